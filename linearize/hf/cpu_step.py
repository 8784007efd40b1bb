"""Decode steps of every mixer with a fused Triton step (`hedgehog`, `hedgehog_swa`, `gated_deltanet`, `qwen3_5_gdn`,
`gla`, `mamba2`, `bamba_mamba2`) for CPU inference, in fewer and cheaper PyTorch operations than the PyTorch path's.

A decode step of a small model on a few CPU cores is bound by the operations it runs, each some microseconds of
dispatch and allocation whatever its size, more than by their arithmetic: on the PyTorch path a SmolLM2-135M `lolcats`
student decoded at 0.96-0.98x its teacher's speed at 2K on two cores (BENCHMARKS.md, fifty-first and fifty-second
sessions). The Hedgehog steps do the same arithmetic with q's and k's heads rotated together and mapped in one batched
product per side into one buffer, the state's sums and ring updated in place, and the ring's row and its oldest key
addressed by the position read once as a number (views, where the PyTorch path gathers and scatters by index): a
`lolcats` layer's step, projections included, in 112 top-level ATen calls instead of 134 (229 instead of 277 in all)
and about 470 us instead of 590 (the layer timed alone), and the student at 1.01-1.04x its teacher's speed. The
others update their convolution's cache, their state and their window in place where the PyTorch path makes new ones,
and skip its repeats of the kv heads to the query heads (`gla` reads its one state per kv head with the group's
queries; `mamba2`'s write broadcasts a kv head's key and value over its group's states).

They take the state in the fused steps' layout (`triton_step`; for `hedgehog_swa` the ring of `ops_window.ring_state`,
or `ops_kept`'s with kept keys) and the same arguments, so a mixer's `launch_step` runs Triton on CUDA and these on the
CPU; the PyTorch path stays their reference (tests/test_cpu_step.py: heads and states step by step, in float64,
float32 and bfloat16, with padding, partial RoPE, a softcap, a decay, kept keys and no window). `LINEARIZE_FUSED_STEP=off` or
`LINEARIZE_KERNELS=torch` sends a step back to it, and so do gradients, a compiled step (which cannot read the
position as a number) and a state made under `torch.inference_mode()` stepped outside it (which torch does not let
change in place).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import rotate_half
from .kernel_dispatch import mode as kernel_mode
from .norms import gated_group_rms_norm, gated_rms_norm
from .ops_delta import delta_rule_gates, l2_normalize
from .ops_gated import ssd_steps
from .triton_step import switch
from .windows import _one_query

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def cpu_step_problem(q: Tensor, tensors: dict[str, Tensor], recurrent: tuple[str, ...], window: int) -> Optional[str]:
    """Why a CPU step does not take this decode step (None when it does): the device, gradients, compilation, the
    dtype, the layer's state `tensors` (empty before the first step, else the PyTorch path's: the sums named first in
    `recurrent` in the accumulation dtype and, with a `window`, its keys in q's dtype and a boolean mask), and the
    switches."""
    if q.device.type != "cpu":
        return "a CPU step takes CPU tensors"
    if torch.is_grad_enabled():
        return "a CPU step has no backward; it runs under torch.no_grad() or torch.inference_mode()"
    if torch.compiler.is_compiling():
        return "a compiled step traces the PyTorch path (a CPU step reads the position as a number)"
    if q.dtype not in DTYPES:
        return f"a CPU step takes q in float16, bfloat16, float32 or float64, got {q.dtype}"
    if tensors:  # the PyTorch path's state for q's dtype (checked on its sums and, with a window, its keys)
        acc = torch.promote_types(q.dtype, torch.float32)
        if tensors[recurrent[0]].dtype != acc or (window and (tensors["k"].dtype != q.dtype or tensors["mask"].dtype != torch.bool)):
            return f"a CPU step takes a state of {acc} sums (and keys of q's dtype, {q.dtype})"
        if not torch.is_inference_mode_enabled() and any(t.is_inference() for t in tensors.values()):
            return "a state made under torch.inference_mode() changes in place only inside it"
    if switch() == "off" or kernel_mode() == "torch":
        return "turned off (LINEARIZE_FUSED_STEP=off or LINEARIZE_KERNELS=torch)"
    return None


def _rotated(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on the first cos.shape[-1] dimensions of x (B, heads, 1, D), in x's dtype; cos, sin (B, 1, rot)."""
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]
    part = x if rot == x.shape[-1] else x[..., :rot]
    rotated = part * cos + rotate_half(part) * sin  # as `attention.apply_rotary` computes it: the cached keys are its own
    return rotated if rot == x.shape[-1] else torch.cat((rotated, x[..., rot:]), dim=-1)


