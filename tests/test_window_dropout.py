"""Window dropout: while a stage trains, whole heads of a windowed mixer lose their softmax window; never at eval."""

import pytest
import torch

import linearize
from linearize.distillation import LoraKDConfig, Session
from linearize.distillation.stages import lora_kd
from linearize.hf.errors import LinearizeError
from linearize.hf.mixers import mixers_in
from tests.mixer_steps import converted_mixer, layer_inputs, parallel
from tests.tiny import tiny_data, tiny_model


@pytest.mark.parametrize("name", ["gated_deltanet", "gla", "mamba2"])
def test_a_dropped_window_leaves_whole_heads_to_the_linear_part_in_training_only(name):
    model, mixer = converted_mixer(name, window=4)
    hidden, position_embeddings, _ = layer_inputs(model, 4, 10, pad=0, offset=0)

    def heads(training: bool, dropout: float, seed: int = 0) -> torch.Tensor:
        mixer.train(training)
        mixer.window_dropout = dropout
        torch.manual_seed(seed)
        with torch.no_grad():
            return parallel(mixer, hidden, position_embeddings, None)

    kept = heads(False, 0.0)
    assert torch.equal(heads(True, 0.0), kept) and torch.equal(heads(False, 0.5), kept)  # eval mode never drops
    linear = heads(True, 1.0)  # every window dropped: the linear part alone
    assert not torch.allclose(linear, kept)
    mixed = heads(True, 0.5, seed=1)
    # Each (sequence, head) is wholly one or the other, and both happen.
    whole = [[torch.equal(mixed[b, h], kept[b, h]) or torch.equal(mixed[b, h], linear[b, h]) for h in range(mixed.shape[1])] for b in range(4)]
    assert all(all(row) for row in whole)
    dropped = sum(torch.equal(mixed[b, h], linear[b, h]) for b in range(4) for h in range(mixed.shape[1]))
    assert 0 < dropped < 4 * mixed.shape[1]


def test_a_stage_sets_window_dropout_while_it_trains_and_clears_it_after():
    data = tiny_data(seq_len=16)
    model = linearize.convert(tiny_model("llama", dtype=torch.float32), "gated_deltanet", window=4)
    seen = []
    for mixer in mixers_in(model):
        mixer.register_forward_pre_hook(lambda module, args: seen.append(module.dropped_window()))
    lora_kd.run(model, data, LoraKDConfig(tokens=16 * 2 * 2, batch_size=2, window_dropout=0.25), Session(progress=False, log=lambda m: None))
    assert set(seen) == {0.0, 0.25}  # the student's passes drop windows; the teacher's (eval mode) never do
    assert all(m.window_dropout == 0.0 for m in mixers_in(model))
    with pytest.raises(LinearizeError, match=r"window_dropout needs converted layers .* set stages.0.window_dropout=0"):
        lora_kd.run(linearize.convert(tiny_model("llama", dtype=torch.float32), "hedgehog"), data,
                    LoraKDConfig(tokens=16 * 2 * 2, batch_size=2, window_dropout=0.25), Session(progress=False, log=lambda m: None))
    with pytest.raises(LinearizeError, match=r"window_dropout is a probability in \[0, 1\)"):
        LoraKDConfig(window_dropout=1.0)
