"""One decode step of a `gated_deltanet`, `qwen3_5_gdn`, `gla`, `mamba2`, `bamba_mamba2`, `hedgehog` or `hedgehog_swa`
layer, window included, in one or two Triton kernel launches.

On a GPU a batch-1 decode step is bound by kernel launches and host work, not by arithmetic: the PyTorch path of
`GatedDeltaNetMixer.mix` launches about 46 kernels per layer (H200, window 64) and fla's fused recurrent kernel
alone costs about 260 us of CPU per call for 2 us on the GPU (BENCHMARKS.md, issue 15). Each step function here does
all of a layer's step that follows the teacher's q/k/v projections in one kernel, one kernel per rule:
- `gated_deltanet_step`: the short convolution's one-token step on q, k and v, shifting its cache (B, C, K - 1) in
  place; the gates from the hidden states, beta = sigmoid(W_beta x + b) and g = -exp(A_log) softplus(W_a x + dt_bias);
  L2-normalisation of the convolved q and k; the gated delta rule's update of the float32 state S (B, H, D, D), in
  place, and its read-out q S;
- `qwen3_5_gdn_step`: the same kernel as qwen3_5 computes the step (`QWEN`): SiLU after the convolution, the L2 norm
  x / sqrt(|x|^2 + 1e-6), q scaled by D^-0.5, beta = sigmoid(W_b x) without a bias, no window; then each head's gated
  RMSNorm, weight * RMSNorm(y) * SiLU(z), with z = W_z x projected before the kernel;
- `gla_step`: softmax feature maps of q and k, the gate logsigmoid(k) / gate_normalizer, the update of the float32
  state (B, Hkv, D, D + 1) of each kv head (values and a ones column, the normaliser) in place, and each query head's
  read-out normalised by its last column;
- `mamba2_step`: dt = softplus(W_dt x + dt_bias), the decay exp(-exp(A_log) dt) per query head, the update of the
  float32 state (B, H, D, D) with (dt k)^T v in place, and the read-out scaling * q S + D * v;
- `bamba_mamba2_step`: the causal convolution's one-token step (with its bias, then SiLU) on x, B and C, query head h's
  channels of v, k (kv heads repeated) and q, its cache (B, 3 H D, K - 1) shifted in place; dt = softplus(W_dt u +
  dt_bias); the update of the float32 state (B, H, D, D) with (dt B)^T x in place and the read-out C S + D x; and
  bamba's gated norm per head, RMSNorm(y SiLU(z)) times its weight, with z = W_z u projected before the kernel;
- `hedgehog_step`: RoPE on q and k, the Hedgehog feature maps (as below) of the rotated q and k, the update of the float32
  state (B, Hkv, 2F, D + 1) with fk^T [v, 1] in place (a pad's fk is 0), and each query head's read-out fq S normalised
  by its last column (0 where no real key was seen);
- `hedgehog_swa_step`: RoPE on q and k, the Hedgehog feature maps [softmax(xW + b), softmax(-(xW + b))] of the rotated
  q (per query head) and k (per kv head) (with `linear_rope` off, of the unrotated ones), and the window's softmax and
  the linear part under one normaliser, (sum_w a_w v_w + (1 - s) fq S) / (sum_w a_w + (1 - s) fq z) with
  a = s exp(score - peak). The window is a ring of `window` rows per kv head (`ops_window.ring_state`), the current
  key scored in its row: then, with a decay, S and z fade by it, the window's oldest key (the next row) leaves into
  the float32 S (B, Hkv, 2F, D) and z (B, Hkv, 2F) (a pad's adds nothing), and the current key, value,
  feature-mapped key (float32) and mask are written into their row, in place: one row read and one written where
  the window's caches used to move on a row (the largest kernel of a compiled step at 2K, H100, forty-fifth
  session). Its output at a pad is not zeroed (nor on the PyTorch path). With kept keys (option `keep`), the same
  step in `ops_kept`'s layout: every row (the kept keys and the ring) scored under the one normaliser with the sums,
  which a step leaves as they are, and the current key written into its row of the ring; the decision every
  keep_block steps is `ops_kept.decide_block`'s, in PyTorch.
The step splits its rows across programs (flash decoding): a window's (LoLCATs': 256), or with kept keys N kept keys
and window + 63 more (831 at N = 512, window 256). `_partial_kernel` runs one program per (sequence, query head,
chunk of `WINDOW_CHUNK` elements' rows), each an online softmax's peak, normaliser and weighted values of its chunk;
`_combine_kernel`, one per (sequence, query head), combines them with the linear part; `_ring_write_kernel`, one per
(sequence, kv head), then folds the oldest key and writes the ring's row. One program per kv head scoring every row
(the form until the forty-fourth and forty-fifth sessions) ran 3 programs at batch 1 on 132 SMs, each through its 3
query heads' rows one after another; one per kv head combining its query heads and folding (until the forty-seventh)
took 16.9 us a layer with the ring (H100, batch 1, bf16, window 256), a quarter of the step's GPU time. Compiled
for sm_90 (bf16, Triton 3.9's ptxas) at SmolLM2's shape, window 64 or 256, and 512 kept keys: 128 to 142 registers a
thread (4 and 8 warps), no spill; at head dim 128 (32 heads, 8 kv heads) 113 to 190, and 255 with 128 features, the
window's combine then spilling 76 bytes (forty-fifth session, before the ring).
And for the first three, with a window: RoPE on the unconvolved q and k, the window's one-query softmax over its cached
keys and the current one (the mask, the teacher's scaling, its softcap where it has one), the window cache
(B, Hkv, window - 1, D) shifted in place, and the share mix s * window + (1 - s) * linear heads, with
s = sigmoid(window_logit) (gla: 0.5). A padding token neither writes, decays nor enters the convolution, as on the
PyTorch path, whose output at it `gated_deltanet` and `mamba2` zero and `gla` does not.
A last, tiny launch shifts the window's mask (B, window - 1), which every kv head's program reads: shifted by one
of them, it could change under another.

One program per (sequence, kv head) for every rule but the gated delta rule's two and `hedgehog_swa`'s split: it owns
every byte it writes (its query heads' and kv head's convolution channels, its query heads' or kv head's state, its kv
head's window rows), so the in-place updates need no cross-program synchronisation, and the window's keys are read
once for the group's query heads. The `gated_deltanet` and `qwen3_5_gdn` kernels run one program per (sequence, query head) instead: at batch 1
SmolLM2-135M (9 query, 3 kv heads) gave the kv-head layout 3 programs on the H200's 132 SMs, each stepping three
64 x 64 states one after another, 21 us a step, the largest kernel of a compiled decode step (BENCHMARKS.md, fifteenth
session). A query head's program owns its q channels of the convolution and its state; its kv head's k and v channels
and window rows it only reads, and the second launch (`_kv_shift_kernel`, one program per kv head, in place of the
mask's) moves them and the mask on. Within a program a barrier separates the reads of a shifted cache from its
writes. 8 warps: compiled for sm_90 (bf16, ptxas), at SmolLM2's shape with window 64 the gated_deltanet (one query
head a program), its kv shift, gla and mamba2 kernels take 114, 128, 186 and 246 registers a thread and spill none;
at head dim 128 and window 64 the gla and mamba2 kernels spill 0.5 to 0.7 KB, gated_deltanet's none; at window x head
dim 16,384 (`MAX_WINDOW_TILE`) 0.4 KB (gated_deltanet), 0.9 to 2.2 KB (gla, mamba2) and 3.2 KB (the kv shift, which
holds the window's keys and values whole). The gla kernel keeps its state's last column as a vector beside the D x D values, so it holds no tile D + 1
columns wide (a power of two: twice the registers).

The kernels share their window, RoPE and rounding (`_window_tile`, `_shifted`, `_scores`, `_rotated`, `_rounded`)
and their launch (`_launch`; `hedgehog_swa`'s its own); each rule is its own kernel (`hedgehog_swa`'s two),
its own function and its own custom op.

Arithmetic is float32; the rotated q and k and the window's heads are rounded to the input dtype where the PyTorch
path rounds them (so the cached keys are bit-identical to its own), and the output is in the input dtype. The
layouts of the states are the PyTorch path's, so prefill, static caches and saved models do not change. Each step is
registered as a custom op (`torch.library.custom_op`, `OPS`), which a compiled decode step (static cache) calls;
eager decoding launches the kernels without the op's dispatch.

This module is shipped as remote code next to saved models: Triton is imported inside a try block, and where it is
missing (or the step does not fit, `fused_step_problem`) the PyTorch path runs. `LINEARIZE_FUSED_STEP=off` turns
the step off (fla's and flex_attention's kernels still run); `LINEARIZE_KERNELS=torch` turns every kernel off.
"""

import functools
import inspect
import os
from typing import Callable, Optional

import torch
from torch import Tensor

from .errors import LinearizeError
from .kernel_dispatch import mode as kernel_mode
from .kernel_dispatch import op_name

try:  # optional: Triton comes with CUDA builds of torch. transformers' remote-code import check skips try blocks.
    import triton
    import triton.language as tl

    TRITON_PROBLEM = None
except Exception as error:  # ImportError, or a broken Triton install
    TRITON_PROBLEM = f"triton is not usable ({type(error).__name__}: {str(error)[:120]})"

# Triton reads TRITON_INTERPRET when it is imported and when a kernel is defined: with it, kernels run on CPU tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
SWITCH = "LINEARIZE_FUSED_STEP"
SWITCHES = ("auto", "on", "off")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A program holds its window's keys and values (window x head_dim, float32) and one state (head_dim x head_dim). At
# window x head dim 16,384 (8 warps, sm_90) a thread spills 0.9 to 2.2 KB; past these sizes the PyTorch path runs.
MAX_HEAD_DIM = 128
MAX_WINDOW_TILE = 16384
# Elements of the rows' keys (rows x head dim) that a `hedgehog_swa` step's partial program scores: its rows split into
# chunks of 64 at head dim 64, whatever their number (module docstring).
WINDOW_CHUNK = 4096


def switch() -> str:
    """LINEARIZE_FUSED_STEP: `auto` (default: the fused step on CUDA tensors), `off` (the PyTorch path, with fla's
    and flex_attention's kernels where LINEARIZE_KERNELS lets them run) or `on` (CPU tensors too, which Triton runs
    only in its interpreter, TRITON_INTERPRET=1: the tests). It switches `hedgehog_swa`'s fused prefill
    (triton_window.py), a prefill's short convolution (triton_conv.py), Hedgehog's feature maps (triton_features.py)
    and RoPE (triton_rope.py) alike."""
    value = os.environ.get(SWITCH, "auto").lower()
    if value not in SWITCHES:
        raise LinearizeError(f"{SWITCH}={value!r} is not one of {', '.join(SWITCHES)}; unset it or pick one")
    return value


