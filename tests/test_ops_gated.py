import pytest
import torch
import torch.nn.functional as F

from linearize.hf.ops_gated import (
    chunk_gla,
    chunk_simple_gla,
    naive_gla,
    naive_simple_gla,
    recurrent_gla,
    recurrent_simple_gla,
)

B, H, K, V = 2, 3, 16, 24

OPS = {
    "gla": (naive_gla, recurrent_gla, chunk_gla),
    "simple": (naive_simple_gla, recurrent_simple_gla, chunk_simple_gla),
}


def make_inputs(variant, T, dtype=torch.float64, k_dim=K, v_dim=V, with_state=False, gate=None):
    """Random q, k, v, gates (realistic mix of slow and fast decays) and optional state."""
    q = torch.randn(B, H, T, k_dim, dtype=dtype)
    k = torch.randn(B, H, T, k_dim, dtype=dtype)
    v = torch.randn(B, H, T, v_dim, dtype=dtype)
    gshape = (B, H, T, k_dim) if variant == "gla" else (B, H, T)
    if gate is None:
        g = F.logsigmoid(torch.randn(gshape, dtype=torch.float64) * 1.5 + 2.0).to(dtype)
    else:
        g = gate(gshape).to(dtype)
    s0 = torch.randn(B, H, k_dim, v_dim, dtype=dtype) if with_state else None
    return q, k, v, g, s0


def run_with_grads(fn, q, k, v, g, s0, **kw):
    """Outputs, final state and gradients of a fixed random functional w.r.t. all inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g)]
    s = s0.detach().clone().requires_grad_() if s0 is not None else None
    o, S = fn(*leaves, initial_state=s, **kw)
    gen = torch.Generator().manual_seed(1234)
    wo = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    ws = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S.dtype)
    loss = (o * wo).sum() + (S * ws).sum()
    inputs = leaves + ([s] if s is not None else [])
    grads = torch.autograd.grad(loss, inputs)
    return o.detach(), S.detach(), grads


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("variant", ["gla", "simple"])
@pytest.mark.parametrize("form", ["recurrent", "chunk16", "chunk64"])
@pytest.mark.parametrize("T", [1, 63, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_naive_with_grads(variant, form, T, with_state):
    torch.manual_seed(0)
    naive, recurrent, chunk = OPS[variant]
    fn, kw = (recurrent, {}) if form == "recurrent" else (chunk, {"chunk_size": int(form[5:])})
    inputs = make_inputs(variant, T, with_state=with_state)

    o_ref, S_ref, g_ref = run_with_grads(naive, *inputs)
    o, S, grads = run_with_grads(fn, *inputs, **kw)

    assert o.shape == (B, H, T, V) and o.dtype == torch.float64
    assert S.shape == (B, H, K, V) and S.dtype == torch.float64
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(S, S_ref, atol=1e-10, rtol=0)
    names = ["q", "k", "v", "g", "initial_state"]
    assert len(grads) == len(g_ref) == (5 if with_state else 4)
    for name, a, b in zip(names, grads, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=f"grad {name}")


@pytest.mark.parametrize("T", [1, 17, 130])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_grouped_queries_match_the_key_heads_repeated(T, with_state, chunk_size):
    """Three queries per key head: the output of each query head and the gradients of every input equal those of the
    key heads repeated to the queries' (grouped-query order), and the state is one per key head."""
    torch.manual_seed(9)
    groups = 3
    q, k, v, g, s0 = make_inputs("gla", T, with_state=with_state)
    q = torch.randn(B, H * groups, T, K, dtype=q.dtype)

    def repeated(q, k, v, g, initial_state=None):
        o, S = naive_gla(q, *(x.repeat_interleave(groups, 1) for x in (k, v, g)), initial_state=(
            None if initial_state is None else initial_state.repeat_interleave(groups, 1)))
        return o, S[:, ::groups]

    o_ref, S_ref, g_ref = run_with_grads(repeated, q, k, v, g, s0)
    o, S, grads = run_with_grads(chunk_gla, q, k, v, g, s0, chunk_size=chunk_size)
    assert o.shape == (B, H * groups, T, V) and S.shape == (B, H, K, V)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(S, S_ref, atol=1e-10, rtol=0)
    for name, a, b in zip(["q", "k", "v", "g", "initial_state"], grads, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=f"grad {name}")


def test_chunk_gla_without_gradients_gives_the_same_bits_as_with_them():
    """In place where no gradient is recorded, out of place where one is: the same arithmetic, so a checkpointed
    layer's two passes agree bit for bit (grouped queries, float32, several sub-chunks)."""
    torch.manual_seed(10)
    q, k, v, g, s0 = (t.float() for t in make_inputs("gla", 70, with_state=True))
    q = torch.randn(B, 2 * H, 70, K)
    with torch.no_grad():
        plain = chunk_gla(q, k, v, g, initial_state=s0)
    tracked = chunk_gla(*(t.clone().requires_grad_() for t in (q, k, v, g)), initial_state=s0)
    assert tracked[0].requires_grad
    assert all(torch.equal(a.detach(), b) for a, b in zip(tracked, plain))


