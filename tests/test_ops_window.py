"""Window + linear attention ops: chunked and recurrent forms against the quadratic reference."""

import pytest
import torch

from linearize.hf import ops_window
from linearize.hf.ops_window import (
    chunk_window_linear, decode_window_linear, masked_scores, naive_window_linear, ordered_state, recurrent_window_linear, ring_state,
)

B, H, D, V, F = 2, 3, 8, 6, 5


def feature(x, w):
    y = torch.einsum("bhtd,hdf->bhtf", x, w)
    return torch.cat((torch.softmax(y, -1), torch.softmax(-y, -1)), -1)


def make(length, context=0, seed=0, padded=False):
    g = torch.Generator().manual_seed(seed)
    total = context + length

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = r(B, H, total, D), r(B, H, total, D), r(B, H, total, V)
    wq, wk = r(H, D, F), r(H, D, F)
    mask = torch.ones(B, total, dtype=torch.bool)
    if padded:
        mask[0, : min(3, total)] = False
    sm = torch.sigmoid(r(H))
    return q, k, v, wq, wk, mask, sm


def run(op, q, k, v, wq, wk, mask, sm, window, state=None, output_state=True, **extra):
    return op(
        q,
        k,
        v,
        feature(q, wq),
        feature(k, wk),
        window=window,
        scaling=D**-0.5,
        sm_weight=sm,
        ln_weight=1 - sm,
        key_mask=mask,
        state=state,
        output_state=output_state,
        **extra,
    )


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double() if a[key].is_floating_point() else a[key], b[key].double() if b[key].is_floating_point() else b[key], atol=1e-10), key


FORMS = [
    ("chunk16", lambda *a, **k: chunk_window_linear(*a, chunk_size=16, **k)),
    ("chunk64", lambda *a, **k: chunk_window_linear(*a, chunk_size=64, **k)),
    ("recurrent", recurrent_window_linear),
]


# Windows shorter than a chunk of 16, as long, and reaching 2, 4 and 7 chunks of 16 back (2 of 64 for 100).
@pytest.mark.parametrize("window", [0, 1, 4, 16, 20, 50, 100])
@pytest.mark.parametrize("length", [1, 63, 130])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("form", FORMS, ids=[f[0] for f in FORMS])
def test_forms_match_reference(form, window, length, with_state, padded):
    _, op = form
    context = 37 if with_state else 0
    q, k, v, wq, wk, mask, sm = make(length, context, seed=length + window, padded=padded)
    state = None
    if with_state:
        _, state = run(naive_window_linear, q[:, :, :context], k[:, :, :context], v[:, :, :context], wq, wk, mask[:, :context], sm, window)
    part = slice(context, None)
    ref, ref_state = run(naive_window_linear, q[:, :, part], k[:, :, part], v[:, :, part], wq, wk, mask[:, part], sm, window, state)
    out, out_state = run(op, q[:, :, part], k[:, :, part], v[:, :, part], wq, wk, mask[:, part], sm, window, state)
    assert torch.allclose(out, ref, atol=1e-10, rtol=1e-9)
    assert_states_equal(out_state, ref_state)


def test_state_passing_equals_one_call():
    q, k, v, wq, wk, mask, sm = make(130, seed=3, padded=True)
    whole, whole_state = run(naive_window_linear, q, k, v, wq, wk, mask, sm, window=8)
    for split in (1, 50, 129):
        first, state = run(chunk_window_linear, q[..., :split, :], k[..., :split, :], v[..., :split, :], wq, wk, mask[:, :split], sm, 8)
        rest, final = run(chunk_window_linear, q[..., split:, :], k[..., split:, :], v[..., split:, :], wq, wk, mask[:, split:], sm, 8, state)
        assert torch.allclose(torch.cat((first, rest), 2), whole, atol=1e-10)
        assert_states_equal(final, whole_state)


def test_naive_matches_explicit_definition():
    """The reference itself, against a per-query loop over the definition in the module docstring."""
    q, k, v, wq, wk, mask, sm = make(17, seed=5, padded=True)
    out, _ = run(naive_window_linear, q, k, v, wq, wk, mask, sm, 5, output_state=False)
    assert_explicit_definition(out, q, k, v, wq, wk, mask, sm, 5)


