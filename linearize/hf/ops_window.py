"""Linear attention with an optional sliding softmax window sharing one normaliser (pure PyTorch).

For query t, keys in (t - window, t] score exp(q.k * scaling - m_t) * sm_weight (m_t: the largest such score);
older keys score (fq_t . fk_s) * ln_weight, times decay ** (t - window - s) where a per-head `decay` in (0, 1) is
given (a key has weight 1 as it leaves the window and fades after; window >= 1); the output is the score-weighted mean
of the values. window = 0 is plain (inclusive) linear attention. Layout (B, H, T, D), all heads equal (callers expand
grouped heads).

A `state` carries a sequence across calls: S (B,H,F,V) and z (B,H,F) sum the feature-mapped keys that have left
the window (with a decay, as the next query reads them), k/v/fk/mask hold the last window - 1 keys. The naive,
chunked and recurrent forms take and return it.
`decode_window_linear` is the recurrent form of one token with grouped heads: the queries of a kv head read one
state, kept per kv head, its window a ring of `window` rows (`ring_state`) that a step writes one row of (what
hedgehog_swa decodes with).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Elements of the largest intermediate one prefill block makes (64 MiB in float32): `chunk_window_linear` runs a
# long prefill a block at a time, so its working memory does not grow with the length. A block is never shorter
# than MIN_BLOCK_TOKENS (nor than one chunk): at large batches shorter blocks cost more in kernel launches than
# they save in memory (BENCHMARKS.md, "Prefill memory and decode time, profiled").
BLOCK_ELEMENTS = 1 << 24
MIN_BLOCK_TOKENS = 2048
# Queries a chunk of the chunked form: a window of W keys reaches ceil(W / CHUNK) chunks back, so every query scores
# at most CHUNK - 1 keys more than its window (a `lolcats` layer's 2K prefill, two cores: 50.4 ms in chunks of 64,
# 62.6 in chunks as long as its 256-key window, which score twice the window; BENCHMARKS.md, fifty-fourth session).
CHUNK = 64


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 when the inputs are float64 (exactness tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def _empty_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fk: torch.Tensor) -> dict[str, torch.Tensor]:
    b, h, _, d = k.shape
    f, e = fk.shape[-1], v.shape[-1]
    return {
        "S": q.new_zeros(b, h, f, e, dtype=_acc(q)),
        "z": q.new_zeros(b, h, f, dtype=_acc(q)),
        "k": k.new_zeros(b, h, 0, d),
        "v": v.new_zeros(b, h, 0, e),
        "fk": fk.new_zeros(b, h, 0, f),
        "mask": torch.zeros(b, 0, dtype=torch.bool, device=k.device),
    }


def _with_context(q, k, v, fk, key_mask, state):
    """Prepend the state's window keys to this call's keys; return them with the valid-key mask."""
    if key_mask is None:
        key_mask = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    if not state:  # nothing carried (a fresh cache's first call): this call's keys as they are, not copied; the mask
        # copied, as a state may keep a view of it (`window_tail`) and a static cache writes into what it keeps
        b, h, _, _ = k.shape
        S, z = q.new_zeros(b, h, fk.shape[-1], v.shape[-1], dtype=_acc(q)), q.new_zeros(b, h, fk.shape[-1], dtype=_acc(q))
        return k, v, fk, key_mask.to(torch.bool, copy=True), S, z
    k = torch.cat((state["k"].to(k.dtype), k), dim=2)
    v = torch.cat((state["v"].to(v.dtype), v), dim=2)
    fk = torch.cat((state["fk"].to(fk.dtype), fk), dim=2)
    mask = torch.cat((state["mask"], key_mask.bool()), dim=1)
    return k, v, fk, mask, state["S"], state["z"]


def window_tail(keep: int, mask: torch.Tensor, **keys: torch.Tensor) -> dict[str, torch.Tensor]:
    """The last `keep` positions of each (B, H, T, *) tensor in `keys` and of `mask` (B, T), as a window cache.

    Always exactly `keep` long, whatever T: shorter contexts are left-padded with zeros that `mask` marks invalid,
    which every window score masks out, so the cache has one shape from the first token on (a decode step can be
    compiled once). Copies where T > keep + 1, so the cache does not keep a long prefill's key tensor alive.
    """
    length = mask.shape[1]
    if length >= keep:
        start = length - keep
        # A view of a tensor one position longer (a decode step's) keeps one position more alive; of a prefill's,
        # the whole prefill: copy only then.
        tail = {name: t[:, :, start:] if start <= 1 else t[:, :, start:].clone() for name, t in keys.items()}
        return {**tail, "mask": mask[:, start:] if start <= 1 else mask[:, start:].clone()}
    pad = keep - length
    tail = {name: F.pad(t, (0, 0, pad, 0)) for name, t in keys.items()}
    return {**tail, "mask": F.pad(mask, (pad, 0), value=False)}


def _next_state(k, v, fk, mask, S, z, window: int, decay: torch.Tensor | None = None, length: int = 0) -> dict[str, torch.Tensor]:
    """Fold every key older than the last window - 1 into (S, z); keep the rest as window context. With a `decay`
    (H,), (S, z) are as the query after the `length` queries of this call reads them: the carried sums faded by
    decay ** length, a folded key by decay ** (how many keys were folded after it)."""
    keep = max(window - 1, 0)
    cut = max(k.shape[2] - keep, 0)
    fk_old = fk[:, :, :cut].to(S.dtype) * mask[:, None, :cut, None]
    if decay is not None:
        log_decay = decay.to(S.dtype).log()[None, :, None]
        fk_old = fk_old * torch.exp(log_decay * torch.arange(cut - 1, -1, -1, device=k.device, dtype=S.dtype))[..., None]
        S, z = S * torch.exp(log_decay[..., None] * length), z * torch.exp(log_decay * length)
    return {
        "S": S + torch.einsum("bhsf,bhse->bhfe", fk_old, v[:, :, :cut].to(S.dtype)),
        "z": z + fk_old.sum(2),
        **window_tail(keep, mask, k=k, v=v, fk=fk),
    }


def _weights(weight, dtype):
    return weight.to(dtype).reshape(1, -1, 1, 1) if torch.is_tensor(weight) else weight


def _row_weights(weight, hkv: int, rows: int, dtype):
    """A per-query-head weight (H,) as (1, Hkv, 1, G x rows, 1), for a kv head's G query heads of `rows` queries each
    laid out as one set of rows (the chunked forms' grouped layout); a number as it is."""
    if not torch.is_tensor(weight):
        return weight
    return weight.to(dtype).reshape(hkv, -1).repeat_interleave(rows, dim=1).reshape(1, hkv, 1, -1, 1)


def _check_decay(decay, window: int) -> None:
    if decay is not None and window < 1:
        raise ValueError(f"a decay needs a window of at least 1, got {window}")


def naive_window_linear(
    q, k, v, fq, fk, *, window, scaling, sm_weight=1.0, ln_weight=1.0, key_mask=None, softcap=None, state=None, output_state=False,
    decay=None,
):
    """Quadratic reference. Returns (o, new_state or None); o in v's dtype."""
    _check_decay(decay, window)
    length = q.shape[2]
    k_all, v_all, fk_all, mask, S, z = _with_context(q, k, v, fk, key_mask, state)
    total = k_all.shape[2]
    acc = _acc(q)
    smw, lnw = _weights(sm_weight, acc), _weights(ln_weight, acc)
    scores = torch.einsum("bhtd,bhsd->bhts", q.to(acc), k_all.to(acc)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    t = torch.arange(total - length, total, device=q.device)[:, None]
    s = torch.arange(total, device=q.device)[None, :]
    valid = mask[:, None, None, :]
    in_window = (s <= t) & (s > t - window) & valid
    in_linear = (s <= t - window) & valid
    masked = scores.masked_fill(~in_window, float("-inf"))
    peak = masked.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    a_sm = torch.exp(masked - peak) * smw
    a_ln = torch.einsum("bhtf,bhsf->bhts", fq.to(acc), fk_all.to(acc)) * in_linear * lnw
    carried = lnw
    if decay is not None:
        log_decay = decay.to(acc).log().reshape(1, -1, 1, 1)
        a_ln = a_ln * torch.exp(log_decay * (t - window - s).clamp_min(0))
        # The carried sums are as this call's first query reads them.
        carried = lnw * torch.exp(log_decay * torch.arange(length, device=q.device, dtype=acc)[:, None])
    a = a_sm + a_ln
    num = a @ v_all.to(acc) + carried * torch.einsum("bhtf,bhfe->bhte", fq.to(acc), S)
    den = a.sum(-1, keepdim=True) + carried * torch.einsum("bhtf,bhf->bht", fq.to(acc), z)[..., None]
    o = (num / den.clamp_min(1e-30)).to(v.dtype)
    return o, (_next_state(k_all, v_all, fk_all, mask, S, z, window, decay, length) if output_state else None)


def block_length(per_token: int, chunk: int) -> int:
    """Tokens per prefill block: a multiple of `chunk` whose intermediates of `per_token` elements a token stay
    within BLOCK_ELEMENTS, or MIN_BLOCK_TOKENS (rounded down to chunks) where that is more, and at least one chunk."""
    return chunk * max(1, max(BLOCK_ELEMENTS // per_token, MIN_BLOCK_TOKENS) // chunk)


def chunk_window_linear(
    q,
    k,
    v,
    fq,
    fk,
    *,
    window,
    scaling,
    sm_weight=1.0,
    ln_weight=1.0,
    key_mask=None,
    softcap=None,
    state=None,
    output_state=False,
    chunk_size=CHUNK,
    decay=None,
):
    """Chunked parallel form, a block of chunks at a time (`block_length`): each block continues from the state the
    last one left, so a long prefill's working memory does not grow with its length. A chunk of `chunk_size` queries
    reads the chunks of keys that its window reaches (`reach`) explicitly: shorter chunks score fewer keys outside
    the window (a chunk as long as the window scores twice its window). Grouped queries as they are: q and fq of H
    heads, k, v, fk, the state and `decay` of Hkv heads dividing H, query head h reading kv head h // (H / Hkv), the
    keys' chunks, states and masks made once per kv head. Returns (o, new_state or None)."""
    b, h, length, _ = q.shape
    if h % k.shape[1]:
        raise ValueError(f"{h} query heads do not group over {k.shape[1]} key heads; give k, v and fk a number of heads that divides q's")
    c, back = chunk_size, reach(window, chunk_size)
    # Per query token: its scores against its chunk's and the earlier chunks' keys, and its share of its chunk's
    # (F x V) state.
    step = block_length(b * h * max((back + 1) * c, fk.shape[-1] * v.shape[-1] // c + 1), c)
    _check_decay(decay, window)
    options = dict(
        window=window, scaling=scaling, sm_weight=sm_weight, ln_weight=ln_weight, softcap=softcap, chunk_size=chunk_size, decay=decay
    )
    outputs = []
    for start in range(0, length, step):
        part = slice(start, start + step)
        last = start + step >= length
        mask = None if key_mask is None else key_mask[:, part]
        o, state = _chunk_window_block(
            q[:, :, part], k[:, :, part], v[:, :, part], fq[:, :, part], fk[:, :, part], key_mask=mask, state=state,
            output_state=output_state or not last, **options,
        )
        outputs.append(o)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)), state


def reach(window: int, chunk: int) -> int:
    """How many earlier chunks of `chunk` keys a query chunk's window reaches into (at least one)."""
    return max(1, math.ceil(window / chunk))


# Longer than 60 lines with its signature and docstring: the chunked scan reads top to bottom as the docstring's
# algebra; split, its steps would pass a dozen chunk tensors between them.
def _chunk_window_block(
    q,
    k,
    v,
    fq,
    fk,
    *,
    window,
    scaling,
    sm_weight,
    ln_weight,
    key_mask,
    softcap,
    state,
    output_state,
    chunk_size,
    decay,
):
    """One block of the chunked form: each query chunk sees its own and the `reach` previous key chunks explicitly, which
    hold its window, and older keys through a prefix sum of per-chunk states (with a decay, a scan of them, each
    faded to its chunk's end)."""
    b, h, length, d = q.shape
    k_all, v_all, fk_all, mask, S, z = _with_context(q, k, v, fk, key_mask, state)
    hkv, total = k_all.shape[1], k_all.shape[2]
    g = h // hkv
    context = total - length
    c, back = chunk_size, reach(window, chunk_size)
    n = math.ceil(total / c)
    pad = n * c - total
    acc = _acc(q)
    smw, lnw = (_row_weights(w, hkv, c, acc) for w in (sm_weight, ln_weight))

    def chunks(x, front=0):
        x = torch.nn.functional.pad(x.to(acc), (0, 0, front, pad))
        return x.reshape(x.shape[0], x.shape[1], n, c, x.shape[-1])

    def query_rows(x):  # (B, H, N, C, *) -> (B, Hkv, N, G x C, *): a chunk's queries of one kv head's G heads as one set of rows
        return x.reshape(b, hkv, g, n, c, x.shape[-1]).transpose(2, 3).reshape(b, hkv, n, g * c, x.shape[-1])

    qc, fqc = query_rows(chunks(q, context)), query_rows(chunks(fq, context))
    kc, vc, fkc = chunks(k_all), chunks(v_all), chunks(fk_all)
    mc = torch.nn.functional.pad(mask, (0, pad)).reshape(b, 1, n, c, 1).to(acc)
    fkc = fkc * mc
    vc_masked = vc * mc

    kb, vb, mb = (after_previous(x, 2, back) for x in (kc, vc_masked, mc))
    # The linear part's keys: only the first (j <= r + back * c - window) are outside the window, the first chunk's
    # where the window ends at a chunk's edge.
    linear_keys = (back + 1) * c - window
    fkb = after_previous(fkc, 2, back, slots=math.ceil(linear_keys / c))
    r = torch.arange(c, device=q.device).repeat(g)[:, None]  # each row's position in its chunk
    j = torch.arange((back + 1) * c, device=q.device)[None, :]
    dist = back * c + r - j
    in_window = ((dist >= 0) & (dist < window)) & (mb.transpose(-1, -2) > 0)
    in_linear = (dist >= window).to(acc)

    scores = torch.einsum("bhnrd,bhnjd->bhnrj", qc * scaling, kb)  # scaled on q: half the elements of the scores
    # Without gradients the scores' tensor, the block's largest, becomes the weights in place: on the CPU each fresh
    # tensor of its size costs its pages' first touch (a `lolcats` layer's 2K prefill, two cores: 116 ms out of place,
    # 72 in place; BENCHMARKS.md, fifty-third session). With gradients autograd needs the steps apart.
    inplace = not scores.requires_grad
    if softcap is not None:
        scores = softcapped(scores, softcap, inplace=inplace)
    masked = masked_scores(scores, in_window, inplace=inplace)
    peak = masked.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    a_sm = exp_weights(masked, peak, smw, inplace=inplace)
    # The linear part's mask, weight and decay make one small factor, applied in one pass.
    factor = in_linear[:, :linear_keys] * lnw
    log_decay = None if decay is None else decay.to(acc).log().reshape(1, hkv, 1, 1, 1)
    if decay is not None:
        factor = factor * torch.exp(log_decay * (dist[:, :linear_keys] - window).clamp_min(0))
    a_ln = maybe_in_place(torch.einsum("bhnrf,bhnjf->bhnrj", fqc, fkb[..., :linear_keys, :]), "mul", factor, inplace=inplace)
    a = added_to_front(a_sm, a_ln, inplace=inplace)
    if decay is None:
        prior_num, prior_den = _prior_reads(fqc, fkc, vc, S, z, back)
    else:
        prior_num, prior_den = _decayed_prior_reads(fqc, fkc, vc, S, z, log_decay[..., 0], window, context, back)
    num = a @ vb + lnw * prior_num
    den = a.sum(-1, keepdim=True) + lnw * prior_den[..., None]
    o = (num / den.clamp_min(1e-30)).reshape(b, hkv, n, g, c, -1).transpose(2, 3).reshape(b, h, n * c, -1)
    o = o[:, :, context : context + length].to(v.dtype)
    return o, (_next_state(k_all, v_all, fk_all, mask, S, z, window, decay, length) if output_state else None)


def after_previous(x: torch.Tensor, dim: int, previous: int = 1, slots: int | None = None) -> torch.Tensor:
    """x in chunks along `dim` (N of them, their C rows along dim + 1), each chunk's rows after the `previous` chunks'
    before it (zeros before the first): N chunks of (previous + 1) C rows, written into one fresh tensor (where padding
    and concatenating made several); with `slots`, only the first `slots` chunks' rows of each."""
    n, c = x.shape[dim], x.shape[dim + 1]
    slots = previous + 1 if slots is None else slots
    rows = x.new_empty(*x.shape[: dim + 1], slots * c, *x.shape[dim + 2 :])
    for slot in range(slots):  # slot `slot` of chunk m holds chunk m - previous + slot
        gone = min(previous - slot, n)
        # Each view taken as it is written: autograd refuses a write through a view made before its base needed
        # gradients.
        rows.narrow(dim + 1, slot * c, c).narrow(dim, 0, gone).zero_()
        rows.narrow(dim + 1, slot * c, c).narrow(dim, gone, n - gone).copy_(x.narrow(dim, 0, n - gone))
    return rows


def added_to_front(a: torch.Tensor, b: torch.Tensor, *, inplace: bool) -> torch.Tensor:
    """a with b added to its first b.shape[-1] columns, in place where `inplace`: the same sums either way, so a
    prefill without gradients (a checkpointed layer's first pass) and with them give the same bits."""
    width = b.shape[-1]
    if width == a.shape[-1]:
        return maybe_in_place(a, "add", b, inplace=inplace)
    if inplace:
        a[..., :width].add_(b)
        return a
    return torch.cat((a[..., :width] + b, a[..., width:]), dim=-1)


def maybe_in_place(x: torch.Tensor, op: str, *args, inplace: bool) -> torch.Tensor:
    """x.op(*args), or in place (x.op_(*args)) where `inplace`: a prefill's largest intermediates become their
    successors in place where no gradient is recorded (on the CPU a fresh tensor of their size costs its pages' first
    touch), and stay apart for autograd."""
    return getattr(x, f"{op}_" if inplace else op)(*args)


def masked_scores(scores: torch.Tensor, allowed: torch.Tensor, *, inplace: bool) -> torch.Tensor:
    """scores where `allowed` (a boolean mask that broadcasts to them), -inf elsewhere, in place where `inplace`
    (`maybe_in_place`): a bias of zeros and -infs of the mask's shape, added. The same values as masked_fill, at a
    fraction of its time on the CPU, where masked_fill takes about 1.4 ns an element and an addition 0.2 (two cores,
    AVX2; BENCHMARKS.md, fifty-fifth session)."""
    bias = torch.zeros(allowed.shape, dtype=scores.dtype, device=scores.device).masked_fill_(~allowed, float("-inf"))
    return maybe_in_place(scores, "add", bias, inplace=inplace)


def softcapped(scores: torch.Tensor, softcap: float, *, inplace: bool) -> torch.Tensor:
    """tanh(scores / softcap) * softcap, in place where `inplace` (`maybe_in_place`)."""
    return maybe_in_place(maybe_in_place(maybe_in_place(scores, "div", softcap, inplace=inplace), "tanh", inplace=inplace), "mul", softcap, inplace=inplace)


def exp_weights(scores: torch.Tensor, peak: torch.Tensor, weight=None, *, inplace: bool) -> torch.Tensor:
    """exp(scores - peak) * weight (no product where `weight` is None), in place where `inplace` (`maybe_in_place`)."""
    weights = maybe_in_place(maybe_in_place(scores, "sub", peak, inplace=inplace), "exp", inplace=inplace)
    return weights if weight is None else maybe_in_place(weights, "mul", weight, inplace=inplace)


def _prior_reads(fqc, fkc, vc, S, z, back: int):
    """What each query (fqc: (B, Hkv, N, G x C, *), a kv head's query heads as rows of its chunks) reads of the keys
    (fkc, vc: (B, Hkv, N, C, *)) more than `back` chunks back, all outside its window, and of the carried sums: a prefix
    sum of per-chunk states shifted by back + 1 chunks. Returns (num, den)."""
    n = fkc.shape[2]
    prior_S = S[:, :, None] + F.pad(torch.einsum("bhnsf,bhnse->bhnfe", fkc, vc).cumsum(2), (0, 0, 0, 0, back + 1, 0))[:, :, :n]
    prior_z = z[:, :, None] + F.pad(fkc.sum(3).cumsum(2), (0, 0, back + 1, 0))[:, :, :n]
    return torch.einsum("bhnrf,bhnfe->bhnre", fqc, prior_S), torch.einsum("bhnrf,bhnf->bhnr", fqc, prior_z)


def _decayed_prior_reads(fqc, fkc, vc, S, z, log_decay, window: int, context: int, back: int):
    """`_prior_reads` with a per-kv-head decay (log_decay (1, Hkv, 1, 1)): each chunk's state faded to its last key, a
    scan carrying it across chunks (fading by decay ** C a chunk), read back + 1 chunks later faded by
    decay ** (back C + r - window + 1) for the query r of its chunk; the carried sums, as the call's first query
    (chunk position `context`) reads them, faded by decay ** (position - context)."""
    _, _, n, c, _ = fkc.shape
    position = torch.arange(c, device=fkc.device, dtype=fkc.dtype)
    faded = fkc * torch.exp(log_decay * (c - 1 - position)[:, None])[:, :, None]
    position = position.repeat(fqc.shape[3] // c)  # each query row's position in its chunk
    per_chunk_S, per_chunk_z = torch.einsum("bhnsf,bhnse->bhnfe", faded, vc), faded.sum(3)
    across = torch.exp(log_decay[..., 0] * c)
    run_S, run_z = torch.zeros_like(per_chunk_S[:, :, 0]), torch.zeros_like(per_chunk_z[:, :, 0])
    older_S, older_z = [run_S] * (back + 1), [run_z] * (back + 1)  # the first back + 1 chunks read nothing older
    for m in range(n - back - 1):
        run_S = run_S * across[..., None] + per_chunk_S[:, :, m]
        run_z = run_z * across + per_chunk_z[:, :, m]
        older_S.append(run_S)
        older_z.append(run_z)
    older_fade = torch.exp(log_decay * (back * c + position - window + 1))
    query = torch.arange(n, device=fkc.device, dtype=fkc.dtype)[:, None] * c + position
    carried_fade = torch.exp(log_decay * (query - context).clamp_min(0))
    num = torch.einsum("bhnrf,bhnfe->bhnre", fqc, torch.stack(older_S[:n], 2)) * older_fade[..., None]
    num = num + torch.einsum("bhnrf,bhfe->bhnre", fqc, S) * carried_fade[..., None]
    den = torch.einsum("bhnrf,bhnf->bhnr", fqc, torch.stack(older_z[:n], 2)) * older_fade
    den = den + torch.einsum("bhnrf,bhf->bhnr", fqc, z) * carried_fade
    return num, den


def recurrent_window_linear(
    q, k, v, fq, fk, *, window, scaling, sm_weight=1.0, ln_weight=1.0, key_mask=None, softcap=None, state=None, output_state=True,
    decay=None,
):
    """Token-by-token decode form: the window keys are scored directly, older keys through (S, z)."""
    _check_decay(decay, window)
    b, h, length, _ = q.shape
    state = state if state else _empty_state(q, k, v, fk)
    if key_mask is None:
        key_mask = torch.ones(b, length, dtype=torch.bool, device=q.device)
    acc = _acc(q)
    smw, lnw = _weights(sm_weight, acc), _weights(ln_weight, acc)
    S, z = state["S"], state["z"]
    ck, cv, cfk, cmask = state["k"].to(k.dtype), state["v"].to(v.dtype), state["fk"].to(fk.dtype), state["mask"]
    keep = max(window - 1, 0)
    sm_head = smw[..., 0] if torch.is_tensor(smw) else smw
    ln_head = lnw[..., 0] if torch.is_tensor(lnw) else lnw

    def fold(S, z, fk_s, v_s, valid):
        fk_s = fk_s.to(acc) * valid[:, None, None]
        return S + fk_s[..., None] * v_s[:, :, None, :].to(acc), z + fk_s

    outputs = []
    for t in range(length):
        kt, vt, fkt, mt = k[:, :, t : t + 1], v[:, :, t : t + 1], fk[:, :, t : t + 1], key_mask[:, t : t + 1].bool()
        fqt = fq[:, :, t].to(acc)
        if window == 0:  # plain linear attention: the current key is read through the state
            S, z = fold(S, z, fkt[:, :, 0], vt[:, :, 0], mt[:, 0])
        else:
            ck, cv, cfk = torch.cat((ck, kt), 2), torch.cat((cv, vt), 2), torch.cat((cfk, fkt), 2)
            cmask = torch.cat((cmask, mt), 1)
        num = ln_head * torch.einsum("bhf,bhfe->bhe", fqt, S)
        den = ln_head * torch.einsum("bhf,bhf->bh", fqt, z)[..., None]
        if window > 0:
            score = torch.einsum("bhd,bhsd->bhs", q[:, :, t].to(acc), ck.to(acc)) * scaling
            if softcap is not None:
                score = torch.tanh(score / softcap) * softcap
            score = score.masked_fill(~cmask[:, None, :], float("-inf"))
            peak = score.amax(-1, keepdim=True)
            peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
            a = torch.exp(score - peak) * sm_head
            num = num + torch.einsum("bhs,bhse->bhe", a, cv.to(acc))
            den = den + a.sum(-1, keepdim=True)
            if decay is not None:  # the sums fade by one token for the next query
                S, z = S * decay.to(acc)[None, :, None, None], z * decay.to(acc)[None, :, None]
            if ck.shape[2] > keep:  # the oldest key leaves the window for the next token
                S, z = fold(S, z, cfk[:, :, 0], cv[:, :, 0], cmask[:, 0])
                ck, cv, cfk, cmask = ck[:, :, 1:], cv[:, :, 1:], cfk[:, :, 1:], cmask[:, 1:]
        outputs.append((num / den.clamp_min(1e-30)).to(v.dtype))
    o = torch.stack(outputs, dim=2)
    new = {"S": S, "z": z, **window_tail(keep, cmask, k=ck, v=cv, fk=cfk)} if output_state else None
    return o, new


def empty_ring_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fk: torch.Tensor, window: int) -> dict[str, torch.Tensor]:
    """A ring state (`ring_state`) before any token, per kv head of k: empty sums, `window` masked zero rows, at 0."""
    b, hkv, _, d = k.shape
    return {
        "S": q.new_zeros(b, hkv, fk.shape[-1], v.shape[-1], dtype=_acc(q)),
        "z": q.new_zeros(b, hkv, fk.shape[-1], dtype=_acc(q)),
        "k": k.new_zeros(b, hkv, window, d),
        "v": v.new_zeros(b, hkv, window, v.shape[-1]),
        "fk": fk.new_zeros(b, hkv, window, fk.shape[-1]),
        "mask": torch.zeros(b, hkv, window, dtype=torch.bool, device=k.device),
        "at": torch.zeros(b, dtype=torch.int64, device=k.device),
    }


def ring_state(ordered: dict[str, torch.Tensor], at: torch.Tensor, window: int) -> dict[str, torch.Tensor]:
    """A state as the forms here leave it (S, z, the last window - 1 keys k, v, fk (B, Hkv, window - 1, *) and their
    mask (B, window - 1), oldest first: `window_tail`) as a ring of `window` rows after `at` (B,) tokens seen (equal
    for every sequence, on the state's device): position p in row p mod window, the row of position `at` (the next
    key's) zero and masked. A decode step then writes its key into its row instead of moving the window on
    (`decode_window_linear`, `triton_step`'s `hedgehog_swa` step)."""
    hkv = ordered["k"].shape[1]
    # Row r holds the tail's position at - window + ((r - at) mod window); the free row, at - window's, is the pad.
    rows = (torch.arange(window, device=at.device) - at[0]) % window
    mask = F.pad(ordered["mask"], (1, 0), value=False).index_select(1, rows)
    return {
        "S": ordered["S"],
        "z": ordered["z"],
        **{name: F.pad(ordered[name], (0, 0, 1, 0)).index_select(2, rows) for name in ("k", "v", "fk")},
        "mask": mask[:, None].expand(-1, hkv, -1).contiguous(),
        "at": at,
    }


def ordered_state(ring: dict[str, torch.Tensor], window: int) -> dict[str, torch.Tensor]:
    """`ring_state`'s inverse: the ring's last window - 1 positions, oldest first, as the forms here take a state."""
    tail = (torch.arange(1, window, device=ring["at"].device) + ring["at"][0]) % window
    return {
        "S": ring["S"],
        "z": ring["z"],
        **{name: ring[name].index_select(2, tail) for name in ("k", "v", "fk")},
        "mask": ring["mask"][:, 0].index_select(1, tail),
    }


def written(x: torch.Tensor, row, new) -> torch.Tensor:
    """x (B, Hkv, P, *) with `new` (B, Hkv or 1, 1, *, or a number) in row `row` (a number, or a 0-d tensor on x's
    device): in place, or in a copy where autograd records or where x was made under torch.inference_mode() and is
    written outside it (which torch refuses in place). A compiled step (without gradients, its tensors a static
    state's own, which it cannot ask) writes in place."""
    if not torch.compiler.is_compiling() and (torch.is_grad_enabled() or (x.is_inference() and not torch.is_inference_mode_enabled())):
        x = x.clone()
    if not torch.is_tensor(row):
        x[:, :, row : row + 1] = new
        return x
    return x.index_copy_(2, row.view(1), torch.as_tensor(new, dtype=x.dtype, device=x.device).expand_as(x[:, :, :1]))


def decode_window_linear(
    q, k, v, fq, fk, *, window, scaling, sm_weight=1.0, ln_weight=1.0, key_mask=None, softcap=None, state=None, decay=None
):
    """One decode step of the recurrent form with grouped heads and a ring state (`ring_state`): the arithmetic of
    `recurrent_window_linear` for T = 1 in a few kernels, a state per kv head instead of per query head, and no copy
    of the window.

    q, fq (B, H, 1, *) are the queries; k, v, fk (B, Hkv, 1, *) the new key, H a multiple of Hkv (query head i
    reads kv head i // (H // Hkv)); `sm_weight`/`ln_weight` are numbers or per-query-head tensors (H,). The key is
    written into its row of the ring (`written`), every row is scored in one product (the ring holds the window), the
    sums are read, then the window's oldest key, in the next row, is folded into them (faded first, with a `decay`
    per kv head (Hkv,)). `window` >= 1. Returns (o (B, H, 1, V) in v's dtype, the next ring state).
    """
    if window < 1:
        raise ValueError(f"decode_window_linear needs a window of at least 1, got {window}")
    b, h, _, d = q.shape
    hkv = k.shape[1]
    acc = _acc(q)
    state = state if state else empty_ring_state(q, k, v, fk, window)
    position = state["at"][0]
    row, oldest = position % window, ((position + 1) % window).view(1)
    real = True if key_mask is None else key_mask.bool()[:, None]
    keys, values, features, mask = (written(state[name], row, new) for name, new in (("k", k), ("v", v), ("fk", fk), ("mask", real)))
    # A decode step on the CPU is bound by its number of operations, not their size: every product below is one bmm
    # over the (B * Hkv) kv heads, every per-head weight a broadcast view, and each sum of two products one addcmul.
    g, rows = h // hkv, b * hkv
    scores = torch.bmm(q.reshape(rows, g, d).to(acc), keys.to(acc).view(rows, window, d).mT) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = torch.where(mask.view(b, hkv, 1, window), scores.view(b, hkv, g, window), float("-inf"))
    # A query whose window holds no real key has every score at -inf, and weight 0 for all of them.
    peak = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(acc).min)
    smw, lnw = (w.to(acc).view(hkv, g, 1) if torch.is_tensor(w) else w for w in (sm_weight, ln_weight))
    a = torch.exp(scores - peak) * smw
    S, z = state["S"], state["z"]
    fqg = fq.reshape(rows, g, -1).to(acc)
    linear = torch.bmm(fqg, S.view(rows, *S.shape[2:])).view(b, hkv, g, -1)
    linear_mass = torch.bmm(fqg, z.view(rows, -1, 1)).view(b, hkv, g, 1)
    num = torch.bmm(a.view(rows, g, window), values.to(acc).view(rows, window, -1)).view(b, hkv, g, -1)
    num, den = (torch.addcmul(x, lnw, y) if torch.is_tensor(lnw) else x + lnw * y
                for x, y in ((num, linear), (a.sum(-1, keepdim=True), linear_mass)))
    o = (num / den.clamp_min(1e-30)).view(b, h, 1, -1).to(v.dtype)
    # The oldest key leaves the window for the next step (a pad adds nothing).
    old = features.index_select(2, oldest)[:, :, 0].to(acc) * mask.index_select(2, oldest)
    if decay is not None:  # the sums fade by one token for the next query
        S, z = S * decay.to(acc)[None, :, None, None], z * decay.to(acc)[None, :, None]
    S = torch.addcmul(S, old[..., None], values.index_select(2, oldest).to(acc))  # a rank-one write: a broadcast multiply-add
    state = {"S": S, "z": z + old, "k": keys, "v": values, "fk": features, "mask": mask, "at": state["at"] + 1}
    return o, state
