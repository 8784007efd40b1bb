"""Sliding-window softmax attention shared by the mixers: the window itself, its cache and the option check.

`swa` is this window alone; `gla`, `gated_deltanet` and `mamba2` mix it into their linear heads (`add_window`);
`hedgehog_swa` checks its window option here and computes its shared normaliser in `ops_window`.
Long prefills are computed in bands: each chunk of queries scores only its own and the previous chunk of keys,
so memory is O(T * window), never O(T^2); and a block of bands at a time (`ops_window.block_length`), so the
scores a prefill holds at once do not grow with its length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import AttentionSpec, apply_rotary
from .errors import LinearizeError
from .ops_window import block_length

# Queries per band: long enough to amortise the band's overhead; a band is never shorter than the window.
BAND = 64


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    scaling: float,
    softcap: float | None = None,
    key_mask: torch.Tensor | None = None,
    band: int = BAND,
) -> torch.Tensor:
    """Causal softmax attention over keys s with t - window < s <= t, computed band by band, a block at a time.

    q (B, H, T, D) are the last T positions of the S keys k, v (B, Hkv, S, D); H is a multiple of Hkv (query
    head i reads kv head i // (H // Hkv)). `key_mask` (B, S) marks real keys; a query that sees none gets 0.
    Computed in float32 (float64 for float64 inputs), returned in v's dtype.
    """
    b, h, length, _ = q.shape
    total = k.shape[2]
    if length == 1 and total <= window:
        return _one_query(q, k, v, scaling=scaling, softcap=softcap, key_mask=key_mask)
    c = min(max(band, window), total)
    step = block_length(b * h * 2 * c, c)
    if length <= step:
        return _bands(q, k, v, window=window, scaling=scaling, softcap=softcap, key_mask=key_mask, band=band)
    if key_mask is None:
        key_mask = torch.ones(b, total, dtype=torch.bool, device=k.device)
    context = total - length
    outputs = []
    for start in range(0, length, step):
        stop = min(start + step, length)
        # The block's queries see keys back to window - 1 before its first one.
        keys = slice(max(0, context + start - (window - 1)), context + stop)
        outputs.append(
            _bands(
                q[:, :, start:stop], k[:, :, keys], v[:, :, keys], window=window, scaling=scaling, softcap=softcap,
                key_mask=key_mask[:, keys], band=band,
            )
        )
    return torch.cat(outputs, dim=2)


def _one_query(q, k, v, *, scaling, softcap, key_mask):
    """A decode step: one query that sees all the keys it is given, in a few kernels (no bands to pad and mask)."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bkgd,bksd->bkgs", q.reshape(b, hkv, h // hkv, d).to(acc), k.to(acc)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query that sees no real key gets 0
    return torch.einsum("bkgs,bkse->bkge", probs, v.to(acc)).reshape(b, h, 1, -1).to(v.dtype)


def _bands(q, k, v, *, window, scaling, softcap, key_mask, band):
    """`window_attention` for one block of queries, all its bands at once."""
    b, h, length, d = q.shape
    hkv, total = k.shape[1], k.shape[2]
    groups = h // hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    if key_mask is None:
        key_mask = torch.ones(b, total, dtype=torch.bool, device=k.device)
    # A band of c >= window - 1 queries needs only its own and the previous band of keys.
    c = min(max(band, window), total)
    n = -(-total // c)
    pad = n * c - total
    qb = F.pad(q.to(acc), (0, 0, total - length, pad)).reshape(b, hkv, groups, n, c, d)
    kb = F.pad(k.to(acc), (0, 0, 0, pad)).reshape(b, hkv, n, c, d)
    vb = F.pad(v.to(acc), (0, 0, 0, pad)).reshape(b, hkv, n, c, v.shape[-1])
    mb = F.pad(key_mask.bool(), (0, pad)).reshape(b, n, c)
    if n > 1:
        kb = torch.cat((F.pad(kb, (0, 0, 0, 0, 1, 0))[:, :, :-1], kb), dim=3)
        vb = torch.cat((F.pad(vb, (0, 0, 0, 0, 1, 0))[:, :, :-1], vb), dim=3)
        mb = torch.cat((F.pad(mb, (0, 0, 1, 0))[:, :-1], mb), dim=2)
    span = kb.shape[3]
    distance = (span - c) + torch.arange(c, device=q.device)[:, None] - torch.arange(span, device=q.device)[None, :]
    allowed = (distance >= 0) & (distance < window) & mb[:, None, None, :, None, :]
    scores = torch.einsum("bkgnrd,bknjd->bkgnrj", qb, kb) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    peak = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)))
    norm = weights.sum(-1, keepdim=True)
    out = torch.einsum("bkgnrj,bknje->bkgnre", weights, vb) / torch.where(norm > 0, norm, torch.ones_like(norm))
    return out.reshape(b, h, n * c, -1)[:, :, total - length : total].to(v.dtype)