def _feature_maps(x: Tensor, heads: int, wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor, acc: torch.dtype) -> Tensor:
    """Hedgehog's maps [softmax(xW + b), softmax(-(xW + b))] of x (B, heads + kv heads, 1, D), the first `heads` by
    (wq, bq) (heads, D, F), (heads, 1, F), the rest by (wk, bk): (B, heads + kv heads, 2F) in `acc`."""
    batch, total, _, d = x.shape
    rows = x.reshape(batch, total, d).transpose(0, 1).to(acc)
    y = rows.new_empty(total, batch, wq.shape[-1])
    torch.baddbmm(bq.to(acc), rows[:heads], wq.to(acc), out=y[:heads])
    torch.baddbmm(bk.to(acc), rows[heads:], wk.to(acc), out=y[heads:])
    return torch.stack((y, -y), dim=2).softmax(-1).view(total, batch, -1).transpose(0, 1)


def hedgehog_step(q, k, v, cos, sin, real, wq, bq, wk, bk, S) -> Tensor:
    """`triton_step.hedgehog_step` on CPU tensors: RoPE on q and k, their feature maps, fk^T [v, 1] added to the state S
    (B, Hkv, 2F, D + 1) in place (a pad's fk is 0), and each query head's read-out fq S over its last column (0 where
    no real key was seen). q (B, H, 1, D), k and v (B, Hkv, 1, D), real (B, 1) or None; returns (B, H, 1, D) in v's
    dtype."""
    batch, heads, _, d = q.shape
    rows, group, acc = batch * k.shape[1], heads // k.shape[1], S.dtype
    both = torch.cat((q, k), dim=1)
    features = _feature_maps(both if cos is None else _rotated(both, cos, sin), heads, wq, bq, wk, bk, acc)
    fk = features[:, heads:]
    if real is not None:
        fk = fk * real.view(batch, 1, 1)
    values = F.pad(v.to(acc), (0, 1), value=1.0)
    state = S.view(rows, *S.shape[2:])
    state.baddbmm_(fk.reshape(rows, -1, 1), values.view(rows, 1, d + 1))
    out = torch.bmm(features[:, :heads].reshape(rows, group, -1), state)
    num, den = out[..., :d], out[..., d:]
    return (num / torch.where(den > 0, den, 1.0)).view(batch, heads, 1, d).to(v.dtype)


