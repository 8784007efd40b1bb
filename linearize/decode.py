"""Greedy decoding with each per-token step captured once in a CUDA graph and replayed.

At batch 1 an eager decode step is bound by kernel-launch and Python overhead, not by memory. A converted
model whose layers all keep a fixed-size state has a step of fixed shape, so the whole step (all layers,
the head and the argmax) can be captured once and replayed: the state tensors keep their addresses and the
captured step ends by copying the new state into them. `hedgehog_swa`'s kept keys (option `keep`) are decided at
the end of every keep_block-th step, on the host's count: such a model's step has two kinds, each captured once and
replayed at its positions (the position itself is read on the device). Kept softmax layers grow their KV cache
every step and cannot be captured this way; `GraphDecoder` refuses models that have them.
"""

from __future__ import annotations

import torch

from .hf.cache import MixerState
from .hf.errors import LinearizeError
from .hf.mixers import get_mixer
from .hf.ops_kept import ends_block

STOP_CHECK = 16  # steps between checks (each a host sync) whether every row has ended


def end_at_eos(tokens: torch.LongTensor, eos_token_id: torch.LongTensor | None, pad_token_id: int | None) -> torch.LongTensor:
    """Greedy `tokens` (batch, steps) as `generate()` returns its new tokens: pads after each row's first
    end-of-sequence token, cut after the step at which the last row ended.

    Rows are independent, so padding afterwards gives what feeding pads back in would.
    """
    if eos_token_id is None:
        return tokens
    hit = torch.isin(tokens, eos_token_id)
    ended = hit.cumsum(1) > 0
    tokens = tokens.masked_fill(ended.cumsum(1) > 1, pad_token_id)
    all_ended = ended.all(0).nonzero()
    return tokens if len(all_ended) == 0 else tokens[:, : int(all_ended[0]) + 1]