def assert_explicit_definition(out, q, k, v, wq, wk, mask, sm, window, decay=None):
    """Each query's output against the module docstring's definition, written as a loop over its keys."""
    fq, fk = feature(q, wq), feature(k, wk)
    for b in range(B):
        for h in range(H):
            for t in range(q.shape[2]):
                keys = [s for s in range(t + 1) if mask[b, s]]
                if not keys:
                    continue
                win = [s for s in keys if s > t - window]
                scores = {s: (q[b, h, t] @ k[b, h, s]).item() * D**-0.5 for s in win}
                peak = max(scores.values()) if scores else 0.0
                weights = {s: torch.exp(torch.tensor(scores[s] - peak, dtype=torch.float64)) * sm[h] for s in win}
                fade = 1.0 if decay is None else decay[h]
                weights.update({s: (fq[b, h, t] @ fk[b, h, s]) * (1 - sm[h]) * fade ** (t - window - s) for s in keys if s <= t - window})
                expected = sum(w * v[b, h, s] for s, w in weights.items()) / sum(weights.values())
                assert torch.allclose(out[b, h, t], expected, atol=1e-12)


@pytest.mark.parametrize("length", [1, 63, 130])
# chunks of 16 longer than the window, as long (the linear part's half), and reaching 3 chunks back
@pytest.mark.parametrize("window", [6, 16, 40])
@pytest.mark.parametrize("decayed", [False, True])
def test_gradients_match_reference(length, window, decayed):
    q, k, v, wq, wk, mask, sm = make(length, seed=11, padded=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, wq, wk, sm)]
    extra = {"decay": decays(seed=window)} if decayed else {}
    grads = []
    for op in (naive_window_linear, lambda *a, **kw: chunk_window_linear(*a, chunk_size=16, **kw)):
        for leaf in leaves:
            leaf.grad = None
        qq, kk, vv, wwq, wwk, ssm = leaves
        out, _ = run(op, qq, kk, vv, wwq, wwk, mask, ssm, window=window, output_state=False, **extra)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([leaf.grad.clone() for leaf in leaves])
    for ref, got in zip(*grads):
        assert torch.allclose(got, ref, atol=1e-9)


@pytest.mark.parametrize("dtype,limit", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_close_to_float64(dtype, limit):
    q, k, v, wq, wk, mask, sm = make(130, seed=2)
    ref, _ = run(naive_window_linear, q, k, v, wq, wk, mask, sm, window=16, output_state=False)
    out, _ = run(chunk_window_linear, q.to(dtype), k.to(dtype), v.to(dtype), wq.to(dtype), wk.to(dtype), mask, sm.to(dtype), window=16, output_state=False)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).norm() / ref.norm()).item() < limit


@pytest.mark.parametrize("budget", [1, 2000, 20000])
@pytest.mark.parametrize("with_state", [False, True])
def test_blocks_match_one_pass(monkeypatch, budget, with_state):
    """A long prefill runs a block of chunks at a time (ops_window.BLOCK_ELEMENTS); blocks of one chunk, a few
    chunks and the whole input give the reference's output and state, padding and a carried state included."""
    monkeypatch.setattr(ops_window, "BLOCK_ELEMENTS", budget)
    monkeypatch.setattr(ops_window, "MIN_BLOCK_TOKENS", 1)
    context = 37 if with_state else 0
    q, k, v, wq, wk, mask, sm = make(300, context, seed=budget, padded=True)
    state = None
    if with_state:
        _, state = run(naive_window_linear, q[:, :, :context], k[:, :, :context], v[:, :, :context], wq, wk, mask[:, :context], sm, 20)
    part = slice(context, None)
    ref, ref_state = run(naive_window_linear, q[:, :, part], k[:, :, part], v[:, :, part], wq, wk, mask[:, part], sm, 20, state)
    out, out_state = run(lambda *a, **kw: chunk_window_linear(*a, chunk_size=16, **kw), q[:, :, part], k[:, :, part], v[:, :, part], wq, wk, mask[:, part], sm, 20, state)
    assert torch.allclose(out, ref, atol=1e-10, rtol=1e-9)
    assert_states_equal(out_state, ref_state)


