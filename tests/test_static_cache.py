"""The static cache: `generate(..., cache_implementation="static")` gives the dynamic cache's tokens, its states
keep one shape and address, and transformers' compiled decode step traces once for all steps. And a chunked prefill
(`generate(..., prefill_chunk_size=N)`) gives one prefill's tokens."""

from contextlib import nullcontext

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import CompileConfig

import linearize
from linearize import LinearizeError
from linearize.hf import modeling_linearized
from linearize.hf.modeling_linearized import LinearizedForCausalLM
from linearize.hf.attention import decode_attention
from linearize.hf.cache import MixerState, returned_cache
from linearize.hf.plan import LayerPlan
from tests.test_mixers import MIXER_CASES, STATIC_STATE, converted
from tests.tiny import left_padded, random_ids

pytestmark = pytest.mark.core


def padded_settings(new_tokens=16):
    ids, mask = left_padded(random_ids(2, 12), [3, 0])
    return dict(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def compiled_anywhere(fullgraph: bool, backend="eager") -> CompileConfig:
    """A compile config under which generate() compiles on any device (transformers compiles on CUDA only unless told
    so), through `backend` (default Dynamo's eager backend: the graphs without inductor)."""
    compile_config = CompileConfig(backend=backend, fullgraph=fullgraph, mode=None)
    compile_config._compile_all_devices = True
    return compile_config


@pytest.mark.parametrize("name", sorted(MIXER_CASES))
def test_static_generation_equals_dynamic(name):
    model = converted(name)
    settings = padded_settings()
    assert torch.equal(model.generate(**settings, cache_implementation="static"), model.generate(**settings))


@pytest.mark.parametrize("name", sorted(MIXER_CASES))
def test_a_prefill_in_chunks_generates_as_one_prefill(name):
    """transformers' chunked prefill (`prefill_chunk_size`, which needs the cache before the first chunk) takes the
    12-token prompts in chunks of 5, 5 and 2 through the cache: the tokens and logits of one prefill (float64)."""
    model = converted(name)
    lengths = []
    model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    settings = dict(padded_settings(new_tokens=4), output_logits=True, return_dict_in_generate=True)
    whole = model.generate(**settings)
    assert lengths == [12, 1, 1, 1]
    chunked = model.generate(**settings, prefill_chunk_size=5)
    assert lengths[4:] == [5, 5, 2, 1, 1, 1]
    assert torch.equal(chunked.sequences, whole.sequences)
    assert (torch.stack(chunked.logits) - torch.stack(whole.logits)).abs().max() < 1e-10


@pytest.mark.parametrize("name", ["swa", "hedgehog_swa+keep"])  # a kept softmax layer; kept keys' decisions
def test_a_compiled_chunked_prefill_generates_as_one_prefill(name):
    """With a static cache transformers sends a chunked prefill's chunks through the compiled forward too (on CUDA,
    where it compiles): chunks of 5, 5 and 2 tokens, then the decode steps. Each chunk length needs its own graph, so
    the steps trusted after their guards (`guarded_then_trusted`) count only single-token calls: counting the chunks,
    the 2-token chunk ran trusted and torch raised that it would recompile under `skip_guard_eval_unsafe` (for every
    student; tests/test_gpu.py runs every mixer through inductor)."""
    model = converted(name)
    settings = dict(padded_settings(new_tokens=4), output_logits=True, return_dict_in_generate=True)
    whole = model.generate(**settings)
    compile_config = compiled_anywhere(fullgraph=False)
    torch._dynamo.reset()
    chunked = model.generate(**settings, cache_implementation="static", compile_config=compile_config, prefill_chunk_size=5)
    assert torch.equal(chunked.sequences, whole.sequences)
    assert (torch.stack(chunked.logits) - torch.stack(whole.logits)).abs().max() < 1e-10


def test_a_compiled_chunked_prefill_of_prompts_of_other_lengths_generates_as_one_prefill():
    """A user's prompts differ in length, so their last chunks do: the first last chunk shorter than the others Dynamo
    compiles for a symbolic length (automatic dynamic shapes, transformers' default `CompileConfig(dynamic=None)`), and
    the converted layers' chunked forms run on it (remainders of 2, 3, 1 and 3 tokens, some shorter than the pads)."""
    model = converted("gated_deltanet+window")
    compile_config = compiled_anywhere(fullgraph=False)
    torch._dynamo.reset()
    for length in (12, 13, 16, 18):
        ids, mask = left_padded(random_ids(2, length), [3, 0])
        settings = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        chunked = model.generate(**settings, cache_implementation="static", compile_config=compile_config, prefill_chunk_size=5)
        assert torch.equal(chunked, model.generate(**settings)), length


@pytest.mark.parametrize("teacher", [False, True], ids=["states", "kv-only"])
def test_a_compiled_chunked_prefill_writes_a_fresh_caches_states_eagerly_then_compiles(monkeypatch, teacher):
    """A fresh static cache's first chunk runs eagerly: its states' first write allocates the tensors that the later
    calls write in place, which allocated inside a graph replayed from CUDA graphs its next replay would overwrite (it
    raised on an H100). The later chunks and the steps run compiled, and so does every chunk of the next generate(),
    whose reset cache keeps its tensors; the tokens are one prefill's. Under teacher_mode every layer keeps static keys
    and values (transformers' `StaticLayer`, initialised on its first update): the same."""
    model = converted("gated_deltanet+window")
    calls, compiled = [], []  # every call of the compiled forward's wrapper; those it passed on to the compiled one
    allocating, trusting = LinearizedForCausalLM._allocating_eagerly, modeling_linearized.guarded_then_trusted

    def every(self, step, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[1])
        return allocating(self, step, *args, **kwargs)

    def spied(step):
        inner = trusting(step)
        return lambda *args, **kwargs: compiled.append(kwargs["input_ids"].shape[1]) or inner(*args, **kwargs)

    monkeypatch.setattr(LinearizedForCausalLM, "_allocating_eagerly", every)
    monkeypatch.setattr(modeling_linearized, "guarded_then_trusted", spied)
    settings = padded_settings(new_tokens=4)
    compile_config = compiled_anywhere(fullgraph=False)
    torch._dynamo.reset()
    with linearize.teacher_mode(model) if teacher else nullcontext():
        expected = model.generate(**settings)
        for passed_on in ([5, 2, 1, 1, 1], [5, 5, 2, 1, 1, 1]):
            calls.clear()
            compiled.clear()
            assert torch.equal(model.generate(**settings, cache_implementation="static", compile_config=compile_config, prefill_chunk_size=5), expected)
            assert calls == [5, 5, 2, 1, 1, 1] and compiled == passed_on


@pytest.mark.parametrize("name", sorted(STATIC_STATE))
def test_a_fixed_size_state_has_one_shape_whatever_the_prompt(name):
    model = converted(name)
    shapes = set()
    for length in (1, 2, 9):
        cache = model.new_cache(max_cache_len=16)
        model(random_ids(2, length), cache=cache, use_cache=True)
        states = [layer for layer in cache.layers if isinstance(layer, MixerState)]
        before = [{n: t.data_ptr() for n, t in s.tensors.items()} for s in states]
        model(random_ids(2, 1), cache=cache, use_cache=True, position_ids=torch.full((2, 1), length))
        assert [{n: t.data_ptr() for n, t in s.tensors.items()} for s in states] == before
        assert [int(s.get_seq_length()) for s in states] == [length + 1] * len(states)
        shapes.add(tuple(tuple((n, tuple(t.shape)) for n, t in sorted(s.tensors.items())) for s in states))
    assert len(shapes) == 1


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", ["gated_deltanet+window", "mamba2+window", "swa", "hedgehog_swa+keep"])
def test_compiled_generate_traces_the_decode_step_once(name, batch):
    """transformers compiles the decode step for a static cache; fullgraph and one graph for every step (at batch 1
    too, where a slice of the growing mask would keep a stride that grows), which writes the states in place and
    returns only the logits: new states returned from the graph would be written after it, outside the graph. Kept
    keys (blocks of 4 over 16 steps) are decided after the steps that end a block, outside the graph."""
    from torch._dynamo.utils import counters

    outputs = []

    def backend(graph, example_inputs):
        outputs.append(len(next(n for n in graph.graph.nodes if n.op == "output").args[0]))
        return graph.forward

    model = converted(name)
    settings = padded_settings()
    settings.update(input_ids=settings["input_ids"][:batch], attention_mask=settings["attention_mask"][:batch])
    compile_config = compiled_anywhere(fullgraph=True, backend=backend)
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(**settings, cache_implementation="static", compile_config=compile_config)
    assert counters["stats"]["unique_graphs"] == 1 and outputs == [1]
    assert torch.equal(compiled, model.generate(**settings))


@pytest.mark.parametrize("name", ["gated_deltanet+window", "swa", "hedgehog_swa"])
def test_a_compiled_decode_step_reads_its_caches_kinds_not_the_layer_plan(name, monkeypatch):
    """Traced, parsing the layer plan (`cache_kinds`) put guards on every layer's options into the compiled step,
    which Dynamo evaluates before every step (618 of a 30-layer student's 8,368), and scanning the mixers for
    attention transfer's hooks guarded every mixer a second time; the step reads its cache's kinds instead (`_kinds`:
    the cache was checked against the plan in the eager prefill) and no mixer list, with the same tokens (swa: its
    kept softmax layer reads the mask)."""
    parsed, listed = [], []
    original, mixers = LayerPlan.from_json.__func__, LinearizedForCausalLM._mixers

    def counted(cls, data):
        parsed.append(torch.compiler.is_compiling())
        return original(cls, data)

    def listing(self):
        listed.append(torch.compiler.is_compiling())
        return mixers(self)

    model = converted(name)
    settings = padded_settings(new_tokens=4)
    expected = model.generate(**settings)
    monkeypatch.setattr(LayerPlan, "from_json", classmethod(counted))
    monkeypatch.setattr(LinearizedForCausalLM, "_mixers", listing)
    compile_config = compiled_anywhere(fullgraph=True)
    torch._dynamo.reset()
    assert torch.equal(model.generate(**settings, cache_implementation="static", compile_config=compile_config), expected)
    assert parsed and not any(parsed) and listed and not any(listed)


def test_only_fixed_size_states_make_a_compileable_cache():
    assert converted("gated_deltanet").new_cache(max_cache_len=8).is_compileable
    assert converted("swa").new_cache(max_cache_len=8).is_compileable  # its kept layer gets a static KV layer
    assert not converted("swa").new_cache().is_compileable
    assert not converted("qwen3_5_attention").new_cache(max_cache_len=8).is_compileable
    assert converted("hedgehog_swa+keep").new_cache(max_cache_len=8).is_compileable  # decided after the compiled step


def test_a_static_state_refuses_a_new_shape():
    state = MixerState(static=True)
    state.write({"S": torch.zeros(2, 3)})
    kept = state.tensors["S"]
    state.write({"S": torch.ones(2, 3)})
    assert state.tensors["S"] is kept and bool(kept.eq(1).all())
    with pytest.raises(LinearizeError, match="changed shape"):
        state.write({"S": torch.zeros(2, 4)})


def state_addresses(cache) -> list[int]:
    return [t.data_ptr() for layer in cache.layers for t in (getattr(layer, "tensors", None) or {}).values()] + [
        t.data_ptr() for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None
    ]


@pytest.mark.parametrize("name", sorted(STATIC_STATE))
def test_the_next_static_generation_reuses_the_reset_cache(name):
    """A second generate() of the same batch size gets the first one's cache, reset: the same addresses (so CUDA
    graphs replay instead of being recorded again) and the same tokens as a dynamic cache, with another prompt."""
    model = converted(name)
    first = padded_settings()
    model.generate(**first, cache_implementation="static")
    kept = model._static_cache[2]
    addresses = state_addresses(kept)
    second = dict(first, input_ids=random_ids(2, 12, seed=7))
    assert torch.equal(model.generate(**second, cache_implementation="static"), model.generate(**second))
    assert model._static_cache[2] is kept and state_addresses(kept) == addresses


def test_a_static_cache_is_not_reused_across_batch_sizes_nor_when_returned():
    model = converted("gated_deltanet+window")
    settings = padded_settings()
    model.generate(**settings, cache_implementation="static")
    kept = model._static_cache[2]
    one = dict(settings, input_ids=settings["input_ids"][:1], attention_mask=settings["attention_mask"][:1])
    assert torch.equal(model.generate(**one, cache_implementation="static"), model.generate(**one))
    assert model._static_cache[2] is not kept
    returned = model.generate(**one, cache_implementation="static", return_dict_in_generate=True)
    assert returned_cache(returned) is not model._static_cache[2]


def test_a_static_cache_is_not_reused_after_set_options_changes_a_state():
    """More kept keys make a larger state: the next static generate() builds a cache for it (it raised that the state
    changed shape, on the model's kept cache), and its tokens are the dynamic cache's."""
    model = converted("hedgehog_swa+keep")
    settings = padded_settings()
    model.generate(**settings, cache_implementation="static")
    kept = model._static_cache[2]
    linearize.set_options(model, keep=5)  # converted with 3
    assert torch.equal(model.generate(**settings, cache_implementation="static"), model.generate(**settings))
    assert model._static_cache[2] is not kept


def sdpa_priority() -> list[SDPBackend]:
    return [SDPBackend(value) for value in torch._C._get_sdp_priority_order()]


def test_an_eager_decode_step_on_cuda_prefers_flash_and_efficient_to_cudnn():
    """cuDNN builds an execution graph for every new key length (BENCHMARKS.md, twentieth session): a single-token
    step on CUDA orders flash, efficient, cuDNN, math; a prefill, a CPU step and the backends a caller enabled are
    left as they are."""
    default = sdpa_priority()
    for device, length in (("cpu", 1), ("cuda", 7)):
        with decode_attention(device, length):
            assert sdpa_priority() == default
    flash, efficient, cudnn, math = SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH
    with decode_attention(torch.device("cuda"), 1):
        assert sdpa_priority()[:4] == [flash, efficient, cudnn, math]
    assert sdpa_priority() == default
    with sdpa_kernel([math, cudnn], set_priority=True), decode_attention("cuda", 1):
        assert sdpa_priority()[:2] == [cudnn, math]
        assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()


@pytest.mark.parametrize("name", ["attention", "qwen3_5_attention"])
def test_a_converted_model_runs_each_forward_under_decode_attention(name, monkeypatch):
    """generate() of a model with softmax layers: the prefill and every single-token step go through
    `decode_attention` with the model's device and the step's length."""
    seen = []
    monkeypatch.setattr(modeling_linearized, "decode_attention", lambda device, length: seen.append((str(device), length)) or nullcontext())
    converted(name).generate(**padded_settings(new_tokens=3))
    assert seen == [("cpu", 12), ("cpu", 1), ("cpu", 1)]


def test_assisted_generation_is_refused_in_one_line_where_a_state_cannot_roll_back():
    """Prompt lookup and an assistant model need the cache cropped back to the accepted draft, which a converted
    layer's state cannot be; under teacher_mode every layer keeps KV, and prompt lookup gives greedy's tokens."""
    model = converted("hedgehog_swa")
    settings = dict(input_ids=random_ids(1, 12), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    for assisted in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=converted("hedgehog_swa"))):
        with pytest.raises(ValueError, match="assisted") as error:
            model.generate(**settings, **assisted)
        assert "\n" not in str(error.value)
    with linearize.teacher_mode(model):
        assert torch.equal(model.generate(**settings, prompt_lookup_num_tokens=3), model.generate(**settings))


