"""`hedgehog_swa` with kept keys: beside its softmax window, the N keys a kv head that its linear state recalls worst
stay exact (pure PyTorch). Learned from LoLA's sparse cache (its paper; none of its code).

Keys are decided `block` (B) at a time, at block boundaries of the absolute position: query t of block c = t // B
scores by softmax the keys s with cB - w < s <= t (its window, w to w + B - 1 keys) and the kept keys of its block;
every other earlier key is folded into the linear state, read through the feature maps, and the two share one
normaliser as in `ops_window`. At the boundary cB the B keys in ((c - 1)B - w, cB - w] are decided: together with the
N kept so far they are ordered by their recall error (descending, ties in the order kept then candidates, oldest
first), the first N are kept and the other B are folded.

The recall error of key s is how badly linear attention over every earlier key would give back its value:
|| v_s - sum_{j<s} (fk_s . fk_j) v_j / sum_{j<s} (fk_s . fk_j) ||^2 over real keys (+inf for the first real key,
which nothing before it predicts, -inf for padding, which is never kept). It depends on the keys alone, not on what
was kept, so a prefill computes every error at once; it is computed without gradients (the choice is not trained).

Layout: q, fq (B, H, T, *), k, v, fk (B, Hkv, T, *), H a multiple of Hkv (query head i reads kv head i // (H // Hkv));
`sm_weight`/`ln_weight` numbers or per-query-head tensors (H,). The state, per kv head: S (F, V) and z (F) sum the
folded keys; k, v, fk and mask (B, L) hold the last L = w + B - 2 positions not yet decided (left-padded with masked
zeros, as `ops_window.window_tail`); kept_k, kept_v, kept_fk and kept_err the N kept keys (an empty slot's error
-inf). `position` is the absolute position of the call's first token (the count of tokens the state has seen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops_window import _acc, block_length


def empty_kept_state(q, k, v, fk, window: int, keep: int, block: int) -> dict[str, torch.Tensor]:
    """The state before any token: empty sums, L masked tail slots, N empty kept slots."""
    b, hkv, _, d = k.shape
    f, e, tail = fk.shape[-1], v.shape[-1], window + block - 2
    acc = _acc(q)
    return {
        "S": q.new_zeros(b, hkv, f, e, dtype=acc),
        "z": q.new_zeros(b, hkv, f, dtype=acc),
        "k": k.new_zeros(b, hkv, tail, d),
        "v": v.new_zeros(b, hkv, tail, e),
        "fk": fk.new_zeros(b, hkv, tail, f),
        "mask": torch.zeros(b, tail, dtype=torch.bool, device=k.device),
        "kept_k": k.new_zeros(b, hkv, keep, d),
        "kept_v": v.new_zeros(b, hkv, keep, e),
        "kept_fk": fk.new_zeros(b, hkv, keep, f),
        "kept_err": torch.full((b, hkv, keep), float("-inf"), dtype=acc, device=k.device),
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
    (a causal linear attention of the keys' own features, a block at a time), without gradients."""
    with torch.no_grad():
        acc = S.dtype
        b, hkv, length, f = fk.shape
        real = mask[:, None, :, None].to(acc)
        fkm, values = fk.to(acc) * real, v.to(acc)
        kept_real = (kept_err > float("-inf")).to(acc)[..., None]
        kfk = kept_fk.to(acc) * kept_real
        # What the sums and the kept keys give every key.
        num = torch.einsum("bhtf,bhfe->bhte", fkm, S) + torch.einsum("bhtf,bhnf,bhne->bhte", fkm, kfk, kept_v.to(acc))
        den = torch.einsum("bhtf,bhf->bht", fkm, z) + torch.einsum("bhtf,bhf->bht", fkm, kfk.sum(2))
        # The keys before each one in this call: within its block explicitly, the earlier blocks through their sums.
        n = -(-length // block)
        pad = n * block - length
        fc = F.pad(fkm, (0, 0, 0, pad)).reshape(b, hkv, n, block, f)
        vc = F.pad(values, (0, 0, 0, pad)).reshape(b, hkv, n, block, -1)
        gram = torch.einsum("bhnrf,bhnsf->bhnrs", fc, fc).tril(-1)
        states = F.pad(torch.einsum("bhnsf,bhnse->bhnfe", fc, vc).cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, :n]
        sums = F.pad(fc.sum(3).cumsum(2), (0, 0, 1, 0))[:, :, :n]
        num = num + (gram @ vc + fc @ states).reshape(b, hkv, n * block, -1)[:, :, :length]
        den = den + (gram.sum(-1) + torch.einsum("bhnrf,bhnf->bhnr", fc, sums)).reshape(b, hkv, -1)[:, :, :length]
        err = ((values - num / den.clamp_min(1e-30)[..., None]) ** 2).sum(-1)
        err = torch.where(den > 0, err, float("inf"))
        return torch.where(mask[:, None, :], err, float("-inf"))


def _decide(pool_err: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the pool (..., N + B) of the N kept (highest error first) and the B folded."""
    order = pool_err.argsort(dim=-1, descending=True, stable=True)
    return order[..., :keep], order[..., keep:]


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, Hkv, P, *) at index (B, Hkv, ...) along P: (B, Hkv, ..., *)."""
    b, hkv = index.shape[:2]
    flat = index.reshape(b, hkv, -1)
    out = torch.gather(x, 2, flat[..., None].expand(-1, -1, -1, x.shape[-1]))
    return out.reshape(*index.shape, x.shape[-1])


def kept_window_linear(
    q, k, v, fq, fk, *, window, keep, block, scaling, sm_weight=1.0, ln_weight=1.0, key_mask=None, softcap=None, state=None,
    position=0, output_state=False,
):
    """The parallel form, a segment of `ops_window.block_length` tokens at a time (each continuing from the state the
    last left, so a long prefill's working memory does not grow with it). Returns (o (B, H, T, V) in v's dtype, the
    next state or None)."""
    _check(window, keep, block)
    b, h, length, _ = q.shape
    step = block_length(b * h * (window + 2 * block + keep), block)
    if not state:
        state = empty_kept_state(q, k, v, fk, window, keep, block)
    outputs = []
    for start in range(0, length, step):
        part = slice(start, start + step)
        mask = None if key_mask is None else key_mask[:, part]
        o, state = _kept_segment(
            q[:, :, part], k[:, :, part], v[:, :, part], fq[:, :, part], fk[:, :, part], window=window, keep=keep, block=block,
            scaling=scaling, sm_weight=sm_weight, ln_weight=ln_weight, key_mask=mask, softcap=softcap, state=state,
            position=position + start,
        )
        outputs.append(o)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)), (state if output_state else None)


