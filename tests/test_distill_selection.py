"""Automatic layer selection: the layers whose conversion hurts most (normalised error) keep softmax attention."""

import json
import re

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import linearize
from linearize.config import SelectionConfig, load_recipe
from linearize.distillation import layer_errors, select_attention
from linearize.distillation.selection import (
    METHODS, auto_amount, auto_count, by_heads, interleaved, leading_layers, needles, next_token_logprobs, opening_gains, openings, restore_gains, retrieval_heads,
    retrieval_windows, single_layer_kl, token_kl,
)
from linearize.hf.mixers import mixers_in
from linearize.hf.errors import LinearizeError
from linearize.run import validate_recipe
from linearize.surgery import revert_to_attention
from tests.tiny import assert_reloaded, tiny_data, tiny_model, tiny_tokenizer

LAYERS = 6


@pytest.fixture(scope="module")
def windows():
    return tiny_data(seq_len=32).heldout_windows(32, 512)


def student():
    return linearize.convert(tiny_model("llama", dtype=torch.float32, num_hidden_layers=LAYERS), "hedgehog")


def top(errors, key, count):
    return sorted(sorted(errors, key=lambda i: errors[i][key], reverse=True)[:count])


def test_selection_follows_the_normalised_error_where_the_raw_error_disagrees(windows, tmp_path):
    model = student()
    last = LAYERS - 1
    base = layer_errors(model, windows)
    # Scaling the last layer's output projection scales its teacher and student outputs alike: its normalised
    # error stays, its raw error moves by the square, and no other layer sees the change. Push it to the top of
    # the raw ranking unless it already leads the normalised one; then push it to the bottom.
    leads = top(base, "normalized", 1) == [last]
    with torch.no_grad():
        model.model.model.layers[last].self_attn.attn.o_proj.weight.mul_(0.01 if leads else 100.0)
    errors = layer_errors(model, windows)
    assert all(errors[i]["normalized"] == pytest.approx(base[i]["normalized"], rel=1e-4) for i in errors)
    assert top(errors, "mse", 1) != top(errors, "normalized", 1)

    plain = model.state_dict()
    selection = select_attention(model, windows, 2, SelectionConfig())
    assert selection["kept_attention"] == top(errors, "normalized", 2) != top(errors, "mse", 2)
    assert set(selection["seconds"]) == {"error", "total"} and 0 <= selection["seconds"]["error"] <= selection["seconds"]["total"]
    recorded = {f["layer"]: f for f in selection["layers"]}
    assert set(recorded) == set(range(LAYERS))
    for i in recorded:
        assert recorded[i]["normalized"] == pytest.approx(errors[i]["normalized"])
        assert recorded[i]["mse"] == pytest.approx(errors[i]["mse"])
    assert sorted(recorded[i]["rank"] for i in recorded) == list(range(1, LAYERS + 1))

    kept = selection["kept_attention"]
    assert model.config.selection == {key: value for key, value in selection.items() if key != "seconds"}
    assert [e["mixer"] for e in model.config.layers] == ["attention" if i in kept else "hedgehog" for i in range(LAYERS)]
    for i, layer in enumerate(model.model.model.layers):
        assert getattr(layer.self_attn, "is_linearize_mixer", False) == (i not in kept)
    # The kept layers are the teacher's modules (their weights unchanged); the rest still hold their mixers.
    def name_before(key):  # model.model.layers.<i>.self_attn.<...>: a kept layer lost the mixer's ".attn"
        reverted = ".self_attn." in key and int(key.split(".")[3]) in kept
        return key.replace(".self_attn.", ".self_attn.attn.", 1) if reverted else key

    assert all(torch.equal(v, plain[name_before(k)]) for k, v in model.state_dict().items())

    ids = windows[:2]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.selection == model.config.selection and reloaded.config.layers == model.config.layers
    assert_reloaded(reloaded, model, input_ids=ids)


def test_kl_scoring_ranks_by_the_single_layer_kl(windows):
    model = student()
    kl = single_layer_kl(model, windows[:4])
    selection = select_attention(model, windows[:4], 2, SelectionConfig(kl=True))
    assert selection["kept_attention"] == sorted(sorted(kl, key=kl.get, reverse=True)[:2])
    assert all(f["kl"] == pytest.approx(kl[f["layer"]]) for f in selection["layers"])
    assert "KL" in selection["method"]