def hedgehog_swa_step(
    q, k, v, cos, sin, real, wq, bq, wk, bk, window_logit, S, z, keys, values, fk, mask, at, keep, scaling, softcap, decay_logit,
    linear_rope,
) -> Tensor:
    """`triton_step.hedgehog_swa_step` on CPU tensors: the current key, value, feature-mapped key and mask written into
    the ring's row (`ops_window.ring_state`; `at` (B,) tokens seen), every row scored, the window's softmax and the
    linear part under one normaliser, (sum_w a_w v_w + (1 - s) fq S) / (sum_w a_w + (1 - s) fq z) with a = s exp(score
    - peak) and s = sigmoid(window_logit), then S and z faded by `decay_logit`'s sigmoid (if given) and the ring's oldest
    key folded into them, all in place. With `keep` kept keys, `ops_kept`'s layout (the kept keys' rows, then a ring of
    the rest), where a step leaves the sums as they are (the block's decision, `ops_kept.decide_block`, is the
    caller's). Shapes as `hedgehog_step`'s, S (B, Hkv, 2F, D), z (B, Hkv, 2F), keys and values (B, Hkv, rows, D), fk
    (B, Hkv, rows, 2F), mask (B, Hkv, rows)."""
    batch, heads, _, d = q.shape
    kv_heads, width, acc = k.shape[1], keys.shape[2], S.dtype
    rows, group = batch * kv_heads, heads // kv_heads
    both = torch.cat((q, k), dim=1)
    turned = both if cos is None else _rotated(both, cos, sin)
    features = _feature_maps(turned if linear_rope else both, heads, wq, bq, wk, bk, acc)
    position = int(at[0])
    row = keep + position % (width - keep)
    keys[:, :, row] = turned[:, heads:, 0]
    values[:, :, row] = v[:, :, 0]
    fk[:, :, row] = features[:, heads:]
    mask[:, :, row] = True if real is None else real.view(batch, 1)
    # The PyTorch paths' order of operations (`ops_window.decode_window_linear`, `ops_kept.decode_kept_window_linear`):
    # in 16 bits the heads then round as theirs do.
    queries, keys_t = turned[:, :heads].reshape(rows, group, d).to(acc), keys.view(rows, width, d).mT.to(acc)
    scores = torch.bmm(queries * scaling, keys_t) if keep else torch.bmm(queries, keys_t).mul_(scaling)
    if softcap is not None:
        scores = torch.tanh(scores.div_(softcap)).mul_(softcap)
    scores = torch.where(mask.view(batch, kv_heads, 1, width), scores.view(batch, kv_heads, group, width), float("-inf"))
    # A query whose window holds no real key has every score at -inf, and weight 0 for all of them.
    share = torch.sigmoid(window_logit.to(acc)).view(1, kv_heads, group, 1)
    weights = scores.sub_(scores.amax(-1, keepdim=True).clamp_min_(torch.finfo(acc).min)).exp_().mul_(share)
    fq = features[:, :heads].reshape(rows, group, -1)
    linear = torch.bmm(fq, S.view(rows, *S.shape[2:])).view(batch, kv_heads, group, d)
    linear_mass = torch.bmm(fq, z.view(rows, -1, 1)).view(batch, kv_heads, group, 1)
    num = torch.bmm(weights.view(rows, group, width), values.view(rows, width, d).to(acc)).view(batch, kv_heads, group, d)
    rest, den = 1.0 - share, weights.sum(-1, keepdim=True)
    if keep:
        num, den = num + rest * linear, den + rest * linear_mass
    else:
        num, den = torch.addcmul(num, rest, linear), torch.addcmul(den, rest, linear_mass)
    out = num.div_(den.clamp_min_(1e-30))
    if not keep:
        oldest = (row + 1) % width
        leaving = fk[:, :, oldest] * mask[:, :, oldest, None]  # a pad adds nothing
        if decay_logit is not None:
            fade = torch.sigmoid(decay_logit.to(acc)).view(1, kv_heads, 1)
            S.mul_(fade[..., None])
            z.mul_(fade)
        S.view(rows, *S.shape[2:]).baddbmm_(leaving.reshape(rows, -1, 1), values[:, :, oldest].reshape(rows, 1, d).to(acc))
        z.add_(leaving)
    return out.view(batch, heads, 1, d).to(v.dtype)


def gated_deltanet_step(
    hidden, q, k, v, cos, sin, real, conv_weight, beta_weight, beta_bias, decay_weight, a_log, dt_bias, window_logit, conv,
    recurrent, window_k, window_v, window_mask, scaling, softcap,
) -> Tensor:
    """`triton_step.gated_deltanet_step` on CPU tensors: the gates beta = sigmoid(W_beta x + b) and g = -exp(A_log)
    softplus(W_a x + dt_bias) from the hidden states x (B, 1, hidden), the short convolution's one-token step on q, k
    and v (its cache conv (B, C, K - 1) moved on in place), q and k L2-normalised, the gated delta rule's update of
    recurrent (B, H, D, D) in place and its read-out; with a window (window_k, window_v (B, Hkv, window - 1, D),
    window_mask (B, window - 1)), the teacher's softmax over it and the current key, mixed in by sigmoid(window_logit),
    the window moved on in place. A pad (False in real (B, 1)) neither writes, decays nor enters the convolution, and
    its heads are 0. Returns (B, H, 1, D) in q's dtype."""
    out = _delta_rule_heads(hidden, q, k, v, real, conv_weight, beta_weight, beta_bias, decay_weight, a_log, dt_bias, conv, recurrent)
    if window_k is not None:
        share = torch.sigmoid(window_logit.to(out.dtype)).view(-1, 1, 1)
        out = torch.lerp(out, _window_heads(q, k, v, cos, sin, real, window_k, window_v, window_mask, scaling, softcap).to(out.dtype), share)
    if real is not None:
        out = out * real.view(-1, 1, 1, 1)
    return out.to(q.dtype)