@pytest.mark.parametrize("window", [1, 4, 20])
@pytest.mark.parametrize("context", [0, 2, 37])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("decayed", [False, True])
def test_decode_step_with_grouped_heads_is_the_recurrent_form(window, context, padded, softcap, decayed):
    """decode_window_linear's queries of one kv head read one state, its window a ring: it equals
    recurrent_window_linear on heads repeated per query head, output, next state (per kv head, its ring read in
    order) and gradients, from any context; with a decay per kv head, the recurrent form's repeated per query head."""
    groups, heads = 3, 2
    g = torch.Generator().manual_seed(window + context)
    q = torch.randn(B, heads * groups, context + 1, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, heads, context + 1, n, generator=g, dtype=torch.float64, requires_grad=True) for n in (D, V))
    wq, wk = torch.randn(heads * groups, D, F, generator=g, dtype=torch.float64), torch.randn(heads, D, F, generator=g, dtype=torch.float64)
    mask = torch.ones(B, context + 1, dtype=torch.bool)
    if padded:
        mask[0, : min(3, context + 1)] = False
    sm = torch.sigmoid(torch.randn(heads * groups, generator=g, dtype=torch.float64))
    options = dict(window=window, scaling=D**-0.5, sm_weight=sm, ln_weight=1 - sm, softcap=softcap)
    fq, fk = feature(q, wq), feature(k, wk)

    def repeated(x):
        return x.repeat_interleave(groups, dim=1)

    decay = decays(heads) if decayed else None
    per_query_head = dict(options, decay=None if decay is None else decay.repeat_interleave(groups))
    state = None
    if context:
        _, state = naive_window_linear(q[:, :, :context], repeated(k[:, :, :context]), repeated(v[:, :, :context]), fq[:, :, :context],
                                       repeated(fk[:, :, :context]), key_mask=mask[:, :context], output_state=True, **per_query_head)
    last = slice(context, None)
    ref, ref_state = recurrent_window_linear(q[:, :, last], repeated(k[:, :, last]), repeated(v[:, :, last]), fq[:, :, last],
                                             repeated(fk[:, :, last]), key_mask=mask[:, last], state=state, **per_query_head)
    ring = None
    if state is not None:
        ring = ring_state({n: t[:, ::groups] if t.dim() > 2 else t for n, t in state.items()}, torch.full((B,), context), window)
    out, out_state = decode_window_linear(q[:, :, last], k[:, :, last], v[:, :, last], fq[:, :, last], fk[:, :, last],
                                          key_mask=mask[:, last], state=ring, decay=decay, **options)
    assert torch.allclose(out, ref, atol=1e-12)
    assert torch.equal(out_state["at"], torch.full((B,), context + 1))
    assert_states_equal(ordered_state(out_state, window), {n: t[:, ::groups] if t.dim() > 2 else t for n, t in ref_state.items()})
    probe = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * probe).sum() + out_state["S"].sum(), [q, k, v], retain_graph=True)
    expected = torch.autograd.grad((ref * probe).sum() + ref_state["S"][:, ::groups].sum(), [q, k, v])
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("window", [1, 2, 5])
@pytest.mark.parametrize("seen", [0, 3, 11])
def test_a_ring_holds_position_p_in_row_p_mod_window_and_reads_back_in_order(window, seen):
    """ring_state puts the tail's position p in row p mod window, the next position's row zero and masked; ordered_state
    gives the tail back, left-padding included."""
    tail = min(seen, window - 1)
    positions = torch.arange(seen - (window - 1), seen, dtype=torch.float64)  # negative: left padding
    ordered = {
        "S": torch.randn(1, 2, 3, 4), "z": torch.randn(1, 2, 3),
        **{name: torch.where(positions >= 0, positions, 0.0).view(1, 1, -1, 1).expand(1, 2, -1, 3).clone() for name in ("k", "v", "fk")},
        "mask": (positions >= 0).view(1, -1),
    }
    ring = ring_state(ordered, torch.full((1,), seen), window)
    for p in range(seen - tail, seen):
        assert ring["k"][0, :, p % window].eq(p).all() and ring["mask"][0, :, p % window].all()
    assert not ring["mask"][0, :, seen % window].any() and ring["k"][0, :, seen % window].eq(0).all()
    assert ring["mask"].sum() == 2 * tail
    back = ordered_state(ring, window)
    assert_states_equal(back, ordered)