def test_the_kl_of_one_converted_layer_is_that_layers_doing(windows):
    model = student()
    with torch.no_grad(), linearize.teacher_mode(model):
        teacher = model(input_ids=windows[:2]).logits
        model.model.model.layers[2].self_attn.teacher = False
        only_two = model(input_ids=windows[:2]).logits
    kl = single_layer_kl(model, windows[:2])
    assert all(value > 0 for value in kl.values())
    from linearize.distillation.stages.lora_kd import kd_losses

    assert kl[2] == pytest.approx(kd_losses(only_two, teacher, windows[:2], 1.0)[0].item(), rel=1e-5)


def test_auto_selection_in_a_recipe_runs_after_attention_transfer(tmp_path):
    data = tiny_data(seq_len=32)
    recipe = load_recipe(
        "quickstart",
        [
            "convert.mixer=hedgehog",
            "convert.options={}",
            "convert.keep_attention=auto:0.34",
            "data.seq_len=32",
            "stages=[{kind: attention_transfer, tokens: 256, batch_size: 2, lr: 0.05}]",
        ],
    )
    messages = []
    model = linearize.distill(tiny_model("llama", dtype=torch.float32, num_hidden_layers=LAYERS), data, recipe, log=messages.append, progress=False)
    kept = model.config.selection["kept_attention"]
    assert len(kept) == 2  # round(0.34 * 6)
    assert sum(e["mixer"] == "attention" for e in model.config.layers) == 2
    assert any("softmax attention kept in layers" in m and str(kept) in m for m in messages)


@pytest.mark.parametrize(
    "spec, count",
    [("auto:2", 2), ("auto:0.25", 8), ("auto:0.5", 15), (" auto:1 ", 1)],
)
def test_auto_counts(spec, count):
    assert auto_count(auto_amount(spec), 30) == count


@pytest.mark.parametrize("spec, message", [("auto:0", "cannot read"), ("auto:1.5", "cannot read"), ("auto", "cannot read"), ("auto:x", "cannot read")])
def test_bad_auto_specs(spec, message):
    with pytest.raises(LinearizeError, match=message):
        auto_amount(spec)


def test_auto_counts_out_of_range():
    with pytest.raises(LinearizeError, match="^keep_attention: auto:30 chooses 30 of 30 layers; choose at least one and leave at least one$"):
        auto_count(30.0, 30)
    with pytest.raises(LinearizeError, match="^serve.layers: auto:0.01 chooses 0 of 30 layers"):
        auto_count(0.01, 30, "serve.layers")
    with pytest.raises(LinearizeError, match="^serve.layers: cannot read 'auto:x'"):
        auto_amount("auto:x", "serve.layers")
    assert auto_amount([0, 1]) is None and auto_amount("every:2") is None


def test_revert_checks_before_changing_anything():
    model = linearize.convert(tiny_model("llama", dtype=torch.float32), "hedgehog", keep_attention=[0])
    before = [type(layer.self_attn) for layer in model.model.model.layers]
    for layers, message in (([0], "already has softmax attention"), ([1, 2], "would leave no converted layer"), ([1, 7], "out of range")):
        with pytest.raises(LinearizeError, match=message):
            revert_to_attention(model, layers)
        assert [type(layer.self_attn) for layer in model.model.model.layers] == before
    assert revert_to_attention(model, [2]) == [2]
    assert isinstance(model.model.model.layers[2].self_attn, nn.Module) and not getattr(model.model.model.layers[2].self_attn, "is_linearize_mixer", False)


def test_restore_scoring_proposes_per_scorer_and_the_closest_model_wins(windows):
    """restore: each layer's gain is the fall of the fully converted model's KL when it alone is restored; every
    scorer's proposal is measured with its layers restored, and the lowest KL is kept."""
    model = student()
    converted, gains = restore_gains(model, windows[:4])
    assert converted > 0 and set(gains) == {m.layer_idx for m in mixers_in(model)}
    selection = select_attention(model, windows[:4], 2, SelectionConfig(kl=True, restore=True))
    candidates = selection["candidates"]
    assert set(candidates) == {"attention-transfer MSE / teacher output mean square", "single-layer logit KL", "restore-one-layer KL gain"}
    best = min(candidates, key=lambda name: candidates[name]["kl"])
    assert selection["method"] == best and selection["kept_attention"] == candidates[best]["kept_attention"]
    assert candidates["restore-one-layer KL gain"]["kept_attention"] == sorted(sorted(gains, key=gains.get, reverse=True)[:2])
    assert all(f["restore_gain"] == pytest.approx(gains[f["layer"]]) for f in selection["layers"])
    assert selection["converted_kl"] == pytest.approx(converted) and all(c["kl"] < converted for c in candidates.values())
    spent = selection["seconds"]
    assert set(spent) == {"error", "kl", "restore", "candidates", "total"}
    assert sum(value for name, value in spent.items() if name != "total") <= spent["total"] + 0.05