class GraphDecoder:
    """Prefill eagerly, then replay one captured decode step per token.

    Example:
        >>> decoder = GraphDecoder(student)
        >>> tokens = decoder.generate(input_ids, max_new_tokens=128)   # (batch, <= 128), as generate()'s new tokens
    """

    def __init__(self, model, warmup_steps: int = 2):
        mixers = [(get_mixer(entry.mixer), entry.options) for entry in model.config.plan]
        if not all(mixer.static_state(options) for mixer, options in mixers):
            raise LinearizeError(
                "GraphDecoder needs every layer's state to have a fixed size, updated on the GPU (softmax layers grow their "
                "cache); use model.generate()"
            )
        periods = {mixer.decision_period(options) for mixer, options in mixers} - {0}
        if len(periods) > 1:
            raise LinearizeError(
                f"GraphDecoder captures one step per kind, and these layers decide their kept keys every {sorted(periods)} steps; "
                "give them one keep_block (linearize set-options) or use model.generate()"
            )
        if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
            raise LinearizeError("GraphDecoder needs the model on a CUDA device; use model.generate() elsewhere")
        self.model = model
        self.warmup_steps = warmup_steps
        self.period = periods.pop() if periods else 0  # kept keys' decisions follow every period-th step (0: none)

    def decides(self, seen: int) -> bool:
        """Whether the step that follows `seen` tokens is of the kind that ends with kept keys' decisions."""
        return bool(self.period) and ends_block(seen, self.period)

    def _special_tokens(self, eos_token_id, pad_token_id, ignore_eos, device) -> tuple[torch.LongTensor | None, int | None]:
        """The end-of-sequence ids and the pad id, by default the model's generation config's (as generate())."""
        config = self.model.generation_config
        eos = config.eos_token_id if eos_token_id is None else eos_token_id
        if eos is None or ignore_eos:
            return None, None
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=device)
        pad = config.pad_token_id if pad_token_id is None else pad_token_id
        return eos, int(eos[0]) if pad is None else pad

    def capture(self, cache, token: torch.LongTensor, position: torch.LongTensor, seen: int | None = None):
        """Capture one decode step (model, argmax, state copy-back) in a CUDA graph, of the kind of the step that
        follows `seen` tokens (`decides`; default: the cache's count).

        Returns the graph and its static input token, input position and output token. The cache's states keep
        the tensors the captured step reads, and the step ends by copying its new state into them. Capturing runs
        nothing: the states' tensors and counts are as they were.
        """
        states = [layer for layer in cache.layers if isinstance(layer, MixerState)]
        inputs = [dict(layer.tensors) for layer in states]
        counts = [layer.seen for layer in states]
        if seen is not None:  # the host's count picks the step's kind; the position is read on the device
            for layer in states:
                layer.seen = seen
        static_token, static_position = token.clone(), position.clone()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            logits = self.model(static_token, cache=cache, position_ids=static_position, use_cache=True).logits
            static_next = logits[:, -1:].argmax(-1)
            for layer, before in zip(states, inputs):
                for name, tensor in layer.tensors.items():
                    before[name].copy_(tensor)
        torch.cuda.current_stream().wait_stream(stream)
        for layer, before, count in zip(states, inputs, counts):
            layer.write(before)
            layer.seen = count
        return graph, static_token, static_position, static_next

    def steps(self, cache, token: torch.LongTensor, position: torch.LongTensor, seen: int) -> "CapturedSteps":
        """The decode steps of `cache`, which has seen `seen` tokens, each kind captured once (`CapturedSteps`)."""
        return CapturedSteps(self, cache, token, position, seen)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        max_new_tokens: int,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        ignore_eos: bool = False,
    ) -> torch.LongTensor:
        """The new tokens of greedy decoding, equal to `model.generate(input_ids, do_sample=False)[:, length:]`.

        A row ends at an end-of-sequence token and is padded after it; decoding stops once every row has ended
        (checked every `STOP_CHECK` steps) or after `max_new_tokens`. `ignore_eos=True` always decodes
        `max_new_tokens` (for timing).
        """
        model = self.model
        batch, length = input_ids.shape
        eos, pad = self._special_tokens(eos_token_id, pad_token_id, ignore_eos, input_ids.device)
        ended = torch.zeros(batch, 1, dtype=torch.bool, device=input_ids.device)
        tokens: list[torch.LongTensor] = []

        def keep(token) -> bool:
            """Record `token`; True when every row has ended (looked at every STOP_CHECK tokens)."""
            tokens.append(token)
            if eos is None:
                return False
            ended.logical_or_(torch.isin(token, eos))
            return len(tokens) % STOP_CHECK == 0 and bool(ended.all())

        cache = model.new_cache()
        token = model(input_ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        keep(token)
        position = torch.full((batch, 1), length, device=input_ids.device, dtype=torch.long)
        # Eager steps first: Triton autotuning and lazily created state happen outside the capture.
        for _ in range(min(self.warmup_steps, max_new_tokens - 1)):
            token = model(token, cache=cache, position_ids=position, use_cache=True).logits[:, -1:].argmax(-1)
            position += 1
            keep(token)
        remaining = max_new_tokens - len(tokens)
        if remaining <= 0:
            return end_at_eos(torch.cat(tokens, 1)[:, :max_new_tokens], eos, pad)
        steps = self.steps(cache, token, position, length + len(tokens) - 1)
        for _ in range(remaining):
            token = steps.replay(token, position)
            position += 1
            if keep(token):
                break
        return end_at_eos(torch.cat(tokens, 1), eos, pad)


class CapturedSteps:
    """A cache's decode step captured once per kind (`GraphDecoder.decides`), replayed one token at a time: the step
    that follows `seen` tokens first, and each kind a later one takes, are captured at construction."""

    def __init__(self, decoder: GraphDecoder, cache, token: torch.LongTensor, position: torch.LongTensor, seen: int):
        self.decoder, self.seen = decoder, seen
        first = {}  # per kind, the first count within a period whose step is of it
        for count in range(seen, seen + max(decoder.period, 1)):
            first.setdefault(decoder.decides(count), count)
        self.graphs = {kind: decoder.capture(cache, token, position, count) for kind, count in first.items()}

    def replay(self, token: torch.LongTensor, position: torch.LongTensor) -> torch.LongTensor:
        """The greedy next token (batch, 1) after `token` at `position` (batch, 1), the cache's state moved on."""
        graph, static_token, static_position, static_next = self.graphs[self.decoder.decides(self.seen)]
        static_token.copy_(token)
        static_position.copy_(position)
        graph.replay()
        self.seen += 1
        return static_next.clone()
