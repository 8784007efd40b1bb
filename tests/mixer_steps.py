"""Running one converted layer's mixer in its three forms, for module-level tests against a naive reference.

The forms are: parallel (no cache), recurrent (one token per call with a MixerState) and chunked (a prefill
part, then the rest, carrying the MixerState). Inputs are float64 so results can be compared tightly.
"""

from __future__ import annotations

import torch

import linearize
from linearize.hf.attention import apply_rotary, repeat_heads
from linearize.hf.cache import MixerState
from tests.tiny import tiny_model


def converted_mixer(name: str, **options):
    """(model, first layer's mixer) of the tiny float64 llama converted to `name`."""
    model = linearize.convert(tiny_model(), name, **options)
    return model, linearize.hf.mixers.mixers_in(model)[0]


def layer_inputs(model, batch: int, length: int, pad: int, offset: int, seed: int = 0):
    """Random hidden states (requiring grad), RoPE (cos, sin) from `offset` on, and a left-padding mask or None.

    Row 0 gets `pad` left pads (positions count real tokens only, as the model computes them).
    """
    generator = torch.Generator().manual_seed(seed)
    hidden_size = model.config.text_config.hidden_size
    hidden = torch.randn(batch, length, hidden_size, generator=generator, dtype=torch.float64).requires_grad_()
    mask = None
    real = torch.ones(batch, length, dtype=torch.bool)
    if pad:
        real[0, :pad] = False
        mask = real
    positions = offset + (real.long().cumsum(-1) - 1).clamp_min(0)
    position_embeddings = model.model.model.rotary_emb(hidden, positions)
    return hidden, position_embeddings, mask


def _run(mixer, hidden, position_embeddings, mask, state, start, end):
    piece = hidden[:, start:end]
    q, k, v = mixer.project(piece)
    cos, sin = position_embeddings
    sub_mask = mask[:, start:end] if mask is not None else None
    return mixer.mix(piece, q, k, v, (cos[:, start:end], sin[:, start:end]), sub_mask, state)


def parallel(mixer, hidden, position_embeddings, mask):
    """Heads (B, H, T, Dv) from one call without a cache."""
    return _run(mixer, hidden, position_embeddings, mask, None, 0, hidden.shape[1])


def stateful(mixer, hidden, position_embeddings, mask, initial: dict | None, cuts: list[int]):
    """Heads from consecutive calls over hidden[:, cuts[i]:cuts[i+1]] sharing one MixerState; and the final state."""
    state = MixerState()
    state.write({name: t.clone() for name, t in (initial or {}).items()})
    outs = [_run(mixer, hidden, position_embeddings, mask, state, a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    return torch.cat(outs, dim=2), state.tensors


def forms(mixer, hidden, position_embeddings, mask, initial: dict | None):
    """{form: (heads, final state or None)}; the parallel form is left out when there is an initial state."""
    length = hidden.shape[1]
    results = {
        "recurrent": stateful(mixer, hidden, position_embeddings, mask, initial, list(range(length + 1))),
        "chunked": stateful(mixer, hidden, position_embeddings, mask, initial, [0, (length + 1) // 2, length]),
    }
    if initial is None:
        results["parallel"] = (parallel(mixer, hidden, position_embeddings, mask), None)
    return results


def gradients(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 7) -> list[torch.Tensor]:
    """Gradients of a fixed random projection of `out` with respect to `inputs`."""
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return list(torch.autograd.grad((out * weight).sum(), inputs))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 1e-10) -> None:
    scale = expected.abs().max().clamp_min(1.0)
    error = (actual - expected).abs().max() / scale
    assert error < tol, f"{what}: max relative difference {error:.2e}"


def reference_window_heads(mixer, q, k, v, mask, position_embeddings):
    """Softmax over keys t - window < s <= t that are not padding (float64; attention.softmax_attention is float32)."""
    spec, groups = mixer.spec, mixer.spec.groups
    q, k = apply_rotary(q, k, position_embeddings)
    scores = torch.einsum("bhtd,bhsd->bhts", q, repeat_heads(k, groups)) * spec.scaling
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    t = torch.arange(q.shape[2])
    allowed = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - mixer.window)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return probs @ repeat_heads(v, groups)


def assert_window_mix_matches(model, mixer, linear_reference, new: set[str], length: int, padded: bool) -> None:
    """A mixer with window=N against share * (softmax over the last N keys) + (1 - share) * linear_reference(hidden,
    position_embeddings, mask), per head, zero at pads: every form, outputs and gradients (`new` and the share)."""
    hidden, position_embeddings, mask = layer_inputs(model, 2, length, min(5, length) if padded else 0, offset=0)
    q, k, v = mixer.spec.project(mixer.attn, hidden)
    share = torch.sigmoid(mixer.window_logit)[:, None, None]
    linear = linear_reference(hidden, position_embeddings, mask)
    expected = share * reference_window_heads(mixer, q, k, v, mask, position_embeddings) + (1 - share) * linear
    if mask is not None:
        expected = expected * mask[:, None, :, None]
    params = [p for n, p in mixer.named_parameters() if n in new | {"window_logit"}]
    expected_grads = gradients(expected, [hidden, *params])
    for form, (out, _) in forms(mixer, hidden, position_embeddings, mask, None).items():
        assert_close(out, expected, f"{form} output")
        for grad, want in zip(gradients(out, [hidden, *params]), expected_grads):
            assert_close(grad, want, f"{form} gradient")
    assert (share - 0.5).abs().max() > 0.05, "the shares should differ from the start, or the per-head mix proves little"


def assert_conv_state_forms_match(
    model, mixer, reference, new: set[str], length: int, with_initial: bool, padded: bool, recurrent: str = "recurrent"
) -> None:
    """A mixer whose state is a "conv" state and a (B, H, D, D) `recurrent` one (the delta rule's "recurrent", Mamba-2's
    "ssm") against `reference(mixer, hidden, mask, initial)` -> (heads, final state): every form, outputs, final
    states and gradients (`new` parameters and the input), from a fresh or a random initial state, with or without
    left pads."""
    pad = min(5, length) if padded else 0
    hidden, position_embeddings, mask = layer_inputs(model, 2, length, pad, offset=7 if with_initial else 0)
    initial = None
    if with_initial:
        generator = torch.Generator().manual_seed(11)
        channels, kernel = mixer.conv_weight.shape
        h, d = mixer.spec.num_heads, mixer.spec.head_dim
        initial = {
            "conv": torch.randn(2, channels, kernel - 1, generator=generator, dtype=torch.float64),
            recurrent: torch.randn(2, h, d, d, generator=generator, dtype=torch.float64) * 0.3,
        }
    names, params = zip(*[(n, p) for n, p in mixer.named_parameters() if n in new])
    expected, expected_state = reference(mixer, hidden, mask, initial)
    expected_grads = gradients(expected, [hidden, *params])
    for form, (out, state) in forms(mixer, hidden, position_embeddings, mask, initial).items():
        assert_close(out, expected, f"{form} output")
        if state is not None:
            for name in ("conv", recurrent):
                assert_close(state[name], expected_state[name], f"{form} final {name} state")
        for name, grad, want in zip(("hidden", *names), gradients(out, [hidden, *params]), expected_grads):
            assert_close(grad, want, f"{form} gradient of {name}")