@pytest.fixture(scope="module")
def long_windows():
    return tiny_data(seq_len=32).heldout_windows(512, 4096)[:2]


def test_retrieval_tasks_mark_the_positions_that_predict_their_answers(long_windows):
    """Selection's retrieval tasks: passkey, needle and multi-key needle of the training pool in turn, as long as
    the filler windows, seeded; the mask marks the positions that predict the answer."""
    tokenizer = tiny_tokenizer()
    tasks, answers = retrieval_windows(tokenizer, long_windows, 3)
    assert tasks.shape == (3, 512) and answers.shape == (3, 512)
    for row, words in zip(range(3), ("pass key", "special magic number", "special magic number")):
        text = tokenizer.decode(tasks[row])
        assert words in text
        predicted = tokenizer.decode(tasks[row, answers[row].nonzero().flatten() + 1])
        assert predicted.startswith(" ") and predicted.endswith(".") and predicted.strip(" .").isdigit()
        assert len(predicted.strip(" .")) in (4, 6, 7) and text.endswith(predicted.strip())  # evaluation's have 5
        assert answers[row, -1].item() is False
    again, _ = retrieval_windows(tokenizer, long_windows, 3)
    assert torch.equal(tasks, again)
    with pytest.raises(LinearizeError, match="raise convert.selection.seq_len"):
        retrieval_windows(tokenizer, long_windows[:, :128], 1)


def test_retrieval_scoring_proposes_the_layers_answers_need_and_the_lowest_sum_wins(long_windows):
    """retrieval: each layer's gain is the fall of the KL at the answers when it alone is restored; that ranking
    proposes its layers, and so does it in turn with the text's; every proposal is measured on text and at the
    answers, and the lowest sum wins."""
    tokenizer = tiny_tokenizer()
    model = student()
    tasks, answers = retrieval_windows(tokenizer, long_windows, 3)
    converted, gains = restore_gains(model, tasks, 4, answers)
    with torch.no_grad(), linearize.teacher_mode(model):
        teacher = model(input_ids=tasks).logits
    with torch.no_grad():
        assert converted == pytest.approx(token_kl(model(input_ids=tasks).logits, teacher)[answers].mean().item(), rel=1e-5)
    selection = select_attention(model, long_windows, 2, SelectionConfig(kl=True, retrieval=3), tokenizer=tokenizer)
    candidates = selection["candidates"]
    assert set(candidates) == {"attention-transfer MSE / teacher output mean square", "single-layer logit KL",
                               "restore-one-layer KL gain at retrieval answers", "retrieval and text rankings in turn"}
    by_gain = sorted(gains, key=gains.get, reverse=True)
    assert candidates["restore-one-layer KL gain at retrieval answers"]["kept_attention"] == sorted(by_gain[:2])
    by_kl = sorted((f["layer"] for f in selection["layers"]), key=lambda i: next(f["kl"] for f in selection["layers"] if f["layer"] == i), reverse=True)
    assert candidates["retrieval and text rankings in turn"]["kept_attention"] == sorted(interleaved(by_gain, by_kl)[:2])
    best = min(candidates, key=lambda name: candidates[name]["kl"] + candidates[name]["answer_kl"])
    assert selection["method"] == best and selection["kept_attention"] == candidates[best]["kept_attention"]
    assert all(f["retrieval_gain"] == pytest.approx(gains[f["layer"]]) for f in selection["layers"])
    assert selection["converted_answer_kl"] == pytest.approx(converted) and selection["retrieval_tasks"] == 3
    assert set(selection["seconds"]) == {"error", "kl", "retrieval", "candidates", "candidates_at_answers", "total"}
    assert sum(e["mixer"] == "attention" for e in model.config.layers) == 2


