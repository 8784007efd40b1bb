"""Greedy decoding with each per-token step captured once in a CUDA graph and replayed.

At batch 1 an eager decode step is bound by kernel-launch and Python overhead, not by memory. A converted
model whose layers all keep a fixed-size state has a step of fixed shape, so the whole step (all layers,
the head and the argmax) can be captured once and replayed: the state tensors keep their addresses and the
captured step ends by copying the new state into them. Kept softmax layers grow their KV cache every step
and cannot be captured this way; `GraphDecoder` refuses models that have them.
"""

from __future__ import annotations

import torch

from .hf.cache import MixerState
from .hf.errors import LinearizeError


# Mixers whose captured step did not reproduce generate() on the GPU (BENCHMARKS.md, GPU tests 2026-11-23).
UNVERIFIED = {"gated_deltanet"}


class GraphDecoder:
    """Prefill eagerly, then replay one captured decode step per token.

    Example:
        >>> decoder = GraphDecoder(student)
        >>> tokens = decoder.generate(input_ids, max_new_tokens=128)   # (batch, 128)
    """

    def __init__(self, model, warmup_steps: int = 2):
        unverified = sorted({entry["mixer"] for entry in model.config.layers} & UNVERIFIED)
        if unverified:
            raise LinearizeError(
                f"GraphDecoder does not take {', '.join(unverified)} layers yet (on an H100 its tokens differed from generate()'s); use model.generate()"
            )
        if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
            raise LinearizeError("GraphDecoder needs the model on a CUDA device; use model.generate() elsewhere")
        if any(entry["mixer"] == "attention" for entry in model.config.layers):
            raise LinearizeError("GraphDecoder needs every layer converted (kept softmax layers grow their cache); use model.generate()")
        self.model = model
        self.warmup_steps = warmup_steps

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, max_new_tokens: int) -> torch.LongTensor:
        model = self.model
        batch, length = input_ids.shape
        cache = model.new_cache()
        out = model(input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        tokens = [token]
        position = torch.full((batch, 1), length, device=input_ids.device, dtype=torch.long)
        # Eager steps first: Triton autotuning and lazily created state happen outside the capture.
        for _ in range(min(self.warmup_steps, max_new_tokens - 1)):
            token = model(token, past_key_values=cache, position_ids=position, use_cache=True).logits[:, -1:].argmax(-1)
            position += 1
            tokens.append(token)
        remaining = max_new_tokens - len(tokens)
        if remaining <= 0:
            return torch.cat(tokens, 1)[:, :max_new_tokens]
        states = [layer for layer in cache.layers if isinstance(layer, MixerState)]
        inputs = [dict(layer.tensors) for layer in states]
        static_token, static_position = token.clone(), position.clone()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            logits = model(static_token, past_key_values=cache, position_ids=static_position, use_cache=True).logits
            static_next = logits[:, -1:].argmax(-1)
            for layer, before in zip(states, inputs):
                for name, tensor in layer.tensors.items():
                    before[name].copy_(tensor)
        torch.cuda.current_stream().wait_stream(stream)
        for layer, before in zip(states, inputs):
            layer.tensors = before
        for _ in range(remaining):
            static_token.copy_(token)
            static_position.copy_(position)
            graph.replay()
            token = static_next.clone()
            position += 1
            tokens.append(token)
        return torch.cat(tokens, 1)