def qwen3_5_gdn_step(hidden, q, k, v, real, z, conv_weight, b_weight, a_weight, a_log, dt_bias, norm_weight, conv, recurrent, scale, eps) -> Tensor:
    """`triton_step.qwen3_5_gdn_step` on CPU tensors: `gated_deltanet_step`'s rule as qwen3_5 runs it (SiLU after the
    convolution, q and k scaled to unit length with qwen3_5's epsilon, q times `scale`, no bias on beta, no window),
    then its gated RMSNorm by SiLU(z) (z (B, 1, H D)) with norm_weight (D,) and `eps`; conv and recurrent updated in
    place. Returns (B, H, 1, D) in q's dtype, 0 at a pad."""
    batch, heads, _, d = q.shape
    out = _delta_rule_heads(hidden, q, k, v, real, conv_weight, b_weight, None, a_weight, a_log, dt_bias, conv, recurrent, qwen_scale=scale)
    gated = gated_rms_norm(out.to(hidden.dtype), z.view(batch, 1, heads, d).transpose(1, 2), norm_weight, eps)
    if real is not None:
        gated = gated * real.view(batch, 1, 1, 1)
    return gated.to(q.dtype)


def _delta_rule_heads(
    hidden, q, k, v, real, conv_weight, beta_weight, beta_bias, decay_weight, a_log, dt_bias, conv, recurrent, qwen_scale: Optional[float] = None
) -> Tensor:
    """The gated delta rule's heads (B, H, 1, D) in the sums' dtype after one token: its gates, the short convolution
    (conv moved on in place, a pad leaving it as it was) and the rule's update of `recurrent` in place. `qwen_scale`:
    None for `gated_deltanet`'s form, else q's scale in qwen3_5's (`mixer_gated_deltanet.delta_rule_decode`'s `silu`)."""
    batch, heads, _, d = q.shape
    kv_heads = k.shape[1]
    rows = batch * heads
    beta, g = delta_rule_gates(hidden, beta_weight, beta_bias, decay_weight, a_log, dt_bias, real)
    channels = _conv_step(conv, torch.cat((q, k, v), dim=1), conv_weight, real).view(batch, -1, d)
    if qwen_scale is None:
        qk = F.normalize(channels[:, : heads + kv_heads], dim=-1)
    else:
        channels = F.silu(channels)
        qk = l2_normalize(channels[:, : heads + kv_heads])
    group = heads // kv_heads
    keys = qk[:, heads:].repeat_interleave(group, dim=1).reshape(rows, 1, d)
    values = channels[:, heads + kv_heads :].repeat_interleave(group, dim=1).reshape(rows, 1, d)
    state = recurrent.view(rows, d, d).mul_(g.exp().view(rows, 1, 1))
    state.addcmul_(keys.transpose(1, 2), (values - torch.bmm(keys, state)) * beta.reshape(rows, 1, 1))
    queries = qk[:, :heads].reshape(rows, 1, d)
    if qwen_scale is not None and qwen_scale != 1.0:
        queries = queries * qwen_scale
    return torch.bmm(queries, state).view(batch, heads, 1, d)


