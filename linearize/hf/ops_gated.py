"""Gated linear attention (GLA) ops in pure PyTorch.

This module is copied next to saved models as remote code, so it imports only
torch and the standard library.

Layout is (B, H, T, D): q, k are (B, H, T, K), v is (B, H, T, V). Gates are
log-decays (<= 0). Per batch and head the ops compute

    S_t = diag(exp(gk_t)) @ S_{t-1} + k_t^T v_t        (S is K x V)
    o_t = scale * q_t @ S_t

so a token sees its own key (inclusive causal) and there is no normaliser.
The "simple" variants take one scalar gate per head and step, g of shape
(B, H, T) (Mamba-2 SSD form): S_t = exp(g_t) S_{t-1} + k_t^T v_t.

Every op returns (o, final_state): o in the dtype of v, final_state of shape
(B, H, K, V) in the compute dtype, which is float32 (float64 if any input is
float64).

`chunk_gla` also takes grouped queries: q of (B, G * H, T, K) beside k, v and
gates of H heads, query head h reading key head h // G (grouped-query
attention's order). The state and the gates' decays are the same for every
query of a group, so they are computed once per key head; o has G * H heads.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .ops_window import masked_scores

Tensor = torch.Tensor

__all__ = [
    "naive_gla",
    "recurrent_gla",
    "chunk_gla",
    "naive_simple_gla",
    "recurrent_simple_gla",
    "chunk_simple_gla",
]

# Sub-chunk length for the secondary chunking inside chunk_gla.
_SUB_CHUNK = 16


def _prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor,
    scale: Optional[float],
    initial_state: Optional[Tensor],
    scalar_gate: bool,
    grouped: bool = False,
):
    same = q.dim() == 4 and k.dim() == 4 and (k.shape == q.shape or (
        grouped and k.shape[::2] == q.shape[::2] and k.shape[3] == q.shape[3] and q.shape[1] % max(k.shape[1], 1) == 0))
    if not same:
        heads = "a multiple of k's heads" if grouped else "k's heads"
        raise ValueError(f"q and k must be (B, H, T, K) with q's heads {heads}; got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, T, K = k.shape
    if v.dim() != 4 or v.shape[:3] != (B, H, T):
        raise ValueError(f"v must be (B, H, T, V) with B, H, T of q; got {tuple(v.shape)}")
    V = v.shape[-1]
    want = (B, H, T) if scalar_gate else (B, H, T, K)
    if tuple(gate.shape) != want:
        raise ValueError(f"gate must have shape {want}; got {tuple(gate.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(f"initial_state must be {(B, H, K, V)}; got {tuple(initial_state.shape)}")

    tensors = [q, k, v, gate] + ([initial_state] if initial_state is not None else [])
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    scale = K ** -0.5 if scale is None else float(scale)
    s0 = initial_state.to(acc) if initial_state is not None else None
    return q.to(acc), k.to(acc), v.to(acc), gate.to(acc), scale, s0, v.dtype


def _zeros_state(q: Tensor, v: Tensor) -> Tensor:
    B, H, _, K = q.shape
    return q.new_zeros(B, H, K, v.shape[-1])


def _pad_time(x: Tensor, pad: int, dim: int) -> Tensor:
    """Zero-pad the time axis at the end. Padded steps have k = 0 and gate = 0
    (decay 1), so they leave the state untouched."""
    if pad == 0:
        return x
    widths = [0, 0] * (x.dim() - dim - 1) + [0, pad]
    return F.pad(x, widths)


def _chunk_recurrence(kd: Tensor, v: Tensor, decay: Tensor, s0: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Carry the state across chunks.

    kd: (B, H, N, C, K) keys already decayed to the chunk end; v: (B, H, N, C, V);
    decay: total per-chunk decay, broadcastable to (B, H, N, K, V).
    Returns the state entering each chunk, (B, H, N, K, V), and the final state.
    """
    B, H, N, _, K = kd.shape
    U = kd.transpose(-1, -2) @ v
    S = s0 if s0 is not None else kd.new_zeros(B, H, K, v.shape[-1])
    entering = []
    for n in range(N):
        entering.append(S)
        S = decay[:, :, n] * S + U[:, :, n]
    return torch.stack(entering, dim=2), S


# ----------------------------------------------------------------------------
# Vector (per key channel) gates
# ----------------------------------------------------------------------------


