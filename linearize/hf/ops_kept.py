"""`hedgehog_swa` with kept keys: beside its softmax window, the N keys a kv head that its linear state recalls worst
stay exact. Learned from LoLA's sparse cache (its paper; none of its code). PyTorch, the reference of its kernels: on
CUDA an inference prefill's scoring runs in `triton_kept`, a decode step in `triton_step` (the ring below).

Keys are decided `block` (B) at a time, at block boundaries of the absolute position: query t of block c = t // B
scores by softmax the keys s with cB - w < s <= t (its window, w to w + B - 1 keys) and the kept keys of its block;
every other earlier key is folded into the linear state, read through the feature maps, and the two share one
normaliser as in `ops_window`. At the boundary cB the B keys in ((c - 1)B - w, cB - w] are decided: together with the
N kept so far they are ordered by their recall error (descending, ties in the order kept then candidates, oldest
first), the first N are kept and the other B are folded.

The recall error of key s is how badly linear attention over every earlier key would give back its value:
|| v_s - sum_{j<s} (fk_s . fk_j) v_j / sum_{j<s} (fk_s . fk_j) ||^2 over real keys (+inf for the first real key,
which nothing before it predicts, -inf for padding, which is never kept). It depends on the keys alone, not on what
was kept, so a prefill computes every error at once, and every boundary's decision too (`_kept_segment`); it is
computed without gradients (the choice is not trained).

Layout: q, fq (B, H, T, *), k, v, fk (B, Hkv, T, *), H a multiple of Hkv (query head i reads kv head i // (H // Hkv));
`sm_weight`/`ln_weight` numbers or per-query-head tensors (H,). The state, per kv head: S (F, V) and z (F) sum the
folded keys; k, v, fk (B, Hkv, N + R, *) and mask (B, Hkv, N + R) hold the N kept keys in rows 0 .. N - 1, then a ring
of R = w + B - 1 rows in which position p sits in row N + p mod R: the last R positions, those not yet decided real and
the others zero and masked; err (B, Hkv, N) the kept keys' recall errors (an empty slot's -inf, and masked). A decode
step writes its key into its row of the ring and scores every row at once: one product, no copy of the window (a step
on the CPU is bound by its number of operations and copies). `position` is the absolute position of the call's first
token (the count of tokens the state has seen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops_window
from .ops_window import _acc, _row_weights, block_length, exp_weights, masked_scores, softcapped, written
from .triton_kept import kept_prefill_problem, kept_window_prefill


def empty_kept_state(q, k, v, fk, window: int, keep: int, block: int) -> dict[str, torch.Tensor]:
    """The state before any token: empty sums, every row masked zeros, N empty kept slots."""
    b, hkv, _, d = k.shape
    rows, acc = keep + window + block - 1, _acc(q)
    return {
        "S": q.new_zeros(b, hkv, fk.shape[-1], v.shape[-1], dtype=acc),
        "z": q.new_zeros(b, hkv, fk.shape[-1], dtype=acc),
        "k": k.new_zeros(b, hkv, rows, d),
        "v": v.new_zeros(b, hkv, rows, v.shape[-1]),
        "fk": fk.new_zeros(b, hkv, rows, fk.shape[-1]),
        "mask": torch.zeros(b, hkv, rows, dtype=torch.bool, device=k.device),
        "err": torch.full((b, hkv, keep), float("-inf"), dtype=acc, device=k.device),
    }


def ends_block(position: int, block: int) -> bool:
    """Whether the step at `position` ends a block: its decision follows it (`decide_block`)."""
    return (position + 1) % block == 0


def ring_rows(positions, keep: int, ring: int):
    """The state's rows of `positions` (a number or a tensor of them): N + p mod R, R = w + B - 1 the ring's length."""
    return keep + positions % ring


def _unpacked(state: dict, keep: int, ring: int, position: int) -> dict[str, torch.Tensor]:
    """The state's parts in the order the parallel form reads them: the kept keys (kept_k, kept_v, kept_fk, kept_err)
    and the last L = R - 1 positions (k, v, fk, mask (B, L)), oldest first."""
    tail = ring_rows(torch.arange(position - ring + 1, position, device=state["k"].device), keep, ring)
    parts = {f"kept_{name}": state[name][:, :, :keep] for name in ("k", "v", "fk")}
    parts.update({name: state[name].index_select(2, tail) for name in ("k", "v", "fk")})
    return {**parts, "mask": state["mask"][:, 0].index_select(1, tail), "kept_err": state["err"], "S": state["S"], "z": state["z"]}


def _packed(parts: dict, ring: int, end: int) -> dict[str, torch.Tensor]:
    """`_unpacked`'s inverse for a state that has seen `end` tokens: the tail's L positions, after one decided (zero
    and masked) before them, rolled into their rows of the ring."""
    shift = end % ring

    def rows(kept, tail):
        return torch.cat((kept, torch.roll(F.pad(tail, (0, 0, 1, 0)), shift, dims=2)), dim=2)

    hkv = parts["kept_k"].shape[1]
    mask = torch.roll(F.pad(parts["mask"], (1, 0), value=False), shift, dims=1)
    return {
        "S": parts["S"],
        "z": parts["z"],
        **{name: rows(parts[f"kept_{name}"], parts[name]) for name in ("k", "v", "fk")},
        "mask": torch.cat((parts["kept_err"] > float("-inf"), mask[:, None].expand(-1, hkv, -1)), dim=2),
        "err": parts["kept_err"],
    }


def _check(window: int, keep: int, block: int) -> None:
    if window < 1 or keep < 1 or block < 1:
        raise ValueError(f"kept keys need window, keep and block of at least 1, got {window}, {keep}, {block}")


def _weights(weight, hkv: int, acc: torch.dtype, trailing: int):
    """A per-query-head weight (H,) as (Hkv, G) followed by `trailing` broadcast dimensions; a number as it is."""
    if not torch.is_tensor(weight):
        return weight
    return weight.to(acc).reshape(hkv, -1, *([1] * trailing))


def recall_errors(fk, v, mask, S, z, kept_fk, kept_v, kept_err, block: int) -> torch.Tensor:
    """(B, Hkv, T) each key's recall error against the sums, the real kept keys and the real keys before it in `fk`
    (a causal linear attention of the keys' own features, a block at a time), without gradients. The values carry a
    column of ones, so each product gives a read-out's numerator and its normaliser at once."""
    with torch.no_grad():
        acc = S.dtype
        b, hkv, length, f = fk.shape
        fkm = fk.to(acc) * mask[:, None, :, None].to(acc)
        values = v.to(acc)
        ones = values.new_ones(1).expand(*values.shape[:-1], 1)
        kfk = kept_fk.to(acc) * (kept_err > float("-inf")).to(acc)[..., None]
        # What the sums and the kept keys give every key, [S + fk_kept^T v_kept | z + sum fk_kept] (F, E + 1).
        known = torch.cat((S + kfk.transpose(-1, -2) @ kept_v.to(acc), (z + kfk.sum(2))[..., None]), dim=-1)
        # The keys before each one in this call: within its block explicitly, the earlier blocks through their sums.
        n = -(-length // block)
        pad = n * block - length
        fc = F.pad(fkm, (0, 0, 0, pad)).reshape(b, hkv, n, block, f)
        vc = F.pad(torch.cat((values, ones), dim=-1), (0, 0, 0, pad)).reshape(b, hkv, n, block, -1)
        gram = (fc @ fc.transpose(-1, -2)).tril(-1)
        before = F.pad((fc.transpose(-1, -2) @ vc).cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, :n]
        read = (gram @ vc + fc @ (before + known[:, :, None])).reshape(b, hkv, n * block, -1)[:, :, :length]
        num, den = read[..., :-1], read[..., -1]
        err = ((values - num / den.clamp_min(1e-30)[..., None]) ** 2).sum(-1)
        err = torch.where(den > 0, err, float("inf"))
        return torch.where(mask[:, None, :], err, float("-inf"))


def _decide(pool_err: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the pool (..., N + B) of the N kept (highest error first) and the B folded."""
    order = pool_err.argsort(dim=-1, descending=True, stable=True)
    return order[..., :keep], order[..., keep:]


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, Hkv, P, *) at index (B, Hkv, ...) along P: (B, Hkv, ..., *). Whole rows by `index_select`, which copies a
    row at a time where `gather` indexes each element (a tenth of the time on the CPU at a prefill's sizes)."""
    b, hkv, p = x.shape[:3]
    rows = index.reshape(b * hkv, -1) + torch.arange(0, b * hkv * p, p, device=x.device)[:, None]
    return x.reshape(b * hkv * p, -1).index_select(0, rows.flatten()).view(*index.shape, x.shape[-1])


def kept_window_linear(
    q, k, v, fq, fk, *, window, keep, block, scaling, sm_weight=1.0, ln_weight=1.0, key_mask=None, softcap=None, state=None,
    position=0, output_state=False,
):
    """The parallel form, a segment of `ops_window.block_length` tokens at a time (each continuing from the state the
    last left, so a long prefill's working memory does not grow with it). Returns (o (B, H, T, V) in v's dtype, the
    next state or None)."""
    _check(window, keep, block)
    b, h, length, _ = q.shape
    kernel = kept_prefill_problem(q, k, v, fq) is None
    step = segment_length(b, h, k.shape[1], window=window, keep=keep, block=block, features=fk.shape[-1], values=v.shape[-1], kernel=kernel)
    if not state:
        state = empty_kept_state(q, k, v, fk, window, keep, block)
    outputs = []
    for start in range(0, length, step):
        part = slice(start, start + step)
        mask = None if key_mask is None else key_mask[:, part]
        o, state = _kept_segment(
            q[:, :, part], k[:, :, part], v[:, :, part], fq[:, :, part], fk[:, :, part], window=window, keep=keep, block=block,
            scaling=scaling, sm_weight=sm_weight, ln_weight=ln_weight, key_mask=mask, softcap=softcap, state=state,
            position=position + start, kernel=kernel,
        )
        outputs.append(o)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)), (state if output_state else None)


def segment_length(b: int, h: int, hkv: int, *, window: int, keep: int, block: int, features: int, values: int, kernel: bool) -> int:
    """Tokens a prefill segment holds. The PyTorch path scores each query against its window and kept keys, b h (w + 2B
    + N) elements a token (`ops_window.block_length`). The kernel (`triton_kept`) scores without materialising them, so
    its segment grows until the decisions' own tensors reach `ops_window.BLOCK_ELEMENTS`: the pool's membership after
    every boundary, b Hkv (L / B) (N + L) elements of int64 (counted twice), and the recall errors' sums of each block,
    b Hkv (L / B) F (V + 1). Fewer segments, fewer of a prefill's host-bound operations (each segment runs some 240 of
    them a layer, whatever its length: BENCHMARKS.md, forty-eighth session); never shorter than the PyTorch path's."""
    step = block_length(b * h * (window + 2 * block + keep), block)
    if not kernel:
        return step
    budget = ops_window.BLOCK_ELEMENTS / (b * hkv)
    # (L / B)(N + L) <= budget / 2, solved for L; and (L / B) F (V + 1) <= budget.
    membership = (-keep + (keep * keep + 2 * block * budget) ** 0.5) / 2
    sums = budget * block / (features * (values + 1))
    return max(step, int(min(membership, sums)) // block * block)


# Longer than 60 lines: the segment reads top to bottom as the module docstring's steps (errors, decisions, sums, then
# the heads, `_heads` or its kernel, and the next state); split further, each step would pass a dozen tensors on.
# `kernel`: whether the heads are scored by `kept_window_prefill` (the call's choice, which set the segment's length).
def _kept_segment(
    q, k, v, fq, fk, *, window, keep, block, scaling, sm_weight, ln_weight, key_mask, softcap, state, position, kernel,
):
    b, length = q.shape[0], q.shape[2]
    hkv, acc = k.shape[1], _acc(q)
    tail = window + block - 2
    state = _unpacked(state, keep, tail + 1, position)
    if key_mask is None:
        key_mask = torch.ones(b, length, dtype=torch.bool, device=q.device)
    # U: the undecided keys, the state's tail then this call's, front-padded so that blocks start at multiples of B.
    front = (position - tail) % block
    base = position - tail - front
    total = front + tail + length
    n = -(-total // block)
    back = n * block - total

    def undecided(old, new):
        return F.pad(torch.cat((old.to(new.dtype), new), dim=2), (0, 0, front, back))

    uk, uv, ufk = undecided(state["k"], k), undecided(state["v"], v), undecided(state["fk"], fk)
    umask = F.pad(torch.cat((state["mask"], key_mask.bool()), dim=1), (front, back), value=False)
    S, z = state["S"], state["z"]
    err = recall_errors(ufk, uv, umask, S, z, state["kept_fk"], state["kept_v"], state["kept_err"], block)
    # The decisions at the M boundaries this call passes, all at once. Errors depend on the keys alone, so the kept
    # set after a boundary is the first N of every key decided by then in one order, error descending, then oldest
    # first (the state's kept slots, in their order, before the keys decided here), which is the order the decode
    # step's sort leaves; a key left out once never returns. Pool index p < N is the state's kept slot p, N + i the
    # i-th key decided here: U's key first + i, at boundary i // B + 1.
    first_boundary = (position // block + 1) * block
    m = max(0, (position + length - first_boundary) // block + 1)
    first = first_boundary - block - window + 1 - base
    pool_err = torch.cat((state["kept_err"], err[:, :, first : first + m * block]), dim=2)
    order = pool_err.argsort(dim=-1, descending=True, stable=True)
    decided_at = ((torch.arange(keep + m * block, device=q.device) - keep).div(block, rounding_mode="floor") + 1).clamp_min(0)
    member = decided_at[order][:, :, None, :] <= torch.arange(m + 1, device=q.device)[:, None]  # (B, Hkv, M + 1, pool)
    rank = member.cumsum(-1) - 1
    slots = torch.where(member & (rank < keep), rank, keep)
    refs = order.new_zeros(b, hkv, m + 1, keep + 1).scatter_(-1, slots, order[:, :, None].expand(-1, -1, m + 1, -1))[..., :keep]
    # Each boundary folds B keys: those left out there first (left out once, out for good), in the sort's order.
    folded_at = (m + 1) - (member & (rank >= keep)).sum(2)
    folded = order.gather(-1, folded_at.argsort(dim=-1, stable=True)[..., : m * block]).view(b, hkv, m, block)
    kept_refs, folded = (torch.where(x < keep, x, x + first) for x in (refs, folded))  # as indices into the kept slots then U
    all_err = torch.cat((state["kept_err"], err), dim=2)
    all_k = torch.cat((state["kept_k"].to(k.dtype), uk), dim=2)
    all_v = torch.cat((state["kept_v"].to(v.dtype), uv), dim=2)
    kept_real = (state["kept_err"] > float("-inf"))[..., None]
    all_fk = torch.cat((state["kept_fk"].to(acc) * kept_real, ufk.to(acc) * umask[:, None, :, None]), dim=2)
    # The sums each query block reads: the state's plus every key folded at a boundary before the block.
    folded_fk = _gather(all_fk, folded)
    added_S = torch.einsum("bhmsf,bhmse->bhmfe", folded_fk, _gather(all_v, folded).to(acc))
    sums_S = torch.cat((S[:, :, None], S[:, :, None] + added_S.cumsum(2)), dim=2)
    sums_z = torch.cat((z[:, :, None], z[:, :, None] + folded_fk.sum(3).cumsum(2)), dim=2)
    refs = kept_refs[:, :, -1]
    # Query blocks: those of U holding this call's queries (the first `offset` into its block); each reads the
    # decisions at boundaries up to its start.
    first_block, offset = divmod(front + tail, block)
    starts = base + block * torch.arange(first_block, n, device=q.device)
    seen = ((starts - first_boundary).div(block, rounding_mode="floor") + 1).clamp_min(0)
    kept_refs = kept_refs[:, :, seen]  # (B, Hkv, Q, N)
    block_S, block_z = sums_S[:, :, seen], sums_z[:, :, seen]

    kept_real = torch.gather(all_err, 2, kept_refs.flatten(2)).view_as(kept_refs) > float("-inf")
    scored = (q, fq, all_k, all_v, umask, kept_refs, kept_real, block_S, block_z, sm_weight, ln_weight)
    layout = dict(keep=keep, first_block=first_block, offset=offset, window=window, block=block, scaling=scaling, softcap=softcap)
    if kernel:
        o = kept_window_prefill(*scored, **layout)
    else:
        o = _heads(*scored, **layout)
    # The next state: the sums after the last boundary, its kept keys, and the last L positions with those decided at
    # it (at or before its position - w) zeroed and masked, as the decode step leaves them.
    end = position + length
    undecided = torch.arange(end - tail, end, device=q.device) > end // block * block - window
    last = slice(front + length, front + tail + length)
    new = {
        "S": sums_S[:, :, -1],
        "z": sums_z[:, :, -1],
        "k": uk[:, :, last] * undecided[:, None],
        "v": uv[:, :, last] * undecided[:, None],
        "fk": ufk[:, :, last] * undecided[:, None],
        "mask": umask[:, last] & undecided,
        "kept_k": _gather(all_k, refs),
        "kept_v": _gather(all_v, refs),
        "kept_fk": _gather(all_fk, refs).to(fk.dtype),
        "kept_err": torch.gather(all_err, 2, refs),
    }
    return o, _packed(new, tail + 1, end)


def _heads(
    q, fq, all_k, all_v, umask, kept_refs, kept_real, block_S, block_z, sm_weight, ln_weight, *, keep, first_block, offset, window,
    block, scaling, softcap,
):
    """The heads (B, H, T, V) in v's dtype of a segment's queries from what `_kept_segment` decided (the PyTorch path of
    `triton_kept.kept_window_prefill`, which documents the arguments): each query block's window of U's keys and its
    kept keys by softmax, its sums through the feature maps, under one normaliser."""
    b, h, length, _ = q.shape
    hkv, acc = all_k.shape[1], _acc(q)
    g = h // hkv
    rows = g * block
    back = block_S.shape[2] * block - offset - length

    def query_blocks(x):  # (B, H, T, *) -> (B, Hkv, Q, G x B, *): a block's queries of one kv head's G heads as one set of rows
        x = F.pad(x, (0, 0, offset, back))
        return x.reshape(b, hkv, g, -1, block, x.shape[-1]).transpose(2, 3).reshape(b, hkv, -1, rows, x.shape[-1])

    qb = query_blocks(q.to(acc) * scaling)
    fqb = query_blocks(fq.to(acc))
    # The keys of query block j: its kept keys, then its window, the w + B - 1 keys of U ending with its last (w - 1
    # before its first); one product scores both, so one pass each masks, exponentiates and sums them.
    width = window + block - 1

    def keys_of_blocks(x):  # (B, Hkv, keep + M, *) -> (B, Hkv, Q, N + width, *)
        windowed = F.pad(x[:, :, keep:], (0, 0, window - 1, 0))[:, :, first_block * block :].unfold(2, width, block)
        return torch.cat((_gather(x, kept_refs), windowed.transpose(-1, -2)), dim=3)

    keys, values = keys_of_blocks(all_k.to(acc)), keys_of_blocks(all_v.to(acc))
    wmask = F.pad(umask, (window - 1, 0))[:, first_block * block :].unfold(1, width, block)  # (B, Q, width)
    causal = torch.arange(width, device=q.device)[None, :] <= torch.arange(block, device=q.device)[:, None] + window - 1
    scores = qb @ keys.transpose(-1, -2)
    inplace = not scores.requires_grad
    if softcap is not None:
        scores = softcapped(scores, softcap, inplace=inplace)
    # Each part masked by its own mask: the kept keys' (B, Hkv, Q, 1, N), the window's (B, 1, Q, rows, width).
    n = kept_refs.shape[-1]
    parts = [(scores[..., :n], kept_real[:, :, :, None, :]), (scores[..., n:], causal.repeat(g, 1) & wmask[:, None, :, None, :])]
    parts = [masked_scores(part, real, inplace=inplace) for part, real in parts]
    if not inplace:
        scores = torch.cat(parts, dim=-1)
    peak = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(acc).min)
    smw, lnw = (_row_weights(w, hkv, block, acc) for w in (sm_weight, ln_weight))
    a = exp_weights(scores, peak, smw, inplace=inplace)
    num = a @ values + lnw * (fqb @ block_S)
    den = a.sum(-1, keepdim=True) + lnw * (fqb @ block_z[..., None])
    o = (num / den.clamp_min(1e-30)).reshape(b, hkv, -1, g, block, num.shape[-1]).transpose(2, 3).reshape(b, h, -1, num.shape[-1])
    return o[:, :, offset : offset + length].to(all_v.dtype)


def decode_kept_window_linear(
    q, k, v, fq, fk, *, window, keep, block, scaling, sm_weight=1.0, ln_weight=1.0, key_mask=None, softcap=None, state=None, position=0,
    decide=True,
):
    """One decode step of the token at `position`: its key written into its row of the ring (in place where autograd
    records nothing, else into a copy), then every real row scored by softmax in one product and the sums read through
    the features; where the next position starts a block, the block is decided (`decide_block`), unless `decide` is
    False: then the caller decides after the step, and `position` may be a 0-d tensor on the state's device (a compiled
    step reads it there). Returns (o (B, H, 1, V) in v's dtype, the next state)."""
    _check(window, keep, block)
    if not state:
        state = empty_kept_state(q, k, v, fk, window, keep, block)
    b, h, _, d = q.shape
    hkv, acc = k.shape[1], _acc(q)
    g, rows = h // hkv, b * hkv
    row = ring_rows(position, keep, window + block - 1)
    real = True if key_mask is None else key_mask.bool()[:, None]
    state = {**state, **{name: written(state[name], row, new) for name, new in (("k", k), ("v", v), ("fk", fk), ("mask", real))}}
    keys, values, mask = state["k"], state["v"], state["mask"]
    width = keys.shape[2]
    scores = torch.bmm(q.reshape(rows, g, d).to(acc) * scaling, keys.to(acc).view(rows, width, d).mT)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = torch.where(mask.view(b, hkv, 1, width), scores.view(b, hkv, g, width), float("-inf"))
    peak = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(acc).min)
    smw, lnw = _weights(sm_weight, hkv, acc, 1), _weights(ln_weight, hkv, acc, 1)
    a = torch.exp(scores - peak) * smw
    S, z = state["S"], state["z"]
    fqg = fq.reshape(rows, g, -1).to(acc)
    num = torch.bmm(a.view(rows, g, width), values.to(acc).view(rows, width, -1)).view(b, hkv, g, -1)
    linear = torch.bmm(fqg, S.view(rows, *S.shape[2:])).view(b, hkv, g, -1)
    linear_mass = torch.bmm(fqg, z.view(rows, -1, 1)).view(b, hkv, g, 1)
    num, den = (x + lnw * y for x, y in ((num, linear), (a.sum(-1, keepdim=True), linear_mass)))
    o = (num / den.clamp_min(1e-30)).view(b, h, 1, -1).to(v.dtype)
    if not decide or not ends_block(position, block):
        return o, state
    return o, decide_block(state, position, window=window, keep=keep, block=block)


def decide_block(state: dict, position, *, window: int, keep: int, block: int) -> dict[str, torch.Tensor]:
    """The state after the step at `position` (a number, or a 0-d tensor on the state's device, which a captured step
    reads there), whose next position starts a block: the B positions of the ring's that
    are decided there join the kept keys, the N recalled worst stay, and the others are folded into the sums; their rows
    of the ring are zeroed and masked. A new state (its tensors fresh)."""
    ring = window + block - 1
    acc = state["S"].dtype
    decided = ring_rows(torch.arange(block, device=state["k"].device) + (position - ring + 1), keep, ring)
    pool = {name: torch.cat((state[name][:, :, :keep], state[name].index_select(2, decided)), dim=2) for name in ("k", "v", "fk", "mask")}
    err = recall_errors(
        pool["fk"][:, :, keep:], pool["v"][:, :, keep:], pool["mask"][:, 0, keep:], state["S"], state["z"],
        pool["fk"][:, :, :keep], pool["v"][:, :, :keep], state["err"], block,
    )
    pool_err = torch.cat((state["err"], err), dim=2)
    kept, folded = _decide(pool_err, keep)
    folded_fk = _gather(pool["fk"].to(acc), folded) * torch.gather(pool["mask"], 2, folded)[..., None]
    cleared = decided - keep

    def rows(name, fill):
        return torch.cat((_gather(pool[name], kept), state[name][:, :, keep:].index_fill(2, cleared, fill)), dim=2)

    return {
        "S": state["S"] + folded_fk.mT @ _gather(pool["v"].to(acc), folded),
        "z": state["z"] + folded_fk.sum(2),
        "k": rows("k", 0),
        "v": rows("v", 0),
        "fk": rows("fk", 0),
        "mask": torch.cat((torch.gather(pool["mask"], 2, kept), state["mask"][:, :, keep:].index_fill(2, cleared, False)), dim=2),
        "err": torch.gather(pool_err, 2, kept),
    }


def naive_kept_window_linear(
    q, k, v, fq, fk, *, window, keep, block, scaling, sm_weight=1.0, ln_weight=1.0, key_mask=None, softcap=None
):
    """Quadratic reference of one call from an empty state: every recall error from the full key-by-key products, the
    kept sets by the rule in plain Python, then every (query, key) weight. Returns o (B, H, T, V) in v's dtype."""
    _check(window, keep, block)
    b, h, length, _ = q.shape
    hkv, acc = k.shape[1], _acc(q)
    mask = torch.ones(b, length, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    fkm, values = fk.to(acc) * mask[:, None, :, None], v.to(acc)
    gram = (fkm @ fkm.mT).tril(-1)
    den = gram.sum(-1)
    err = torch.where(den > 0, ((values - gram @ values / den.clamp_min(1e-30)[..., None]) ** 2).sum(-1), float("inf"))
    err = torch.where(mask[:, None, :], err, float("-inf"))
    held = torch.zeros(b, hkv, length, length, dtype=torch.bool)
    for row in range(b):
        for head in range(hkv):
            errors, kept = err[row, head].tolist(), []
            for boundary in range(block, length, block):
                candidates = [s for s in range(boundary - block - window + 1, boundary - window + 1) if s >= 0]
                kept = sorted(kept + candidates, key=lambda s: -errors[s])[:keep]
                held[row, head, boundary : boundary + block, kept] = True
    held = held.to(q.device)
    t = torch.arange(length, device=q.device)[:, None]
    s = torch.arange(length, device=q.device)[None, :]
    start = t // block * block
    real = mask[:, None, None, :]
    soft = (((s > start - window) & (s <= t)) | held) & real
    linear = (s <= start - window) & ~held & real
    groups = h // hkv
    soft, linear = soft.repeat_interleave(groups, 1), linear.repeat_interleave(groups, 1)
    keys, values, fkeys = (x.to(acc).repeat_interleave(groups, 1) for x in (k, v, fk))
    scores = q.to(acc) @ keys.mT * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~soft, float("-inf"))
    peak = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(acc).min)
    smw, lnw = (w.to(acc).view(1, -1, 1, 1) if torch.is_tensor(w) else w for w in (sm_weight, ln_weight))
    weights = torch.exp(scores - peak) * smw + (fq.to(acc) @ fkeys.mT) * linear * lnw
    return (weights @ values / weights.sum(-1, keepdim=True).clamp_min(1e-30)).to(v.dtype)