def turned_off() -> Optional[str]:
    """Why linearize's fused kernels do not run here at all (None when they may): the switches, then Triton."""
    chosen = switch()
    if chosen == "off" or kernel_mode() == "torch":
        return f"turned off ({SWITCH}={chosen}, LINEARIZE_KERNELS={kernel_mode()})"
    return TRITON_PROBLEM


def fused_kernel_problem(x: Tensor, what: str) -> Optional[str]:
    """Why a fused inference kernel (`what`, e.g. "the fused RoPE") does not run on x here (None when it may, as far as
    the switches, Triton and the device go): CUDA tensors, or CPU tensors with LINEARIZE_FUSED_STEP=on under Triton's
    interpreter (the tests). The device is read first: off CUDA and the interpreter, a call reads no environment
    variable (a decode step on the CPU makes a dozen of these checks a layer)."""
    where = f"{what} runs on CUDA tensors (on CPU tensors with {SWITCH}=on under TRITON_INTERPRET=1)"
    if not (x.is_cuda or INTERPRETED):
        return where
    problem = turned_off()
    if problem is not None:
        return problem
    if not (x.is_cuda or switch() == "on"):
        return where
    return None


def fused_step_problem(
    hidden: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    position_embeddings,
    window: int,
    tensors: dict[str, Tensor],
    recurrent: tuple[str, ...],
    chunks_window: bool = False,
) -> Optional[str]:
    """Why a step function here does not take this decode step (None when it does): the switches, Triton, the device,
    gradients, dtypes, sizes, and the layer state `tensors` (empty before the first step, else as the PyTorch path
    leaves it: the float32 tensors named in `recurrent`, and the window's). A step that `chunks_window` reads its
    window a chunk at a time (`WINDOW_CHUNK`), so takes windows of any length."""
    problem = fused_kernel_problem(q, "the fused step")
    if problem is not None:
        return problem
    if torch.is_grad_enabled():
        return "the fused step has no backward; it runs under torch.no_grad() or torch.inference_mode()"
    if any(t.stride(-1) != 1 for t in (hidden, q, k, v)):
        return "the fused step takes hidden states, q, k and v whose last dimension is contiguous"
    if q.dtype not in DTYPES or hidden.dtype != q.dtype:
        return f"the fused step takes hidden states and q of one dtype among float16/bfloat16/float32, got {hidden.dtype}, {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or (not chunks_window and window * (1 << (q.shape[-1] - 1).bit_length()) > MAX_WINDOW_TILE):
        return f"the fused step takes head dimensions up to {MAX_HEAD_DIM} and windows of up to {MAX_WINDOW_TILE} keys x head dim"
    if position_embeddings is not None:
        cos = position_embeddings[0]
        if cos.dim() != 3 or cos.shape[1] != 1 or cos.dtype != q.dtype or cos.shape[-1] % 2:
            return "the fused step takes RoPE as (batch, 1, even rotary dim) cos/sin in the dtype of q"
    expected = dict.fromkeys(recurrent, torch.float32)
    if window:
        expected.update(k=q.dtype, v=q.dtype, mask=torch.bool)
    if "at" in tensors:  # kept keys' position on the device (`mixer_hedgehog`)
        expected["at"] = torch.int64
    if tensors and {n: t.dtype for n, t in tensors.items()} != expected:
        return f"the fused step takes a state of {expected}"
    return None


def _launch(
    kernel, q, k, v, cos, sin, real, window_k, window_v, window_mask, scaling, softcap, *rule, conv: Optional[Tensor] = None, **constants
) -> Tensor:
    """Launch a rule's `kernel`, one program per (sequence, kv head), then shift the window's mask; returns the heads
    (B, H, 1, D) in q's dtype. The kernel takes the arguments shared by every rule, then the rule's own, `rule` (None
    for an absent optional tensor), and the rule's `constants`. With `conv`, the convolution's cache
    (B, (H + 2 Hkv) D, K - 1) of a gated delta rule, the kernel runs one program per (sequence, query head) instead,
    and `_kv_shift_kernel` then moves on what they share: each kv head's k and v channels of `conv`, its window rows,
    and the window's mask.

    q (B, H, 1, D), k, v (B, Hkv, 1, D): the teacher's projections, unconvolved and unrotated; cos, sin (B or 1, 1,
    rotary dim) or None (no RoPE); real (B, 1) marks real tokens (None: all are); window_k, window_v
    (B, Hkv, window - 1, D) and window_mask (B, window - 1): the window's contiguous cache, updated in place, or None
    (no window).
    """
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    keep = 0 if window_k is None else window_k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    given = functools.partial(_given, q)
    # Shared by the step kernel and `_kv_shift_kernel`: the tensors they both read, their strides, and their shapes.
    window = (given(window_k), given(window_v), given(window_mask))
    strides = _strides(k, v, cos, real)
    shapes = dict(
        **_shapes(q, k, cos, real), KEEP=keep, BLOCK_WINDOW=triton.next_power_of_2(keep + 1), num_warps=8,
    )
    kernel[(batch, kv_heads if conv is None else heads)](
        q, k, v, given(cos), given(sin), given(real), *window, out, q.stride(0), q.stride(1), *strides,
        scaling, 1.0 if softcap is None else softcap, *map(given, rule),
        WINDOW=window_k is not None, SOFTCAP=softcap is not None, **shapes, **constants,
    )
    if conv is not None:
        taps = conv.shape[-1] + 1
        _kv_shift_kernel[(batch, kv_heads)](
            k, v, given(cos), given(sin), given(real), *window, conv, *strides,
            BLOCK_KEEP=triton.next_power_of_2(max(keep, 1)), WINDOW=window_k is not None and keep > 0,
            TAPS=taps, BLOCK_TAPS=triton.next_power_of_2(max(taps - 1, 1)), **shapes,
        )
    elif window_mask is not None and keep > 0:  # the mask one place on, after every kv head's program has read it
        _shift_mask_kernel[(batch,)](
            window_mask, given(real), strides[-1], KEEP=keep, BLOCK_KEEP=triton.next_power_of_2(keep), HAS_REAL=real is not None,
        )
    return out


def _given(q: Tensor, t: Optional[Tensor]) -> Tensor:
    """t, or q for an absent optional tensor, which the kernel never reads."""
    return q if t is None else t


def _strides(k: Tensor, v: Tensor, cos: Optional[Tensor], real: Optional[Tensor]) -> tuple:
    """The strides every step kernel takes after q's: k's and v's (sequence, head), cos's sequence (0 where one row
    serves every sequence) and real's."""
    return (k.stride(0), k.stride(1), v.stride(0), v.stride(1), 0 if cos is None or cos.shape[0] == 1 else cos.stride(0),
            0 if real is None else real.stride(0))


def _shapes(q: Tensor, k: Tensor, cos: Optional[Tensor], real: Optional[Tensor]) -> dict:
    """The constants every step kernel takes: its heads, head dim, rotary dim and whether it reads a padding mask."""
    return dict(
        HEADS=q.shape[1], KV_HEADS=k.shape[1], DIM=q.shape[-1], ROT=0 if cos is None else cos.shape[-1],
        BLOCK_DIM=triton.next_power_of_2(q.shape[-1]), HAS_REAL=real is not None,
    )


def _hidden(hidden: Tensor) -> dict:
    """The constants of a kernel that reads the hidden states (B, 1, hidden size): their size and its block."""
    return dict(HIDDEN=hidden.shape[-1], BLOCK_HIDDEN=min(triton.next_power_of_2(hidden.shape[-1]), 256))


def _gated_deltanet(
    hidden: Tensor, q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor], sin: Optional[Tensor], real: Optional[Tensor],
    conv_weight: Tensor, beta_weight: Tensor, beta_bias: Tensor, decay_weight: Tensor, a_log: Tensor, dt_bias: Tensor,
    window_logit: Optional[Tensor], conv: Tensor, recurrent: Tensor,
    window_k: Optional[Tensor], window_v: Optional[Tensor], window_mask: Optional[Tensor], scaling: float, softcap: Optional[float],
) -> Tensor:
    """The heads (B, H, 1, D) in q's dtype of one `gated_deltanet` decode step (module docstring); updates conv
    (B, C, K - 1), recurrent (B, H, D, D), both contiguous float32, and the window (`_launch`) in place. hidden
    (B, 1, hidden size): the layer's input."""
    taps = conv_weight.shape[1]
    return _launch(
        _gated_deltanet_kernel, q, k, v, cos, sin, real, window_k, window_v, window_mask, scaling, softcap,
        hidden, hidden.stride(0), conv_weight, beta_weight, beta_bias, decay_weight, a_log, dt_bias, window_logit,
        conv, recurrent, None, 0, None, 0.0,
        conv=conv, TAPS=taps, BLOCK_TAPS=triton.next_power_of_2(max(taps - 1, 1)), QWEN=False, **_hidden(hidden),
    )


def _qwen3_5_gdn(
    hidden: Tensor, q: Tensor, k: Tensor, v: Tensor, real: Optional[Tensor], z: Tensor, conv_weight: Tensor, b_weight: Tensor,
    a_weight: Tensor, a_log: Tensor, dt_bias: Tensor, norm_weight: Tensor, conv: Tensor, recurrent: Tensor, scale: float, eps: float,
) -> Tensor:
    """The heads (B, H, 1, D) in q's dtype of one `qwen3_5_gdn` decode step, its gated norm included (module docstring);
    updates conv (B, C, K - 1) and recurrent (B, H, D, D), both contiguous float32, in place. hidden (B, 1, hidden
    size): the layer's input; z (B, 1, H D): the gate's projection of it; norm_weight (D,); scale: q's, D^-0.5; eps:
    the norm's."""
    taps = conv_weight.shape[1]
    return _launch(
        _gated_deltanet_kernel, q, k, v, None, None, real, None, None, None, scale, None,
        hidden, hidden.stride(0), conv_weight, b_weight, None, a_weight, a_log, dt_bias, None,
        conv, recurrent, z, z.stride(0), norm_weight, eps,
        conv=conv, TAPS=taps, BLOCK_TAPS=triton.next_power_of_2(max(taps - 1, 1)), QWEN=True, **_hidden(hidden),
    )