def gla_step(q, k, v, cos, sin, real, S, window_k, window_v, window_mask, gate_normalizer, scaling, softcap) -> Tensor:
    """`triton_step.gla_step` on CPU tensors: the state S (B, Hkv, D, D + 1) of each kv head faded by
    exp(logsigmoid(k) / gate_normalizer) per key dimension and written softmax(k)^T [v, 1] in place (a pad neither
    writes nor fades), each query head's read-out softmax(q) S over its last column (0 where no real key was seen);
    with a window, half of each head the teacher's softmax over it (`_window_heads`, which moves it on in place).
    q and k unrotated for the linear part. Returns (B, H, 1, D) in v's dtype."""
    batch, heads, _, d = q.shape
    kv_heads, acc = k.shape[1], S.dtype
    rows, group = batch * kv_heads, heads // kv_heads
    keys = k.to(acc)
    fk, fade = keys.softmax(-1), F.logsigmoid(keys) / gate_normalizer
    if real is not None:  # a pad adds nothing and does not fade
        fk, fade = fk * real.view(batch, 1, 1, 1), fade * real.view(batch, 1, 1, 1)
    state = S.view(rows, d, d + 1).mul_(fade.exp().view(rows, d, 1))
    state.baddbmm_(fk.view(rows, d, 1), F.pad(v.to(acc), (0, 1), value=1.0).view(rows, 1, d + 1))
    out = torch.bmm(q.to(acc).softmax(-1).view(rows, group, d), state)
    num, den = out[..., :d], out[..., d:]
    out = (num / torch.where(den > 0, den, 1.0)).view(batch, heads, 1, d)
    if window_k is not None:
        out = torch.lerp(out, _window_heads(q, k, v, cos, sin, real, window_k, window_v, window_mask, scaling, softcap).to(acc), 0.5)
    return out.to(v.dtype)


def mamba2_step(
    hidden, q, k, v, cos, sin, real, dt_weight, dt_bias, a_log, skip, window_logit, ssm, window_k, window_v, window_mask, scaling, softcap,
) -> Tensor:
    """`triton_step.mamba2_step` on CPU tensors: dt = softplus(W_dt x + dt_bias) per head from the hidden states x
    (B, 1, hidden), each head's state ssm (B, H, D, D) faded by exp(-exp(A_log) dt) and written (dt B)^T x in place,
    with x, B, C the kv heads' v, k and the query heads' q; y = scaling C h + skip x; with a window, the teacher's
    softmax over it mixed in by sigmoid(window_logit) (`_window_heads`, which moves it on in place). A pad (dt = 0)
    neither writes nor fades, and its heads are 0. Returns (B, H, 1, D) in q's dtype."""
    batch, heads, _, d = q.shape
    kv_heads, acc = k.shape[1], ssm.dtype
    group = heads // kv_heads
    dt = ssd_steps(hidden, dt_weight, dt_bias, real).view(batch, kv_heads, group, 1)
    x = v.to(acc).view(batch, kv_heads, 1, d)
    y = _ssm_heads(q.to(acc), k.to(acc).view(batch, kv_heads, 1, d) * dt, x, dt, a_log, ssm, scaling)
    y = y.view(batch, kv_heads, group, d).addcmul_(skip.to(acc).view(1, kv_heads, group, 1), x).view(batch, heads, 1, d)
    if window_k is not None:
        share = torch.sigmoid(window_logit.to(acc)).view(-1, 1, 1)
        y = torch.lerp(y, _window_heads(q, k, v, cos, sin, real, window_k, window_v, window_mask, scaling, softcap).to(acc), share)
    if real is not None:
        y = y * real.view(batch, 1, 1, 1)
    return y.to(q.dtype)