# Longer than 60 lines: the segment reads top to bottom as the module docstring's steps (errors, decisions, sums,
# window, kept keys); split, each step would pass a dozen tensors to the next.
def _kept_segment(q, k, v, fq, fk, *, window, keep, block, scaling, sm_weight, ln_weight, key_mask, softcap, state, position):
    b, h, length, d = q.shape
    hkv, g, acc = k.shape[1], h // k.shape[1], _acc(q)
    tail = window + block - 2
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
    # The decisions: one at each block boundary this call passes. A pool reference r < N is the state's kept slot r,
    # N + i the undecided key i of U.
    boundaries = list(range((position // block + 1) * block, position + length + 1, block))
    refs = torch.arange(keep, device=q.device).expand(b, hkv, keep)
    all_err = torch.cat((state["kept_err"], err), dim=2)
    kept_refs, folded_refs = [refs], []
    for boundary in boundaries:
        first = boundary - block - window + 1 - base
        candidates = torch.arange(keep + first, keep + first + block, device=q.device).expand(b, hkv, block)
        pool = torch.cat((refs, candidates), dim=2)
        kept, folded = _decide(torch.gather(all_err, 2, pool), keep)
        refs = torch.gather(pool, 2, kept)
        kept_refs.append(refs)
        folded_refs.append(torch.gather(pool, 2, folded))
    all_k = torch.cat((state["kept_k"].to(k.dtype), uk), dim=2)
    all_v = torch.cat((state["kept_v"].to(v.dtype), uv), dim=2)
    all_fk = torch.cat((state["kept_fk"].to(acc), ufk.to(acc) * umask[:, None, :, None]), dim=2)
    # The sums each query block reads: the state's plus every key folded at a boundary before the block.
    if folded_refs:
        folded = torch.stack(folded_refs, dim=2)
        folded_fk = _gather(all_fk, folded)
        added_S = torch.einsum("bhmsf,bhmse->bhmfe", folded_fk, _gather(all_v, folded).to(acc))
        added_z = folded_fk.sum(3)
        sums_S = torch.cat((S[:, :, None], S[:, :, None] + added_S.cumsum(2)), dim=2)
        sums_z = torch.cat((z[:, :, None], z[:, :, None] + added_z.cumsum(2)), dim=2)
    else:
        sums_S, sums_z = S[:, :, None], z[:, :, None]
    # Query blocks: those of U holding this call's queries (the first `offset` into its block); each reads the
    # decisions at boundaries up to its start.
    first_block, offset = divmod(front + tail, block)
    starts = base + block * torch.arange(first_block, n, device=q.device)
    seen = torch.searchsorted(torch.tensor(boundaries, device=q.device, dtype=starts.dtype), starts, right=True)
    kept_refs = torch.stack(kept_refs, dim=2)[:, :, seen]  # (B, Hkv, Q, N)
    block_S, block_z = sums_S[:, :, seen], sums_z[:, :, seen]

    def query_blocks(x):  # (B, H, T, *) -> (B, Hkv, G, Q, B, *), padded as U
        x = F.pad(x, (0, 0, offset, back))
        return x.reshape(b, hkv, g, -1, block, x.shape[-1])

    qb = query_blocks(q.to(acc) * scaling)
    fqb = query_blocks(fq.to(acc))
    # The window of query block j: the w + B - 1 keys of U ending with its last, w - 1 before its first.
    width = window + block - 1

    def windows(x):  # (B, Hkv, M, *) -> (B, Hkv, Q, width, *)
        x = F.pad(x, (0, 0, window - 1, 0))[:, :, first_block * block :]
        return x.unfold(2, width, block).transpose(-1, -2)

    wk, wv = windows(uk.to(acc)), windows(uv.to(acc))
    wmask = F.pad(umask, (window - 1, 0))[:, first_block * block :].unfold(1, width, block)  # (B, Q, width)
    causal = torch.arange(width, device=q.device)[None, :] <= torch.arange(block, device=q.device)[:, None] + window - 1
    scores = torch.einsum("bhgqrd,bhqsd->bhgqrs", qb, wk)
    kept_scores = torch.einsum("bhgqrd,bhqnd->bhgqrn", qb, _gather(all_k.to(acc), kept_refs))
    if softcap is not None:
        scores, kept_scores = (torch.tanh(x / softcap) * softcap for x in (scores, kept_scores))
    scores = scores.masked_fill(~(causal & wmask[:, None, None, :, None, :]), float("-inf"))
    kept_real = torch.gather(all_err, 2, kept_refs.flatten(2)).view_as(kept_refs) > float("-inf")
    kept_scores = kept_scores.masked_fill(~kept_real[:, :, None, :, None, :], float("-inf"))
    peak = torch.maximum(scores.amax(-1, keepdim=True), kept_scores.amax(-1, keepdim=True)).clamp_min(torch.finfo(acc).min)
    smw, lnw = _weights(sm_weight, hkv, acc, 3), _weights(ln_weight, hkv, acc, 3)
    a, a_kept = torch.exp(scores - peak) * smw, torch.exp(kept_scores - peak) * smw
    num = a @ wv[:, :, None] + a_kept @ _gather(all_v.to(acc), kept_refs)[:, :, None]
    num = num + lnw * torch.einsum("bhgqrf,bhqfe->bhgqre", fqb, block_S)
    den = a.sum(-1, keepdim=True) + a_kept.sum(-1, keepdim=True)
    den = den + lnw * torch.einsum("bhgqrf,bhqf->bhgqr", fqb, block_z)[..., None]
    o = (num / den.clamp_min(1e-30)).reshape(b, h, -1, num.shape[-1])
    o = o[:, :, offset : offset + length].to(v.dtype)
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
    return o, new


def decode_kept_window_linear(
    q, k, v, fq, fk, *, window, keep, block, scaling, sm_weight=1.0, ln_weight=1.0, key_mask=None, softcap=None, state=None, position=0
):
    """One decode step of the token at `position`: its window (the state's L positions and this one) and the kept keys
    by softmax, the sums through the features; where the next position starts a block, the oldest B positions are
    decided. Returns (o (B, H, 1, V) in v's dtype, the next state)."""
    _check(window, keep, block)
    if not state:
        state = empty_kept_state(q, k, v, fk, window, keep, block)
    b, h, _, d = q.shape
    hkv, acc = k.shape[1], _acc(q)
    g, rows = h // hkv, b * hkv
    # The kept keys and the window's, with this one, in one tensor: one product, mask and exponential score them all
    # (a CPU step is bound by its number of operations); the window's part is a view of it.
    kept_k, kept_v, kept_err = state["kept_k"], state["kept_v"], state["kept_err"]
    all_k = torch.cat((kept_k, state["k"], k.to(state["k"].dtype)), dim=2)
    all_v = torch.cat((kept_v, state["v"], v.to(state["v"].dtype)), dim=2)
    keys, values = all_k[:, :, keep:], all_v[:, :, keep:]
    features = torch.cat((state["fk"], fk.to(state["fk"].dtype)), dim=2)
    mask = F.pad(state["mask"], (0, 1), value=True) if key_mask is None else torch.cat((state["mask"], key_mask.bool()), dim=1)
    real = torch.cat((kept_err > float("-inf"), mask[:, None, :].expand(-1, hkv, -1)), dim=2)
    qg = q.reshape(rows, g, d).to(acc) * scaling
    scores = torch.bmm(qg, all_k.to(acc).view(rows, -1, d).mT).view(b, hkv, g, -1)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~real[:, :, None, :], float("-inf"))
    peak = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(acc).min)
    smw, lnw = _weights(sm_weight, hkv, acc, 1), _weights(ln_weight, hkv, acc, 1)
    a = torch.exp(scores - peak) * smw
    fqg = fq.reshape(b, hkv, g, -1).to(acc)
    num = a @ all_v.to(acc) + lnw * (fqg @ state["S"])
    den = a.sum(-1, keepdim=True) + lnw * (fqg @ state["z"][..., None])
    o = (num / den.clamp_min(1e-30)).view(b, h, 1, -1).to(v.dtype)
    if (position + 1) % block:  # the oldest position is one decided at the last boundary, or padding
        return o, {**state, "k": keys[:, :, 1:], "v": values[:, :, 1:], "fk": features[:, :, 1:], "mask": mask[:, 1:]}
    # The next position starts a block: the oldest B positions join the kept keys, the N worst recalled stay.
    err = recall_errors(
        features[:, :, :block], values[:, :, :block], mask[:, :block], state["S"], state["z"], state["kept_fk"], kept_v, kept_err, block
    )
    pool = {
        name: torch.cat((state[f"kept_{name}"], tensor[:, :, :block]), dim=2)
        for name, tensor in (("k", keys), ("v", values), ("fk", features))
    }
    pool_err = torch.cat((kept_err, err), dim=2)
    kept, folded = _decide(pool_err, keep)
    folded_fk = _gather(pool["fk"].to(acc), folded) * torch.gather(real[:, :, : keep + block], 2, folded)[..., None]
    return o, {
        "S": state["S"] + folded_fk.mT @ _gather(pool["v"].to(acc), folded),
        "z": state["z"] + folded_fk.sum(2),
        "k": F.pad(keys[:, :, block:], (0, 0, block - 1, 0)),
        "v": F.pad(values[:, :, block:], (0, 0, block - 1, 0)),
        "fk": F.pad(features[:, :, block:], (0, 0, block - 1, 0)),
        "mask": F.pad(mask[:, block:], (block - 1, 0), value=False),
        "kept_k": _gather(pool["k"], kept),
        "kept_v": _gather(pool["v"], kept),
        "kept_fk": _gather(pool["fk"], kept),
        "kept_err": torch.gather(pool_err, 2, kept),
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
