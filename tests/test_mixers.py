"""Every registered mixer through the whole model: cached generation, chunked prefill, save/reload, state size.

A new mixer joins by adding a line to MIXER_CASES; a test fails if a registered mixer has no line.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import linearize
from linearize import LinearizeError
from linearize.hf import shipped_mixers
from linearize.hf import cache as cache_module
from linearize.hf.attention import apply_rotary
from linearize.hf.cache import MixerState, RoomyLayer, returned_cache
from tests.families import MIXER_LAYOUT
from tests.tiny import assert_reloaded, left_padded, random_ids, relative_error, reload_probe, run_python, tiny_model

pytestmark = pytest.mark.core

# (mixer, options, keep_attention) on the tiny 3-layer llama; windows are small so they matter at these lengths.
# A case named MIXER+VARIANT runs MIXER with other options.
MIXER_CASES = {
    "attention": ({}, ()),
    "bamba_mamba2": ({"conv_size": 3}, [1]),
    "gated_deltanet": ({"conv_size": 3}, ()),
    "gated_deltanet+window": ({"conv_size": 3, "window": 4}, ()),
    "hedgehog": ({"feature_dim": 8}, ()),
    "hedgehog_swa": ({"window": 4}, [1]),
    "hedgehog_swa+decay": ({"window": 4, "decay": 0.9}, [1]),
    "hedgehog_swa+linear_rope": ({"window": 4, "linear_rope": False}, [1]),
    "hedgehog_swa+keep": ({"window": 4, "keep": 3, "keep_block": 4}, [1]),
    "gla": ({"window": 4}, ()),
    "mamba2": ({}, [1]),
    "mamba2+window": ({"window": 4}, [1]),
    "swa": ({"window": 4}, [1]),
    "qwen3_5_gdn": ({"conv_size": 3}, [1]),
    "qwen3_5_attention": ({}, [1]),
}
# Mixers whose state must not grow with context at all (the softmax window of *_swa is bounded, so they count).
CONSTANT_STATE = set(MIXER_CASES) - {"attention", "qwen3_5_attention"}
# Of those, the mixers whose state a static cache keeps in place (hedgehog_swa's kept keys are decided on the host).
STATIC_STATE = {name for name in CONSTANT_STATE if linearize.MIXERS[name.split("+")[0]].static_state(MIXER_CASES[name][0])}


def converted(name, family="llama", **overrides):
    options, keep = MIXER_CASES[name]
    return linearize.convert(tiny_model(family, **overrides), name.split("+")[0], keep_attention=keep, **options)


def test_every_registered_mixer_has_a_case():
    assert set(linearize.MIXERS) == {n.split("+")[0] for n in MIXER_CASES}


@pytest.mark.parametrize("name", sorted(MIXER_CASES))
def test_cached_generation_equals_uncached(name):
    model = converted(name)
    ids, mask = left_padded(random_ids(2, 12), [3, 0])
    settings = dict(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    cached = model.generate(**settings, use_cache=True)
    uncached = model.generate(**settings, use_cache=False)
    assert cached.shape[1] == 12 + 32
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", sorted(MIXER_CASES))
def test_chunked_prefill_equals_one_shot(name):
    model = converted(name)
    ids, mask = left_padded(random_ids(2, 40), [5, 0])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    whole = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    cache, pieces = None, []
    for start, end in ((0, 7), (7, 8), (8, 29), (29, 40)):
        out = model(
            ids[:, start:end],
            attention_mask=mask[:, :end],
            position_ids=positions[:, start:end],
            cache=cache,
            use_cache=True,
        )
        cache = returned_cache(out)
        pieces.append(out.logits)
    assert torch.allclose(torch.cat(pieces, 1), whole, atol=1e-9)


@pytest.mark.parametrize("name", ["attention", "hedgehog_swa", "qwen3_5_attention"])
@pytest.mark.parametrize("pads", [[0, 0, 0], [5, 0, 2]], ids=["unpadded", "padded"])
def test_a_later_chunk_masks_its_softmax_layers_once_for_the_batch(name, pads, monkeypatch):
    """A chunk after cached tokens, in a batch without padding: the softmax layers (kept, or qwen3_5's) get one
    (1, 1, chunk, keys) mask for all sequences, not one per sequence (which SDPA's memory-efficient kernel turns into
    a float copy per sequence, the prefill's working set at large batch); padded, each sequence its own. The logits
    are those of one prefill either way."""
    model = converted(name).double()
    ids, mask = left_padded(random_ids(3, 40), pads)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    whole = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    masks, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        if attn_mask is not None:
            masks.append(tuple(attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    cache, pieces = None, []
    for start, end in ((0, 7), (7, 29), (29, 40)):
        out = model(ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end], cache=cache, use_cache=True)
        cache = returned_cache(out)
        pieces.append(out.logits)
    assert torch.allclose(torch.cat(pieces, 1), whole, atol=1e-10)
    later = [shape for shape in masks if shape[-1] > 7]
    assert later and {shape[0] for shape in later} == ({1} if pads == [0, 0, 0] else {3})
    assert {shape[-2:] for shape in later} == {(22, 29), (11, 40)}


def test_kept_layers_append_into_room_and_beam_search_reorders_them(monkeypatch):
    """A kept layer's decode step writes its position into the room after its keys and values: the buffer stays (no
    copy of the cache) until the room is used up. Where autograd records, it concatenates (a write into the room
    would change what the backward saved). With 4 positions of room, so that buffers are replaced often, greedy and
    beam-search generation (which reorders and repeats the cache) equal uncached generation."""
    monkeypatch.setattr(cache_module, "ROOM", 4)
    model = converted("hedgehog_swa")
    ids, mask = left_padded(random_ids(2, 12), [3, 0])
    cache = returned_cache(model(ids, attention_mask=mask, use_cache=True))
    layer = cache.layers[1]
    assert isinstance(layer, RoomyLayer) and layer.keys.shape[2] == 12 and layer._rooms == (None, None)
    buffers = []
    with torch.no_grad():
        for step in range(6):
            model(random_ids(2, 1, seed=step), attention_mask=torch.ones(2, 13 + step, dtype=torch.long), cache=cache, use_cache=True)
            buffers.append(layer._rooms[0].data_ptr())
            assert layer.keys.data_ptr() == buffers[-1] and layer.keys.shape[2] == 13 + step
    # the first step's buffer holds 12 + 1 positions and 4 of room: four more steps fit, the sixth needs a new one
    assert buffers[:5] == [buffers[0]] * 5 and buffers[5] != buffers[0]
    layer.offload()
    assert layer._rooms == (None, None) and layer.keys.shape[2] == 18
    for beams in (1, 3):
        settings = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False, num_beams=beams)
        assert torch.equal(model.generate(**settings), model.generate(**settings, use_cache=False))


@pytest.mark.parametrize("name", sorted(CONSTANT_STATE))
def test_state_size_does_not_grow_with_context(name):
    model = converted(name, max_position_embeddings=1024)
    sizes = []
    for length in (64, 512):
        out = model(random_ids(1, length), use_cache=True)
        layers = returned_cache(out).layers
        assert all(isinstance(layer, MixerState) for i, layer in enumerate(layers) if model.config.layers[i]["mixer"] != "attention")
        sizes.append([layer.nbytes() for layer in layers if isinstance(layer, MixerState)])
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("name", sorted(MIXER_CASES))
def test_save_reload_with_linearize(name, tmp_path):
    """Every mixer, alone, saves and reloads exactly; without linearize (remote code) a student holding every
    mixer is checked once, below."""
    model = converted(name)
    model.save_pretrained(tmp_path)
    saved = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_linearized.py", "configuration_linearized.py"} <= saved
    assert not any(n.endswith((".bin", ".pt")) for n in saved)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert type(reloaded).__name__ == "LinearizedForCausalLM"
    assert_reloaded(reloaded, model, input_ids=random_ids(2, 17))


def test_a_saved_student_loads_in_the_dtype_asked_for(tmp_path):
    """A student of a teacher loaded from a folder (whose config records its dtype, float32) reloads in the dtype that
    from_pretrained is given, and in its own saved dtype without one: its teacher's recorded dtype once won, so a float32
    student asked for in bfloat16 came back in float32."""
    tiny_model(dtype=torch.float32).save_pretrained(tmp_path / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    assert teacher.config.dtype == torch.float32
    linearize.convert(teacher, "gated_deltanet", window=4, keep_attention=[0]).save_pretrained(tmp_path / "student")
    ids = random_ids(1, 12)
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.bfloat16)
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert relative_error(half(ids).logits.float(), full(ids).logits) < 0.05
    half.save_pretrained(tmp_path / "half")
    assert {p.dtype for p in AutoModelForCausalLM.from_pretrained(tmp_path / "half").parameters()} == {torch.bfloat16}


def test_every_mixer_file_of_the_package_is_found_and_registers():
    """A new mixer is one new file: every mixer_*.py beside shipped_mixers is imported, and each registers a mixer."""
    files = {path.stem for path in Path(shipped_mixers.__file__).parent.glob("mixer_*.py")}
    assert set(shipped_mixers.MIXER_MODULES) == files
    assert {cls.__module__.rsplit(".", 1)[1] for cls in linearize.MIXERS.values()} == files


def test_a_saved_folder_carries_every_mixer_file_and_loads_them_all_as_remote_code(tmp_path):
    """Without linearize, the saved code registers every mixer, rebuilds a model holding one layer of each exactly,
    generates the same tokens with and without its cache, and saves a copy that carries every mixer file again."""
    hybrid = {mixer: [index] for index, (mixer, _) in enumerate(MIXER_LAYOUT) if mixer not in ("attention", "hedgehog")}
    options = {mixer: options for mixer, options in MIXER_LAYOUT if options}
    teacher = tiny_model(num_hidden_layers=len(MIXER_LAYOUT))
    model = linearize.convert(teacher, "hedgehog", keep_attention=[0], layers=[1], hybrid=hybrid, mixer_options=options)
    assert model.config.mixer_names() == [mixer for mixer, _ in MIXER_LAYOUT]
    saved, again = tmp_path / "saved", tmp_path / "again"
    model.save_pretrained(saved)
    mixer_files = sorted(f"{module}.py" for module in shipped_mixers.MIXER_MODULES)
    assert set(mixer_files) <= {path.name for path in saved.iterdir()}
    output = run_python(
        f"""
        import pathlib, sys
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(saved)!r}, trust_remote_code=True, dtype=torch.float64)
        print("mixers", sorted(sys.modules[type(model).__module__].MIXERS))
        model.save_pretrained({str(again)!r})
        print("files", sorted(path.name for path in pathlib.Path({str(again)!r}).glob("mixer_*.py")))
        """
        + reload_probe(model, tmp_path / "probe.pt", input_ids=random_ids(2, 9))
        + """
        cached = model.generate(probe["inputs"]["input_ids"], max_new_tokens=8, do_sample=False)
        uncached = model.generate(probe["inputs"]["input_ids"], max_new_tokens=8, do_sample=False, use_cache=False)
        print("generation equal", bool(torch.equal(cached, uncached)))
        """,
        cwd=tmp_path,
    )
    assert f"mixers {sorted(linearize.MIXERS)}" in output
    assert f"files {mixer_files}" in output
    assert "reloaded exactly True" in output and "generation equal True" in output


def test_save_pretrained_refuses_to_push_before_the_mixer_files_are_written(tmp_path):
    with pytest.raises(LinearizeError, match=r"call model.push_to_hub\(repo_id\)"):
        converted("hedgehog").save_pretrained(tmp_path, push_to_hub=True)


@pytest.mark.parametrize("name", sorted(n for n in MIXER_CASES if n != "attention"))
def test_new_parameters_get_gradients(name):
    model = converted(name)
    model.train()
    loss = model(random_ids(2, 30), labels=random_ids(2, 30, seed=3)).loss
    loss.backward()
    mixers = linearize.hf.mixers.mixers_in(model)
    for m in mixers:
        assert sum(p.numel() for p in m.new_parameters()) == m.cost(m.spec, m.options).new_parameters
    # A mixer that adds no parameters (gla, swa) trains the teacher's own projections: those need gradients.
    trained = [p for m in mixers for p in (m.new_parameters() or list(m.attn.parameters()))]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in trained)


@pytest.mark.parametrize(
    "name, module, function",
    [("gated_deltanet", "mixer_gated_deltanet", "gated_delta_rule"), ("bamba_mamba2", "mixer_bamba_mamba2", "simple_gla"), ("qwen3_5_gdn", "mixer_qwen3_5_gdn", "gated_delta_rule")],
)
def test_under_autocast_fla_reads_the_autocast_dtype(name, module, function, monkeypatch):
    """A float32 model trained under bf16 autocast (its hidden states stay float32) hands fla its q, k, v in bf16, as a
    bf16 model does: fla's float32 kernels are about twice as slow and take Triton minutes to compile."""
    import importlib

    mixer_module = importlib.import_module(f"linearize.hf.{module}")
    seen, original = [], getattr(mixer_module, function)
    monkeypatch.setattr(mixer_module, function, lambda *args, **kwargs: seen.append(kwargs["dtype"]) or original(*args, **kwargs))
    model = converted(name, dtype=torch.float32)
    ids = random_ids(1, 6)
    model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    layers = len(seen) // 2
    assert layers and seen == [torch.float32] * layers + [torch.bfloat16] * layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rope_of_one_token_is_transformers_own_to_the_bit(dtype):
    """`apply_rotary` rotates one token's q and k together (fewer operations for a decode step), and a prefill's
    apart: both give transformers' Llama RoPE bit for bit; a partial rotary (cos narrower than the heads) still
    rotates only its lanes."""
    generator = torch.Generator().manual_seed(5)
    for length in (1, 3):
        q = torch.randn(2, 6, length, 8, generator=generator).to(dtype)
        k = torch.randn(2, 2, length, 8, generator=generator).to(dtype)
        angles = torch.rand(2, length, 4, generator=generator, dtype=torch.float64) * 7
        cos, sin = (torch.cat((f(angles), f(angles)), dim=-1).to(dtype) for f in (torch.cos, torch.sin))
        expected = apply_rotary_pos_emb(q, k, cos, sin)
        got = apply_rotary(q, k, (cos, sin))
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        narrow_q, narrow_k = apply_rotary(q, k, (cos[..., :4], sin[..., :4]))
        assert torch.equal(narrow_q[..., 4:], q[..., 4:]) and torch.equal(narrow_k[..., 4:], k[..., 4:])
        half = apply_rotary_pos_emb(q[..., :4], k[..., :4], cos[..., :4], sin[..., :4])
        assert torch.equal(narrow_q[..., :4], half[0]) and torch.equal(narrow_k[..., :4], half[1])
