"""Sliding-window softmax attention shared by the mixers: the window itself, its cache and the option check.

`swa` is this window alone; `gla`, `gated_deltanet` and `mamba2` mix it into their linear heads (`add_window`);
`hedgehog_swa` checks its window option here and computes its shared normaliser in `ops_window`.
Long prefills are computed in bands: each chunk of queries scores only its own and the previous chunk of keys,
so memory is O(T * window), never O(T^2); and a block of bands at a time (`ops_window.block_length`), so the
scores a prefill holds at once do not grow with its length.

Which path runs a window (`window_attention`): a decode step (one query) takes `_one_query`; a prefill (more
than one query) on CUDA takes one fused flex_attention kernel (`flex_window`) where flex takes the
tensors (float16/bfloat16/float32, head dimensions 16 to 256) unless LINEARIZE_KERNELS=torch; everything else
takes the bands, which are the reference. The `fused` argument overrides the rule (`use_flex`): True forces
flex_attention (the CPU too, forward only there), False the bands. flex_attention is compiled once per process;
the block mask of a window is made once per shape, and per call only where some key is masked. Where compiling
flex_attention fails (outside a caller's own compile), a warning says so and the bands take over for the process.
`hedgehog_swa`'s shared normaliser stays in PyTorch: it subtracts each query's largest window score, which
flex_attention returns without a gradient, and, tried for inference, its window part through flex_attention made
the whole op 1.4x slower at batch 1 and 1.07x faster at batch 8 (H200, 8K tokens): the linear part dominates.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .attention import AttentionSpec, apply_rotary
from .errors import LinearizeError
from .kernel_dispatch import mode as kernel_mode
from .ops_window import after_previous, block_length, exp_weights, masked_scores, softcapped, window_tail

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
    fused: bool | None = None,
) -> torch.Tensor:
    """Causal softmax attention over keys s with t - window < s <= t: fused, or band by band, a block at a time.

    q (B, H, T, D) are the last T positions of the S keys k, v (B, Hkv, S, D); H is a multiple of Hkv (query
    head i reads kv head i // (H // Hkv)). `key_mask` (B, S) marks real keys; a query that sees none gets 0.
    `fused` picks the path of a prefill (module docstring). The bands compute in float32 (float64 for float64
    inputs), flex_attention in the inputs' dtype with float32 softmax; returned in v's dtype.
    """
    b, h, length, _ = q.shape
    total = k.shape[2]
    if length == 1 and total <= window:
        return _one_query(q, k, v, scaling=scaling, softcap=softcap, key_mask=key_mask)
    if length > 1 and use_flex(q, k, v, fused):
        try:
            return flex_window(q, k, v, window=window, scaling=scaling, softcap=softcap, key_mask=key_mask)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            if fused or torch.compiler.is_compiling():
                raise
            _flex_failed(error)
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
    hkv, total = k.shape[1], k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    # (B * Hkv) batches of bmm, each kv head's queries together: fewer dispatches than 4D products.
    keys, values = k.to(acc).reshape(b * hkv, total, d), v.to(acc).reshape(b * hkv, total, -1)
    scores = torch.bmm(q.reshape(b * hkv, h // hkv, d).to(acc), keys.transpose(1, 2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if key_mask is not None:
        scores = torch.where(key_mask.bool()[:, None, None, :], scores.view(b, hkv, -1, total), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query that sees no real key gets 0
    return torch.bmm(probs.view(b * hkv, -1, total), values).view(b, h, 1, -1).to(v.dtype)


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
        kb, vb, mb = after_previous(kb, 2), after_previous(vb, 2), after_previous(mb, 1)
    span = kb.shape[3]
    distance = (span - c) + torch.arange(c, device=q.device)[:, None] - torch.arange(span, device=q.device)[None, :]
    allowed = (distance >= 0) & (distance < window) & mb[:, None, None, :, None, :]
    scores = torch.einsum("bkgnrd,bknjd->bkgnrj", qb, kb) * scaling
    inplace = not scores.requires_grad  # `ops_window.maybe_in_place`
    if softcap is not None:
        scores = softcapped(scores, softcap, inplace=inplace)
    scores = masked_scores(scores, allowed, inplace=inplace)
    peak = scores.amax(-1, keepdim=True)
    weights = exp_weights(scores, torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)), inplace=inplace)
    norm = weights.sum(-1, keepdim=True)
    out = torch.einsum("bkgnrj,bknje->bkgnre", weights, vb) / torch.where(norm > 0, norm, torch.ones_like(norm))
    return out.reshape(b, h, n * c, -1)[:, :, total - length : total].to(v.dtype)


# flex_attention's tile: the window's block mask is built from tiles of this many queries and keys.
FLEX_BLOCK = 128
FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def flex_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why flex_attention cannot compute a window over these tensors (None when it can)."""
    if not q.dtype == k.dtype == v.dtype or q.dtype not in FLEX_DTYPES:
        return f"flex_attention takes q, k, v of one dtype among float16/bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not (16 <= q.shape[-1] <= 256 and 16 <= v.shape[-1] <= 256):
        return f"flex_attention takes head dimensions from 16 to 256, got {q.shape[-1]} and {v.shape[-1]}"
    return None


# Where the default rule (fused=None) sends a window prefill to flex_attention.
FLEX_DEVICES = ("cuda",)
# Why compiling flex_attention failed in this process, once it has: the bands then take every window prefill that the
# default rule would have sent to it.
flex_failure: str | None = None


def use_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: bool | None) -> bool:
    """Whether a window prefill over q, k, v runs through `flex_window`: as `fused` says when it is True or False;
    for None, on CUDA where flex_attention takes the tensors, unless LINEARIZE_KERNELS=torch or compiling it has
    failed in this process."""
    if fused is None:
        return q.device.type in FLEX_DEVICES and kernel_mode() != "torch" and flex_failure is None and flex_problem(q, k, v) is None
    problem = flex_problem(q, k, v) if fused else None
    if problem is not None:
        raise LinearizeError(f"{problem}; pass fused=None to use the PyTorch path")
    return fused