def test_query_heads_that_do_not_group_the_key_heads_raise():
    q, k, v, g, _ = make_inputs("gla", 5)
    with pytest.raises(ValueError, match="a multiple of k's heads"):
        chunk_gla(torch.randn(B, H + 1, 5, K, dtype=q.dtype), k, v, g)
    with pytest.raises(ValueError, match="with q's heads k's heads"):
        naive_gla(torch.randn(B, 2 * H, 5, K, dtype=q.dtype), k, v, g)


@pytest.mark.parametrize("variant", ["gla", "simple"])
def test_naive_matches_explicit_loop(variant):
    """Pin the ground truth to the recurrence written out with plain Python loops."""
    torch.manual_seed(1)
    T = 9
    q, k, v, g, s0 = make_inputs(variant, T, with_state=True)
    scale = 0.3
    o_ref, S_ref = (naive_gla if variant == "gla" else naive_simple_gla)(q, k, v, g, scale, s0)
    gk = g if variant == "gla" else g.unsqueeze(-1).expand(B, H, T, K)
    for b_ in range(B):
        for h in range(H):
            S = s0[b_, h].clone()
            for t in range(T):
                S = torch.diag(gk[b_, h, t].exp()) @ S + torch.outer(k[b_, h, t], v[b_, h, t])
                torch.testing.assert_close(o_ref[b_, h, t], scale * q[b_, h, t] @ S, atol=1e-12, rtol=0)
            torch.testing.assert_close(S_ref[b_, h], S, atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant", ["gla", "simple"])
@pytest.mark.parametrize("form", ["recurrent", "chunk"])
def test_equal_kv_dims_and_custom_scale(variant, form):
    torch.manual_seed(2)
    naive, recurrent, chunk = OPS[variant]
    fn = recurrent if form == "recurrent" else chunk
    q, k, v, g, s0 = make_inputs(variant, 70, k_dim=8, v_dim=8, with_state=True)
    for scale in (None, 0.7):
        o_ref, S_ref = naive(q, k, v, g, scale=scale, initial_state=s0)
        o, S = fn(q, k, v, g, scale=scale, initial_state=s0)
        torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(S, S_ref, atol=1e-10, rtol=0)
    # scale=None means K ** -0.5
    o_default, _ = fn(q, k, v, g, initial_state=s0)
    o_explicit, _ = fn(q, k, v, g, scale=8 ** -0.5, initial_state=s0)
    torch.testing.assert_close(o_default, o_explicit, atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant", ["gla", "simple"])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("split", [1, 50, 129])
def test_state_passing(variant, chunk_size, split):
    torch.manual_seed(3)
    naive, recurrent, chunk = OPS[variant]
    T = 130
    q, k, v, g, s0 = make_inputs(variant, T, with_state=True)
    o_full, S_full = chunk(q, k, v, g, initial_state=s0, chunk_size=chunk_size)

    def part(sl):
        return q[:, :, sl], k[:, :, sl], v[:, :, sl], g[:, :, sl]

    o1, S1 = chunk(*part(slice(0, split)), initial_state=s0, chunk_size=chunk_size)
    o2, S2 = chunk(*part(slice(split, T)), initial_state=S1, chunk_size=chunk_size)
    torch.testing.assert_close(torch.cat([o1, o2], dim=2), o_full, atol=1e-10, rtol=0)
    torch.testing.assert_close(S2, S_full, atol=1e-10, rtol=0)

    # Prefill with the chunked form, then decode token by token with the recurrent form.
    S = S1
    outs = [o1]
    for t in range(split, T):
        o_t, S = recurrent(*part(slice(t, t + 1)), initial_state=S)
        outs.append(o_t)
    torch.testing.assert_close(torch.cat(outs, dim=2), o_full, atol=1e-10, rtol=0)
    torch.testing.assert_close(S, S_full, atol=1e-10, rtol=0)


def strong_gate(shape):
    g = -20.0 * torch.rand(shape, dtype=torch.float64)
    # Saturate some steps at exactly -20 and leave some at 0, the extremes.
    g = torch.where(torch.rand(shape) < 0.2, torch.full_like(g, -20.0), g)
    return torch.where(torch.rand(shape) < 0.1, torch.zeros_like(g), g)


@pytest.mark.parametrize("variant", ["gla", "simple"])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_strong_decay(variant, chunk_size):
    torch.manual_seed(4)
    naive, _, chunk = OPS[variant]
    inputs = make_inputs(variant, 130, with_state=True, gate=strong_gate)
    assert inputs[3].min() == -20.0
    o_ref, S_ref, g_ref = run_with_grads(naive, *inputs)
    o, S, grads = run_with_grads(chunk, *inputs, chunk_size=chunk_size)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert all(torch.isfinite(gr).all() for gr in grads)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(S, S_ref, atol=1e-10, rtol=0)
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)

    # Same in float32: the cumulative log-gate reaches about -1300 within a chunk.
    o32, S32, grads32 = run_with_grads(chunk, *(t.float() for t in inputs), chunk_size=chunk_size)
    assert torch.isfinite(o32).all() and torch.isfinite(S32).all()
    assert all(torch.isfinite(gr).all() for gr in grads32)
    assert rel_err(o32, o_ref) < 1e-5
    assert rel_err(S32, S_ref) < 1e-5


@pytest.mark.parametrize("variant", ["gla", "simple"])
@pytest.mark.parametrize("with_state", [False, True])
def test_zero_decay_is_linear_attention(variant, with_state):
    torch.manual_seed(5)
    naive, recurrent, chunk = OPS[variant]
    T = 130
    q, k, v, g, s0 = make_inputs(variant, T, with_state=with_state, gate=torch.zeros)
    scale = K ** -0.5
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    expected = (q @ k.transpose(-1, -2)).masked_fill(~mask, 0) @ v
    expected_S = k.transpose(-1, -2) @ v
    if s0 is not None:
        expected = expected + q @ s0
        expected_S = expected_S + s0
    expected = scale * expected
    for fn, kw in ((naive, {}), (recurrent, {}), (chunk, {"chunk_size": 16}), (chunk, {"chunk_size": 64})):
        o, S = fn(q, k, v, g, initial_state=s0, **kw)
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, expected, atol=1e-10, rtol=0)
        torch.testing.assert_close(S, expected_S, atol=1e-10, rtol=0)