def test_retrieval_scoring_needs_the_tokenizer_and_a_count(long_windows):
    with pytest.raises(LinearizeError, match="needs the tokenizer"):
        select_attention(student(), long_windows, 2, SelectionConfig(retrieval=3))
    with pytest.raises(LinearizeError, match="convert.selection.retrieval"):
        SelectionConfig(retrieval=-1)
    assert interleaved([3, 1, 2], [1, 4, 3]) == [3, 1, 4, 2]


def test_a_recipe_chooses_by_retrieval_answers_and_a_short_length_is_refused_before_training():
    data, tokenizer = tiny_data(seq_len=32), tiny_tokenizer()
    overrides = ["convert.mixer=hedgehog", "convert.options={}", "convert.keep_attention=auto:2", "data.seq_len=32",
                 "stages=[{kind: attention_transfer, tokens: 256, batch_size: 2, lr: 0.05}]", "convert.selection.retrieval=3"]
    messages = []
    with pytest.raises(LinearizeError, match="raise convert.selection.seq_len"):
        linearize.distill(tiny_model("llama", dtype=torch.float32, num_hidden_layers=LAYERS), data, "quickstart", tokenizer=tokenizer,
                          overrides=overrides, log=messages.append, progress=False)
    assert not any("attention_transfer" in m for m in messages)
    with pytest.raises(LinearizeError, match="needs the tokenizer"):
        linearize.distill(tiny_model("llama", dtype=torch.float32, num_hidden_layers=LAYERS), data, "quickstart", overrides=overrides, progress=False)
    model = linearize.distill(tiny_model("llama", dtype=torch.float32, num_hidden_layers=LAYERS), data, "quickstart", tokenizer=tokenizer,
                              overrides=overrides + ["convert.selection.seq_len=512", "convert.selection.tokens=1024"], log=messages.append, progress=False)
    assert model.config.selection["retrieval_tasks"] == 3 and len(model.config.selection["kept_attention"]) == 2
    assert any("at retrieval answers" in m for m in messages) and any("/retrieval " in m for m in messages)


def test_needles_mark_every_place_the_context_states_the_answer(long_windows):
    """A passkey is stated twice, a needle once; a task whose context lost its answer has no needle."""
    tasks, answers = retrieval_windows(tiny_tokenizer(), long_windows, 3)
    found = needles(tasks, answers)
    for row, times in zip(range(3), (2, 1, 1)):
        digits = tasks[row, answers[row].nonzero().flatten()[1:]]  # the answer's tokens before its full stop
        assert int(found[row].sum()) == times * len(digits)
        assert torch.equal(tasks[row, found[row]], digits.repeat(times))
        assert not found[row, answers[row].nonzero().flatten()[0] + 1 :].any()  # never the answer itself
    lost = tasks.clone()
    lost[0, found[0]] = 3
    assert not needles(lost, answers)[0].any() and torch.equal(needles(lost, answers)[1:], found[1:])


@pytest.mark.parametrize("mixer, options", [("hedgehog", {}), ("hedgehog_swa", {"window": 4, "linear_rope": False})], ids=["hedgehog", "hybrid_long"])
def test_retrieval_heads_are_the_teachers_attention_on_the_needles(long_windows, mixer, options):
    """Each head's score is the teacher's own attention probability (transformers' eager attention) on the needle's
    tokens, from the positions that predict the answer, averaged over those positions and the tasks; whatever the
    mixer around them (`hybrid_long`'s reads q and k before RoPE)."""
    tasks, answers = retrieval_windows(tiny_tokenizer(), long_windows, 3)
    teacher = tiny_model("llama", dtype=torch.float32, num_hidden_layers=3, attn_implementation="eager")
    with torch.no_grad():
        for layer in teacher.model.layers:  # sharper attention, so that heads differ and their order is checked
            layer.self_attn.q_proj.weight.mul_(30.0)
            layer.self_attn.k_proj.weight.mul_(30.0)
        probs = teacher(input_ids=tasks, output_attentions=True).attentions  # per layer (B, H, T, T)
    found = needles(tasks, answers)
    expected = {
        layer: torch.stack([p[b][:, answers[b]][..., found[b]].sum(-1).mean(-1) for b in range(len(tasks))]).mean(0)
        for layer, p in enumerate(probs)
    }
    heads = retrieval_heads(linearize.convert(teacher, mixer, **options), tasks, answers, batch_size=2)
    assert set(heads) == {0, 1, 2}
    for layer, per_head in heads.items():
        assert torch.allclose(torch.tensor(per_head, dtype=torch.float32), expected[layer], atol=1e-5)
    assert all(max(h) > 2 * min(h) for h in heads.values())
    lost = tasks.clone()
    lost[:, found.any(0)] = 3
    with pytest.raises(LinearizeError, match="no task states its answer"):
        retrieval_heads(linearize.convert(tiny_model("llama", dtype=torch.float32, num_hidden_layers=2), "hedgehog"), lost, answers)


