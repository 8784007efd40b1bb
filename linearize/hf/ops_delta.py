"""Pure-PyTorch gated delta rule (the recurrence behind Gated DeltaNet).

This module is shipped as remote code next to saved models, so it imports only
torch and the standard library.

Layout is (B, H, T, D): q, k are (B, H, T, K), v is (B, H, T, V), g and beta are
(B, H, T). q and k must already be L2-normalised along K. Per batch and head the
state S is K x V and

    S_t = alpha_t * S_{t-1} + beta_t * k_t^T (v_t - k_t @ (alpha_t * S_{t-1})),  alpha_t = exp(g_t)
    o_t = scale * q_t @ S_t

The naive, recurrent and chunked forms compute in float32 (float64 if any input is
float64), return o in v's dtype and the final state (B, H, K, V) in that compute
dtype. `step_gated_delta_rule`, the recurrent form's one-token step, takes rows
(batch x head) already in one float dtype and keeps it (a decode step calls it
directly); `delta_rule_gates` gives a layer's beta and g from its hidden states, and `l2_normalize` qwen3_5's
unit length.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "naive_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "chunk_gated_delta_rule",
    "step_gated_delta_rule",
]


# torch.compile unrolls the chunk loop of chunk_gated_delta_rule, so under it chunks grow (by whole multiples) until at
# most this many are traced: a cold compile of forward and backward at 2,048 tokens took 75.2 s with 32 chunks of 64
# and 28.2 s with 8 of 256, while the compiled step itself went from 29.5 to 47.8 ms, the longer chunks' intra-chunk
# work (CPU inductor, benchmarks/compile_cost.py, BENCHMARKS.md; unmeasured on a GPU).
TRACED_CHUNKS = 8


def _prepare(q, k, v, g, beta, scale, initial_state):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"expected q, k (B, H, T, K) and v (B, H, T, V); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if g.shape != q.shape[:3] or beta.shape != q.shape[:3]:
        raise ValueError(f"expected g, beta of shape {tuple(q.shape[:3])}")
    B, H, T, K = q.shape
    V = v.shape[-1]
    tensors = [q, k, v, g, beta] + ([initial_state] if initial_state is not None else [])
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if scale is None:
        scale = K ** -0.5
    if initial_state is None:
        state = q.new_zeros(B, H, K, V, dtype=dtype)
    else:
        if initial_state.shape != (B, H, K, V):
            raise ValueError(f"expected initial_state of shape {(B, H, K, V)}")
        state = initial_state.to(dtype)
    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    return q, k, v, g, beta, float(scale), state


def naive_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference: S_t = a_t S + b_t k_t^T (v_t - k_t (a_t S)), o_t = scale q_t S_t, a_t = exp(g_t)."""
    out_dtype = v.dtype
    q, k, v, g, beta, scale, S = _prepare(q, k, v, g, beta, scale, initial_state)
    T = q.shape[2]
    outputs = []
    for t in range(T):
        alpha_t = g[:, :, t].exp()[:, :, None, None]  # (B, H, 1, 1)
        beta_t = beta[:, :, t][:, :, None, None]  # (B, H, 1, 1)
        k_t = k[:, :, t][:, :, None, :]  # (B, H, 1, K)
        v_t = v[:, :, t][:, :, None, :]  # (B, H, 1, V)
        q_t = q[:, :, t][:, :, None, :]  # (B, H, 1, K)
        decayed = alpha_t * S
        S = decayed + beta_t * k_t.transpose(-1, -2) @ (v_t - k_t @ decayed)
        outputs.append(scale * (q_t @ S)[:, :, 0, :])
    o = torch.stack(outputs, dim=2)
    return o.to(out_dtype), S


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode path, token loop: S_t = a_t S + b_t k_t^T (v_t - k_t (a_t S)), o_t = scale q_t S_t."""
    out_dtype = v.dtype
    q, k, v, g, beta, scale, S = _prepare(q, k, v, g, beta, scale, initial_state)
    B, H, T, K = q.shape
    V = v.shape[-1]
    # Per-token elementwise work hoisted out of the loop, and (B * H) batches of 3D products: the loop body is
    # `step_gated_delta_rule` (a decode step on CPU is bound by the number of dispatches).
    alpha = g.exp().reshape(B * H, T, 1, 1)
    k = k.reshape(B * H, T, 1, K)
    q_row = (q if scale == 1.0 else q * scale).reshape(B * H, T, 1, K)
    v = v.reshape(B * H, T, 1, V)
    b = beta.reshape(B * H, T, 1, 1)
    S = S.reshape(B * H, K, V)
    outputs = []
    for t in range(T):
        o_t, S = step_gated_delta_rule(q_row[:, t], k[:, t], v[:, t], alpha[:, t], b[:, t], S)
        outputs.append(o_t)
    o = torch.cat(outputs, dim=1) if T != 1 else outputs[0]
    return o.view(B, H, T, V).to(out_dtype), S.view(B, H, K, V)


def step_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One token of the rule for N independent rows (batch x head), all of one float dtype: q, k (N, 1, K) with q
    already scaled, v (N, 1, V), alpha = exp(g) and beta (N, 1, 1), state (N, K, V). Returns o (N, 1, V) and the
    new state: S = alpha S, S += k^T beta (v - k S), o = q S, in six kernels (the rank-one write as a broadcast
    multiply-add, which on the CPU takes two thirds of a batched product's time at 64 x 64)."""
    decayed = state * alpha
    state = torch.addcmul(decayed, k.transpose(1, 2), (v - torch.bmm(k, decayed)) * beta)
    return torch.bmm(q, state), state