def test_a_compiled_generation_trusts_its_guards_after_its_first_steps_and_an_option_changed_between_calls_holds(monkeypatch):
    """A generate()'s first GUARDED_STEPS decode steps evaluate every guard of the compiled step, the later ones only
    those that tell its graphs apart (`guarded_then_trusted`; a 30-layer student's guards took 482 us of a 3.29 ms step
    on an H100). The first steps of each call still meet every guard: kept keys changed by `set_options` between two
    compiled generations recompile there, and each generation equals the uncached one with its options; with
    LINEARIZE_STEP_GUARDS=every no step skips them."""
    stances = []
    original = torch.compiler.set_stance

    def recorded(*args, **kwargs):
        stances.append(kwargs.get("skip_guard_eval_unsafe", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.compiler, "set_stance", recorded)
    model = converted("hedgehog_swa+keep")
    settings = padded_settings(new_tokens=8)
    compile_config = compiled_anywhere(fullgraph=True)
    torch._dynamo.reset()
    for keep in (2, 5):
        linearize.set_options(model, keep=keep)
        expected = model.generate(**settings)
        stances.clear()
        assert torch.equal(model.generate(**settings, cache_implementation="static", compile_config=compile_config), expected)
        assert stances == [True] * (8 - 1 - modeling_linearized.GUARDED_STEPS)  # 7 decode steps after the prefill
    monkeypatch.setenv("LINEARIZE_STEP_GUARDS", "every")
    stances.clear()
    assert torch.equal(model.generate(**settings, cache_implementation="static", compile_config=compile_config), expected)
    assert stances == []
    monkeypatch.setenv("LINEARIZE_STEP_GUARDS", "some")
    with pytest.raises(LinearizeError, match="^LINEARIZE_STEP_GUARDS='some' is not one of first, every; unset it or pick one$"):
        model.generate(**settings, cache_implementation="static", compile_config=compile_config)