def bamba_mamba2_step(
    hidden, q, k, v, real, z, conv_weight, conv_bias, dt_weight, dt_bias, a_log, skip, norm_weight, conv, ssm, eps,
) -> Tensor:
    """`triton_step.bamba_mamba2_step` on CPU tensors: x, B, C from v, k (repeated to the query heads) and q through
    the short convolution's one-token step (its cache conv (B, 3 H D, K - 1) moved on in place, a pad leaving it as it
    was), its bias and SiLU; `mamba2_step`'s update of ssm (B, H, D, D) in place and read-out C h + skip x; then bamba's
    gated RMSNorm per head by SiLU(z) (z (B, 1, H D)) with norm_weight (H, D) and `eps`. Returns (B, H, 1, D) in q's
    dtype, 0 at a pad."""
    batch, heads, _, d = q.shape
    group, acc = heads // k.shape[1], ssm.dtype
    xbc = torch.cat((v.repeat_interleave(group, dim=1), k.repeat_interleave(group, dim=1), q), dim=1)
    x, b, c = F.silu(_conv_step(conv, xbc, conv_weight, real) + conv_bias.to(acc)).view(batch, 3, heads, 1, d).unbind(1)
    dt = ssd_steps(hidden, dt_weight, dt_bias, real).view(batch, heads, 1, 1)
    y = _ssm_heads(c, b * dt, x, dt, a_log, ssm, 1.0).addcmul_(skip.to(acc).view(1, heads, 1, 1), x)
    out = gated_group_rms_norm(y, z.view(batch, 1, heads, d).transpose(1, 2), norm_weight, eps)
    if real is not None:
        out = out * real.view(batch, 1, 1, 1)
    return out.to(q.dtype)


def _conv_step(conv: Tensor, heads: Tensor, conv_weight: Tensor, real: Optional[Tensor]) -> Tensor:
    """The short causal convolution's one-token step: heads (B, *, 1, D) as its C channels in conv's dtype after the
    cache conv (B, C, K - 1) of the inputs before, weighted by conv_weight (C, K); returns (B, C) and moves conv on in
    place (a pad, False in real (B, 1), leaves it as it was)."""
    batch = conv.shape[0]
    seq = torch.cat((conv, heads.to(conv.dtype).view(batch, -1, 1)), dim=-1)
    if real is None:
        conv.copy_(seq[..., 1:])
    else:
        conv.copy_(torch.where(real.view(batch, 1, 1).bool(), seq[..., 1:], conv))
    return (seq * conv_weight.to(conv.dtype)).sum(-1)


def _ssm_heads(c: Tensor, keys: Tensor, x: Tensor, dt: Tensor, a_log: Tensor, ssm: Tensor, scaling: float) -> Tensor:
    """Mamba-2's one-token update of ssm (B, H, D, D) in place, h = exp(-exp(A_log) dt) h + keys^T x, and its read-out
    scaling c h (B, H, 1, D). c (B, H, 1, D); keys (dt B) and x broadcast to (B, H, 1, D) (a kv head's to its group),
    dt to (B, H, 1, 1); all in ssm's dtype."""
    batch, heads, _, d = c.shape
    state = ssm.view(batch, x.shape[1], -1, d, d)
    fade = torch.exp(-a_log.to(ssm.dtype).exp().view(1, x.shape[1], -1, 1) * dt.view(batch, x.shape[1], -1, 1))
    state.mul_(fade[..., None]).addcmul_(keys.view(batch, x.shape[1], -1, d, 1), x.view(batch, x.shape[1], -1, 1, d))
    queries = c if scaling == 1.0 else c * scaling
    return torch.bmm(queries.reshape(batch * heads, 1, d), ssm.view(batch * heads, d, d)).view(batch, heads, 1, d)


def _window_heads(q, k, v, cos, sin, real, window_k, window_v, window_mask, scaling, softcap) -> Tensor:
    """The teacher's softmax heads (B, H, 1, D), in v's dtype, of q over the window's cached keys and the current one
    (q and k rotated; `windows._one_query`, the PyTorch path's), the window (B, Hkv, window - 1, *) and its mask
    (B, window - 1) moved on by the current key in place (`windows.sliding_window_heads`' decode step)."""
    heads = q.shape[1]
    both = torch.cat((q, k), dim=1)
    turned = both if cos is None else _rotated(both, cos, sin)
    keys = torch.cat((window_k, turned[:, heads:]), dim=2)
    values = torch.cat((window_v, v), dim=2)
    mask = F.pad(window_mask, (0, 1), value=True) if real is None else torch.cat((window_mask, real.bool()), dim=1)
    out = _one_query(turned[:, :heads], keys, values, scaling=scaling, softcap=softcap, key_mask=mask)
    window_k.copy_(keys[:, :, 1:])
    window_v.copy_(values[:, :, 1:])
    window_mask.copy_(mask[:, 1:])
    return out