def test_heads_selection_keeps_the_strongest_heads_layers_whatever_the_others_measure(long_windows):
    tokenizer = tiny_tokenizer()
    model = student()
    heads = retrieval_heads(model, *retrieval_windows(tokenizer, long_windows, 3))
    strongest = sorted(sorted(heads, key=lambda layer: max(heads[layer]), reverse=True)[:2])
    selection = select_attention(model, long_windows, 2, SelectionConfig(restore=True, heads=3), tokenizer=tokenizer)
    assert selection["method"] == METHODS["heads"] and selection["kept_attention"] == strongest
    assert selection["candidates"][METHODS["heads"]]["kept_attention"] == strongest  # measured beside the others
    assert METHODS["restore"] in selection["candidates"] and selection["head_tasks"] == 3
    assert set(selection["seconds"]) == {"error", "restore", "heads", "candidates", "total"}
    assert all(f["retrieval_head"] == pytest.approx(max(heads[f["layer"]])) for f in selection["layers"])
    assert selection["heads"] == {str(layer): pytest.approx(per_head) for layer, per_head in heads.items()}
    assert [e["mixer"] == "attention" for e in model.config.layers] == [i in strongest for i in range(LAYERS)]
    with pytest.raises(LinearizeError, match="convert.selection.heads needs the tokenizer"):
        select_attention(student(), long_windows, 2, SelectionConfig(heads=3))
    with pytest.raises(LinearizeError, match="convert.selection.heads"):
        SelectionConfig(heads=-1)


def distilled_with_heads(*overrides: str) -> tuple[dict, list[str]]:
    """A tiny attention transfer that keeps 2 of LAYERS layers by the teacher's retrieval heads (3 tasks of 512
    tokens), with `overrides`: the saved selection and what the run said."""
    overrides = ["convert.mixer=hedgehog", "convert.options={}", "convert.keep_attention=auto:2", "data.seq_len=32",
                 "stages=[{kind: attention_transfer, tokens: 256, batch_size: 2, lr: 0.05}]", "convert.selection.heads=3",
                 "convert.selection.seq_len=512", "convert.selection.tokens=1024", *overrides]
    messages = []
    model = linearize.distill(tiny_model("llama", dtype=torch.float32, num_hidden_layers=LAYERS), tiny_data(seq_len=32), "quickstart",
                              tokenizer=tiny_tokenizer(), overrides=overrides, log=messages.append, progress=False)
    return model.config.selection, messages


def test_a_recipe_keeps_the_teachers_retrieval_heads_and_says_so():
    selection, messages = distilled_with_heads()
    assert selection["method"] == METHODS["heads"] and selection["head_tasks"] == 3 and len(selection["kept_attention"]) == 2
    assert any(f"selection by {METHODS['heads']}" in m and "/head " in m for m in messages)
    took = [m for m in messages if m.strip().startswith("selection took")]
    assert len(took) == 1 and re.fullmatch(r"selection took [0-9.]+ s \(error [0-9.]+ s, heads [0-9.]+ s\)", took[0].strip()), took
    assert "seconds" not in selection  # timings stay out of the saved config