def _gla(
    q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor], sin: Optional[Tensor], real: Optional[Tensor], state: Tensor,
    window_k: Optional[Tensor], window_v: Optional[Tensor], window_mask: Optional[Tensor], gate_normalizer: float, scaling: float, softcap: Optional[float],
) -> Tensor:
    """The heads (B, H, 1, D) in q's dtype of one `gla` decode step (module docstring); updates state
    (B, Hkv, D, D + 1), contiguous float32, and the window (`_launch`) in place."""
    return _launch(
        _gla_kernel, q, k, v, cos, sin, real, window_k, window_v, window_mask, scaling, softcap, state, gate_normalizer
    )


def _mamba2(
    hidden: Tensor, q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor], sin: Optional[Tensor], real: Optional[Tensor],
    dt_weight: Tensor, dt_bias: Tensor, a_log: Tensor, skip: Tensor, window_logit: Optional[Tensor], ssm: Tensor,
    window_k: Optional[Tensor], window_v: Optional[Tensor], window_mask: Optional[Tensor], scaling: float, softcap: Optional[float],
) -> Tensor:
    """The heads (B, H, 1, D) in q's dtype of one `mamba2` decode step (module docstring); updates ssm (B, H, D, D),
    contiguous float32, and the window (`_launch`) in place. hidden (B, 1, hidden size): the layer's input; skip: D,
    the current value's weight per head; scaling: the teacher's, for the state's read-out and the window's scores."""
    return _launch(
        _mamba2_kernel, q, k, v, cos, sin, real, window_k, window_v, window_mask, scaling, softcap,
        hidden, hidden.stride(0), dt_weight, dt_bias, a_log, skip, window_logit, ssm, **_hidden(hidden),
    )


def _bamba_mamba2(
    hidden: Tensor, q: Tensor, k: Tensor, v: Tensor, real: Optional[Tensor], z: Tensor, conv_weight: Tensor, conv_bias: Tensor,
    dt_weight: Tensor, dt_bias: Tensor, a_log: Tensor, skip: Tensor, norm_weight: Tensor, conv: Tensor, ssm: Tensor, eps: float,
) -> Tensor:
    """The heads (B, H, 1, D) in q's dtype of one `bamba_mamba2` decode step, its gated norm included (module
    docstring); updates conv (B, 3 H D, K - 1) and ssm (B, H, D, D), both contiguous float32, in place. hidden
    (B, 1, hidden size): the layer's input; z (B, 1, H D): the gate's projection of it; skip: D per head; norm_weight
    (H, D); eps: the norm's."""
    taps = conv_weight.shape[1]
    return _launch(
        _bamba_mamba2_kernel, q, k, v, None, None, real, None, None, None, 1.0, None,
        hidden, hidden.stride(0), z, z.stride(0), conv_weight, conv_bias, dt_weight, dt_bias, a_log, skip, norm_weight, conv, ssm, eps,
        TAPS=taps, BLOCK_TAPS=triton.next_power_of_2(max(taps - 1, 1)), **_hidden(hidden),
    )


def _hedgehog(
    q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor], sin: Optional[Tensor], real: Optional[Tensor],
    q_weight: Tensor, q_bias: Tensor, k_weight: Tensor, k_bias: Tensor, S: Tensor,
) -> Tensor:
    """The heads (B, H, 1, D) in q's dtype of one `hedgehog` decode step (module docstring); updates S
    (B, Hkv, 2F, D + 1), contiguous float32, in place. q_weight (H, D, F), q_bias (H, 1, F): the query heads' feature
    maps; k_weight, k_bias: the kv heads'."""
    features = q_weight.shape[-1]
    return _launch(
        _hedgehog_kernel, q, k, v, cos, sin, real, None, None, None, 1.0, None, q_weight, q_bias, k_weight, k_bias, S,
        FEATURES=features, BLOCK_FEATURES=triton.next_power_of_2(features),
    )