def flex_window(q, k, v, *, window, scaling, softcap=None, key_mask=None):
    """Causal softmax attention over keys t - window < s <= t through one fused flex_attention kernel.

    q (B, H, T, D) are the last T positions of the S keys k, v (B, Hkv, S, D); H is a multiple of Hkv (query head i
    reads kv head i // (H // Hkv)). `key_mask` (B, S) marks real keys; a query that sees none gets 0. Returns the
    output in q's dtype. Memory is O(T * window): no T x S scores; the block mask skips the tiles outside the window.

    Example:
        >>> q = torch.randn(1, 9, 4096, 64, device="cuda", dtype=torch.bfloat16)
        >>> k, v = torch.randn(2, 1, 3, 4096, 64, device="cuda", dtype=torch.bfloat16)
        >>> flex_window(q, k, v, window=64, scaling=0.125).shape
        torch.Size([1, 9, 4096, 64])
    """
    length, total = q.shape[2], k.shape[2]
    blocks = _window_blocks(length, total, window, q.device)
    if key_mask is not None and not bool(key_mask.all()):
        blocks = _padded_blocks(blocks, key_mask.bool(), window)
    # Inside a compiled model the caller's compile fuses flex_attention itself.
    run = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    return run(
        q, k, v, score_mod=_softcap_mod(softcap) if softcap else None, block_mask=blocks, scale=scaling,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def _flex_failed(error: Exception) -> None:
    """Record that compiling flex_attention failed, and warn once: the bands, the reference, run instead.

    Seen on an H200 (torch 2.11): a float32 window over 2 query heads and 1 kv head, left-padded, 70 tokens, failed
    to lower ("NoValidChoicesError") in a test; windows of SmolLM2's shape compiled. A user's prefill must not fail
    where the bands can compute it."""
    global flex_failure
    cause = getattr(error, "inner_exception", None) or error
    flex_failure = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:200]}"
    warnings.warn(f"compiling flex_attention for a window failed ({flex_failure}); windows run on the PyTorch path (slower) "
                  "from now on in this process", stacklevel=4)


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process: uncompiled, it materialises every score."""
    return torch.compile(flex_attention)


@functools.cache
def _softcap_mod(softcap: float):
    def capped(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    return capped


@functools.lru_cache(maxsize=64)
def _window_blocks(length: int, total: int, window: int, device: torch.device) -> BlockMask:
    """The block mask of a window over keys that are all real, one for every batch; made once per shape."""
    # Tensors, not ints, in the mask: flex_attention compiles once for every window and context.
    context = torch.tensor(total - length, device=device)
    reach = torch.tensor(window, device=device)

    def in_window(b, h, q_idx, kv_idx):
        t = q_idx + context
        return (kv_idx <= t) & (kv_idx > t - reach)

    return _block_mask(length, total, window, torch.arange(total + 1, device=device)[None], in_window)


def _padded_blocks(blocks: BlockMask, key_mask: torch.Tensor, window: int) -> BlockMask:
    """`blocks` narrowed to the real keys of each sequence: tiles with none are skipped, tiles with some masked."""
    in_window = blocks.mask_mod

    def real_in_window(b, h, q_idx, kv_idx):
        return in_window(b, h, q_idx, kv_idx) & key_mask[b, kv_idx]

    real_before = F.pad(key_mask.to(torch.int32).cumsum(1), (1, 0))
    return _block_mask(*blocks.seq_lengths, window, real_before, real_in_window)


def _block_mask(length, total, window, real_before, mask_mod) -> BlockMask:
    """flex_attention's tiles for queries at the last `length` of `total` positions and keys t - window < s <= t.

    real_before (B or 1, total + 1) counts the real keys before each position. A tile is skipped where none of its
    keys is seen, full (mask_mod skipped) where every query sees every key, partial (mask_mod applied) otherwise;
    tiles cut short by the ends are never full, as `create_block_mask` has them.
    """
    size = FLEX_BLOCK
    device = real_before.device
    rows = torch.arange(0, length, size, device=device)
    first = (total - length + rows)[:, None]
    last = (total - length + (rows + size).clamp(max=length) - 1)[:, None]
    starts = torch.arange(0, total, size, device=device)
    ends = (starts + size).clamp(max=total) - 1
    # Some query of a tile sees the keys in (first - window, last]; all of them see those in (last - window, first].
    low, high = torch.maximum(starts, first - window + 1), torch.minimum(ends, last)
    seen = (low <= high) & (real_before[:, high + 1] - real_before[:, low] > 0)
    whole = (ends <= first) & (starts > last - window) & (rows + size <= length)[:, None]
    full = whole & (real_before[:, ends + 1] - real_before[:, starts] == size)[:, None]
    partial = seen & ~full

    def ordered(dense):
        dense = dense[:, None].to(torch.int32)
        return dense.sum(-1, dtype=torch.int32), dense.argsort(dim=-1, descending=True, stable=True).to(torch.int32)

    return BlockMask.from_kv_blocks(
        *ordered(partial), *ordered(full), BLOCK_SIZE=size, mask_mod=mask_mod, seq_lengths=(length, total)
    )


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

    `cache` is None (no cache) or a dict, possibly empty, holding "k", "v" (B, Hkv, window - 1, D; rotated, left-padded while fewer were seen)
    and "mask" (B, window - 1). Returns the heads and, when `cache` was given, the next cache. A decode step
    is the recurrent form: its one query scores the cached window plus its own key, a single band.
    """
    q, k = apply_rotary(q, k, position_embeddings)
    # No mask where nothing is masked: the fused path then needs no look at the mask (a device sync) to know it.
    mask = padding_mask
    if cache:
        k = torch.cat((cache["k"].to(k.dtype), k), dim=2)
        v = torch.cat((cache["v"].to(v.dtype), v), dim=2)
        mask = F.pad(cache["mask"], (0, q.shape[2]), value=True) if mask is None else torch.cat((cache["mask"], mask.bool()), dim=1)
    heads = window_attention(q, k, v, window=window, scaling=spec.scaling, softcap=spec.softcap, key_mask=mask)
    if cache is None:
        return heads, None
    if mask is None:
        mask = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    return heads, window_tail(max(window - 1, 0), mask, k=k, v=v)


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
    dropout: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """share * (the teacher's softmax over the last `window` keys) + (1 - share) * `linear` heads (B, H, T, D).

    `share` is a number or a per-head tensor (H,). `tensors` is None without a cache, else the layer state's
    tensors, from which the window's "k", "v" and "mask" are read. `dropout` (training only): each head of each
    sequence loses its window with this probability, its share set to 0, so the linear part carries it alone.
    Returns the mixed heads in `linear`'s dtype and the window's next cache entries (empty without a cache), for
    the caller to merge into its state.
    """
    cache = None if tensors is None else {n: tensors[n] for n in ("k", "v", "mask") if n in tensors}
    heads, cache = sliding_window_heads(spec, window, q, k, v, position_embeddings, padding_mask, cache)
    if torch.is_tensor(share):
        share = share.to(linear.dtype).view(-1, 1, 1)
    if dropout:
        share = share * (torch.rand(linear.shape[0], linear.shape[1], 1, 1, device=linear.device) >= dropout).to(linear.dtype)
    # linear + share * (heads - linear): the share's mix in one operation.
    return torch.lerp(linear, heads.to(linear.dtype), share), cache or {}


def check_window(window: int, config, name: str, low: int = 1) -> None:
    """Refuse a `window` option below `low` or longer than the model's context."""
    limit = getattr(config, "max_position_embeddings", None)
    if window < low:
        raise LinearizeError(f"option 'window' of mixer {name!r} must be at least {low}, got {window}")
    if limit is not None and window > limit:
        raise LinearizeError(
            f"option 'window' of mixer {name!r} is {window}, longer than the model's context of {limit} tokens; use a smaller window"
        )
