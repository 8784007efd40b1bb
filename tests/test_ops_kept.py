"""Kept keys beside the window (`ops_kept`): the parallel form, calls carried by the state and the decode step against
the quadratic reference, outputs and gradients, at awkward lengths, grouped heads and left padding; and what it keeps."""

import pytest
import torch

from linearize.hf import ops_window
from linearize.hf.ops_kept import decide_block, decode_kept_window_linear, kept_window_linear, naive_kept_window_linear

B, H, HKV, D, V, F = 2, 4, 2, 8, 6, 5


def make(length, seed=0, padded=False, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(requires_grad)

    q, k, v = r(B, H, length, D), r(B, HKV, length, D), r(B, HKV, length, V)
    fq, fk = (torch.softmax(r(B, h, length, F), -1).detach().requires_grad_(requires_grad) for h in (H, HKV))
    mask = torch.ones(B, length, dtype=torch.bool)
    if padded:
        mask[0, : min(5, length)] = False
    share = torch.sigmoid(torch.randn(H, generator=g, dtype=torch.float64))
    return (q, k, v, fq, fk), dict(scaling=D**-0.5, sm_weight=share, ln_weight=1 - share, key_mask=mask)


def part(tensors, options, start, end):
    """The tensors and key mask of positions start..end."""
    return [t[:, :, start:end] for t in tensors], {**options, "key_mask": options["key_mask"][:, start:end]}


SIZES = [dict(window=5, keep=3, block=4), dict(window=8, keep=2, block=8), dict(window=1, keep=5, block=3), dict(window=16, keep=7, block=8)]


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("length", [1, 10, 63, 130])
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "w{window}-n{keep}-b{block}".format(**s))
def test_every_form_matches_the_reference(sizes, length, padded):
    tensors, options = make(length, padded=padded)
    options.update(sizes)
    expected = naive_kept_window_linear(*tensors, **options)
    whole, final = kept_window_linear(*tensors, output_state=True, **options)
    torch.testing.assert_close(whole, expected, atol=1e-12, rtol=1e-10)
    cuts = sorted({0, min(7, length), length // 2, length})  # pieces that start and end inside blocks
    state, pieces = None, []
    for start, end in zip(cuts, cuts[1:]):
        out, state = kept_window_linear(*part(tensors, options, start, end)[0], state=state, position=start, output_state=True,
                                        **part(tensors, options, start, end)[1])
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 2), expected, atol=1e-12, rtol=1e-10)
    for name in final:
        torch.testing.assert_close(state[name], final[name], atol=1e-12, rtol=1e-10, msg=lambda m: f"carried state {name}: {m}")
    state, steps = None, []
    for t in range(length):
        out, state = decode_kept_window_linear(*part(tensors, options, t, t + 1)[0], state=state, position=t, **part(tensors, options, t, t + 1)[1])
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 2), expected, atol=1e-12, rtol=1e-10)
    for name in final:
        torch.testing.assert_close(state[name], final[name], atol=1e-12, rtol=1e-10, msg=lambda m: f"decoded state {name}: {m}")