def naive_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Reference GLA in explicit quadratic form (O(T^2 K) memory).

    With b_t = sum_{s<=t} gk_s:
      o_i = scale * [ (q_i * exp(b_i)) @ S_0 + sum_{j<=i} (sum_k q_ik k_jk exp(b_ik - b_jk)) v_j ]
      S_T = exp(b_T)[:, None] * S_0 + sum_j (k_j * exp(b_T - b_j))^T v_j
    which equals the recurrence S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t.
    """
    q, k, v, gk, scale, s0, out_dtype = _prepare(q, k, v, gk, scale, initial_state, False)
    T = q.shape[2]
    b = gk.cumsum(dim=2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    diff = b[:, :, :, None, :] - b[:, :, None, :, :]  # (B, H, T_i, T_j, K)
    # Mask before exp: the upper triangle holds positive exponents.
    decay = torch.exp(torch.where(causal[:, :, None], diff, float("-inf")))
    A = torch.einsum("bhik,bhjk,bhijk->bhij", q, k, decay)
    o = A @ v
    b_last = b[:, :, -1:, :]  # (B, H, 1, K)
    S = (k * torch.exp(b_last - b)).transpose(-1, -2) @ v
    if s0 is not None:
        o = o + (q * torch.exp(b)) @ s0
        S = S + torch.exp(b_last).transpose(-1, -2) * s0
    return (scale * o).to(out_dtype), S


def recurrent_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Token-by-token GLA (decode path): S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t; o_t = scale q_t S_t."""
    q, k, v, gk, scale, s0, out_dtype = _prepare(q, k, v, gk, scale, initial_state, False)
    return _recurrence(q, k, v, torch.exp(gk).unsqueeze(-1), scale, s0, out_dtype)  # decay (B, H, T, K, 1)