def test_openings_are_where_each_answers_first_token_is_predicted(long_windows):
    tokenizer = tiny_tokenizer()
    tasks, answers = retrieval_windows(tokenizer, long_windows, 3)
    first = openings(answers)
    assert first.sum(-1).tolist() == [1, 1, 1] and not (first & ~answers).any()
    for row in range(3):
        at = int(first[row].nonzero()[0])
        assert not answers[row, :at].any()
        assert tokenizer.decode(tasks[row, at + 1 : at + 2]).startswith(" ")  # the number's opening
    assert not openings(torch.zeros(2, 5, dtype=torch.bool)).any()
    logits = torch.randn(2, 6, 11, dtype=torch.bfloat16)
    batch = torch.randint(0, 11, (2, 6))
    taken = next_token_logprobs(logits, batch)
    assert taken.dtype == torch.float32 and taken[:, -1].eq(0).all()
    expected = torch.log_softmax(logits.float(), -1)[torch.arange(2)[:, None], torch.arange(5)[None], batch[:, 1:]]
    assert torch.allclose(taken[:, :-1], expected)


def opening_logprob(model, tasks, answers, restored):
    """The mean log-probability of the answers' first tokens with `restored` on softmax, computed directly."""
    first = openings(answers)
    with torch.no_grad():
        for mixer in mixers_in(model):
            mixer.teacher = mixer.layer_idx in restored
        try:
            logprobs = torch.log_softmax(model(input_ids=tasks).logits.float(), -1)
        finally:
            for mixer in mixers_in(model):
                mixer.teacher = False
    rows, at = first.nonzero(as_tuple=True)
    return logprobs[rows, at, tasks[rows, at + 1]].mean().item()


def test_opening_gains_add_the_layers_that_most_raise_the_answers_first_token(long_windows):
    """Each step restores every layer not yet chosen beside the chosen ones and adds the one whose restoring most
    raises the log-probability of the answers' first tokens."""
    model = student()
    tasks, answers = retrieval_windows(tiny_tokenizer(), long_windows, 3)
    added, steps = opening_gains(model, tasks, answers, [2], 2, batch_size=2)
    assert len(added) == 2 and len(steps) == 2 and 2 not in added and added[0] != added[1]
    chosen = [2]
    for step, layer in zip(steps, added):
        assert step["from"] == sorted(chosen) and step["added"] == layer
        before = opening_logprob(model, tasks, answers, set(chosen))
        assert step["opening_logprob"] == pytest.approx(before, abs=1e-4)
        gains = {i: opening_logprob(model, tasks, answers, set(chosen) | {i}) - before for i in range(LAYERS) if i not in chosen}
        assert step["gains"] == {str(i): pytest.approx(gain, abs=1e-4) for i, gain in gains.items()}
        assert layer == max(gains, key=gains.get)
        chosen.append(layer)
    assert not any(m.teacher for m in mixers_in(model))


def test_heads_with_opening_keep_the_strongest_heads_then_the_opening_layers(long_windows):
    tokenizer = tiny_tokenizer()
    model = student()
    head_tasks = retrieval_windows(tokenizer, long_windows, 3)
    heads = retrieval_heads(model, *head_tasks)
    strongest = sorted(heads, key=lambda layer: max(heads[layer]), reverse=True)[:2]
    added, steps = opening_gains(model, *head_tasks, strongest, 1)
    selection = select_attention(model, long_windows, 3, SelectionConfig(restore=True, heads=3, opening=1), tokenizer=tokenizer)
    assert selection["method"] == METHODS["heads_opening"] and selection["kept_attention"] == sorted(strongest + added)
    assert selection["candidates"][METHODS["heads"]]["kept_attention"] == sorted(sorted(heads, key=lambda layer: max(heads[layer]), reverse=True)[:3])
    assert selection["opening"] == json.loads(json.dumps(steps)) and set(selection["seconds"]) == {"error", "restore", "heads", "opening", "candidates", "total"}
    assert {f["layer"] for f in selection["layers"] if "opening_gain" in f} == set(range(LAYERS)) - set(strongest)
    assert json.loads(json.dumps(model.config.selection)) == model.config.selection  # saved as it reloads
    assert [e["mixer"] == "attention" for e in model.config.layers] == [i in strongest + added for i in range(LAYERS)]
    with pytest.raises(LinearizeError, match="leaves none of the 2 kept layers"):
        select_attention(student(), long_windows, 2, SelectionConfig(heads=3, opening=2), tokenizer=tokenizer)
    with pytest.raises(LinearizeError, match="set convert.selection.heads too"):
        SelectionConfig(opening=1)
    with pytest.raises(LinearizeError, match="convert.selection.opening=-1"):
        SelectionConfig(heads=3, opening=-1)