@pytest.mark.parametrize("variant", ["gla", "simple"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("with_state", [False, True])
def test_low_precision_inputs(variant, dtype, tol, with_state):
    torch.manual_seed(6)
    naive, recurrent, chunk = OPS[variant]
    q, k, v, g, s0 = make_inputs(variant, 130, dtype=dtype, with_state=with_state)
    ref_o, ref_S = naive(*(t.double() for t in (q, k, v, g)), initial_state=None if s0 is None else s0.double())
    for fn in (chunk, recurrent):
        o, S = fn(q, k, v, g, initial_state=s0)
        assert o.dtype == dtype
        assert S.dtype == torch.float32
        assert rel_err(o, ref_o) < tol
        assert rel_err(S, ref_S) < tol


@pytest.mark.parametrize("variant", ["gla", "simple"])
@pytest.mark.parametrize("form", ["naive", "recurrent", "chunk"])
def test_no_nan_and_causal(variant, form):
    torch.manual_seed(7)
    fn = OPS[variant][("naive", "recurrent", "chunk").index(form)]
    T, cut = 130, 100
    q, k, v, g, s0 = make_inputs(variant, T, dtype=torch.float32, with_state=True)
    o, S, grads = run_with_grads(fn, q, k, v, g, s0)
    assert o.shape == (B, H, T, V)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert o.abs().max() > 0

    # Changing future tokens must not change earlier outputs (padding and chunking leak nothing).
    q2, k2, v2, g2 = (t.clone() for t in (q, k, v, g))
    for t in (q2, k2, v2):
        t[:, :, cut:] = torch.randn_like(t[:, :, cut:]) * 100
    g2[:, :, cut:] = -torch.rand_like(g2[:, :, cut:]) * 10
    o2, _ = fn(q2, k2, v2, g2, initial_state=s0)
    torch.testing.assert_close(o2[:, :, :cut], o[:, :, :cut], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(o2[:, :, cut:], o[:, :, cut:])


def test_chunk_size_not_multiple_of_16():
    torch.manual_seed(8)
    q, k, v, g, s0 = make_inputs("gla", 75, with_state=True)
    o_ref, S_ref = naive_gla(q, k, v, g, initial_state=s0)
    for cs in (1, 7, 24, 100):
        o, S = chunk_gla(q, k, v, g, initial_state=s0, chunk_size=cs)
        torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(S, S_ref, atol=1e-10, rtol=0)


def test_bad_shapes_raise():
    q, k, v, g, _ = make_inputs("gla", 5)
    with pytest.raises(ValueError):
        chunk_gla(q, k, v, g[..., 0])
    with pytest.raises(ValueError):
        chunk_simple_gla(q, k, v, g)
    with pytest.raises(ValueError):
        recurrent_gla(q, k, v, g, initial_state=torch.zeros(B, H, V, K, dtype=q.dtype))
    with pytest.raises(ValueError):
        naive_gla(q, k[..., :-1], v, g)
