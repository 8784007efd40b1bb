import functools

import pytest
import torch
import torch.nn.functional as F

from linearize.hf.ops_delta import (
    chunk_gated_delta_rule,
    naive_gated_delta_rule,
    recurrent_gated_delta_rule,
    step_gated_delta_rule,
)

B, H, K, V = 2, 3, 16, 24


def make_inputs(T, dtype=torch.float64, with_state=True, seed=0, requires_grad=False):
    torch.manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, K, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, H, T, K, dtype=torch.float64), dim=-1)
    v = torch.randn(B, H, T, V, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, H, T, dtype=torch.float64) + 2.0)
    beta = torch.sigmoid(torch.randn(B, H, T, dtype=torch.float64))
    h0 = torch.randn(B, H, K, V, dtype=torch.float64) if with_state else None
    out = [x.to(dtype) if x is not None else None for x in (q, k, v, g, beta, h0)]
    if requires_grad:
        out = [x.requires_grad_() if x is not None else None for x in out]
    return out


def chunk16(*args, **kwargs):
    return chunk_gated_delta_rule(*args, chunk_size=16, **kwargs)


def chunk64(*args, **kwargs):
    return chunk_gated_delta_rule(*args, chunk_size=64, **kwargs)


FORMS = {
    "recurrent": recurrent_gated_delta_rule,
    "chunk16": chunk16,
    "chunk64": chunk64,
}


def matrix_form_reference(q, k, v, g, beta, scale, h0):
    """S_t = alpha_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t, one (b, h) at a time."""
    T = q.shape[2]
    o = torch.zeros(B, H, T, V, dtype=torch.float64)
    S_all = torch.zeros(B, H, K, V, dtype=torch.float64)
    eye = torch.eye(K, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S = h0[b, h].clone()
            for t in range(T):
                kt = k[b, h, t][:, None]
                S = g[b, h, t].exp() * (eye - beta[b, h, t] * kt @ kt.T) @ S + beta[b, h, t] * kt @ v[b, h, t][None]
                o[b, h, t] = scale * q[b, h, t] @ S
            S_all[b, h] = S
    return o, S_all


def test_naive_matches_matrix_form():
    q, k, v, g, beta, h0 = make_inputs(9, seed=1)
    o, S = naive_gated_delta_rule(q, k, v, g, beta, scale=0.7, initial_state=h0)
    o_ref, S_ref = matrix_form_reference(q, k, v, g, beta, 0.7, h0)
    torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(S, S_ref, atol=1e-12, rtol=0)


def test_default_scale_and_shapes():
    q, k, v, g, beta, _ = make_inputs(5, with_state=False, seed=2)
    o_default, S = naive_gated_delta_rule(q, k, v, g, beta)
    o_explicit, _ = naive_gated_delta_rule(q, k, v, g, beta, scale=K ** -0.5)
    assert o_default.shape == (B, H, 5, V)
    assert S.shape == (B, H, K, V)
    torch.testing.assert_close(o_default, o_explicit, atol=0, rtol=0)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [1, 63, 130])