def test_leading_layers_are_the_converted_ones_nearest_before_the_first_chosen():
    assert leading_layers([7, 14, 15, 18], list(range(30)), 1) == [6]
    assert leading_layers([7, 14, 15, 18], [i for i in range(30) if i != 6], 2) == [5, 4]  # 6 is not converted
    assert leading_layers([1, 2, 5], list(range(8)), 3) == [0, 3, 4]  # too few before: the nearest after, not chosen


def test_leading_layers_around_are_the_nearest_on_either_side_before_first_at_a_tie():
    assert leading_layers([7, 14, 15, 18], list(range(30)), 2, around=True) == [6, 8]
    assert leading_layers([7, 8, 14], list(range(30)), 3, around=True) == [6, 5, 9]  # 8 is chosen: 9 is two away
    assert leading_layers([7, 14], [i for i in range(30) if i != 6], 2, around=True) == [8, 5]  # 6 is not converted
    assert leading_layers([0, 14], list(range(30)), 2, around=True) == [1, 2]


def test_by_heads_ranks_by_the_strongest_head_and_puts_the_lead_layers_in_front():
    heads = {0: [0.1, 0.0], 1: [0.0, 0.2], 2: [0.9, 0.3], 3: [0.5, 0.6], 4: [0.05, 0.01]}
    assert by_heads(heads, 2) == [2, 3, 1, 0, 4]
    assert by_heads(heads, 2, lead=1) == [2, 1, 3, 0, 4]  # layer 1, before the strongest, takes the place of layer 3
    assert by_heads(heads, 3, lead=2) == [2, 1, 0, 3, 4]
    assert by_heads(heads, 3, lead=2, around=True) == [2, 1, 3, 0, 4]  # 1 and 3 beside the strongest, 2


@pytest.mark.parametrize("lead, around", [(1, False), (2, True)], ids=["before", "around"])
def test_heads_with_lead_keep_the_strongest_heads_and_the_layers_by_the_first(long_windows, lead, around):
    tokenizer = tiny_tokenizer()
    model = student()
    heads = retrieval_heads(model, *retrieval_windows(tokenizer, long_windows, 3))
    ranked = sorted(heads, key=lambda layer: max(heads[layer]), reverse=True)
    strongest = ranked[: 3 - lead]
    chosen = leading_layers(strongest, list(range(LAYERS)), lead, around)
    first = min(strongest)
    assert not set(chosen) & set(strongest)
    assert all(abs(layer - first) <= lead for layer in chosen) if around else (chosen[0] < first or first == 0)
    selection = select_attention(model, long_windows, 3, SelectionConfig(heads=3, lead=lead, around=around), tokenizer=tokenizer)
    assert selection["method"] == METHODS["heads_around" if around else "heads_lead"]
    assert selection["kept_attention"] == sorted(strongest + chosen)
    assert selection["lead"] == {"layers": chosen, "first_head_layer": first, "in_place_of": ranked[3 - lead : 3], **({"around": True} if around else {})}
    assert [f["rank"] for f in sorted(selection["layers"], key=lambda f: f["rank"])][:3] == [1, 2, 3]
    assert {f["layer"] for f in selection["layers"] if f["rank"] <= 3} == set(strongest + chosen)
    assert [e["mixer"] == "attention" for e in model.config.layers] == [i in strongest + chosen for i in range(LAYERS)]
    assert json.loads(json.dumps(model.config.selection)) == model.config.selection
    with pytest.raises(LinearizeError, match="convert.selection.lead=2 leaves none of the 2 kept layers"):
        select_attention(student(), long_windows, 2, SelectionConfig(heads=3, lead=2), tokenizer=tokenizer)
    with pytest.raises(LinearizeError, match="convert.selection.lead=1: .* set convert.selection.heads too"):
        SelectionConfig(lead=1)
    with pytest.raises(LinearizeError, match="opening=1 and lead=1 both choose .* set one of them to 0"):
        SelectionConfig(heads=3, opening=1, lead=1)


def test_a_recipe_keeps_the_lead_layers_and_says_which():
    selection, messages = distilled_with_heads("convert.selection.lead=1")
    lead = selection["lead"]
    assert selection["method"] == METHODS["heads_lead"] and sorted(lead["layers"] + [lead["first_head_layer"]]) == selection["kept_attention"]
    said = [m.strip() for m in messages if "kept before the first retrieval-head layer" in m]
    assert said == [f"layers {lead['layers']} kept before the first retrieval-head layer {lead['first_head_layer']}, in place of {lead['in_place_of']}"]