def test_decode_step_refuses_a_window_of_zero():
    q, k, v, wq, wk, mask, sm = make(1)
    with pytest.raises(ValueError, match="window of at least 1"):
        decode_window_linear(q, k, v, feature(q, wq), feature(k, wk), window=0, scaling=1.0)


def decays(heads=H, seed=0):
    """Per-head decays from 0.8 to 0.99: strong enough that keys 100 tokens back weigh little, weak enough not to vanish."""
    return 0.8 + 0.19 * torch.rand(heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_decay_matches_explicit_definition():
    """With a decay, a key that has left the window weighs decay ** (t - window - s): 1 as it leaves."""
    q, k, v, wq, wk, mask, sm = make(23, seed=6, padded=True)
    window, decay = 5, decays()
    out, _ = run(naive_window_linear, q, k, v, wq, wk, mask, sm, window, output_state=False, decay=decay)
    assert_explicit_definition(out, q, k, v, wq, wk, mask, sm, window, decay)
    undecayed, _ = run(naive_window_linear, q, k, v, wq, wk, mask, sm, window, output_state=False)
    assert not torch.allclose(out, undecayed, atol=1e-3)


@pytest.mark.parametrize("window", [1, 4, 20, 50])
@pytest.mark.parametrize("length", [1, 63, 130])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("form", FORMS, ids=[f[0] for f in FORMS])
def test_decayed_forms_match_reference(form, window, length, with_state):
    """The chunked and recurrent forms with a decay, from a carried state or none, padding included: outputs and
    next states; the state of a first call, carried, gives what one call over both parts gives."""
    _, op = form
    context = 37 if with_state else 0
    q, k, v, wq, wk, mask, sm = make(length, context, seed=length + window, padded=True)
    decay = decays(seed=window)
    whole, whole_state = run(naive_window_linear, q, k, v, wq, wk, mask, sm, window, decay=decay)
    state = None
    if with_state:
        _, state = run(naive_window_linear, q[:, :, :context], k[:, :, :context], v[:, :, :context], wq, wk, mask[:, :context], sm, window, decay=decay)
    part = slice(context, None)
    ref, ref_state = run(naive_window_linear, q[:, :, part], k[:, :, part], v[:, :, part], wq, wk, mask[:, part], sm, window, state, decay=decay)
    out, out_state = run(op, q[:, :, part], k[:, :, part], v[:, :, part], wq, wk, mask[:, part], sm, window, state, decay=decay)
    assert torch.allclose(ref, whole[:, :, part], atol=1e-10, rtol=1e-9)
    assert_states_equal(ref_state, whole_state)
    assert torch.allclose(out, ref, atol=1e-10, rtol=1e-9)
    assert_states_equal(out_state, ref_state)


@pytest.mark.parametrize("budget", [1, 2000])
def test_decayed_blocks_match_one_pass(monkeypatch, budget):
    monkeypatch.setattr(ops_window, "BLOCK_ELEMENTS", budget)
    monkeypatch.setattr(ops_window, "MIN_BLOCK_TOKENS", 1)
    q, k, v, wq, wk, mask, sm = make(300, seed=budget, padded=True)
    ref, ref_state = run(naive_window_linear, q, k, v, wq, wk, mask, sm, 20, decay=decays())
    out, out_state = run(lambda *a, **kw: chunk_window_linear(*a, chunk_size=16, **kw), q, k, v, wq, wk, mask, sm, 20, decay=decays())
    assert torch.allclose(out, ref, atol=1e-10, rtol=1e-9)
    assert_states_equal(out_state, ref_state)


@pytest.mark.parametrize("length", [1, 63, 130])
def test_decayed_gradients_match_reference(length):
    """Gradients of the chunked form with a decay, the decay's own included, against the reference's."""
    q, k, v, wq, wk, mask, sm = make(length, seed=13, padded=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, wq, wk, sm, decays())]
    grads = []
    for op in (naive_window_linear, lambda *a, **kw: chunk_window_linear(*a, chunk_size=16, **kw)):
        qq, kk, vv, wwq, wwk, ssm, decay = leaves
        out, state = run(op, qq, kk, vv, wwq, wwk, mask, ssm, window=6, decay=decay)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + state["S"].sum() + state["z"].sum()
        grads.append(torch.autograd.grad(loss, leaves))
    for ref, got in zip(*grads):
        assert torch.allclose(got, ref, atol=1e-9)
    assert length <= 6 or grads[0][-1].abs().min() > 0  # once keys have left the window, the decay matters