@pytest.mark.parametrize("length", [63, 130])
def test_gradients_match_the_reference(length):
    tensors, options = make(length, requires_grad=True, padded=True)
    options.update(window=5, keep=3, block=8)
    probe = torch.randn(B, H, length, V, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = torch.autograd.grad((naive_kept_window_linear(*tensors, **options) * probe).sum(), tensors)
    got = torch.autograd.grad((kept_window_linear(*tensors, **options)[0] * probe).sum(), tensors)
    for name, a, b in zip(["q", "k", "v", "fq", "fk"], got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=lambda m: f"gradient of {name}: {m}")


def test_segments_of_a_long_prefill_match_one_pass(monkeypatch):
    tensors, options = make(130, padded=True)
    options.update(window=5, keep=3, block=4)
    whole, final = kept_window_linear(*tensors, output_state=True, **options)
    monkeypatch.setattr(ops_window, "BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(ops_window, "MIN_BLOCK_TOKENS", 12)  # 12 tokens a segment: boundaries inside and between them
    segmented, state = kept_window_linear(*tensors, output_state=True, **options)
    torch.testing.assert_close(segmented, whole, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(state["S"], final["S"], atol=1e-12, rtol=1e-10)


def test_keeping_every_key_is_causal_softmax_attention():
    """With room for every key nothing is folded: the output is softmax attention, whatever the features and shares."""
    tensors, options = make(70)
    options.update(window=4, keep=70, block=8)
    q, k, v = tensors[:3]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=D**-0.5)
    torch.testing.assert_close(kept_window_linear(*tensors, **options)[0], expected, atol=1e-12, rtol=1e-10)


def test_it_keeps_the_keys_the_state_recalls_worst():
    """Keys of one feature vector are recalled as the mean of the values before them: the keys whose values stand out
    from that mean are kept, the first key (nothing predicts it) among them, and their errors with them."""
    length, outliers = 40, [11, 23]
    (q, k, v, fq, fk), options = make(length)
    fk = torch.full_like(fk, 1.0 / F)
    v = v * 0.01
    v[:, :, outliers] = 5.0
    options.update(window=4, keep=3, block=4)
    _, state = kept_window_linear(q, k, v, fq, fk, output_state=True, **options)
    kept = (state["v"][:, :, :3] == 5.0).all(-1).sum(-1)  # the kept keys are the state's first rows
    assert (kept == 2).all()
    assert torch.isinf(state["err"][..., 0]).all() and (state["err"][..., 1:] > 1.0).all()


def test_a_step_writes_its_key_into_its_row_of_the_ring():
    """Position p sits in row N + p mod R (R = w + B - 1) of the state: a step writes its key, value, features and mask
    there, in place when autograd records nothing (the rest of the state untouched), into copies when it does."""
    tensors, options = make(14)
    options.update(window=5, keep=3, block=4)  # R = 8: position 12 in row 3 + 4
    _, state = kept_window_linear(*part(tensors, options, 0, 12)[0], output_state=True, **part(tensors, options, 0, 12)[1])
    before = {name: t.clone() for name, t in state.items()}
    step = part(tensors, options, 12, 13)
    _, recorded = decode_kept_window_linear(*step[0], state=state, position=12, **step[1])  # grad mode: copies
    assert all(torch.equal(state[name], before[name]) for name in state)
    with torch.no_grad():
        _, new = decode_kept_window_linear(*step[0], state=state, position=12, **step[1])
    assert all(new[name] is state[name] for name in state)
    _, k, v, _, fk = tensors
    for name, x in (("k", k), ("v", v), ("fk", fk)):
        assert torch.equal(new[name][:, :, 7], x[:, :, 12]) and torch.equal(recorded[name], new[name])
        changed = (new[name] != before[name]).any(-1).any(0).any(0)
        assert changed.nonzero().flatten().tolist() == [7]
    assert new["mask"][:, :, 7].all() and not before["mask"][:, :, 7].any()


def test_a_step_on_the_devices_position_then_its_decision_is_the_step_that_decides():
    """What a compiled step does (`decide=False`, the position a 0-d tensor, written in place) and the decision that
    follows it (`decide_block` on a 0-d tensor, as a captured decision reads it) give, bit for bit, the step at an int
    position that decides a block itself (position 11 ends a block of 4)."""
    tensors, options = make(14)
    options.update(window=5, keep=3, block=4)
    _, state = kept_window_linear(*part(tensors, options, 0, 11)[0], output_state=True, **part(tensors, options, 0, 11)[1])
    step = part(tensors, options, 11, 12)
    with torch.no_grad():
        out, expected = decode_kept_window_linear(*step[0], state={n: t.clone() for n, t in state.items()}, position=11, **step[1])
        got_out, stepped = decode_kept_window_linear(*step[0], state=state, position=torch.tensor(11), decide=False, **step[1])
        assert all(stepped[name] is state[name] for name in state)  # in place, as a static state's tensors
        decided = decide_block(stepped, torch.tensor(11), window=5, keep=3, block=4)
    assert torch.equal(got_out, out)
    assert decided.keys() == expected.keys() and all(torch.equal(decided[n], expected[n]) for n in expected)


def test_a_state_made_under_inference_mode_decodes_outside_it():
    """torch refuses to write in place, outside inference mode, a tensor made inside it: such a state is copied."""
    tensors, options = make(10)
    options.update(window=5, keep=3, block=4)
    with torch.inference_mode():
        _, state = kept_window_linear(*part(tensors, options, 0, 9)[0], output_state=True, **part(tensors, options, 0, 9)[1])
    step = part(tensors, options, 9, 10)
    with torch.no_grad():
        out, new = decode_kept_window_linear(*step[0], state=state, position=9, **step[1])
    expected = naive_kept_window_linear(*tensors, **options)[:, :, 9:]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    assert not new["k"].is_inference() and state["k"].is_inference()


def test_sizes_below_one_are_refused():
    tensors, options = make(4)
    with pytest.raises(ValueError, match="kept keys need window, keep and block of at least 1, got 4, 0, 8"):
        kept_window_linear(*tensors, window=4, keep=0, block=8, **options)