def _hedgehog_swa(
    q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor], sin: Optional[Tensor], real: Optional[Tensor],
    q_weight: Tensor, q_bias: Tensor, k_weight: Tensor, k_bias: Tensor, window_logit: Tensor, S: Tensor, z: Tensor,
    keys: Tensor, values: Tensor, features: Tensor, mask: Tensor, at: Tensor, kept: int, scaling: float,
    softcap: Optional[float], decay_logit: Optional[Tensor], linear_rope: bool,
) -> Tensor:
    """The heads (B, H, 1, D) in q's dtype of one `hedgehog_swa` decode step (module docstring), on its ring: with
    `kept` kept keys `ops_kept`'s layout, else the window's ring (`ops_window.ring_state`). Writes the current key,
    value, feature-mapped key and mask into the ring's row of position `at` (B,), int64, on the device (row
    kept + at mod the ring's length, read there, so a captured step serves every position), of keys, values
    (B, Hkv, P, D) in q's dtype, features (B, Hkv, P, 2F), float32, and mask (B, Hkv, P), in place; without kept keys
    S (B, Hkv, 2F, D) and z (B, Hkv, 2F), float32, then take the window's oldest key in place, faded first by
    sigmoid(decay_logit) (Hkv,) where given. q_weight (H, D, F), q_bias (H, 1, F): the query heads' feature maps;
    k_weight, k_bias: the kv heads'; linear_rope: the feature maps read the rotated q and k (else the unrotated). Kept
    keys' decision, every keep_block steps, is `ops_kept`'s. Three launches: the rows split across programs (flash
    decoding), `_partial_kernel`, one program per (sequence, query head, chunk of rows); `_combine_kernel`, one per
    (sequence, query head); then `_ring_write_kernel`, one per (sequence, kv head), which changes what the others read."""
    batch, heads, _, dim = q.shape
    rows = keys.shape[2]
    chunk = min(triton.next_power_of_2(rows), max(WINDOW_CHUNK // triton.next_power_of_2(dim), 1))
    splits, feature_dim = triton.cdiv(rows, chunk), q_weight.shape[-1]
    shapes = dict(**_shapes(q, k, cos, real), ROWS=rows, SPLITS=splits)
    partial = torch.empty((batch, heads, splits, shapes["BLOCK_DIM"] + 2), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    given = functools.partial(_given, q)
    shared = (q, k, v, given(cos), given(sin), given(real), keys, values, mask, partial)
    strides = (q.stride(0), q.stride(1), *_strides(k, v, cos, real))
    _partial_kernel[(batch, heads, splits)](
        *shared, *strides, scaling, 1.0 if softcap is None else softcap, at, kept, SOFTCAP=softcap is not None, CHUNK=chunk,
        **shapes, num_warps=4,
    )
    head = {name: shapes[name] for name in ("KV_HEADS", "DIM", "ROT", "BLOCK_DIM")}
    head.update(FEATURES=feature_dim, BLOCK_FEATURES=triton.next_power_of_2(feature_dim), LINEAR_ROPE=linear_rope)
    _combine_kernel[(batch, heads)](
        q, given(cos), given(sin), partial, out, q.stride(0), q.stride(1), strides[-2], q_weight, q_bias, window_logit, S, z,
        HEADS=heads, SPLITS=splits, BLOCK_SPLITS=triton.next_power_of_2(splits), **head, num_warps=4,
    )
    _ring_write_kernel[(batch, k.shape[1])](
        k, v, given(cos), given(sin), given(real), keys, values, mask, *strides[2:], features, k_weight, k_bias, S, z,
        given(decay_logit), at, kept, ROWS=rows, HAS_REAL=shapes["HAS_REAL"], HAS_DECAY=decay_logit is not None, FOLD=kept == 0,
        **head, num_warps=8 if kept == 0 else 4,  # the fold holds both halves of the sums, 2F x D (168 registers a thread at 4)
    )
    return out


if TRITON_PROBLEM is None:

    @triton.jit
    def _conv_out(x, cache, weight, d, in_d, TAPS: tl.constexpr, BLOCK_TAPS: tl.constexpr):
        """One token x through the causal depthwise convolution of D channels: `cache` points at their K - 1 past
        inputs (float32), `weight` at their K taps. Reads the cache only."""
        taps = tl.arange(0, BLOCK_TAPS)
        past = in_d[:, None] & (taps[None, :] < TAPS - 1)
        before = tl.load(cache + d[:, None] * (TAPS - 1) + taps[None, :], mask=past, other=0.0)
        w_past = tl.load(weight + d[:, None] * TAPS + taps[None, :], mask=past, other=0.0).to(tl.float32)
        w_now = tl.load(weight + d * TAPS + TAPS - 1, mask=in_d, other=0.0).to(tl.float32)
        return tl.sum(before * w_past, 1) + x * w_now

    @triton.jit
    def _conv_shift(x, cache, d, in_d, keep, TAPS: tl.constexpr, BLOCK_TAPS: tl.constexpr):
        """x shifted into the convolution's cache of D channels where `keep` (a pad leaves it as it was)."""
        taps = tl.arange(0, BLOCK_TAPS)
        rows = d[:, None] * (TAPS - 1) + taps[None, :]
        later = tl.load(cache + rows + 1, mask=in_d[:, None] & (taps[None, :] + 1 < TAPS - 1), other=0.0)
        shifted = tl.where(taps[None, :] == TAPS - 2, x[:, None], later)
        tl.debug_barrier()  # every past input is read (here and by the caller) before any is overwritten
        # `where`, not `& keep`: Triton 3.9's interpreter turns a scalar mask and'ed with a tensor one into int32,
        # which its stores refuse.
        tl.store(cache + rows, shifted, mask=tl.where(keep, in_d[:, None] & (taps[None, :] < TAPS - 1), False))

    @triton.jit
    def _conv_step(x, cache, weight, d, in_d, keep, TAPS: tl.constexpr, BLOCK_TAPS: tl.constexpr):
        """The convolution's output for x (`_conv_out`), x then shifted into its cache (`_conv_shift`)."""
        y = _conv_out(x, cache, weight, d, in_d, TAPS, BLOCK_TAPS)
        _conv_shift(x, cache, d, in_d, keep, TAPS, BLOCK_TAPS)
        return y

    @triton.jit
    def _rounded(x, dtype: tl.constexpr):
        """float32 x rounded to the nearest `dtype` value, ties to even (as PyTorch rounds), still in float32.
        bfloat16 is rounded on the bits, which Triton's interpreter (tests) converts by truncating."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        if dtype == tl.float16:
            return x.to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
        return x

    @triton.jit
    def _rotated(x_ptr, cos, sin, d, in_d, ROT: tl.constexpr):
        """Rotate-half RoPE on the first ROT dims of one head (float32 out), rounded as the PyTorch path rounds:
        x * cos, rotate_half(x) * sin and their sum each in the input dtype."""
        dtype = x_ptr.dtype.element_ty
        x = tl.load(x_ptr + d, mask=in_d, other=0.0).to(tl.float32)
        if ROT > 0:
            in_rot = d < ROT
            first = d < ROT // 2
            partner = tl.load(x_ptr + tl.where(first, d + ROT // 2, d - ROT // 2), mask=in_rot, other=0.0).to(tl.float32)
            c = tl.load(cos + d, mask=in_rot, other=0.0).to(tl.float32)
            s = tl.load(sin + d, mask=in_rot, other=0.0).to(tl.float32)
            straight = _rounded(x * c, dtype)
            turned = _rounded(tl.where(first, -partner, partner) * s, dtype)
            x = tl.where(in_rot, _rounded(straight + turned, dtype), x)
        return x

    @triton.jit
    def _normalised(x):
        return x / tl.maximum(tl.sqrt(tl.sum(x * x, 0)), 1e-12)

    @triton.jit
    def _convolved(x, QWEN: tl.constexpr):
        """A convolved q, k or v as the rule reads it: itself, or qwen3_5's SiLU of it."""
        if QWEN:
            return x * tl.sigmoid(x)
        return x

    @triton.jit
    def _unit(x, QWEN: tl.constexpr):
        """A convolved q or k L2-normalised: F.normalize's x / max(|x|, 1e-12), or qwen3_5's x / sqrt(|x|^2 + 1e-6)."""
        if QWEN:
            return x * tl.rsqrt(tl.sum(x * x, 0) + 1e-6)
        return _normalised(x)

    @triton.jit
    def _softmax(x, in_d):
        """Softmax over one head's D elements (gla's feature map), 0 past them."""
        x = tl.where(in_d, x, float("-inf"))
        e = tl.exp(x - tl.max(x, 0))
        return e / tl.sum(e, 0)

    @triton.jit
    def _log1p(x):
        """log(1 + x) for x >= 0, accurate where x is small, as PyTorch's softplus and logsigmoid take it (Triton has
        no log1p): log(u) x / (u - 1) with u = 1 + x rounded, whose error cancels (Goldberg)."""
        u = 1.0 + x
        small = u == 1.0
        return tl.where(small, x, tl.log(u) * (x / tl.where(small, 1.0, u - 1.0)))

    @triton.jit
    def _softplus(z):
        """F.softplus: z itself past its threshold of 20."""
        return tl.where(z > 20.0, z, _log1p(tl.exp(tl.minimum(z, 20.0))))

    @triton.jit
    def _projected(x, weight, HIDDEN: tl.constexpr, BLOCK_HIDDEN: tl.constexpr):
        """The float32 dot product of a hidden state and one row of a gate's projection, both HIDDEN long."""
        columns = tl.arange(0, BLOCK_HIDDEN)
        total = tl.zeros([BLOCK_HIDDEN], dtype=tl.float32)
        for start in range(0, HIDDEN, BLOCK_HIDDEN):
            cols = start + columns
            inside = cols < HIDDEN
            total += tl.load(x + cols, mask=inside, other=0.0).to(tl.float32) * tl.load(weight + cols, mask=inside, other=0.0).to(tl.float32)
        return tl.sum(total, 0)

    @triton.jit
    def _float32(x):
        """A float argument in float32: torch.compile's inductor passes Python floats to Triton kernels as float64 (eager
        launches pass float32), and float64 would spread through the arithmetic and break the bit-level rounding."""
        return tl.cast(x, tl.float32)

    @triton.jit
    def _program(
        k, v, real, stride_kb, stride_kh, stride_vb, stride_vh, stride_real,
        DIM: tl.constexpr, BLOCK_DIM: tl.constexpr, HAS_REAL: tl.constexpr, GROUPS: tl.constexpr,
    ):
        """Program (b, i)'s sequence b and kv head j (i, or with one program per query head, i's kv head: GROUPS query
        heads a kv head), the lanes d of a head (in_d: the first DIM), whether b's token is real (not a pad), and kv
        head j's k (its pointer and its float32 values) and v (float32)."""
        b = tl.program_id(0).to(tl.int64)  # int64 offsets: (B, H, D, D) states pass 2^31 elements past B 4,096 at H 32, D 128
        j = tl.program_id(1) // GROUPS
        d = tl.arange(0, BLOCK_DIM)
        in_d = d < DIM
        if HAS_REAL:
            keep = tl.load(real + b * stride_real) != 0
        else:
            keep = b >= 0
        k_ptr = k + b * stride_kb + j * stride_kh
        k_now = tl.load(k_ptr + d, mask=in_d, other=0.0).to(tl.float32)
        v_now = tl.load(v + b * stride_vb + j * stride_vh + d, mask=in_d, other=0.0).to(tl.float32)
        return b, j, d, in_d, keep, k_ptr, k_now, v_now

    @triton.jit
    def _window_tile(
        window_k, window_v, k_now, v_now, b, j, d, in_d, start,
        KV_HEADS: tl.constexpr, DIM: tl.constexpr, KEEP: tl.constexpr, ROWS: tl.constexpr,
    ):
        """Rows start .. start + ROWS of kv head j's window in sequence b: the KEEP cached keys and values (rotated,
        input dtype) and the current ones (k_now, v_now) in row KEEP, as float32 tiles (ROWS, BLOCK_DIM). Returns the
        rows, their offsets in the cache (`_shifted`), the keys and the values."""
        rows = start + tl.arange(0, ROWS)
        tile = (b * KV_HEADS + j) * KEEP * DIM + rows[:, None] * DIM + d[None, :]
        tile_mask = (rows < KEEP)[:, None] & in_d[None, :]
        current = rows[:, None] == KEEP
        keys = tl.where(current, k_now[None, :], tl.load(window_k + tile, mask=tile_mask, other=0.0).to(tl.float32))
        values = tl.where(current, v_now[None, :], tl.load(window_v + tile, mask=tile_mask, other=0.0).to(tl.float32))
        return rows, tile, keys, values

    @triton.jit
    def _seen(window_mask, keep, b, rows, KEEP: tl.constexpr):
        """Which of a window's rows (`_window_tile`) in sequence b are real tokens: the mask's, and the current one's
        `keep` in row KEEP."""
        seen = tl.load(window_mask + b * KEEP + rows, mask=rows < KEEP, other=0) != 0
        return tl.where(rows == KEEP, keep, seen)

    @triton.jit
    def _ring_rows(keys, values, mask, k_now, v_now, keep, head, row, d, in_d, start, DIM: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr):
        """Rows start .. start + CHUNK of kv head `head`'s ROWS rows in a ring layout (`ops_kept`'s: kept keys, then the
        ring; or `ops_window.ring_state`'s, the ring alone), as `_window_tile` gives a window's, with the current key and
        value (k_now, v_now, real where `keep`) in row `row` in place of what the cache holds there."""
        rows = start + tl.arange(0, CHUNK)
        tile = (head * ROWS + rows)[:, None] * DIM + d[None, :]
        in_tile = (rows < ROWS)[:, None] & in_d[None, :]
        current = rows == row
        tile_keys = tl.where(current[:, None], k_now[None, :], tl.load(keys + tile, mask=in_tile, other=0.0).to(tl.float32))
        tile_values = tl.where(current[:, None], v_now[None, :], tl.load(values + tile, mask=in_tile, other=0.0).to(tl.float32))
        seen = tl.where(current, keep, tl.load(mask + head * ROWS + rows, mask=rows < ROWS, other=0) != 0)
        return rows, tile, tile_keys, tile_values, seen

    @triton.jit
    def _shifted(cache, tile, x, rows, lanes, KEEP: tl.constexpr, WIDTH: tl.constexpr):
        """Rows 1 .. KEEP of a window's tile x (at offsets `tile` of a cache WIDTH wide) stored one row earlier, in the
        cache's dtype: the next cache is the window's last KEEP rows. The caller has read every row this overwrites."""
        moved = (rows[:, None] >= 1) & (rows[:, None] <= KEEP) & lanes[None, :]
        tl.store(cache + tile - WIDTH, x.to(cache.dtype.element_ty), mask=moved)

    @triton.jit
    def _window_moved(
        window_k, window_v, k_ptr, v_now, cos, sin, b, j, d, in_d,
        KV_HEADS: tl.constexpr, DIM: tl.constexpr, KEEP: tl.constexpr, ROT: tl.constexpr, BLOCK_WINDOW: tl.constexpr,
    ):
        """Kv head j's whole window in sequence b (`_window_tile`), the current key k_ptr's rotated here; shifts the
        cached keys and values in place. Returns the rows, keys and values."""
        rows, tile, keys, values = _window_tile(
            window_k, window_v, _rotated(k_ptr, cos, sin, d, in_d, ROT), v_now, b, j, d, in_d, 0, KV_HEADS, DIM, KEEP, BLOCK_WINDOW
        )
        tl.debug_barrier()  # every cached row is read before any is overwritten
        _shifted(window_k, tile, keys, rows, in_d, KEEP, DIM)
        _shifted(window_v, tile, values, rows, in_d, KEEP, DIM)
        return rows, keys, values

    @triton.jit
    def _window(
        window_k, window_v, window_mask, k_ptr, v_now, cos, sin, keep, b, j, d, in_d,
        KV_HEADS: tl.constexpr, DIM: tl.constexpr, KEEP: tl.constexpr, ROT: tl.constexpr, BLOCK_WINDOW: tl.constexpr,
    ):
        """Kv head j's whole window in sequence b and which rows are real (`_window_moved`, `_seen`); shifts the cached
        keys and values in place."""
        rows, keys, values = _window_moved(window_k, window_v, k_ptr, v_now, cos, sin, b, j, d, in_d, KV_HEADS, DIM, KEEP, ROT, BLOCK_WINDOW)
        return keys, values, _seen(window_mask, keep, b, rows, KEEP)

    @triton.jit
    def _scores(keys, q_now, seen, scaling, softcap, SOFTCAP: tl.constexpr):
        """A rotated query's scores against a window's keys: the teacher's scaling and softcap, -inf where a key is not
        a real token."""
        scores = tl.sum(keys * q_now[None, :], 1) * scaling
        if SOFTCAP:
            e = tl.exp(-2.0 * tl.abs(scores / softcap))
            scores = tl.where(scores < 0, -1.0, 1.0) * (1.0 - e) / (1.0 + e) * softcap
        return tl.where(seen, scores, float("-inf"))

    @triton.jit
    def _partial_sums(scores, seen, values):
        """A chunk of keys' softmax before its normalisation, from their `scores` (-inf where not `seen`) and values: its
        peak, its normaliser sum_w a_w and its weighted values sum_w a_w v_w (`mean`, not yet divided), with
        a_w = exp(score_w - peak) (the peak taken as 0 where no key is seen, whose sums are 0)."""
        peak = tl.max(scores, 0)
        weights = tl.where(seen, tl.exp(scores - tl.where(peak == float("-inf"), 0.0, peak)), 0.0)
        return peak, tl.sum(weights, 0), tl.sum(weights[:, None] * values, 0)

    @triton.jit
    def _windowed(
        linear, share, keys, values, seen, q_ptr, cos, sin, d, in_d, scaling, softcap, ROT: tl.constexpr, SOFTCAP: tl.constexpr
    ):
        """share * (q_ptr's query head's softmax over its window, `_window`) + (1 - share) * its `linear` heads. The
        window's scores take the teacher's scaling and softcap; its heads are 0 where no key is real, and rounded to
        the input dtype before the mix, as the PyTorch path rounds them."""
        scores = _scores(keys, _rotated(q_ptr, cos, sin, d, in_d, ROT), seen, scaling, softcap, SOFTCAP)
        peak = tl.max(scores, 0)
        weights = tl.where(seen, tl.exp(scores - tl.where(peak == float("-inf"), 0.0, peak)), 0.0)
        total = tl.sum(weights, 0)
        window = _rounded(tl.sum(weights[:, None] * values, 0) / tl.where(total > 0, total, 1.0), q_ptr.dtype.element_ty)
        return share * window + (1 - share) * linear

    @triton.jit
    def _store(out, heads, b, h, d, in_d, HEADS: tl.constexpr, DIM: tl.constexpr):
        """Query head h's float32 heads in sequence b into out (B, H, 1, D), rounded to its dtype."""
        dtype = out.dtype.element_ty
        tl.store(out + (b * HEADS + h) * DIM + d, _rounded(heads, dtype).to(dtype), mask=in_d)

    @triton.jit
    def _gated_deltanet_kernel(
        q, k, v, cos, sin, real, window_k, window_v, window_mask, out,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cos, stride_real, scaling, softcap,
        hidden, stride_hidden, conv_weight, beta_weight, beta_bias, decay_weight, a_log, dt_bias, window_logit,
        conv, recurrent, z, stride_z, norm_weight, eps,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, KEEP: tl.constexpr, ROT: tl.constexpr,
        BLOCK_DIM: tl.constexpr, BLOCK_WINDOW: tl.constexpr, HAS_REAL: tl.constexpr, WINDOW: tl.constexpr,
        SOFTCAP: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_HIDDEN: tl.constexpr, TAPS: tl.constexpr, BLOCK_TAPS: tl.constexpr,
        QWEN: tl.constexpr,
    ):
        """Program (b, h): sequence b and query head h (module docstring). It shifts its own q channels of the
        convolution; its kv head's k and v channels and window it only reads, and `_kv_shift_kernel` moves them on.
        QWEN: `qwen3_5_gdn`'s step, SiLU after the convolution, its L2 norm, q scaled by `scaling`, no bias on beta (and
        no window), and its gated norm of the heads with the gate z (B, 1, H D), norm_weight (D,) and eps."""
        GROUPS: tl.constexpr = HEADS // KV_HEADS
        b, j, d, in_d, keep, k_ptr, k_raw, v_raw = _program(
            k, v, real, stride_kb, stride_kh, stride_vb, stride_vh, stride_real, DIM, BLOCK_DIM, HAS_REAL, GROUPS
        )
        h = tl.program_id(1)
        scaling, softcap = _float32(scaling), _float32(softcap)
        CHANNELS: tl.constexpr = (HEADS + 2 * KV_HEADS) * DIM
        cos_row, sin_row = cos + b * stride_cos, sin + b * stride_cos
        x = hidden + b * stride_hidden
        conv_row = conv + b * CHANNELS * (TAPS - 1)
        k_channel = (HEADS + j) * DIM
        v_channel = (HEADS + KV_HEADS + j) * DIM
        ck = _conv_out(k_raw, conv_row + k_channel * (TAPS - 1), conv_weight + k_channel * TAPS, d, in_d, TAPS, BLOCK_TAPS)
        cv = _conv_out(v_raw, conv_row + v_channel * (TAPS - 1), conv_weight + v_channel * TAPS, d, in_d, TAPS, BLOCK_TAPS)
        ck, cv = _unit(_convolved(ck, QWEN), QWEN), _convolved(cv, QWEN)
        q_ptr = q + b * stride_qb + h * stride_qh
        q_raw = tl.load(q_ptr + d, mask=in_d, other=0.0).to(tl.float32)
        cq = _conv_step(q_raw, conv_row + h * DIM * (TAPS - 1), conv_weight + h * DIM * TAPS, d, in_d, keep, TAPS, BLOCK_TAPS)
        cq = _unit(_convolved(cq, QWEN), QWEN)
        # The gates from the hidden states; a pad neither writes nor decays. qwen3_5 scales q by D^-0.5 (`scaling`).
        if QWEN:
            cq = cq * scaling
            beta = tl.sigmoid(_projected(x, beta_weight + h * HIDDEN, HIDDEN, BLOCK_HIDDEN))
        else:
            beta = tl.sigmoid(_projected(x, beta_weight + h * HIDDEN, HIDDEN, BLOCK_HIDDEN) + tl.load(beta_bias + h).to(tl.float32))
        dt = _softplus(_projected(x, decay_weight + h * HIDDEN, HIDDEN, BLOCK_HIDDEN) + tl.load(dt_bias + h).to(tl.float32))
        beta = tl.where(keep, beta, 0.0)
        log_decay = tl.where(keep, -tl.exp(tl.load(a_log + h).to(tl.float32)) * dt, 0.0)
        # The gated delta rule: S = a S + k^T (beta v - beta k (a S)), read out as q S.
        state = recurrent + (b * HEADS + h) * DIM * DIM + d[:, None] * DIM + d[None, :]
        square = in_d[:, None] & in_d[None, :]
        S = tl.load(state, mask=square, other=0.0) * tl.exp(log_decay)
        S = S + ck[:, None] * (beta * cv - beta * tl.sum(ck[:, None] * S, 0))[None, :]
        tl.store(state, S, mask=square)
        heads = tl.sum(cq[:, None] * S, 0)
        if WINDOW:
            rows, _, keys, values = _window_tile(
                window_k, window_v, _rotated(k_ptr, cos_row, sin_row, d, in_d, ROT), v_raw, b, j, d, in_d, 0, KV_HEADS, DIM, KEEP, BLOCK_WINDOW
            )
            share = tl.sigmoid(tl.load(window_logit + h).to(tl.float32))
            seen = _seen(window_mask, keep, b, rows, KEEP)
            heads = _windowed(heads, share, keys, values, seen, q_ptr, cos_row, sin_row, d, in_d, scaling, softcap, ROT, SOFTCAP)
        if QWEN:
            heads = _qwen_gated_norm(heads, z + b * stride_z + h * DIM, norm_weight, d, in_d, _float32(eps), out.dtype.element_ty, DIM)
        _store(out, tl.where(keep, heads, 0.0), b, h, d, in_d, HEADS, DIM)

    @triton.jit
    def _qwen_gated_norm(heads, gate_ptr, weight, d, in_d, eps, dtype: tl.constexpr, DIM: tl.constexpr):
        """qwen3_5's RMSNormGated of one head's float32 heads, rounded where the PyTorch path (`gated_rms_norm`) rounds to
        the model's `dtype`: the heads themselves, their RMSNorm, and its product with the weight; then times SiLU of
        the gate (float32)."""
        x = _rounded(heads, dtype)
        normed = _rounded(x * tl.rsqrt(tl.sum(x * x, 0) / DIM + eps), dtype)
        weighted = _rounded(tl.load(weight + d, mask=in_d, other=0.0).to(tl.float32) * normed, dtype)
        gate = tl.load(gate_ptr + d, mask=in_d, other=0.0).to(tl.float32)
        return weighted * (gate * tl.sigmoid(gate))

    @triton.jit
    def _kv_shift_kernel(
        k, v, cos, sin, real, window_k, window_v, window_mask, conv,
        stride_kb, stride_kh, stride_vb, stride_vh, stride_cos, stride_real,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, KEEP: tl.constexpr, ROT: tl.constexpr,
        BLOCK_DIM: tl.constexpr, BLOCK_WINDOW: tl.constexpr, BLOCK_KEEP: tl.constexpr, HAS_REAL: tl.constexpr,
        WINDOW: tl.constexpr, TAPS: tl.constexpr, BLOCK_TAPS: tl.constexpr,
    ):
        """Program (b, j), after a step kernel whose programs per query head read them: kv head j's k and v channels of
        the convolution's cache (B, (H + 2 Hkv) D, K - 1) and its window rows in sequence b move on one token, and
        program (b, 0) moves the window's mask."""
        b, j, d, in_d, keep, k_ptr, k_raw, v_raw = _program(
            k, v, real, stride_kb, stride_kh, stride_vb, stride_vh, stride_real, DIM, BLOCK_DIM, HAS_REAL, 1
        )
        conv_row = conv + b * (HEADS + 2 * KV_HEADS) * DIM * (TAPS - 1)
        _conv_shift(k_raw, conv_row + (HEADS + j) * DIM * (TAPS - 1), d, in_d, keep, TAPS, BLOCK_TAPS)
        _conv_shift(v_raw, conv_row + (HEADS + KV_HEADS + j) * DIM * (TAPS - 1), d, in_d, keep, TAPS, BLOCK_TAPS)
        if WINDOW:
            _window_moved(
                window_k, window_v, k_ptr, v_raw, cos + b * stride_cos, sin + b * stride_cos, b, j, d, in_d, KV_HEADS, DIM, KEEP, ROT, BLOCK_WINDOW
            )
            if j == 0:
                _shift_mask(window_mask, real, b, stride_real, KEEP, BLOCK_KEEP, HAS_REAL)

    @triton.jit
    def _gla_kernel(
        q, k, v, cos, sin, real, window_k, window_v, window_mask, out,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cos, stride_real, scaling, softcap,
        state, gate_normalizer,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, KEEP: tl.constexpr, ROT: tl.constexpr,
        BLOCK_DIM: tl.constexpr, BLOCK_WINDOW: tl.constexpr, HAS_REAL: tl.constexpr, WINDOW: tl.constexpr,
        SOFTCAP: tl.constexpr,
    ):
        """Program (b, j): sequence b, kv head j, whose state its query heads read, and its query heads (module
        docstring)."""
        b, j, d, in_d, keep, k_ptr, k_raw, v_raw = _program(
            k, v, real, stride_kb, stride_kh, stride_vb, stride_vh, stride_real, DIM, BLOCK_DIM, HAS_REAL, 1
        )
        scaling, softcap = _float32(scaling), _float32(softcap)
        GROUPS: tl.constexpr = HEADS // KV_HEADS
        cos_row, sin_row = cos + b * stride_cos, sin + b * stride_cos
        # The key's feature map and per-channel decay exp(logsigmoid(k) / gate_normalizer); a pad neither writes nor
        # decays.
        fk = tl.where(keep, _softmax(k_raw, in_d), 0.0)
        gate = (tl.minimum(k_raw, 0.0) - _log1p(tl.exp(-tl.abs(k_raw)))) / _float32(gate_normalizer)
        decay = tl.exp(tl.where(keep, gate, 0.0))
        # S = diag(decay) S + fk^T [v, 1]: the values' D columns as a tile, the last (the normaliser) as a vector.
        rows = state + ((b * KV_HEADS + j) * DIM + d) * (DIM + 1)
        square = in_d[:, None] & in_d[None, :]
        S = tl.load(rows[:, None] + d[None, :], mask=square, other=0.0) * decay[:, None] + fk[:, None] * v_raw[None, :]
        z = tl.load(rows + DIM, mask=in_d, other=0.0) * decay + fk
        tl.store(rows[:, None] + d[None, :], S, mask=square)
        tl.store(rows + DIM, z, mask=in_d)
        if WINDOW:
            keys, values, seen = _window(
                window_k, window_v, window_mask, k_ptr, v_raw, cos_row, sin_row, keep, b, j, d, in_d, KV_HEADS, DIM, KEEP, ROT, BLOCK_WINDOW
            )
        for g in range(GROUPS):
            h = j * GROUPS + g
            q_ptr = q + b * stride_qb + h * stride_qh
            fq = _softmax(tl.load(q_ptr + d, mask=in_d, other=0.0).to(tl.float32), in_d)
            # Normalised: 0 (not 0 / 0) while no real key has been seen. A pad's heads are not zeroed (nor on the
            # PyTorch path).
            total = tl.sum(fq * z, 0)
            heads = tl.sum(fq[:, None] * S, 0) / tl.where(total > 0, total, 1.0)
            if WINDOW:
                heads = _windowed(heads, 0.5, keys, values, seen, q_ptr, cos_row, sin_row, d, in_d, scaling, softcap, ROT, SOFTCAP)
            _store(out, heads, b, h, d, in_d, HEADS, DIM)

    @triton.jit
    def _ssd_step(
        ssm, u, dt_weight, dt_bias, a_log, skip, key, value, query, b, h, d, in_d, keep,
        HEADS: tl.constexpr, DIM: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_HIDDEN: tl.constexpr,
    ):
        """Query head h's Mamba-2 step in sequence b: dt = softplus(W_dt u + dt_bias) from the layer input u (0 at a pad:
        no write, no decay), its float32 state S (D, D) = exp(-exp(A_log) dt) S + (dt key)^T value in place, and the
        read-out query S + skip value."""
        dt = _softplus(_projected(u, dt_weight + h * HIDDEN, HIDDEN, BLOCK_HIDDEN) + tl.load(dt_bias + h).to(tl.float32))
        dt = tl.where(keep, dt, 0.0)
        state = ssm + (b * HEADS + h) * DIM * DIM + d[:, None] * DIM + d[None, :]
        square = in_d[:, None] & in_d[None, :]
        S = tl.load(state, mask=square, other=0.0) * tl.exp(-tl.exp(tl.load(a_log + h).to(tl.float32)) * dt)
        S = S + (key * dt)[:, None] * value[None, :]
        tl.store(state, S, mask=square)
        return tl.sum(query[:, None] * S, 0) + tl.load(skip + h).to(tl.float32) * value

    @triton.jit
    def _mamba2_kernel(
        q, k, v, cos, sin, real, window_k, window_v, window_mask, out,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cos, stride_real, scaling, softcap,
        hidden, stride_hidden, dt_weight, dt_bias, a_log, skip, window_logit, ssm,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, KEEP: tl.constexpr, ROT: tl.constexpr,
        BLOCK_DIM: tl.constexpr, BLOCK_WINDOW: tl.constexpr, HAS_REAL: tl.constexpr, WINDOW: tl.constexpr,
        SOFTCAP: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_HIDDEN: tl.constexpr,
    ):
        """Program (b, j): sequence b, kv head j (B and x of its query heads) and its query heads (module docstring)."""
        b, j, d, in_d, keep, k_ptr, k_raw, v_raw = _program(
            k, v, real, stride_kb, stride_kh, stride_vb, stride_vh, stride_real, DIM, BLOCK_DIM, HAS_REAL, 1
        )
        scaling, softcap = _float32(scaling), _float32(softcap)
        GROUPS: tl.constexpr = HEADS // KV_HEADS
        cos_row, sin_row = cos + b * stride_cos, sin + b * stride_cos
        x = hidden + b * stride_hidden
        if WINDOW:
            keys, values, seen = _window(
                window_k, window_v, window_mask, k_ptr, v_raw, cos_row, sin_row, keep, b, j, d, in_d, KV_HEADS, DIM, KEEP, ROT, BLOCK_WINDOW
            )
        for g in range(GROUPS):
            h = j * GROUPS + g
            q_ptr = q + b * stride_qb + h * stride_qh
            q_raw = tl.load(q_ptr + d, mask=in_d, other=0.0).to(tl.float32)
            heads = _ssd_step(
                ssm, x, dt_weight, dt_bias, a_log, skip, k_raw, v_raw, q_raw * scaling, b, h, d, in_d, keep, HEADS, DIM, HIDDEN, BLOCK_HIDDEN
            )
            if WINDOW:
                share = tl.sigmoid(tl.load(window_logit + h).to(tl.float32))
                heads = _windowed(heads, share, keys, values, seen, q_ptr, cos_row, sin_row, d, in_d, scaling, softcap, ROT, SOFTCAP)
            _store(out, tl.where(keep, heads, 0.0), b, h, d, in_d, HEADS, DIM)

    @triton.jit
    def _silu_conv(raw, conv_row, conv_weight, conv_bias, channel, d, in_d, keep, TAPS: tl.constexpr, BLOCK_TAPS: tl.constexpr):
        """SiLU of the convolution's step (`_conv_step`) on the D channels from `channel` on, plus their bias."""
        y = _conv_step(raw, conv_row + channel * (TAPS - 1), conv_weight + channel * TAPS, d, in_d, keep, TAPS, BLOCK_TAPS)
        y = y + tl.load(conv_bias + channel + d, mask=in_d, other=0.0).to(tl.float32)
        return y * tl.sigmoid(y)

    @triton.jit
    def _bamba_mamba2_kernel(
        q, k, v, cos, sin, real, window_k, window_v, window_mask, out,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cos, stride_real, scaling, softcap,
        hidden, stride_hidden, z, stride_z, conv_weight, conv_bias, dt_weight, dt_bias, a_log, skip, norm_weight, conv, ssm, eps,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, KEEP: tl.constexpr, ROT: tl.constexpr,
        BLOCK_DIM: tl.constexpr, BLOCK_WINDOW: tl.constexpr, HAS_REAL: tl.constexpr, WINDOW: tl.constexpr,
        SOFTCAP: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_HIDDEN: tl.constexpr, TAPS: tl.constexpr, BLOCK_TAPS: tl.constexpr,
    ):
        """Program (b, j): sequence b, kv head j (the source of x and B for its query heads) and its query heads
        (module docstring)."""
        b, j, d, in_d, keep, k_ptr, k_raw, v_raw = _program(
            k, v, real, stride_kb, stride_kh, stride_vb, stride_vh, stride_real, DIM, BLOCK_DIM, HAS_REAL, 1
        )
        eps = _float32(eps)
        GROUPS: tl.constexpr = HEADS // KV_HEADS
        CHANNELS: tl.constexpr = 3 * HEADS * DIM
        x_in = hidden + b * stride_hidden
        conv_row = conv + b * CHANNELS * (TAPS - 1)
        for g in range(GROUPS):
            h = j * GROUPS + g
            q_raw = tl.load(q + b * stride_qb + h * stride_qh + d, mask=in_d, other=0.0).to(tl.float32)
            # x, B and C: query head h's channels of v, k and q (kv heads repeated), convolved, biased, through SiLU.
            x = _silu_conv(v_raw, conv_row, conv_weight, conv_bias, h * DIM, d, in_d, keep, TAPS, BLOCK_TAPS)
            B = _silu_conv(k_raw, conv_row, conv_weight, conv_bias, (HEADS + h) * DIM, d, in_d, keep, TAPS, BLOCK_TAPS)
            C = _silu_conv(q_raw, conv_row, conv_weight, conv_bias, (2 * HEADS + h) * DIM, d, in_d, keep, TAPS, BLOCK_TAPS)
            y = _ssd_step(ssm, x_in, dt_weight, dt_bias, a_log, skip, B, x, C, b, h, d, in_d, keep, HEADS, DIM, HIDDEN, BLOCK_HIDDEN)
            # bamba's gated norm per head: RMSNorm of y * SiLU(z) over the head, times its weight.
            gate = tl.load(z + b * stride_z + h * DIM + d, mask=in_d, other=0.0).to(tl.float32)
            gated = y * (gate * tl.sigmoid(gate))
            normed = gated * tl.rsqrt(tl.sum(gated * gated, 0) / DIM + eps)
            heads = tl.load(norm_weight + h * DIM + d, mask=in_d, other=0.0).to(tl.float32) * normed
            _store(out, tl.where(keep, heads, 0.0), b, h, d, in_d, HEADS, DIM)

    @triton.jit
    def _features(x, weight, bias, d, in_d, f, in_f, FEATURES: tl.constexpr):
        """Hedgehog's feature map of one head's float32 x: the halves softmax(xW + b) and softmax(-(xW + b)), each F
        wide (0 past F); weight points at the head's W (D, F), bias at its b (F)."""
        w = tl.load(weight + d[:, None] * FEATURES + f[None, :], mask=in_d[:, None] & in_f[None, :], other=0.0).to(tl.float32)
        y = tl.sum(x[:, None] * w, 0) + tl.load(bias + f, mask=in_f, other=0.0).to(tl.float32)
        return _softmax(y, in_f), _softmax(-y, in_f)

    @triton.jit
    def _hedgehog_program(
        k, v, real, cos, sin, k_weight, k_bias, stride_kb, stride_kh, stride_vb, stride_vh, stride_cos, stride_real,
        DIM: tl.constexpr, BLOCK_DIM: tl.constexpr, HAS_REAL: tl.constexpr, ROT: tl.constexpr, FEATURES: tl.constexpr,
        BLOCK_FEATURES: tl.constexpr, LINEAR_ROPE: tl.constexpr,
    ):
        """A Hedgehog kernel's program (b, j), one per (sequence, kv head) (`_program`: b, j, the lanes d, in_d, whether
        the token is real, v), sequence b's RoPE rows, the feature lanes f (in_f: the first F), and kv head j's rotated
        key and its feature map's halves (of the rotated key, or with LINEAR_ROPE off of the unrotated one)."""
        b, j, d, in_d, keep, k_ptr, _, v_now = _program(
            k, v, real, stride_kb, stride_kh, stride_vb, stride_vh, stride_real, DIM, BLOCK_DIM, HAS_REAL, 1
        )
        cos_row, sin_row = cos + b * stride_cos, sin + b * stride_cos
        f = tl.arange(0, BLOCK_FEATURES)
        in_f = f < FEATURES
        k_now = _rotated(k_ptr, cos_row, sin_row, d, in_d, ROT)
        k_read = k_now if LINEAR_ROPE else _rotated(k_ptr, cos_row, sin_row, d, in_d, 0)
        fk_pos, fk_neg = _features(k_read, k_weight + j * DIM * FEATURES, k_bias + j * FEATURES, d, in_d, f, in_f, FEATURES)
        return b, j, d, in_d, keep, v_now, cos_row, sin_row, f, in_f, k_now, fk_pos, fk_neg

    @triton.jit
    def _sums(S, z, head, d, in_d, f, in_f, DIM: tl.constexpr, FEATURES: tl.constexpr):
        """Pointers to kv head `head`'s halves of S (F, D) each, as the feature map's, which sum the keys that have left
        the window, their mask, and its z: `hedgehog_swa`'s linear state."""
        state = S + (head * 2 * FEATURES + f[:, None]) * DIM + d[None, :]
        return state, in_f[:, None] & in_d[None, :], z + head * 2 * FEATURES + f

    @triton.jit
    def _linear_read(
        q_ptr, cos_row, sin_row, q_weight, q_bias, window_logit, h, state, square, sums, d, in_d, f, in_f,
        DIM: tl.constexpr, ROT: tl.constexpr, FEATURES: tl.constexpr, LINEAR_ROPE: tl.constexpr,
    ):
        """Query head h's share of its window (the sigmoid of its logit) and its linear part's numerator fq S (D) and
        denominator fq z (`_sums`), fq its feature map of the rotated query (with LINEAR_ROPE off, the unrotated)."""
        if LINEAR_ROPE:
            q_read = _rotated(q_ptr, cos_row, sin_row, d, in_d, ROT)
        else:
            q_read = _rotated(q_ptr, cos_row, sin_row, d, in_d, 0)
        fq_pos, fq_neg = _features(q_read, q_weight + h * DIM * FEATURES, q_bias + h * FEATURES, d, in_d, f, in_f, FEATURES)
        num = tl.sum(fq_pos[:, None] * tl.load(state, mask=square, other=0.0), 0)
        num += tl.sum(fq_neg[:, None] * tl.load(state + FEATURES * DIM, mask=square, other=0.0), 0)
        den = tl.sum(fq_pos * tl.load(sums, mask=in_f, other=0.0), 0) + tl.sum(fq_neg * tl.load(sums + FEATURES, mask=in_f, other=0.0), 0)
        return tl.sigmoid(tl.load(window_logit + h).to(tl.float32)), num, den

    @triton.jit
    def _one_normaliser(share, num, den, mean, total):
        """A head under one normaliser: (share * sum_w a_w v_w + (1 - share) fq S) / (share * sum_w a_w + (1 - share) fq z),
        from the window's `mean` (sum_w a_w v_w) and `total` (sum_w a_w), a_w = exp(score_w - the window's peak), and the
        linear part's num and den (`_linear_read`)."""
        return (share * mean + (1 - share) * num) / tl.maximum(share * total + (1 - share) * den, 1e-30)

    @triton.jit
    def _partial_kernel(
        q, k, v, cos, sin, real, keys, values, mask, partial,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cos, stride_real, scaling, softcap, at, kept,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, ROWS: tl.constexpr, ROT: tl.constexpr,
        BLOCK_DIM: tl.constexpr, HAS_REAL: tl.constexpr, SOFTCAP: tl.constexpr, CHUNK: tl.constexpr, SPLITS: tl.constexpr,
    ):
        """Program (b, h, s): query head h of sequence b over rows s CHUNK .. (s + 1) CHUNK of its kv head's ROWS rows
        in the ring layout (`kept` kept keys, then the ring), the current key and value in the ring's row of position
        at[b], from registers (the combining launch stores them after). Its softmax's peak, normaliser and weighted
        values (`_partial_sums`) go into partial (B, H, SPLITS, BLOCK_DIM + 2), the values then the peak and the
        normaliser. It writes nothing else, so the programs of a kv head's rows run at once."""
        b, j, d, in_d, keep, k_ptr, _, v_now = _program(
            k, v, real, stride_kb, stride_kh, stride_vb, stride_vh, stride_real, DIM, BLOCK_DIM, HAS_REAL, HEADS // KV_HEADS
        )
        h = tl.program_id(1)
        split = tl.program_id(2)
        cos_row, sin_row = cos + b * stride_cos, sin + b * stride_cos
        k_now = _rotated(k_ptr, cos_row, sin_row, d, in_d, ROT)
        q_now = _rotated(q + b * stride_qb + h * stride_qh, cos_row, sin_row, d, in_d, ROT)
        row = kept + tl.load(at + b) % (ROWS - kept)
        _, _, tile_keys, tile_values, seen = _ring_rows(
            keys, values, mask, k_now, v_now, keep, b * KV_HEADS + j, row, d, in_d, split * CHUNK, DIM, ROWS, CHUNK
        )
        scores = _scores(tile_keys, q_now, seen, _float32(scaling), _float32(softcap), SOFTCAP)
        peak, total, mean = _partial_sums(scores, seen, tile_values)
        base = partial + ((b * HEADS + h) * SPLITS + split) * (BLOCK_DIM + 2)
        tl.store(base + d, mean)
        tl.store(base + BLOCK_DIM, peak)
        tl.store(base + BLOCK_DIM + 1, total)

    @triton.jit
    def _combine_kernel(
        q, cos, sin, partial, out, stride_qb, stride_qh, stride_cos, q_weight, q_bias, window_logit, S, z,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, ROT: tl.constexpr, BLOCK_DIM: tl.constexpr,
        FEATURES: tl.constexpr, BLOCK_FEATURES: tl.constexpr, LINEAR_ROPE: tl.constexpr, SPLITS: tl.constexpr,
        BLOCK_SPLITS: tl.constexpr,
    ):
        """Program (b, h): sequence b and query head h. Its output from `_partial_kernel`'s partial sums (their peaks'
        largest the rows' peak) and its linear part, under one normaliser. It reads the sums and writes nothing else,
        so a kv head's query heads run at once; `_ring_write_kernel` changes the sums after."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        d = tl.arange(0, BLOCK_DIM)
        in_d = d < DIM
        f = tl.arange(0, BLOCK_FEATURES)
        in_f = f < FEATURES
        state, square, sums = _sums(S, z, b * KV_HEADS + h // (HEADS // KV_HEADS), d, in_d, f, in_f, DIM, FEATURES)
        share, num, den = _linear_read(
            q + b * stride_qb + h * stride_qh, cos + b * stride_cos, sin + b * stride_cos, q_weight, q_bias, window_logit, h,
            state, square, sums, d, in_d, f, in_f, DIM, ROT, FEATURES, LINEAR_ROPE,
        )
        splits = tl.arange(0, BLOCK_SPLITS)
        in_splits = splits < SPLITS
        base = partial + ((b * HEADS + h) * SPLITS + splits) * (BLOCK_DIM + 2)
        peaks = tl.load(base + BLOCK_DIM, mask=in_splits, other=float("-inf"))
        peak = tl.max(peaks, 0)
        rescale = tl.exp(peaks - tl.where(peak == float("-inf"), 0.0, peak))  # 0 for a split with no real key
        total = tl.sum(rescale * tl.load(base + BLOCK_DIM + 1, mask=in_splits, other=0.0), 0)
        mean = tl.sum(rescale[:, None] * tl.load(base[:, None] + d[None, :], mask=in_splits[:, None], other=0.0), 0)
        _store(out, _one_normaliser(share, num, den, mean, total), b, h, d, in_d, HEADS, DIM)

    @triton.jit
    def _ring_write_kernel(
        k, v, cos, sin, real, keys, values, mask, stride_kb, stride_kh, stride_vb, stride_vh, stride_cos, stride_real,
        features, k_weight, k_bias, S, z, decay_logit, at, kept,
        KV_HEADS: tl.constexpr, DIM: tl.constexpr, ROWS: tl.constexpr, ROT: tl.constexpr, BLOCK_DIM: tl.constexpr,
        HAS_REAL: tl.constexpr, FEATURES: tl.constexpr, BLOCK_FEATURES: tl.constexpr, LINEAR_ROPE: tl.constexpr,
        HAS_DECAY: tl.constexpr, FOLD: tl.constexpr,
    ):
        """Program (b, j): sequence b and kv head j, after every query head has read the step's rows and sums. With
        FOLD (a window's ring, no kept keys), the window's oldest key into the sums (`_folded`); then the current key,
        value, feature-mapped key and mask into the ring's row of position at[b], which the partial programs read
        from registers."""
        b, j, d, in_d, keep, v_now, cos_row, sin_row, f, in_f, k_now, fk_pos, fk_neg = _hedgehog_program(
            k, v, real, cos, sin, k_weight, k_bias, stride_kb, stride_kh, stride_vb, stride_vh, stride_cos, stride_real,
            DIM, BLOCK_DIM, HAS_REAL, ROT, FEATURES, BLOCK_FEATURES, LINEAR_ROPE,
        )
        WIDTH: tl.constexpr = 2 * FEATURES
        head = b * KV_HEADS + j
        position = tl.load(at + b)
        if FOLD:
            state, square, sums = _sums(S, z, head, d, in_d, f, in_f, DIM, FEATURES)
            _folded(
                values, mask, features, decay_logit, v_now, fk_pos, fk_neg, keep, j, head, position, state, square, sums,
                d, in_d, f, in_f, DIM, ROWS, FEATURES, HAS_DECAY,
            )
        written = head * ROWS + kept + position % (ROWS - kept)
        tl.store(keys + written * DIM + d, k_now.to(keys.dtype.element_ty), mask=in_d)
        tl.store(values + written * DIM + d, v_now.to(values.dtype.element_ty), mask=in_d)
        tl.store(features + written * WIDTH + f, fk_pos, mask=in_f)
        tl.store(features + written * WIDTH + FEATURES + f, fk_neg, mask=in_f)
        tl.store(mask + written, keep)

    @triton.jit
    def _folded(
        values, mask, features, decay_logit, v_now, fk_pos, fk_neg, keep, j, head, position, state, square, sums,
        d, in_d, f, in_f, DIM: tl.constexpr, ROWS: tl.constexpr, FEATURES: tl.constexpr, HAS_DECAY: tl.constexpr,
    ):
        """After every query head of a window's step has read them (`_combine_kernel`, launched before): the sums fade
        (with a decay) and take the window's oldest key, kv head `head`'s row of position + 1 in its ring of ROWS (a
        pad's adds nothing; with one row, the current key). The row is the one the next step writes; the current key's
        row this one writes after. Each element of the sums is read and written by the same lanes."""
        WIDTH: tl.constexpr = 2 * FEATURES
        if ROWS > 1:
            oldest = head * ROWS + (position + 1) % ROWS
            old = tl.load(mask + oldest) != 0
            old_pos = tl.load(features + oldest * WIDTH + f, mask=in_f, other=0.0)
            old_neg = tl.load(features + oldest * WIDTH + FEATURES + f, mask=in_f, other=0.0)
            v_old = tl.load(values + oldest * DIM + d, mask=in_d, other=0.0).to(tl.float32)
        else:
            old = keep
            old_pos, old_neg, v_old = fk_pos, fk_neg, v_now
        old_pos, old_neg = tl.where(old, old_pos, 0.0), tl.where(old, old_neg, 0.0)
        # With a decay, the sums fade by one token for the next query (at a pad too, as on the PyTorch path).
        fade = tl.sigmoid(tl.load(decay_logit + j).to(tl.float32)) if HAS_DECAY else 1.0
        tl.store(state, fade * tl.load(state, mask=square, other=0.0) + old_pos[:, None] * v_old[None, :], mask=square)
        tl.store(state + FEATURES * DIM, fade * tl.load(state + FEATURES * DIM, mask=square, other=0.0) + old_neg[:, None] * v_old[None, :], mask=square)
        tl.store(sums, fade * tl.load(sums, mask=in_f, other=0.0) + old_pos, mask=in_f)
        tl.store(sums + FEATURES, fade * tl.load(sums + FEATURES, mask=in_f, other=0.0) + old_neg, mask=in_f)

    @triton.jit
    def _hedgehog_kernel(
        q, k, v, cos, sin, real, window_k, window_v, window_mask, out,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cos, stride_real, scaling, softcap,
        q_weight, q_bias, k_weight, k_bias, S,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, KEEP: tl.constexpr, ROT: tl.constexpr,
        BLOCK_DIM: tl.constexpr, BLOCK_WINDOW: tl.constexpr, HAS_REAL: tl.constexpr, WINDOW: tl.constexpr,
        SOFTCAP: tl.constexpr, FEATURES: tl.constexpr, BLOCK_FEATURES: tl.constexpr,
    ):
        """Program (b, j): sequence b, kv head j, whose state its query heads read, and its query heads (module
        docstring). The state's rows are the feature map's halves, its columns the values' then the normaliser's."""
        b, j, d, in_d, keep, v_now, cos_row, sin_row, f, in_f, k_now, fk_pos, fk_neg = _hedgehog_program(
            k, v, real, cos, sin, k_weight, k_bias, stride_kb, stride_kh, stride_vb, stride_vh, stride_cos, stride_real,
            DIM, BLOCK_DIM, HAS_REAL, ROT, FEATURES, BLOCK_FEATURES, True,
        )
        GROUPS: tl.constexpr = HEADS // KV_HEADS
        WIDTH: tl.constexpr = 2 * FEATURES
        fk_pos, fk_neg = tl.where(keep, fk_pos, 0.0), tl.where(keep, fk_neg, 0.0)  # a pad adds nothing
        # S (2F, D + 1) per kv head: the feature-mapped keys times [v, 1], so its last column is the normaliser.
        square = in_f[:, None] & in_d[None, :]
        pos = S + ((b * KV_HEADS + j) * WIDTH + f[:, None]) * (DIM + 1) + d[None, :]
        neg = pos + FEATURES * (DIM + 1)
        pos_sum = S + ((b * KV_HEADS + j) * WIDTH + f) * (DIM + 1) + DIM
        neg_sum = pos_sum + FEATURES * (DIM + 1)
        S_pos = tl.load(pos, mask=square, other=0.0) + fk_pos[:, None] * v_now[None, :]
        S_neg = tl.load(neg, mask=square, other=0.0) + fk_neg[:, None] * v_now[None, :]
        z_pos = tl.load(pos_sum, mask=in_f, other=0.0) + fk_pos
        z_neg = tl.load(neg_sum, mask=in_f, other=0.0) + fk_neg
        tl.store(pos, S_pos, mask=square)
        tl.store(neg, S_neg, mask=square)
        tl.store(pos_sum, z_pos, mask=in_f)
        tl.store(neg_sum, z_neg, mask=in_f)
        for g in range(GROUPS):
            h = j * GROUPS + g
            q_now = _rotated(q + b * stride_qb + h * stride_qh, cos_row, sin_row, d, in_d, ROT)
            fq_pos, fq_neg = _features(q_now, q_weight + h * DIM * FEATURES, q_bias + h * FEATURES, d, in_d, f, in_f, FEATURES)
            num = tl.sum(fq_pos[:, None] * S_pos, 0) + tl.sum(fq_neg[:, None] * S_neg, 0)
            den = tl.sum(fq_pos * z_pos, 0) + tl.sum(fq_neg * z_neg, 0)
            # den is 0 only where no real key has been seen yet (left padding), and num with it.
            _store(out, num / tl.where(den > 0, den, 1.0), b, h, d, in_d, HEADS, DIM)

    @triton.jit
    def _shift_mask_kernel(window_mask, real, stride_real, KEEP: tl.constexpr, BLOCK_KEEP: tl.constexpr, HAS_REAL: tl.constexpr):
        """Program b: `_shift_mask`."""
        _shift_mask(window_mask, real, tl.program_id(0).to(tl.int64), stride_real, KEEP, BLOCK_KEEP, HAS_REAL)

    @triton.jit
    def _shift_mask(window_mask, real, b, stride_real, KEEP: tl.constexpr, BLOCK_KEEP: tl.constexpr, HAS_REAL: tl.constexpr):
        """Sequence b's row of the window's mask (B, KEEP) one place on, with the current token's last (a pad enters as
        False)."""
        rows = tl.arange(0, BLOCK_KEEP)
        later = tl.load(window_mask + b * KEEP + rows + 1, mask=rows + 1 < KEEP, other=0)
        if HAS_REAL:
            now = tl.load(real + b * stride_real)
        else:
            now = tl.full([], 1, window_mask.dtype.element_ty)
        shifted = tl.where(rows == KEEP - 1, now, later)
        tl.debug_barrier()  # every entry is read before any is overwritten
        tl.store(window_mask + b * KEEP + rows, shifted, mask=rows < KEEP)

    def _operator(launch: Callable, mutates: set[str], fake: Callable):
        """`launch` as a custom op that writes the arguments named in `mutates`, with `fake` for the compiler. Named after
        the function and the module that defines it (two modules' `_launch` are two ops; `op_name`)."""
        op = torch.library.custom_op(op_name(launch.__module__, launch.__name__), launch, mutates_args=mutates)
        op.register_fake(fake)
        return op

    def _registered(launch: Callable[..., Tensor], mutates: set[str], fake: Callable[..., Tensor]):
        """`launch` as a custom op (`fake`: its output's shape and dtype from its arguments), and the function that calls
        it: inside torch.compile the op, in eager the kernels launched directly, since the op's dispatch costs about 20 us
        of CPU a call (2 cores). The op is opaque to the compiler, which takes what it writes from `mutates` alone. Seen
        through (`triton_op`), inductor's own reading of the step kernels counted q, k, v, RoPE and the padding mask as
        written too: a compiled static-cache step then mutated a graph input without a static address (the padding
        mask), and CUDA graphs were skipped (H200, thirteenth session)."""
        op = _operator(launch, mutates, fake)

        @functools.wraps(launch)
        def step(*args) -> Tensor:
            return op(*args) if torch.compiler.is_compiling() else launch(*args)

        return op, step

    def _heads(launch: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """A step's output as the compiler sees it: q's shape and dtype, contiguous (`_launch`)."""
        where = list(inspect.signature(launch).parameters).index("q")
        return lambda *args: torch.empty_like(args[where], memory_format=torch.contiguous_format)

    WINDOW_CACHE = {"window_k", "window_v", "window_mask"}
    # The custom ops by mixer name, and the step functions that the mixers call.
    OPS = {}
    OPS["gated_deltanet"], gated_deltanet_step = _registered(_gated_deltanet, {"conv", "recurrent", *WINDOW_CACHE}, _heads(_gated_deltanet))
    OPS["qwen3_5_gdn"], qwen3_5_gdn_step = _registered(_qwen3_5_gdn, {"conv", "recurrent"}, _heads(_qwen3_5_gdn))
    OPS["gla"], gla_step = _registered(_gla, {"state", *WINDOW_CACHE}, _heads(_gla))
    OPS["mamba2"], mamba2_step = _registered(_mamba2, {"ssm", *WINDOW_CACHE}, _heads(_mamba2))
    OPS["hedgehog"], hedgehog_step = _registered(_hedgehog, {"S"}, _heads(_hedgehog))
    OPS["bamba_mamba2"], bamba_mamba2_step = _registered(_bamba_mamba2, {"conv", "ssm"}, _heads(_bamba_mamba2))
    OPS["hedgehog_swa"], hedgehog_swa_step = _registered(
        _hedgehog_swa, {"S", "z", "keys", "values", "features", "mask"}, _heads(_hedgehog_swa)
    )

else:
    OPS = {}
    gated_deltanet_step = qwen3_5_gdn_step = gla_step = mamba2_step = bamba_mamba2_step = hedgehog_step = hedgehog_swa_step = None