def test_forms_match_naive_values_and_grads(form, with_state, T):
    fn = FORMS[form]
    inputs = make_inputs(T, with_state=with_state, seed=T, requires_grad=True)
    q, k, v, g, beta, h0 = inputs
    leaves = [x for x in inputs if x is not None]

    torch.manual_seed(1000 + T)
    w_o = torch.randn(B, H, T, V, dtype=torch.float64)
    w_s = torch.randn(B, H, K, V, dtype=torch.float64)

    def run(f):
        o, S = f(q, k, v, g, beta, initial_state=h0)
        loss = (o * w_o).sum() + (S * w_s).sum()
        return o.detach(), S.detach(), torch.autograd.grad(loss, leaves)

    o_ref, S_ref, grads_ref = run(naive_gated_delta_rule)
    o, S, grads = run(fn)
    assert o.dtype == torch.float64 and S.dtype == torch.float64
    torch.testing.assert_close(o, o_ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(S, S_ref, atol=1e-9, rtol=0)
    names = ["q", "k", "v", "g", "beta", "initial_state"][: len(leaves)]
    for name, gr, gr_ref in zip(names, grads, grads_ref):
        assert torch.isfinite(gr).all(), name
        torch.testing.assert_close(gr, gr_ref, atol=1e-9, rtol=0, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("split", [1, 50, 129])
def test_chunk_state_passing(split, chunk_size):
    q, k, v, g, beta, h0 = make_inputs(130, seed=7)
    fn = functools.partial(chunk_gated_delta_rule, chunk_size=chunk_size)
    o_full, S_full = fn(q, k, v, g, beta, initial_state=h0)
    a = slice(None, split)
    b = slice(split, None)
    o1, S1 = fn(q[:, :, a], k[:, :, a], v[:, :, a], g[:, :, a], beta[:, :, a], initial_state=h0)
    o2, S2 = fn(q[:, :, b], k[:, :, b], v[:, :, b], g[:, :, b], beta[:, :, b], initial_state=S1)
    torch.testing.assert_close(torch.cat([o1, o2], dim=2), o_full, atol=1e-9, rtol=0)
    torch.testing.assert_close(S2, S_full, atol=1e-9, rtol=0)


def test_recurrent_decode_steps_match_chunk_prefill():
    q, k, v, g, beta, h0 = make_inputs(20, seed=8)
    o_full, S_full = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, chunk_size=8)
    o_pre, S = chunk_gated_delta_rule(
        q[:, :, :15], k[:, :, :15], v[:, :, :15], g[:, :, :15], beta[:, :, :15], initial_state=h0, chunk_size=8
    )
    outs = [o_pre]
    for t in range(15, 20):
        s = slice(t, t + 1)
        o_t, S = recurrent_gated_delta_rule(q[:, :, s], k[:, :, s], v[:, :, s], g[:, :, s], beta[:, :, s], initial_state=S)
        outs.append(o_t)
    torch.testing.assert_close(torch.cat(outs, dim=2), o_full, atol=1e-9, rtol=0)
    torch.testing.assert_close(S, S_full, atol=1e-9, rtol=0)


def test_one_token_step_is_the_matrix_form_on_rows():
    """The step on (B * H) rows, q pre-scaled, alpha = exp(g): the matrix form's output and state for one token."""
    q, k, v, g, beta, h0 = make_inputs(1, seed=11)
    scale = 0.37
    expected, expected_state = matrix_form_reference(q, k, v, g, beta, scale, h0)
    rows = lambda x, last: x.reshape(B * H, 1, last)
    o, S = step_gated_delta_rule(
        rows(q * scale, K), rows(k, K), rows(v, V), rows(g.exp(), 1), rows(beta, 1), h0.reshape(B * H, K, V)
    )
    torch.testing.assert_close(o.view(B, H, 1, V), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(S.view(B, H, K, V), expected_state, atol=1e-12, rtol=0)


ALL_FORMS = {"naive": naive_gated_delta_rule, **FORMS}


@pytest.mark.parametrize("form", list(ALL_FORMS))
def test_beta_zero_only_decays_state(form):
    T = 70
    q, k, v, g, beta, h0 = make_inputs(T, seed=3)
    beta = torch.zeros_like(beta)
    o, S = ALL_FORMS[form](q, k, v, g, beta, scale=0.5, initial_state=h0)
    G = g.cumsum(-1)
    expected_S = G[..., -1].exp()[..., None, None] * h0
    expected_o = 0.5 * G.exp()[..., None] * (q @ h0)
    torch.testing.assert_close(S, expected_S, atol=1e-12, rtol=0)
    torch.testing.assert_close(o, expected_o, atol=1e-12, rtol=0)


@pytest.mark.parametrize("form", list(ALL_FORMS))
def test_repeated_key_overwrites_value(form):
    # With g = 0, beta = 1 and one unit key, each write replaces whatever the key
    # retrieved: S_t = (I - k^T k) S_0 + k^T v_t, so k @ S_t = v_t exactly.
    T = 70
    q, _, v, _, _, h0 = make_inputs(T, seed=4)
    torch.manual_seed(5)
    key = F.normalize(torch.randn(B, H, 1, K, dtype=torch.float64), dim=-1)
    k = key.expand(B, H, T, K)
    g = torch.zeros(B, H, T, dtype=torch.float64)
    beta = torch.ones(B, H, T, dtype=torch.float64)
    o, S = ALL_FORMS[form](q, k, v, g, beta, scale=1.0, initial_state=h0)

    proj = torch.eye(K, dtype=torch.float64) - key.transpose(-1, -2) @ key  # (B, H, K, K)
    base = proj @ h0  # (B, H, K, V)
    expected_S = base + key.transpose(-1, -2) @ v[:, :, -1:]
    expected_o = q @ base + (q @ key.transpose(-1, -2)) * v
    torch.testing.assert_close(S, expected_S, atol=1e-10, rtol=0)
    torch.testing.assert_close(o, expected_o, atol=1e-10, rtol=0)
    torch.testing.assert_close(key @ S, v[:, :, -1:], atol=1e-10, rtol=0)

    o_read, _ = ALL_FORMS[form](k, k, v, g, beta, scale=1.0, initial_state=h0)
    torch.testing.assert_close(o_read, v, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", list(FORMS))
def test_strong_decay_finite(form, dtype):
    T = 130
    inputs = make_inputs(T, dtype=dtype, seed=6, requires_grad=True)
    q, k, v, _, beta, h0 = inputs
    torch.manual_seed(6)
    g_strong = torch.full((B, H, T), -20.0, dtype=dtype)
    # Mix in ordinary gates so the chunk sees both extremes.
    g = torch.where(torch.rand(B, H, T) < 0.5, g_strong, F.logsigmoid(torch.randn(B, H, T, dtype=dtype)))
    g.requires_grad_()
    leaves = [q, k, v, g, beta, h0]

    o, S = FORMS[form](q, k, v, g, beta, initial_state=h0)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    grads = torch.autograd.grad(o.sum() + S.sum(), leaves)
    for gr in grads:
        assert torch.isfinite(gr).all()

    o_ref, S_ref = naive_gated_delta_rule(*(x.detach().double() for x in leaves[:5]), initial_state=h0.detach().double())
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert (o.double() - o_ref).abs().max() <= tol * o_ref.abs().max()
    assert (S.double() - S_ref).abs().max() <= tol * S_ref.abs().max()


def test_all_strong_decay_forgets_state():
    q, k, v, _, beta, h0 = make_inputs(64, seed=9)
    g = torch.full((B, H, 64), -20.0, dtype=torch.float64)
    o, S = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    o_ref, S_ref = naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    torch.testing.assert_close(o, o_ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(S, S_ref, atol=1e-9, rtol=0)
    # exp(-20) per step: the state is essentially the last write only.
    last = beta[:, :, -1, None, None] * k[:, :, -1, :, None] * v[:, :, -1, None, :]
    torch.testing.assert_close(S, last, atol=1e-7, rtol=0)


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["float32", "bfloat16"]
)
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_low_precision_chunk_matches_float64_naive(dtype, tol, chunk_size, with_state):
    T = 130
    q, k, v, g, beta, h0 = make_inputs(T, dtype=dtype, with_state=with_state, seed=11)
    o, S = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, chunk_size=chunk_size)
    assert o.dtype == dtype
    assert S.dtype == torch.float32

    def up(x):
        return None if x is None else x.double()

    o_ref, S_ref = naive_gated_delta_rule(up(q), up(k), up(v), up(g), up(beta), initial_state=up(h0))
    rel_o = (o.double() - o_ref).norm() / o_ref.norm()
    rel_S = (S.double() - S_ref).norm() / S_ref.norm()
    assert rel_o < tol, rel_o
    assert rel_S < tol, rel_S


@pytest.mark.parametrize("form", list(ALL_FORMS))
def test_low_precision_output_dtypes(form):
    q, k, v, g, beta, h0 = make_inputs(5, dtype=torch.bfloat16, seed=12)
    o, S = ALL_FORMS[form](q, k, v, g, beta, initial_state=h0)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert o.shape == (B, H, 5, V) and S.shape == (B, H, K, V)


def test_compiled_chunk_form_traces_a_bounded_number_of_chunks():
    """dynamo unrolls the chunk loop: under torch.compile a 2,048-token sequence is traced as the same number of
    (longer) chunks as 512 tokens, and still matches the naive recurrence, values and gradients."""
    sizes = []

    def backend(graph, example_inputs):
        sizes.append(len(graph.graph.nodes))
        return graph.forward

    compiled = torch.compile(chunk64, backend=backend, fullgraph=True, dynamic=False)
    for T in (512, 2048, 700):
        q, k, v, g, beta, h0 = make_inputs(T, seed=T, requires_grad=True)
        o, S = compiled(q, k, v, g, beta, initial_state=h0)
        o_ref, S_ref = naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
        torch.testing.assert_close(o, o_ref, atol=1e-9, rtol=0)
        torch.testing.assert_close(S, S_ref, atol=1e-9, rtol=0)
        grads = torch.autograd.grad((o.sum() + S.sum()), (k, g))
        grads_ref = torch.autograd.grad((o_ref.sum() + S_ref.sum()), (k, g))
        for gr, gr_ref in zip(grads, grads_ref):
            torch.testing.assert_close(gr, gr_ref, atol=1e-8, rtol=0)
    assert sizes[0] == sizes[1] and sizes[2] <= sizes[0]
