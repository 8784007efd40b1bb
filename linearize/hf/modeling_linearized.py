"""The converted model: the teacher's own causal LM with its attention layers replaced as the plan says.

Saved folders carry this file and its siblings, so `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` works where linearize is not installed, and `import linearize` registers the same
classes so no remote code is needed where it is.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS, GenerationMode
from transformers.dynamic_module_utils import get_relative_import_files

from .attention import attention_slot, chunk_causal_mask, decode_attention, decoder_layers
from .cache import NO_ROLLBACK, OUTPUT_CACHE_FIELD, LinearizedCache, cache_in, cache_keyword
from .configuration_linearized import LinearizedConfig
from .errors import LinearizeError
from .mixers import MIXERS, PADDING_MASK, get_mixer, mixers_in
from .ops_kept import ends_block
from .plan import LayerPlan
from .shipped_mixers import MIXER_MODULES


def apply_plan(model: nn.Module, text_config, plan: LayerPlan) -> list[str]:
    """Replace each decoder layer's attention as `plan` says; build every replacement before changing anything.

    Returns the attention slot names that were replaced. Raises LinearizeError (model untouched) on a bad plan.
    """
    layers = decoder_layers(model, text_config.num_hidden_layers)
    if len(plan) != len(layers):
        raise LinearizeError(f"the plan has {len(plan)} layers but the model has {len(layers)}; rebuild the plan for this model")
    built = []
    for index, (layer, entry) in enumerate(zip(layers, plan)):
        slot = attention_slot(layer, where=f"layer {index}: ")
        mixer = get_mixer(entry.mixer).from_attention(getattr(layer, slot), text_config, index, **entry.options)
        built.append((layer, slot, mixer))
    for layer, slot, mixer in built:
        setattr(layer, slot, mixer)
    return [slot for _, slot, _ in built]


def write_mixer_files(folder: Path) -> None:
    """Copy every mixer file, and the files each one imports, beside a saved model, with a shipped_mixers.py that
    imports them by name: transformers follows those lines, so the folder loads every mixer as remote code."""
    here = Path(__file__).parent
    lines = []
    for module in MIXER_MODULES:
        source = here / f"{module}.py"
        for path in (source, *map(Path, get_relative_import_files(source))):
            shutil.copyfile(path, folder / path.name)
        classes = sorted(cls.__name__ for cls in MIXERS.values() if cls.__module__ == f"{__package__}.{module}")
        lines.append(f"from .{module} import {', '.join(classes)}")
    (folder / "shipped_mixers.py").write_text(
        '"""Every mixer file saved with this model, imported so that each registers its mixers (written by save_pretrained)."""\n\n'
        + "\n".join(lines)
        + f"\n\nMIXER_MODULES = {MIXER_MODULES!r}\n"
    )


# The kernel choices a caller may request at load time (`experts_implementation` exists from transformers 5.20).
IMPLEMENTATIONS = ("_attn_implementation", "_experts_implementation")


# A generate()'s first decode steps through a compiled forward evaluate every guard Dynamo put on it; the later ones
# only those that tell its compiled graphs apart (`guarded_then_trusted`). LINEARIZE_STEP_GUARDS=every: all, every step.
GUARDED_STEPS = 2


def _new_tokens(kwargs: dict) -> int | None:
    tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    return None if tokens is None else tokens.shape[1]


def _unwritten(layer) -> bool:
    """Whether a cache layer allocates its tensors on its next write (`LinearizedForCausalLM._allocating_eagerly`)."""
    if getattr(layer, "is_mixer_state", False):
        return layer.static and not layer.tensors
    return not layer.is_initialized


def guarded_then_trusted(compiled, guarded: int = GUARDED_STEPS):
    """`compiled` (transformers' compiled forward for one generate()'s decode steps) with its first `guarded`
    single-token calls under every guard, then the later ones under `torch.compiler.set_stance(skip_guard_eval_unsafe=
    True)`: Dynamo then evaluates only the guards that differ between its cached graphs. Within one generate() the
    decode steps read the same static cache, shapes and options, so what the first steps' guards pass holds for the
    rest, while a change between generate() calls (an option set by `set_options`, another batch size) meets every
    guard again in the next call's first steps. A call of several tokens (a chunk of transformers' chunked prefill,
    which it also sends through the compiled forward) always meets every guard and starts the count again: its length
    needs a graph of its own, which a trusted call would refuse to compile (torch raised for every student's chunked
    prefill with a static cache). The guards cost a batch-1 step of a 30-layer student 482 us of host time on an H100
    against its teacher's 218, of a 3.29 ms step against the teacher's 2.86 (BENCHMARKS.md, forty-seventh session)."""
    chosen = os.environ.get("LINEARIZE_STEP_GUARDS", "first").lower()
    if chosen not in ("first", "every"):
        raise LinearizeError(f"LINEARIZE_STEP_GUARDS={chosen!r} is not one of first, every; unset it or pick one")
    if chosen == "every":
        return compiled
    steps = 0

    def step(*args, **kwargs):
        nonlocal steps
        steps = steps + 1 if _new_tokens(kwargs) == 1 else 0
        if steps <= guarded:
            return compiled(*args, **kwargs)
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return compiled(*args, **kwargs)

    return step


class LinearizedForCausalLM(PreTrainedModel, GenerationMixin):
    """A teacher causal LM (`self.model`) whose attention layers follow `config.plan`.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("out/smollm2-hedgehog")   # after `import linearize`
        >>> model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=20)
    """

    config_class = LinearizedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    def __init__(self, config: LinearizedConfig, model: PreTrainedModel | None = None):
        # What the caller asked for (None unless `attn_implementation=` or `experts_implementation=` was given);
        # read before PreTrainedModel resolves its own defaults, which the teacher's family may not support (Gemma 2
        # refuses SDPA). The teacher's family then picks its own default for what was not asked for.
        requested = {name: getattr(config, name, None) for name in IMPLEMENTATIONS}
        super().__init__(config)
        if model is None:
            for name, value in requested.items():
                if hasattr(config.text_config, name):
                    setattr(config.text_config, name, value)
            # The dtype from_pretrained builds in (its `dtype=`, or the checkpoint's), not the teacher's saved in
            # text_config, which from_config would otherwise take: a float32 student asked for in bfloat16 stayed float32.
            config.text_config.dtype = torch.get_default_dtype()
            model = AutoModelForCausalLM.from_config(config.text_config, dtype=config.text_config.dtype)
            apply_plan(model, config.text_config, config.plan)
        for name in IMPLEMENTATIONS:
            if hasattr(model.config, name):
                setattr(config, name, getattr(model.config, name))
        self.model = model
        self._cache_keyword = cache_keyword(model)
        if getattr(model, "generation_config", None) is not None:
            self.generation_config = model.generation_config
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a plain DynamicCache: forward() builds the per-layer LinearizedCache.
        return False

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as error:
            if "size mismatch" in str(error) or "mismatch" in str(error).lower():
                raise LinearizeError(
                    f"this checkpoint's weights do not match the plan in its config.json ({str(error).splitlines()[0][:160]}); "
                    "re-convert the teacher, or restore the config.json saved with these weights"
                ) from None
            raise
        problems = [f"missing {k}" for k in info.get("missing_keys", [])] + [
            f"unexpected {k}" for k in info.get("unexpected_keys", [])
        ]
        problems += [f"mismatched {k[0] if isinstance(k, tuple) else k}" for k in info.get("mismatched_keys", [])]
        if problems:
            shown = ", ".join(sorted(problems)[:4]) + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise LinearizeError(
                f"this checkpoint's weights do not match the plan in its config.json ({shown}); re-convert the teacher, "
                "or restore the config.json saved with these weights"
            )
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs) -> None:
        """transformers' save_pretrained, plus every mixer file beside the modeling code (`write_mixer_files`)."""
        if kwargs.get("push_to_hub"):
            raise LinearizeError(
                "save_pretrained(push_to_hub=True) would upload before the mixer files are written; call "
                "model.push_to_hub(repo_id), or save the folder and upload it with `linearize push`"
            )
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            write_mixer_files(Path(save_directory))

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.set_output_embeddings(value)

    def _mixers(self) -> list:
        if getattr(self, "_mixer_list", None) is None:  # walked once: every forward asks, decode steps included
            self._mixer_list = mixers_in(self)
        return self._mixer_list

    @property
    def _is_stateful(self) -> bool:
        """transformers (up to 5.24) refuses assisted decoding for a stateful model: one whose converted layers keep a
        state, which cannot be rolled back (not under teacher_mode, or with every layer kept)."""
        return set(self.cache_kinds()) != {"kv"}

    def cache_kinds(self) -> list[str]:
        """Per layer: "kv" for softmax attention (kept, or a converted layer computing its teacher's: teacher_mode, or
        one mixer's `teacher` set, as a layer selection restores it), "state" for a fixed-size state updated on the
        device alone (`Mixer.static_state`), "dynamic" for any other converted layer (one whose state grows)."""
        restored = {m.layer_idx for m in self._mixers() if m.teacher}
        return [
            "kv" if e.is_attention or i in restored else "state" if get_mixer(e.mixer).static_state(e.options) else "dynamic"
            for i, e in enumerate(self.config.plan)
        ]

    def new_cache(self, max_cache_len: int | None = None) -> LinearizedCache:
        """An empty cache with the right kind of storage for every layer; static (for a compiled decode step) when
        `max_cache_len` is given: kept layers then hold that many tokens at most."""
        return LinearizedCache(self.config.text_config, self.cache_kinds(), max_cache_len)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """transformers' hook: `cache_implementation="static"` gets a static LinearizedCache (which generate()
        compiles its decode step for on CUDA); a chunked prefill (`prefill_chunk_size`) a dynamic one up front, which
        transformers needs before the first chunk; otherwise forward() builds the dynamic cache on the first call.

        The static cache is kept and reset for the next call of the same batch size, mode, device and dtype that
        fits in it (as transformers 4.x kept its own): its tensors keep their addresses, so the compiled step's CUDA
        graphs replay instead of being recorded again each call. A cache that generate() returns
        (`return_dict_in_generate`) belongs to the caller and is never reused. Assisted generation (an assistant
        model, prompt lookup) is refused where a converted layer keeps a state: it cannot roll back to the accepted
        draft.
        """
        bound = inspect.signature(GenerationMixin._prepare_cache_for_generation).bind(self, generation_config, model_kwargs, *args, **kwargs)
        assisted = bound.arguments["generation_mode"] == GenerationMode.ASSISTED_GENERATION
        if assisted and self._is_stateful:
            raise LinearizeError(NO_ROLLBACK)
        name = "cache" if OUTPUT_CACHE_FIELD == "cache" else "past_key_values"
        if assisted and model_kwargs.get(name) is None and generation_config.use_cache is not False:
            model_kwargs[name] = self.new_cache()  # transformers' assisted decoding needs it before the first forward
            return
        static = generation_config.cache_implementation in ALL_STATIC_CACHE_IMPLEMENTATIONS
        chunked = getattr(generation_config, "prefill_chunk_size", None) is not None
        if model_kwargs.get(name) is not None or generation_config.use_cache is False or not (static or chunked):
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if not static:  # a chunked prefill: transformers needs the cache before the first chunk
            model_kwargs[name] = self.new_cache()
            return
        length = max(bound.arguments["max_cache_length"], getattr(generation_config, "max_cache_len", None) or 0)
        batch = max(generation_config.num_beams, generation_config.num_return_sequences or 1) * bound.arguments["batch_size"]
        if generation_config.return_dict_in_generate:
            model_kwargs[name] = self.new_cache(length)
            return
        # The plan too: set_options may change a state's shape (more kept keys).
        key = (tuple(self.cache_kinds()), self.config.plan, batch, self.device, self.dtype)
        kept = getattr(self, "_static_cache", None)
        if kept is None or kept[0] != key or kept[1] < length:
            self._static_cache = kept = (key, length, self.new_cache(length))
        else:
            kept[2].reset()
        model_kwargs[name] = kept[2]

    def get_compiled_call(self, compile_config):
        """transformers' compiled forward, which generate() calls for each decode step of a static cache. Where layers
        decide on the host's count (`hedgehog_swa`'s kept keys, `Mixer.decision_period`), each single-token step runs
        with their states deferred (`MixerState.deferred`: the graph never reads the count, one graph for every step),
        and the decisions it left follow it (once every keep_block steps): on CUDA the first of each set of layers runs
        eagerly and is captured in a CUDA graph (kept with the cache) that the later ones replay, reading the position
        on the device; elsewhere eagerly. Dynamo evaluates every guard of the step only in a generate()'s first
        `GUARDED_STEPS` steps (`guarded_then_trusted`). A chunk of a chunked prefill that writes a fresh cache's first
        states runs eagerly (`_allocating_eagerly`)."""
        compiled = functools.partial(self._allocating_eagerly, guarded_then_trusted(super().get_compiled_call(compile_config)))
        periods = {m: m.decision_period(m.options_dict()) for m in self._mixers() if not m.teacher}  # once a generate()
        deciders = [(m, period) for m, period in periods.items() if period]
        return functools.partial(self._step_then_decide, compiled, deciders) if deciders else compiled

    def _allocating_eagerly(self, compiled, *args, **kwargs):
        """`compiled` for one call, or the eager forward for a call of several tokens (a chunk of transformers' chunked
        prefill, which it sends through the compiled forward too) where a layer of the cache has not been written yet:
        a static state, or a kept layer's static keys and values (transformers' `StaticLayer`, initialised on its first
        update). A first write allocates the tensors that every later call writes in place; allocated inside a graph
        replayed from CUDA graphs, they would be the graph's outputs, which its next replay overwrites (the next chunk's
        compile raised so for every `hedgehog_swa` student on an H100). A decode step follows a prefill, which wrote
        every layer; a cache reused by the next generate() (reset, `_prepare_cache_for_generation`) keeps them."""
        cache = cache_in(kwargs)
        if _new_tokens(kwargs) != 1 and cache is not None and any(map(_unwritten, cache.layers)):
            return self(*args, **kwargs)
        return compiled(*args, **kwargs)

    def _step_then_decide(self, compiled, deciders: list, *args, **kwargs):
        """`compiled` for one call; `deciders` the (mixer, decision period) of the layers that decide (`get_compiled_call`)."""
        cache = cache_in(kwargs)
        states = [] if cache is None or _new_tokens(kwargs) != 1 else [cache.layers[m.layer_idx] for m, _ in deciders]
        if not states or not all(getattr(state, "static", False) for state in states):
            return compiled(*args, **kwargs)
        position = int(states[0].seen)  # generate() has synced on the last step's tokens
        for state in states:
            state.deferred = True
        try:
            out = compiled(*args, **kwargs)
        finally:
            for state in states:
                state.deferred = False
        due = [(m, s) for (m, period), s in zip(deciders, states) if ends_block(position, period)]
        if due:
            self._decide(cache, due, position)
        return out

    @staticmethod
    def _decide(cache, due: list, position: int) -> None:
        """The decisions of `due` (mixer, state) after the deferred step at `position` (`_step_then_decide`)."""
        if not due[0][1].tensors["at"].is_cuda:
            for mixer, state in due:
                mixer.decide_after(state, position)
            return
        graphs = cache.__dict__.setdefault("_decision_graphs", {})
        key = tuple(mixer.layer_idx for mixer, _ in due)
        if key in graphs:
            graphs[key].replay()
            return
        for mixer, state in due:  # the first eagerly: it warms up what the capture must not create
            mixer.decide_after(state, position)
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):  # records, runs nothing
            for mixer, state in due:
                mixer.decide_after(state, state.tensors["at"][0] - 1)  # after the step, "at" is its position + 1
        torch.cuda.current_stream().wait_stream(stream)
        graphs[key] = graph

    def prepare_inputs_for_generation(self, input_ids, *args, attention_mask=None, **kwargs):
        """transformers' inputs, plus the new tokens' padding for converted layers where transformers turned the 2D
        mask into a 4D one (it does for a static cache). Passed every step, padded or not: looking would sync."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, attention_mask=attention_mask, **kwargs)
        made = inputs.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() == 2 and made is not None and made.dim() != 2:
            new = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
            # Contiguous strides: a batch-1 slice of the growing mask would keep its row stride, which grows every
            # step, and a compiled step would be traced again for it.
            inputs[PADDING_MASK] = attention_mask[:, -new.shape[1] :].to(torch.bool, memory_format=torch.contiguous_format)
        return inputs

    def _kinds(self, cache: Cache | None) -> list[str]:
        """`cache_kinds`, or in a compiled step its cache's: built from them, and checked against them where the forward
        ran eagerly (`_checked_cache`; a generate()'s prefill among them). Traced, `cache_kinds` parses the layer plan,
        and Dynamo guards on every layer's options, guards it evaluates before every step (618 of a 30-layer
        `hedgehog_swa` student's 8,368; `benchmarks/step_guards.py`)."""
        if torch.compiler.is_compiling() and getattr(cache, "kinds", None) is not None:
            return cache.kinds
        return self.cache_kinds()

    def _softmax_reads_mask(self, cache: Cache | None) -> bool:
        """Whether a softmax layer will read the attention mask (kept layers, teacher_mode, attention transfer). A
        compiled step with a cache (generation) looks no further than the cache's kinds: attention transfer's probes
        run without one, and traced, the scan of every mixer's hook put five guards a layer into the step (one of
        them evaluated in Python), which Dynamo evaluates before every step."""
        if "kv" in self._kinds(cache):
            return True
        return not (cache is not None and torch.compiler.is_compiling()) and any(m.transfer_hook is not None for m in self._mixers())

    def _one_mask_for_the_batch(self, cache: Cache | None, length: int, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """For a chunk after cached tokens, in a batch without padding, through kept SDPA layers: one causal mask
        for every sequence (`chunk_causal_mask`), where transformers' builds one per sequence (it capped
        a hybrid's batch at 32K with 4K chunks; `tests/test_gpu.py` measures the difference). None where transformers'
        own mask is needed: padding, a first chunk or a decode step (no mask at all), sliding-window layers, another
        attention implementation."""
        if cache is None or length == 1 or torch.compiler.is_compiling() or "kv" not in self.cache_kinds():
            return None
        text = self.model.config
        if text._attn_implementation != "sdpa" or getattr(text, "sliding_window", None) or any(
            kind != "full_attention" for kind in getattr(text, "layer_types", None) or ()
        ):
            return None
        past = cache.get_seq_length()
        if past == 0 or (attention_mask is not None and not bool(attention_mask.all())):
            return None
        kv_length, kv_offset = cache.get_mask_sizes(length, 0)
        if kv_offset:
            return None
        return chunk_causal_mask(length, past, kv_length, self.device)

    def _checked_cache(self, cache: Cache | None, use_cache: bool) -> Cache | None:
        if cache is None:
            return self.new_cache() if use_cache else None
        if isinstance(cache, LinearizedCache) or getattr(cache, "kinds", None) is not None:
            if not torch.compiler.is_compiling() and cache.kinds != self.cache_kinds():  # `_kinds`
                raise LinearizeError(
                    "this cache was built for another mode (teacher_mode on/off) or model; start generation with a fresh cache"
                )
            return cache
        if cache.get_seq_length() == 0:
            return self.new_cache()
        raise LinearizeError(
            f"a filled {type(cache).__name__} cannot serve a converted model; pass no cache and the model builds its own"
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ):
        """The teacher's forward with this model's cache. `cache` is `past_key_values` before transformers 5.24;
        either name is taken, and the inner model gets the one the installed version expects. A single-token step on
        CUDA runs its softmax layers' SDPA under `decode_attention`'s order (flash before cuDNN)."""
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise LinearizeError("got both cache and past_key_values; pass the cache once, as cache")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        cache = self._checked_cache(cache if cache is not None else past_key_values, use_cache)
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if attention_mask is not None and attention_mask.dim() == 2:
            # Converted layers read only their own tokens' padding. Eager code passes it only where there is some
            # (looking costs a host sync); a compiled step passes it always, the same result without the sync.
            padding = attention_mask[:, -length:].bool()
            if torch.compiler.is_compiling() or not bool(padding.all()):
                kwargs[PADDING_MASK] = padding
        if attention_mask is not None and not self._softmax_reads_mask(cache):  # no 4D mask is built for no reader
            attention_mask = None
        elif (shared := self._one_mask_for_the_batch(cache, length, attention_mask)) is not None:
            attention_mask = shared
        kwargs[self._cache_keyword] = cache
        with decode_attention(self.device, length):
            return self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )


def register_auto_classes() -> None:
    """Let `AutoConfig`/`AutoModelForCausalLM` resolve model_type "linearized" without remote code."""
    AutoConfig.register(LinearizedConfig.model_type, LinearizedConfig, exist_ok=True)
    AutoModelForCausalLM.register(LinearizedConfig, LinearizedForCausalLM, exist_ok=True)


LinearizedConfig.register_for_auto_class()
LinearizedForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["LinearizedConfig", "LinearizedForCausalLM", "MIXERS", "apply_plan", "register_auto_classes"]
