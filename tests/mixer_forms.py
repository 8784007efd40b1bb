"""One mixer layer run in each of its forms, outputs and gradients checked against a quadratic reference.

The forms: parallel (no cache), chunked (a MixerState, a prefill piece and then the rest, which continues
from the piece's state) and recurrent (a MixerState, the prefill piece and then one token at a time).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from linearize.hf.cache import MixerState
from linearize.hf.mixers import PADDING_MASK
from tests.tiny import tiny_model

BATCH = 2
# Inputs are scaled up so that the tiny model's q/k (init std 0.02) are of order 1, where feature maps, gates
# and softmax windows are far from uniform and a wrong mask or decay shows.
HIDDEN_SCALE = 10.0


def build(mixer_cls, family: str = "llama", **options):
    """`mixer_cls` around layer 0 of a tiny model, and that model's rotary embedding."""
    model = tiny_model(family)
    attn = model.model.layers[0].self_attn
    return mixer_cls.from_attention(attn, model.config, 0, **options), model.model.rotary_emb


def inputs(rotary, hidden_size: int, total: int, pad: int, seed: int = 0):
    """Hidden states (B, total, hidden) that require grad, the padding mask (row 0 left-padded by `pad`, or
    None) and the position embeddings of positions counted over real tokens, as the model computes them."""
    generator = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(BATCH, total, hidden_size, generator=generator, dtype=torch.float64) * HIDDEN_SCALE).requires_grad_()
    mask = torch.ones(BATCH, total, dtype=torch.bool)
    mask[0, :pad] = False
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cos, sin = rotary(hidden, positions)
    return hidden, (mask if pad else None), (cos, sin)


def call(mixer, hidden, position_embeddings, mask, state, start: int, end: int) -> torch.Tensor:
    """The mixer's output for tokens start..end, through its forward (projections and output included)."""
    cos, sin = position_embeddings
    kwargs = {"position_embeddings": (cos[:, start:end], sin[:, start:end])}
    if mask is not None:
        kwargs[PADDING_MASK] = mask[:, start:end]
    if state is not None:
        kwargs["cache"] = SimpleNamespace(layers=[state])
    return mixer(hidden[:, start:end], **kwargs)[0]


def forms(mixer, hidden, position_embeddings, mask, prefix: int) -> dict[str, torch.Tensor]:
    total = hidden.shape[1]
    out = {}
    if prefix == 0:
        out["parallel"] = call(mixer, hidden, position_embeddings, mask, None, 0, total)
    for form in ("chunked", "recurrent"):
        state = MixerState()
        pieces = [call(mixer, hidden, position_embeddings, mask, state, 0, prefix)] if prefix else []
        steps = [(prefix, total)] if form == "chunked" else [(t, t + 1) for t in range(prefix, total)]
        pieces += [call(mixer, hidden, position_embeddings, mask, state, a, b) for a, b in steps]
        assert state.seen == total
        out[form] = torch.cat(pieces, dim=1)
    return out


def assert_forms_match(mixer, reference, rotary, length: int, padded: bool, prefix: int) -> None:
    """Every form of `mixer` gives `reference(mixer, hidden, position_embeddings, mask)`'s output and gradients
    (w.r.t. the hidden states and every parameter of the layer) on prefix + length tokens."""
    total = prefix + length
    pad = min(11, max(total - 2, 1)) if padded else 0
    hidden, mask, position_embeddings = inputs(rotary, mixer.attn.config.hidden_size, total, pad)
    params = [p for p in mixer.parameters() if p.requires_grad]
    probe = torch.randn(BATCH, total, hidden.shape[-1], generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def with_grads(out):
        return out, torch.autograd.grad((out * probe).sum(), [hidden, *params], materialize_grads=True)

    expected, expected_grads = with_grads(reference(mixer, hidden, position_embeddings, mask))
    for form, out in forms(mixer, hidden, position_embeddings, mask, prefix).items():
        out, grads = with_grads(out)
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-8, msg=lambda m: f"{form} output: {m}")
        for name, got, want in zip(["hidden"] + [n for n, p in mixer.named_parameters() if p.requires_grad], grads, expected_grads):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8, msg=lambda m: f"{form} gradient of {name}: {m}")