def test_a_recipe_adds_the_opening_layers_and_says_which():
    selection, messages = distilled_with_heads("convert.selection.opening=1")
    (step,) = selection["opening"]
    assert selection["method"] == METHODS["heads_opening"] and step["added"] in selection["kept_attention"] and len(selection["kept_attention"]) == 2
    said = [m.strip() for m in messages if "added (" in m]
    assert said == [f"with layers {step['from']} on softmax the answers open at log-probability {step['opening_logprob']:.3f};"
                    f" layer {step['added']} added ({step['gains'][str(step['added'])]:+.3f})"]
    assert any("/opening " in m for m in messages)


def test_a_recipe_serves_the_layers_of_the_teachers_retrieval_heads_with_their_own_options():
    """`serve.layers` sets options on some layers after `serve`'s own on all: `auto:N` on the N layers ranked by the
    teacher's strongest retrieval head (with the lead layer), as an independent count of the heads finds them, an
    explicit selection on its layers; the choice is said and saved in the plan. Bad forms fail before loading."""
    overrides = [
        "convert.mixer=hedgehog_swa", "convert.options={window: 8, keep: 4, keep_block: 4, linear_rope: false}", "data.seq_len=32",
        "stages=[{kind: attention_transfer, tokens: 128, batch_size: 2, lr: 0.05}]", "convert.selection.heads=3",
        "convert.selection.lead=1", "convert.selection.seq_len=512", "convert.selection.tokens=1024",
        "serve={keep: 6, layers: {auto:2: {keep: 12}, '5': {keep: 9}}}",
    ]
    teacher, tokenizer = tiny_model("llama", dtype=torch.float32, num_hidden_layers=LAYERS), tiny_tokenizer()
    windows = tiny_data(seq_len=32).heldout_windows(512, 1024)
    converted = linearize.convert(tiny_model("llama", dtype=torch.float32, num_hidden_layers=LAYERS), "hedgehog_swa", window=8, linear_rope=False)
    heads = retrieval_heads(converted, *retrieval_windows(tokenizer, windows, 3, "heads"))
    strongest = max(heads, key=lambda layer: max(heads[layer]))
    chosen = sorted([strongest, *leading_layers([strongest], list(range(LAYERS)), 1)])
    messages = []
    student = linearize.distill(teacher, tiny_data(seq_len=32), "quickstart", tokenizer=tokenizer, overrides=overrides,
                                log=messages.append, progress=False)
    expected = [9 if i == 5 else 12 if i in chosen else 6 for i in range(LAYERS)]
    assert [m.options.keep for m in mixers_in(student)] == expected
    assert [layer["options"]["keep"] for layer in student.config.layers] == expected
    assert any(f"served with keep=12 in layers {chosen} (serve.layers auto:2: the teacher's retrieval heads)" in m for m in messages)
    assert any("served with keep=9 in layers [5] (serve.layers 5)" in m for m in messages)
    with pytest.raises(LinearizeError, match=r"^serve.layers: 'auto:2' ranks layers by the teacher's retrieval heads; set convert.selection.heads \(e.g. 12\)$"):
        validate_recipe(load_recipe("quickstart", ["serve={layers: {auto:2: {keep: 8}}}"]), check_data=False)
    with pytest.raises(LinearizeError, match="^serve.layers must map layer selections to options"):
        validate_recipe(load_recipe("quickstart", ["serve={layers: [1, 2]}"]), check_data=False)
    with pytest.raises(LinearizeError, match=r"^serve.layers\[0\]: no mixer of this recipe takes 'window' after distillation"):
        validate_recipe(load_recipe("quickstart", ["serve={layers: {'0': {window: 8}}}"]), check_data=False)
    with pytest.raises(LinearizeError, match="^serve.layers: layer 9 is out of range"):
        linearize.distill(tiny_model("llama", dtype=torch.float32, num_hidden_layers=LAYERS), tiny_data(seq_len=32), "quickstart",
                          tokenizer=tokenizer, overrides=[*overrides[:-1], "serve={layers: {'9': {keep: 8}}}"], progress=False)