L2_EPS = 1e-6  # qwen3_5's (and fla's) l2norm: x * rsqrt(sum(x^2) + eps)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x scaled to unit length over its last dimension as qwen3_5 does it (fla's l2norm): x / sqrt(|x|^2 + 1e-6)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2_EPS)


def delta_rule_gates(
    hidden_states: torch.Tensor,
    beta_weight: torch.Tensor,
    beta_bias: torch.Tensor | None,
    decay_weight: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A gated delta rule's write strength beta = sigmoid(W_beta x + b) and log-decay g = -exp(A_log) softplus(W_a x +
    dt_bias) for hidden states (B, T, C), both (B, H, T), in float32 or wider; zero at pads (False in `padding_mask`),
    so they neither write nor decay."""
    batch, length, width = hidden_states.shape
    # (B * T, C) rows: each projection is one matrix product with its bias, where a (B, T, C) input takes four.
    x = hidden_states.reshape(-1, width).to(torch.promote_types(hidden_states.dtype, torch.float32))
    beta = torch.sigmoid(F.linear(x, beta_weight.to(x.dtype), None if beta_bias is None else beta_bias.to(x.dtype)))
    g = F.softplus(F.linear(x, decay_weight.to(x.dtype), dt_bias.to(x.dtype))) * -A_log.to(x.dtype).exp()
    beta, g = beta.view(batch, length, -1), g.view(batch, length, -1)
    if padding_mask is not None:
        beta, g = beta * padding_mask[..., None], g * padding_mask[..., None]
    return beta.transpose(1, 2), g.transpose(1, 2)


# Longer than 60 lines with its signature and docstring: the chunked scan reads top to bottom as the docstring's
# algebra; split, its steps would pass a dozen chunk tensors between them.
def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel form of S_t = a_t S + b_t k_t^T (v_t - k_t (a_t S)), o_t = scale q_t S_t.

    Within a chunk with cumulative log-decay G and chunk-start state S0 the
    writes are D = (I + A)^{-1} (beta v - beta exp(G) k S0), where
    A_ij = beta_i (k_i . k_j) exp(G_i - G_j) for i > j (WY/UT form). Under torch.compile the chunks grow so that
    at most TRACED_CHUNKS are traced.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    out_dtype = v.dtype
    q, k, v, g, beta, scale, S = _prepare(q, k, v, g, beta, scale, initial_state)
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = max(1, min(int(chunk_size), T))
    if torch.compiler.is_compiling() and -(-T // C) > TRACED_CHUNKS:
        C *= -(-T // (C * TRACED_CHUNKS))
    pad = (-T) % C
    if pad:
        # beta = 0 and g = 0 make the padded tokens exact no-ops on the state.
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    N = (T + pad) // C
    q = q.reshape(B, H, N, C, K)
    k = k.reshape(B, H, N, C, K)
    v = v.reshape(B, H, N, C, V)
    beta = beta.reshape(B, H, N, C, 1)
    g = g.reshape(B, H, N, C)
    G = g.cumsum(-1)

    idx = torch.arange(C, device=q.device)
    strict = idx[:, None] > idx[None, :]
    # L_ij = G_i - G_j = g_{j+1} + ... + g_i for i >= j, summed directly rather
    # than as a difference of cumsums: the latter loses float32 precision once
    # |G| is large (strong decays), exactly where the differences stay O(1).
    # Entries above the diagonal are masked before the exp (they would be
    # positive and could overflow, and inf there turns into nan in backward).
    L = g[..., :, None].expand(B, H, N, C, C).masked_fill(~strict, 0.0).cumsum(-2)
    L = L.masked_fill(strict.T, float("-inf"))
    decay_incl = L.exp()
    decay_strict = decay_incl.masked_fill(~strict, 0.0)

    kb = k * beta
    A = (kb @ k.transpose(-1, -2)) * decay_strict
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([kb * G.exp()[..., None], v * beta], dim=-1)
    WU = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    W, U = WU.split([K, V], dim=-1)  # D = U - W @ S0

    attn = (q @ k.transpose(-1, -2)) * decay_incl * scale
    q_in = q * (G.exp()[..., None] * scale)  # reads of the chunk-start state
    k_out = k * decay_incl[..., -1, :, None]  # writes decayed to chunk end
    chunk_decay = G[..., -1].exp()[..., None, None]  # (B, H, N, 1, 1)

    outputs = []
    for n in range(N):
        D = U[:, :, n] - W[:, :, n] @ S
        outputs.append(q_in[:, :, n] @ S + attn[:, :, n] @ D)
        S = chunk_decay[:, :, n] * S + k_out[:, :, n].transpose(-1, -2) @ D
    o = torch.stack(outputs, dim=2).reshape(B, H, N * C, V)[:, :, :T]
    return o.to(out_dtype), S