def _recurrence(q: Tensor, k: Tensor, v: Tensor, decay: Tensor, scale: float, s0: Optional[Tensor], out_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """S_t = decay_t * S_{t-1} + k_t^T v_t, o_t = scale q_t S_t one token at a time; decay_t broadcasts to (K, V)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    # (B * H) batches of 3D products: a decode step on CPU is bound by the number of dispatches, which 5D
    # broadcasting matmuls multiply.
    S = (s0 if s0 is not None else _zeros_state(q, v)).reshape(B * H, K, V)
    q, k, v = (q * scale).reshape(B * H, T, K), k.reshape(B * H, T, K), v.reshape(B * H, T, V)
    decay = decay.reshape(B * H, T, *decay.shape[-2:])
    outs = []
    for t in range(T):
        S = torch.addcmul(decay[:, t] * S, k[:, t, :, None], v[:, t, None, :])  # the write: one broadcast multiply-add
        outs.append(torch.bmm(q[:, t, None], S))
    o = outs[0] if T == 1 else torch.cat(outs, dim=1)
    return o.view(B, H, T, V).to(out_dtype), S.view(B, H, K, V)


def _chunk_sizes(T: int, chunk_size: int) -> Tuple[int, int]:
    """Return (chunk length, sub-chunk length) for chunk_gla."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    c = max(d for d in range(1, min(_SUB_CHUNK, chunk_size) + 1) if chunk_size % d == 0)
    if T <= c:
        return T, T
    C = min(chunk_size, -(-T // c) * c)  # no point padding a short sequence to a full chunk
    return C, c


# Longer than 60 lines with its signature and docstring: the chunked scan reads top to bottom as the docstring's
# algebra; split, its steps would pass a dozen chunk tensors between them.
def chunk_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    chunk_size: int = 64,
) -> Tuple[Tensor, Tensor]:
    """Chunked parallel GLA (training / prefill); same result as the recurrence
    S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t.

    Within a chunk, attention scores use exp of differences of cumulative
    log-gates that are always <= 0, so nothing overflows even for very strong
    decays. chunk_size should be a multiple of 16 (any positive value works).
    q may hold G queries per key head (the module docstring): everything that
    depends on the gates alone, the pairwise decays among it, is computed once
    per key head.
    """
    q, k, v, gk, scale, s0, out_dtype = _prepare(q, k, v, gk, scale, initial_state, False, grouped=True)
    B, H, T, K = k.shape
    G = q.shape[1] // H
    V = v.shape[-1]
    C, c = _chunk_sizes(T, chunk_size)
    n = C // c
    N = -(-T // C)
    pad = N * C - T
    q, k, v, gk = (_pad_time(x, pad, 2) for x in (q, k, v, gk))

    q = q.reshape(B, H, G, N, n, c, K)
    k = k.reshape(B, H, N, n, c, K)
    gk = gk.reshape(B, H, N, n, c, K)
    v = v.reshape(B, H, N, C, V)

    # Cumulative log-gates within each sub-chunk, then offset to the chunk start.
    bl = gk.cumsum(dim=-2)  # (B, H, N, n, c, K)
    tot = bl[..., -1, :]  # (B, H, N, n, K)
    offs = F.pad(tot.cumsum(dim=-2)[..., :-1, :], (0, 0, 1, 0))
    b = bl + offs.unsqueeze(-2)  # cumulative from chunk start, inclusive

    # Diagonal sub-blocks: explicit pairwise decays (c x c x K), masked before exp.
    tril = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    # In place on the fresh differences (autograd keeps what exp's backward reads): on the CPU each fresh tensor of
    # this size costs its pages' first touch (BENCHMARKS.md, fifty-third session).
    dd = masked_scores(bl[..., :, None, :] - bl[..., None, :, :], tril[:, :, None], inplace=True).exp_()  # (B, H, N, n, c_i, c_j, K)
    # The keys' decayed copies once per key head, then each query's row of scores as one batched product.
    kdd = dd * k[..., None, :, :] if dd.requires_grad else dd.mul_(k[..., None, :, :])  # exp's backward reads dd
    A_diag = torch.einsum("bhgNnik,bhNnijk->bhgNnij", q, kdd)  # (B, H, G, N, n, c, c)

    if n > 1:
        # Off-diagonal sub-blocks I > J: use the end of sub-chunk J as reference
        # point, so both factors exp(b_i - ref_J) and exp(ref_J - b_j) are <= 1.
        ref = b[..., -1, :]  # (B, H, N, n_J, K)
        kg = k * torch.exp(ref.unsqueeze(-2) - b)  # (B, H, N, n_J, c, K)
        e = b[..., :, None, :, :] - ref[..., None, :, None, :]  # (B, H, N, n_I, n_J, c, K)
        strict = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
        qg = q.unsqueeze(-3) * masked_scores(e, strict[:, :, None, None], inplace=True).exp_().unsqueeze(2)
        A = torch.einsum("bhgNIJik,bhNJjk->bhgNIJij", qg, kg)  # (B, H, G, N, n_I, n_J, c, c)
        eye = torch.eye(n, dtype=q.dtype, device=q.device)[:, :, None, None]
        A = A + eye * A_diag.unsqueeze(-3)
    else:
        A = A_diag.unsqueeze(-3)
    A = A.transpose(-3, -2).reshape(B, H, G, N, C, C)

    q = q.reshape(B, H, G, N, C, K)
    k = k.reshape(B, H, N, C, K)
    b = b.reshape(B, H, N, C, K)
    b_last = b[..., -1:, :]  # (B, H, N, 1, K)
    kd = k * torch.exp(b_last - b)
    S_in, S = _chunk_recurrence(kd, v, torch.exp(b_last).transpose(-1, -2), s0)
    o = A @ v.unsqueeze(2) + (q * torch.exp(b).unsqueeze(2)) @ S_in.unsqueeze(2)
    o = (scale * o).reshape(B, H * G, N * C, V)[:, :, :T]
    return o.to(out_dtype), S


# ----------------------------------------------------------------------------
# Scalar (per head) gates
# ----------------------------------------------------------------------------


def ssd_steps(hidden_states: Tensor, dt_weight: Tensor, dt_bias: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
    """Mamba-2's step sizes dt = softplus(W_dt x + dt_bias) (B, H, T) for hidden states x (B, T, C), in float32 or
    wider; zero at pads (False in `padding_mask` (B, T)), so they neither write nor decay."""
    x = hidden_states.to(torch.promote_types(hidden_states.dtype, torch.float32))
    dt = F.softplus(F.linear(x, dt_weight.to(x.dtype)) + dt_bias.to(x.dtype))
    if padding_mask is not None:
        dt = dt * padding_mask[..., None]
    return dt.transpose(1, 2)


def naive_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Reference scalar-gate GLA: S_t = exp(g_t) S_{t-1} + k_t^T v_t; o_t = scale q_t S_t. g: (B, H, T)."""
    _prepare(q, k, v, g, scale, initial_state, True)
    return naive_gla(q, k, v, g.unsqueeze(-1).expand(q.shape), scale, initial_state)


def recurrent_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Token-by-token scalar-gate GLA (decode path): S_t = exp(g_t) S_{t-1} + k_t^T v_t; o_t = scale q_t S_t."""
    q, k, v, g, scale, s0, out_dtype = _prepare(q, k, v, g, scale, initial_state, True)
    return _recurrence(q, k, v, torch.exp(g)[..., None, None], scale, s0, out_dtype)  # decay (B, H, T, 1, 1)


def chunk_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    chunk_size: int = 64,
) -> Tuple[Tensor, Tensor]:
    """Chunked scalar-gate GLA (Mamba-2 SSD form); same result as
    S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t. g: (B, H, T)."""
    q, k, v, g, scale, s0, out_dtype = _prepare(q, k, v, g, scale, initial_state, True)
    B, H, T, K = q.shape
    V = v.shape[-1]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    q, k, v = (_pad_time(x, pad, 2) for x in (q, k, v))
    g = _pad_time(g, pad, 2)

    q = q.reshape(B, H, N, C, K)
    k = k.reshape(B, H, N, C, K)
    v = v.reshape(B, H, N, C, V)
    b = g.reshape(B, H, N, C).cumsum(dim=-1)

    # A scalar gate makes the decay matrix C x C, so no secondary chunking is needed.
    tril = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    L = torch.exp(torch.where(tril, b[..., :, None] - b[..., None, :], float("-inf")))
    A = (q @ k.transpose(-1, -2)) * L

    b_last = b[..., -1:]  # (B, H, N, 1)
    kd = k * torch.exp(b_last - b).unsqueeze(-1)
    S_in, S = _chunk_recurrence(kd, v, torch.exp(b_last).unsqueeze(-1), s0)
    o = A @ v + (q * torch.exp(b).unsqueeze(-1)) @ S_in
    o = (scale * o).reshape(B, H, N * C, V)[:, :, :T]
    return o.to(out_dtype), S