def test_a_decay_needs_a_window():
    q, k, v, wq, wk, mask, sm = make(5)
    with pytest.raises(ValueError, match="a decay needs a window of at least 1"):
        run(chunk_window_linear, q, k, v, wq, wk, mask, sm, 0, decay=decays())


@pytest.mark.parametrize("chunks", [1, 2, 5])
def test_after_previous_puts_each_chunk_after_the_ones_before_it(chunks):
    """With three previous chunks, chunk j of the result is chunks j - 3, j - 2, j - 1 and j (zeros before the
    first), for floats and masks alike."""
    x = torch.arange(2 * chunks * 4 * 2, dtype=torch.float32).reshape(2, chunks, 4, 2) + 1
    rows = ops_window.after_previous(x, 1, 3)
    assert rows.shape == (2, chunks, 16, 2)
    for j in range(chunks):
        for slot in range(4):
            want = x[:, j - 3 + slot] if j - 3 + slot >= 0 else torch.zeros(2, 4, 2)
            assert torch.equal(rows[:, j, 4 * slot : 4 * slot + 4], want)
    assert torch.equal(ops_window.after_previous(x > 7, 1, 3), rows > 7)


@pytest.mark.parametrize("chunks", [1, 5])
def test_after_previous_puts_each_chunk_after_the_one_before(chunks):
    """Chunk j of the result is chunk j - 1's rows then chunk j's (zeros before the first), along any chunk axis, for
    floats and masks alike."""
    x = torch.arange(2 * 3 * chunks * 4 * 2, dtype=torch.float32).reshape(2, 3, chunks, 4, 2)
    both = ops_window.after_previous(x, 2)
    assert both.shape == (2, 3, chunks, 8, 2)
    assert torch.equal(both[:, :, 0, :4], torch.zeros(2, 3, 4, 2)) and torch.equal(both[:, :, :, 4:], x)
    assert torch.equal(both[:, :, 1:, :4], x[:, :, :-1])
    mask = x[..., 0] > 7
    assert torch.equal(ops_window.after_previous(mask, 2), both[..., 0] > 7)