def effective_window(window: int, spec: AttentionSpec) -> int:
    """The option's window, narrowed to the teacher layer's own sliding window where it has a smaller one."""
    if window and spec.sliding_window:
        return min(window, spec.sliding_window)
    return window


def window_cache_size(window: int, spec: AttentionSpec) -> int:
    """Elements of a window KV cache per sequence: window - 1 rotated keys and values per kv head, and their mask."""
    keep = max(window - 1, 0)
    return keep * (2 * spec.num_kv_heads * spec.head_dim + 1)


def sliding_window_heads(
    spec: AttentionSpec,
    window: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position_embeddings,
    padding_mask: torch.Tensor | None,
    cache: dict[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """The teacher's softmax heads over the last `window` keys, continuing from `cache` when given.

    `cache` is None (no cache) or a dict, possibly empty, holding "k", "v" (B, Hkv, <= window - 1, D; rotated)
    and "mask" (B, <= window - 1). Returns the heads and, when `cache` was given, the next cache. A decode step
    is the recurrent form: its one query scores the cached window plus its own key, a single band.
    """
    q, k = apply_rotary(q, k, position_embeddings)
    mask = padding_mask
    if mask is None:
        mask = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    if cache:
        k = torch.cat((cache["k"].to(k.dtype), k), dim=2)
        v = torch.cat((cache["v"].to(v.dtype), v), dim=2)
        mask = torch.cat((cache["mask"], mask.bool()), dim=1)
    heads = window_attention(q, k, v, window=window, scaling=spec.scaling, softcap=spec.softcap, key_mask=mask)
    if cache is None:
        return heads, None
    cut = k.shape[2] - min(window - 1, k.shape[2])
    # Copies, so the cache does not keep a long prefill's keys alive through a view.
    return heads, {"k": k[:, :, cut:].clone(), "v": v[:, :, cut:].clone(), "mask": mask[:, cut:].clone()}


def add_window(
    spec: AttentionSpec,
    window: int,
    linear: torch.Tensor,
    share,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    position_embeddings,
    padding_mask: torch.Tensor | None,
    tensors: dict[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """share * (the teacher's softmax over the last `window` keys) + (1 - share) * `linear` heads (B, H, T, D).

    `share` is a number or a per-head tensor (H,). `tensors` is None without a cache, else the layer state's
    tensors, from which the window's "k", "v" and "mask" are read. Returns the mixed heads in `linear`'s dtype
    and the window's next cache entries (empty without a cache), for the caller to merge into its state.
    """
    cache = None if tensors is None else {n: tensors[n] for n in ("k", "v", "mask") if n in tensors}
    heads, cache = sliding_window_heads(spec, window, q, k, v, position_embeddings, padding_mask, cache)
    if torch.is_tensor(share):
        share = share.to(linear.dtype)[:, None, None]
    return share * heads.to(linear.dtype) + (1 - share) * linear, cache or {}


def check_window(window: int, config, name: str, low: int = 1) -> None:
    """Refuse a `window` option below `low` or longer than the model's context."""
    limit = getattr(config, "max_position_embeddings", None)
    if window < low:
        raise LinearizeError(f"option 'window' of mixer {name!r} must be at least {low}, got {window}")
    if limit is not None and window > limit:
        raise LinearizeError(
            f"option 'window' of mixer {name!r} is {window}, longer than the model's context of {limit} tokens; use a smaller window"
        )
