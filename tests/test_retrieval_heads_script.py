"""benchmarks/retrieval_heads.py: the teacher's layers ranked by their strongest retrieval head."""

import torch

import linearize
from linearize.distillation.selection import retrieval_heads, retrieval_windows
from tests.tiny import benchmark_script, tiny_data, tiny_model, tiny_tokenizer

script = benchmark_script("retrieval_heads")


def test_layers_are_ranked_by_their_strongest_head_over_all_answers_and_over_first_tokens_per_kind():
    model = linearize.convert(tiny_model("llama", dtype=torch.float32, num_hidden_layers=4), "hedgehog")
    tasks, answers = retrieval_windows(tiny_tokenizer(), tiny_data(seq_len=32).heldout_windows(512, 4096)[:2], 3)
    results = script.rankings(model, tasks, answers, keep=2)
    assert set(results) == {"all", "first_passkey", "first_needle", "first_multikey"}
    heads = retrieval_heads(model, tasks, answers)
    order = sorted(heads, key=lambda layer: max(heads[layer]), reverse=True)
    assert [row["layer"] for row in results["all"]["layers"]] == order and results["all"]["kept"] == sorted(order[:2])
    best = results["all"]["layers"][0]
    assert best["score"] == max(heads[best["layer"]]) == heads[best["layer"]][best["head"]]
    first = torch.zeros_like(answers)
    first[0, answers[0].nonzero()[0]] = True  # the passkey task's first answer position only
    passkey = retrieval_heads(model, tasks[:1], first[:1])
    assert results["first_passkey"]["layers"][0]["score"] == max(max(h) for h in passkey.values())