@pytest.mark.parametrize("window", [4, 16, 20, 50])
@pytest.mark.parametrize("decayed", [False, True])
def test_without_gradients_the_same_bits_as_with_them(window, decayed):
    """The in-place forms without gradients compute what the forms autograd records compute, bit for bit: a
    checkpointed layer runs its first pass without gradients and its second with them."""
    q, k, v, wq, wk, mask, sm = make(70, seed=11, padded=True)
    q, k, v = (t.float() for t in (q, k, v))
    wq, wk, sm = wq.float(), wk.float(), sm.float()
    extra = {"decay": decays().float()} if decayed else {}
    with torch.no_grad():
        plain, plain_state = run(lambda *a, **kw: chunk_window_linear(*a, chunk_size=16, **kw), q, k, v, wq, wk, mask, sm, window, **extra)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, state = run(lambda *a, **kw: chunk_window_linear(*a, chunk_size=16, **kw), *leaves, wq, wk, mask, sm, window, **extra)
    assert out.requires_grad and torch.equal(out.detach(), plain)
    assert all(torch.equal(state[name].detach(), plain_state[name]) for name in state)


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
def test_masked_scores_are_masked_fills_values_and_gradients(inplace):
    """The added bias gives masked_fill's values bit for bit, -inf where the (broadcast) mask is False, and the same
    gradient through a softmax, zero at every masked score."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64, requires_grad=not inplace)
    allowed = torch.rand(5, 7, generator=g) > 0.4
    allowed[:, 0] = True  # every row sees a key
    want = scores.detach().masked_fill(~allowed, float("-inf"))
    got = masked_scores(scores.detach().clone() if inplace else scores, allowed, inplace=inplace)
    assert torch.equal(got, want) and torch.isneginf(got[..., ~allowed]).all()
    if not inplace:
        probe = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
        (grad,) = torch.autograd.grad((torch.softmax(got, -1) * probe).sum(), scores)
        (reference,) = torch.autograd.grad((torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) * probe).sum(), scores)
        assert torch.equal(grad, reference) and (grad[..., ~allowed] == 0).all()


@pytest.mark.parametrize("decayed", [False, True], ids=["", "decayed"])
@pytest.mark.parametrize("window", [1, 16, 50])
@pytest.mark.parametrize("length", [1, 63, 130])
def test_grouped_queries_read_their_kv_head_as_repeated_heads_do(length, window, decayed):
    """q of G x Hkv heads against k, v, fk and a state of Hkv (query head h reads kv head h // G) equals the chunked form
    on repeated kv heads: outputs, the state (the repeated form's every G-th head) and every input's gradient."""
    groups, hkv, context = 3, 2, 21
    g = torch.Generator().manual_seed(length + window)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    total = context + length
    q, fq = r(B, groups * hkv, total, D), torch.softmax(r(B, groups * hkv, total, F), -1)
    k, v, fk = r(B, hkv, total, D), r(B, hkv, total, V), torch.softmax(r(B, hkv, total, F), -1)
    mask = torch.ones(B, total, dtype=torch.bool)
    mask[0, :3] = False
    sm = torch.sigmoid(r(groups * hkv))
    decay = torch.sigmoid(r(hkv)) * 0.5 + 0.5 if decayed else None
    options = dict(window=window, scaling=D**-0.5, sm_weight=sm, ln_weight=1 - sm, chunk_size=16, output_state=True)

    def repeat(x):
        return x.repeat_interleave(groups, dim=1)

    def call(q, k, v, fq, fk, grouped):
        widen = (lambda x: x) if grouped else repeat
        decays = None if decay is None else widen(decay[None])[0]
        _, state = chunk_window_linear(q[:, :, :context], widen(k[:, :, :context]), widen(v[:, :, :context]), fq[:, :, :context],
                                       widen(fk[:, :, :context]), key_mask=mask[:, :context], decay=decays, **options)
        part = slice(context, None)
        return chunk_window_linear(q[:, :, part], widen(k[:, :, part]), widen(v[:, :, part]), fq[:, :, part], widen(fk[:, :, part]),
                                   key_mask=mask[:, part], state=state, decay=decays, **options)

    inputs = [x.requires_grad_() for x in (q, k, v, fq, fk)]
    (grouped, grouped_state), (repeated, repeated_state) = call(*inputs, True), call(*inputs, False)
    torch.testing.assert_close(grouped, repeated, atol=1e-12, rtol=1e-10)
    for name, t in repeated_state.items():
        torch.testing.assert_close(grouped_state[name], t[:, ::groups] if t.dim() > 2 else t, atol=1e-12, rtol=1e-10, msg=name)
    probe = r(*grouped.shape)
    for name, a, b in zip("q k v fq fk".split(), torch.autograd.grad((grouped * probe).sum(), inputs),
                          torch.autograd.grad((repeated * probe).sum(), inputs)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=lambda m: f"gradient of {name}: {m}")


def test_query_heads_that_do_not_group_over_the_key_heads_are_one_line_naming_the_fix():
    q, k, v, wq, wk, mask, sm = make(5)
    with pytest.raises(ValueError, match="3 query heads do not group over 2 key heads; give k, v and fk a number of heads that divides"):
        chunk_window_linear(q, k[:, :2], v[:, :2], feature(q, wq), feature(k, wk)[:, :2], window=2, scaling=1.0)
