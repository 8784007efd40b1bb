"""The fla kernel path against the PyTorch reference, on CUDA (skipped elsewhere; run on a GPU machine with
`LINEARIZE_KERNELS` unset and flash-linear-attention installed: `python -m pytest -q -m gpu tests/test_gpu.py`)."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import linearize
from linearize.decode import GraphDecoder
from linearize.hf import kernel_dispatch as kernels
from linearize.hf.ops_delta import chunk_gated_delta_rule
from linearize.hf.ops_gated import chunk_gla, chunk_simple_gla
from linearize.hf.ops_kept import kept_window_linear
from linearize.hf.ops_window import chunk_window_linear
from linearize.hf.triton_window import window_linear_prefill
from tests.test_triton_step import MIXERS as FUSED_MIXERS
from tests.test_triton_step import PAIRS as FUSED_PAIRS
from tests.test_triton_step import assert_close, assert_steps_match, force_fused_step, window_option
from tests.test_triton_window import per_query_head, window_inputs
from tests.tiny import compiled_twice, greedy_steps, left_padded, random_ids, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(kernels.fla_problem() is not None, reason=str(kernels.fla_problem())),
]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


LIMIT = {torch.float32: 5e-3, torch.bfloat16: 3e-2}  # fla uses tf32 for float32 matmuls


def inputs(kind, length, dtype, with_state, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    b, h, d = 2, 4, 64

    def r(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    q, k, v = r(b, h, length, d), r(b, h, length, d), r(b, h, length, d)
    if kind == "delta":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        gates = (F.logsigmoid(r(b, h, length)) / 4, torch.sigmoid(r(b, h, length)))
    elif kind == "gla":
        gates = (F.logsigmoid(r(b, h, length, d)) / 8,)
    else:
        gates = (F.logsigmoid(r(b, h, length)) / 4,)
    state = r(b, h, d, d) * 0.1 if with_state else None
    return [x.to(dtype) for x in (q, k, v)], gates, state


# The references are the PyTorch chunked forms in float64 (themselves tested against the naive forms on CPU);
# the naive forms build T x T x K tensors, too slow at these lengths.
CASES = {
    "gla": (kernels.gla, chunk_gla),
    "simple_gla": (kernels.simple_gla, chunk_simple_gla),
    "delta": (kernels.gated_delta_rule, chunk_gated_delta_rule),
}


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("length", [1, 63, 500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
def test_fla_forward_matches_reference(kind, length, dtype, with_state):
    fast, reference = CASES[kind]
    (q, k, v), gates, state = inputs(kind, length, dtype, with_state)
    assert kernels.backend(q.device, (64, 64), dtype)[0] == "fla"
    with torch.no_grad():
        o, final = fast(q, k, v, *gates, initial_state=state, decode=length == 1, output_state=True)
        ref_o, ref_final = reference(*(t.double() for t in (q, k, v, *gates)), initial_state=None if state is None else state.double())
    assert o.dtype == dtype and torch.isfinite(o).all()
    assert rel(o, ref_o) < LIMIT[dtype]
    assert rel(final, ref_final) < LIMIT[dtype]


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("length", [63, 500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
def test_fla_gradients_match_reference(kind, length, dtype, with_state):
    problem = None if kind == "gla" else kernels.gated_backward_problem("gated_delta_rule" if kind == "delta" else kind, dtype)
    if problem is not None:
        pytest.skip(f"{problem}: training uses the PyTorch path here")
    fast, reference = CASES[kind]
    (q, k, v), gates, state = inputs(kind, length, dtype, with_state)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, *gates)]
    o, _ = fast(*leaves, initial_state=state, output_state=True)
    weights = torch.randn_like(o)
    (o * weights).sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_o, _ = reference(*ref_leaves, initial_state=None if state is None else state.double())
    (ref_o * weights.double()).sum().backward()
    for got, ref in zip((t.grad for t in leaves), (t.grad for t in ref_leaves)):
        assert rel(got, ref) < 4 * LIMIT[dtype]


MIXERS = {
    "hedgehog": {"feature_dim": 16},
    "hedgehog_swa": {"window": 8},
    "hedgehog_swa+decay+linear_rope": {"window": 8, "decay": 0.9, "linear_rope": False},
    "hedgehog_swa+keep": {"window": 8, "keep": 4, "keep_block": 8},
    "gla": {"window": 8},
    "swa": {"window": 8},
    "gated_deltanet": {},
    "gated_deltanet+window": {"window": 8},
    "mamba2": {},
    "mamba2+window": {"window": 8},
}
# A case named MIXER+VARIANT runs MIXER with other options.
NAMES = sorted(n for n in MIXERS if n.split("+")[0] in linearize.MIXERS)


@pytest.mark.parametrize("name", NAMES)
def test_mixer_on_gpu_both_paths_and_cached_generation(name, monkeypatch):
    model = linearize.convert(tiny_model(dtype=torch.float32, hidden_size=128, num_attention_heads=2, num_key_value_heads=1), name.split("+")[0], **MIXERS[name])
    model = model.cuda()
    ids, mask = left_padded(random_ids(2, 70), [5, 0])
    ids, mask = ids.cuda(), mask.cuda()
    fast = model(ids, attention_mask=mask).logits
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    slow = model(ids, attention_mask=mask).logits
    monkeypatch.delenv("LINEARIZE_KERNELS")
    assert rel(fast, slow) < 5e-3
    settings = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert torch.equal(model.generate(**settings), model.generate(**settings, use_cache=False))


@pytest.mark.parametrize("name", ["gated_deltanet", "qwen3_5_gdn", "gla", "hedgehog", "mamba2"])
def test_a_bfloat16_model_on_fla_matches_its_pytorch_path(name, monkeypatch):
    """A bf16 model at SmolLM2's heads (9 on 3, head dim 64), left-padded, 300 tokens: fla reads q, k and v in bf16
    (`kernel_dispatch`), the PyTorch path computes in float32; the logits agree to bf16 rounding."""
    teacher = tiny_model(dtype=torch.bfloat16, num_hidden_layers=2, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    model = linearize.convert(teacher, name).cuda()
    ids, mask = left_padded(random_ids(2, 300), [37, 0])
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        fast = model(ids, attention_mask=mask).logits
        monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
        slow = model(ids, attention_mask=mask).logits
    assert fast.dtype == torch.bfloat16
    assert rel(fast[1], slow[1]) < 3e-2 and rel(fast[0, 37:], slow[0, 37:]) < 3e-2


@pytest.mark.parametrize("name", ["hedgehog", "gla", "gated_deltanet", "mamba2"])
def test_a_bfloat16_training_step_on_fla_matches_its_pytorch_path(name, monkeypatch):
    """hedgehog's and gla's values carry their normaliser as one more column (V = 65), which fla 0.6 will not
    backpropagate in 16 bits (it stopped lolcats_linear's bf16 training on an H200): gla's go to fla one zero column
    wider (`kernel_dispatch._evened`), hedgehog's feature maps in float32 (in bf16 their bias's gradient came back 15%
    off), and a bf16 model's training step runs, its gradients within bf16 rounding of the PyTorch path's. The gated
    mixers run where fla trains its gated kernels at all (Triton >= 3.7.1, or tilelang on Hopper); mamba2's
    `simple_gla` then reads q, k, v in float32 where tilelang takes only those."""
    gated = {"gated_deltanet": "gated_delta_rule", "mamba2": "simple_gla"}
    problem = kernels.gated_backward_problem(gated[name]) if name in gated else None
    if problem is not None:
        pytest.skip(f"{problem}: {name} trains on the PyTorch path only here")
    teacher = tiny_model(dtype=torch.bfloat16, num_hidden_layers=2, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    model = linearize.convert(teacher, name).cuda().requires_grad_(True)
    ids, mask = left_padded(random_ids(2, 300), [37, 0])
    ids, mask = ids.cuda(), mask.cuda()

    def gradients():
        model.zero_grad()
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    fast = gradients()
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    slow = gradients()
    assert fast and fast.keys() == slow.keys()
    for n in fast:
        assert rel(fast[n], slow[n]) < 5e-2, n


@pytest.mark.parametrize("name", NAMES)
def test_graph_decoder_equals_generate(name):
    """hedgehog_swa's kept keys are decided on the host every keep_block steps: GraphDecoder captures a step of each
    kind (here window 4, blocks of 8, so 20 new tokens take both kinds, twice)."""
    options = dict(MIXERS[name])
    if "window" in options:
        options["window"] = 4  # the prompt fills the window, so every step has the same shapes
    model = linearize.convert(tiny_model(dtype=torch.float32, hidden_size=128, num_attention_heads=2, num_key_value_heads=1), name.split("+")[0], **options)
    model = model.cuda()
    ids = random_ids(2, 40).cuda()
    decoder = GraphDecoder(model)
    assert torch.equal(decoder.generate(ids, 20, ignore_eos=True), greedy_steps(model, ids, 20))
    assert torch.equal(decoder.generate(ids, 20), model.generate(ids, max_new_tokens=20, do_sample=False)[:, 40:])


# Where a compiled chunked prefill still breaks its graph, and why (BENCHMARKS.md, sixty-third session).
GRAPH_BREAKS_LEFT = {
    "hedgehog_swa+keep": "its chunked prefill reads the count of tokens seen on the host (`int(state.seen)`)",
    **dict.fromkeys(
        ("swa", "gla", "gated_deltanet+window", "mamba2+window"),
        "flex_window reads whether every key is real (`bool(key_mask.all())`); compiled through, the key mask concatenated "
        "in the graph failed to lower into torch 2.11's flex_attention kernels at every query length (sixty-fourth session)",
    ),
}


@pytest.mark.parametrize("name", NAMES)
def test_static_cache_generate_compiles_and_equals_dynamic(name):
    """On CUDA, generate() with a static cache compiles its decode step (CUDA graphs) and gives the same tokens; kept
    keys (blocks of 8 over 24 steps) are decided after the steps that end a block: the first decision eagerly, the
    later ones (and every one of the later calls) replayed from its CUDA graph. A chunked prefill (chunks of 16, 16 and
    8) runs its chunks through the same compiled forward: first on a fresh cache, whose first chunk writes the states
    eagerly, last on the reused one, every chunk compiled. Outside `GRAPH_BREAKS_LEFT` nothing the compiler traces
    breaks its graph: fla's chunked kernels (`torch.compiler.disable`d) run as a custom op, hedgehog_swa's window
    kernel's branch reads no dict's truth (a break inside a layer ran the rest of every layer as frames of their own,
    recompiled per layer: a 4K prefill of `hedgehog_swa` at SmolLM2's shape 5.6x slower than its teacher's, H100,
    sixty-third session)."""
    model = linearize.convert(tiny_model(dtype=torch.float32, hidden_size=128, num_attention_heads=2, num_key_value_heads=1), name.split("+")[0], **MIXERS[name])
    model = model.cuda()
    ids, mask = left_padded(random_ids(2, 40), [5, 0])
    settings = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=24, min_new_tokens=24, do_sample=False)
    dynamic = model.generate(**settings)
    torch._dynamo.reset()
    counters.clear()
    assert torch.equal(model.generate(**settings, cache_implementation="static", prefill_chunk_size=16), dynamic)
    for _ in range(2):  # the second call replays what the first compiled and recorded
        assert torch.equal(model.generate(**settings, cache_implementation="static"), dynamic)
    assert torch.equal(model.generate(**settings, cache_implementation="static", prefill_chunk_size=16), dynamic)
    assert hasattr(model, "_compiled_call")
    if name not in GRAPH_BREAKS_LEFT:
        assert counters["graph_break"].total() == 0, dict(counters["graph_break"])


def test_export_of_a_cpu_student_where_fla_is_installed(tmp_path):
    """transformers' qwen3_5 calls fla's kernels on any tensors once fla is installed: export checks a CPU student on
    CUDA there, and the export, reloaded on CUDA, computes the student's logits (fla on both sides)."""
    from transformers import AutoModelForCausalLM

    from linearize.export import export

    teacher = tiny_model(dtype=torch.float32, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    model = linearize.convert(teacher, "qwen3_5_gdn", keep_attention=[1], keep_as="qwen3_5_attention")
    out = export(model, tmp_path / "native", log=lambda m: None)
    assert next(model.parameters()).device.type == "cpu"
    native = AutoModelForCausalLM.from_pretrained(out).cuda()
    ids = random_ids(2, 40).cuda()
    with torch.no_grad():
        assert rel(native(input_ids=ids).logits, model.cuda()(input_ids=ids).logits) < LIMIT[torch.float32]


GGUF = os.environ.get("LINEARIZE_SMOLLM2_GGUF")


@pytest.fixture(scope="module")
def real_teacher():
    if GGUF is None:
        pytest.skip("set LINEARIZE_SMOLLM2_GGUF to the SmolLM2-135M-Instruct .gguf file")
    return linearize.load_teacher(GGUF)


@pytest.mark.parametrize("name", ["hedgehog", "hedgehog_swa", "gla", "gated_deltanet", "mamba2"])
def test_real_teacher_same_greedy_tokens_on_both_paths(name, real_teacher, monkeypatch):
    teacher, tokenizer = real_teacher
    student = linearize.convert(copy.deepcopy(teacher), name).cuda()
    inputs = tokenizer("Elizabeth walked to Netherfield through the mud, and", return_tensors="pt").to("cuda")
    fast = student.generate(**inputs, max_new_tokens=16, do_sample=False)
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    slow = student.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert torch.equal(fast, slow), (tokenizer.decode(fast[0]), tokenizer.decode(slow[0]))


# The fused decode steps (triton_step.py) on CUDA, against the PyTorch path: in float32 the GPU may contract products
# and sums (FMA) and sum in another order, so the caches differ by float32 rounding; bfloat16 rounds on the bits, as
# on the CPU.
FUSED_TOLERANCE = {
    torch.float32: dict(heads=1e-4, unequal=1.0, recurrent=1e-4, S=1e-4, ssm=1e-4, conv=0, k=1e-6, v=0, mask=0, z=1e-4, fk=1e-4, err=1e-4, at=0),
    torch.bfloat16: dict(heads=3e-2, unequal=0.05, recurrent=1e-3, S=1e-3, ssm=1e-3, conv=0, k=0, v=0, mask=0, z=1e-3, fk=1e-4, err=1e-3, at=0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mixer,shape", FUSED_PAIRS, ids=[f"{m}-{s}" for m, s in FUSED_PAIRS])
def test_fused_step_matches_the_pytorch_path(monkeypatch, mixer, shape, dtype):
    """Every decode step from a left-padded prefill until the window has turned over: heads and next state."""
    assert_steps_match(monkeypatch, mixer, shape, dtype, 3, 3, FUSED_TOLERANCE[dtype], device="cuda")


@pytest.mark.parametrize("mixer", FUSED_MIXERS)
def test_fused_step_generates_as_uncached_eager_and_compiled(monkeypatch, mixer):
    """A tiny model (window 4 where the mixer has one) on CUDA: greedy tokens through the fused step, with a dynamic cache and with a compiled
    static one (CUDA graphs), equal uncached generation."""
    teacher = tiny_model(dtype=torch.float32, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    model = linearize.convert(teacher, mixer, **window_option(mixer, 4)).cuda()
    ids, mask = left_padded(random_ids(2, 40), [5, 0])
    settings = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=24, min_new_tokens=24, do_sample=False)
    uncached = model.generate(**settings, use_cache=False)
    calls = force_fused_step(monkeypatch)
    assert torch.equal(model.generate(**settings), uncached)
    assert len(calls) == 3 * 23
    monkeypatch.undo()  # the compiled step calls the fused step as it is, not through the counting wrapper
    for _ in range(2):  # the second call replays what the first compiled and recorded
        assert torch.equal(model.generate(**settings, cache_implementation="static"), uncached)


# The fused prefill against the PyTorch path: float32 products in both (input_precision "ieee"), so float32 rounding;
# in bfloat16 the kernel multiplies the feature maps in tf32 and rounds its weights to bfloat16 before the values.
PREFILL_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
@pytest.mark.parametrize("window", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_prefill_matches_the_pytorch_path(dtype, window, with_state):
    """hedgehog_swa's prefill kernel at SmolLM2's shape (9 query heads on 3 kv heads, head dim 64, feature dim 64), 2K
    tokens, row 0 left-padded, per-head weights and a softcap: heads and next state against `chunk_window_linear`."""
    q, k, v, fq, fk, mask, state = window_inputs(2048, window, dtype, with_state, device="cuda", shape=(2, 9, 3, 64, 128))
    share = torch.rand(9, generator=torch.Generator("cuda").manual_seed(1), device="cuda")
    options = dict(window=window, scaling=64**-0.5, sm_weight=share, ln_weight=1 - share, key_mask=mask, softcap=30.0)
    repeated = None if state is None else {n: per_query_head(t, 3) if t.dim() > 2 else t for n, t in state.items()}
    with torch.no_grad():
        o, new = window_linear_prefill(q, k, v, fq, fk, state=state, output_state=True, **options)
        expected, expected_state = chunk_window_linear(
            q, per_query_head(k, 3), per_query_head(v, 3), fq, per_query_head(fk, 3), state=repeated, output_state=True, **options
        )
    assert o.dtype == dtype
    assert_close(o, expected, "heads", PREFILL_TOLERANCE[dtype])
    for name, tensor in expected_state.items():
        mine = per_query_head(new[name], 3) if tensor.dim() > 2 else new[name]
        if name in ("S", "z"):
            assert_close(mine, tensor, name, 1e-5)
        else:
            assert torch.equal(mine, tensor), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kept_keys_prefill_kernel_matches_the_pytorch_path(monkeypatch, dtype):
    """hedgehog_swa's kept keys' prefill kernel (triton_kept) at SmolLM2's shape, window 256, 128 kept keys, blocks of
    64: 2K tokens in two calls carried by the state (the second starting inside a block), row 0 left-padded, per-head
    weights and a softcap: heads against the PyTorch path, and the same next state."""
    q, k, v, fq, fk, mask, _ = window_inputs(2048, 256, dtype, False, device="cuda", shape=(2, 9, 3, 64, 128))
    share = torch.rand(9, generator=torch.Generator("cuda").manual_seed(1), device="cuda")
    options = dict(window=256, keep=128, block=64, scaling=64**-0.5, sm_weight=share, ln_weight=1 - share, softcap=30.0)

    def in_two_calls():
        state, outs = None, []
        for start, end in ((0, 700), (700, 2048)):
            piece = [t[:, :, start:end] for t in (q, k, v, fq, fk)]
            out, state = kept_window_linear(*piece, key_mask=mask[:, start:end], state=state, position=start, output_state=True, **options)
            outs.append(out)
        return torch.cat(outs, dim=2), state

    with torch.no_grad():
        o, new = in_two_calls()
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
        expected, expected_state = in_two_calls()
    assert o.dtype == dtype
    assert_close(o, expected, "heads", PREFILL_TOLERANCE[dtype])
    assert all(torch.equal(new[name], tensor) for name, tensor in expected_state.items())


# The backward's gradients against autograd through the PyTorch path, relative to each one's largest entry: float32
# products in both (the interpreter's tests see 8e-6 against float64 at 110 tokens, in a weight's gradient, a sum that
# cancels); in bfloat16 the kernel also rounds do, its weights and the score gradients to bfloat16 before their products
# (5e-3 at 65 tokens). Both pass on an H200 (thirteenth and fourteenth sessions).
PREFILL_GRADIENT_TOLERANCE = {torch.float32: 5e-4, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("window", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_prefill_gradients_match_the_pytorch_path(dtype, window):
    """hedgehog_swa's prefill kernel with its backward at SmolLM2's shape (9 query heads on 3 kv heads, head dim 64,
    feature dim 64), 2K tokens, row 0 left-padded, per-head weights and a softcap: the gradients of q, k, v, fq, fk and
    the weights' share against autograd through `chunk_window_linear` (grouped heads repeated: theirs sum the group)."""
    q, k, v, fq, fk, mask, _ = window_inputs(2048, window, dtype, False, device="cuda", shape=(2, 9, 3, 64, 128))
    share = torch.rand(9, generator=torch.Generator("cuda").manual_seed(1), device="cuda")
    grad = torch.randn(q.shape, generator=torch.Generator("cuda").manual_seed(2), device="cuda").to(dtype)
    options = dict(window=window, scaling=64**-0.5, key_mask=mask, softcap=30.0)

    def gradients(path, repeat):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, fq, fk, share)]
        q_, k_, v_, fq_, fk_, sm = leaves
        o = path(q_, repeat(k_), repeat(v_), fq_, repeat(fk_), sm_weight=sm, ln_weight=1 - sm, **options)[0]
        return torch.autograd.grad((o * grad).sum(), leaves)

    mine = gradients(window_linear_prefill, lambda x: x)
    theirs = gradients(chunk_window_linear, lambda x: per_query_head(x, 3))
    for name, got, expected in zip(("q", "k", "v", "fq", "fk", "share"), mine, theirs):
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert_close(got, expected, name, PREFILL_GRADIENT_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_prefill_in_a_compiled_training_step(monkeypatch, dtype):
    """hedgehog_swa's eager training step through its prefill kernel and backward against a recipe's compiled training
    step (`compile_layers`, one graph per decoder layer; it runs the PyTorch form, `compiled_training`): a two-layer model at SmolLM2's heads (9 on 3, head dim 64), left-padded, 300 tokens, window
    64, every parameter trained. In float32 the loss and gradients equal the eager step's (which takes the kernels too).
    In bf16 compiled and eager steps round differently (inductor keeps the ops around the kernel in float32; on the
    H200 one gradient of the two differed by 6.9e-2 of its largest entry): each is measured against the float32 step of
    the same weights, and the compiled one may be off it by at most twice the eager one's error, plus 1e-2."""
    from linearize.hf import mixer_hedgehog

    teacher = tiny_model(dtype=torch.float32, num_hidden_layers=2, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    reference = linearize.convert(teacher, "hedgehog_swa", window=64).cuda()
    model = copy.deepcopy(reference).to(dtype)
    for m in (reference, model):
        m.requires_grad_(True)
    ids, mask = left_padded(random_ids(2, 300), [37, 0])
    ids, mask = ids.cuda(), mask.cuda()
    calls = []
    launch = mixer_hedgehog.window_linear_prefill
    monkeypatch.setattr(mixer_hedgehog, "window_linear_prefill", lambda *a, **k: calls.append(1) or launch(*a, **k))

    def step(m):
        m.zero_grad()
        loss = m(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss.detach().float(), {name: p.grad.float() for name, p in m.named_parameters()}

    loss, grads = step(model)
    assert len(calls) == 2
    exact_loss, exact = step(reference) if dtype != torch.float32 else (loss, grads)
    monkeypatch.setattr(mixer_hedgehog, "window_linear_prefill", launch)
    compiled_loss, compiled = compiled_twice(model, lambda: step(model))
    assert compiled.keys() == grads.keys() == exact.keys()
    if dtype == torch.float32:
        assert_close(compiled_loss, loss, "loss", 1e-4)
        for name, tensor in grads.items():
            assert_close(compiled[name], tensor, name, 1e-4)
        return

    def gap(actual, expected):  # as assert_close measures it: the largest difference over the largest value
        return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()

    assert_close(compiled_loss, exact_loss, "loss", 2 * gap(loss, exact_loss) + 1e-2)
    for name, tensor in exact.items():
        assert_close(compiled[name], tensor, name, 2 * gap(grads[name], tensor) + 1e-2)


def test_kept_keys_in_a_compiled_training_step():
    """hedgehog_swa with kept keys trains on its PyTorch form (the prefill kernel is inference only), as `lolcats_keep`
    compiles it (`compile_layers`): a two-layer model at SmolLM2's heads, left-padded, 300 tokens, window 64, 16 keys kept
    a kv head decided 32 at a time; the compiled step's loss and gradients equal the eager step's in float32."""
    teacher = tiny_model(dtype=torch.float32, num_hidden_layers=2, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    model = linearize.convert(teacher, "hedgehog_swa", window=64, keep=16, keep_block=32).cuda().requires_grad_(True)
    ids, mask = left_padded(random_ids(2, 300), [37, 0])
    ids, mask = ids.cuda(), mask.cuda()

    def step():
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    loss, grads = step()
    compiled_loss, compiled = compiled_twice(model, step)
    assert_close(compiled_loss, loss, "loss", 1e-4)
    assert compiled.keys() == grads.keys()
    for name, tensor in grads.items():
        assert_close(compiled[name], tensor, name, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [2, 4099])
def test_fused_convolution_matches_the_pytorch_path(monkeypatch, dtype, length):
    """A prefill's short convolution through triton_conv.py at SmolLM2's heads (960 channels), left-padded, with a
    cache: q, k, v within 1e-6 of the PyTorch path's (the same float32 sums), the cache equal."""
    from linearize.hf.mixer_gated_deltanet import convolve_heads
    from linearize.hf.triton_conv import conv_prefill_problem

    g = torch.Generator(device="cuda").manual_seed(length)
    q = torch.randn(2, length, 9, 64, generator=g, device="cuda").to(dtype).transpose(1, 2)
    k, v = (torch.randn(2, length, 3, 64, generator=g, device="cuda").to(dtype).transpose(1, 2) for _ in range(2))
    weight = torch.randn(960, 4, generator=g, device="cuda")
    cache = torch.randn(2, 960, 3, generator=g, device="cuda").to(dtype).float()
    mask = torch.ones(2, length, dtype=torch.bool, device="cuda")
    mask[0, : length // 2] = False
    with torch.no_grad():
        assert conv_prefill_problem(torch.zeros(1, 1, 1, device="cuda", dtype=dtype), weight.t()) is None
        got = convolve_heads(q, k, v, weight, mask, cache)
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
        expected = convolve_heads(q, k, v, weight, mask, cache)
    for name, mine, theirs in zip(("q", "k", "v"), got, expected):
        assert_close(mine, theirs, name, 1e-6)
    assert torch.equal(got[3], expected[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [3, 4099])
def test_fused_feature_maps_match_the_pytorch_path(monkeypatch, dtype, length):
    """Hedgehog's feature maps of a prefill through triton_features.py at SmolLM2's query heads (9 of 64), a trained-like
    map, x strided as a projection leaves it: within 1e-5 of the PyTorch path's float32 maps."""
    from linearize.hf.mixer_hedgehog import HedgehogFeatureMap
    from linearize.hf.triton_features import feature_map_problem

    g = torch.Generator(device="cuda").manual_seed(length)
    feature_map = HedgehogFeatureMap(9, 64, 64).cuda()
    with torch.no_grad():
        feature_map.weight.add_(torch.randn(feature_map.weight.shape, generator=g, device="cuda") * 0.3)
        feature_map.bias.add_(torch.randn(feature_map.bias.shape, generator=g, device="cuda"))
    feature_map = feature_map.to(dtype)
    x = (torch.randn(2, length, 9, 64, generator=g, device="cuda") * 3).to(dtype).transpose(1, 2)
    with torch.no_grad():
        assert feature_map_problem(x, feature_map.weight, feature_map.bias) is None
        got = feature_map(x)
        monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
        expected = feature_map(x)
    assert got.dtype == expected.dtype == torch.float32
    assert_close(got, expected, "feature maps", 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [3, 4099])
def test_fused_rope_matches_the_pytorch_path(monkeypatch, dtype, length):
    """RoPE on a prefill's q and k through triton_rope.py at SmolLM2's heads (9 and 3 of 64), strided as a projection
    leaves them, cos and sin from transformers' rotary embedding: q, k and their gradients equal the PyTorch path's in
    bfloat16 (each product and sum rounded as PyTorch rounds) and within 1e-6 in float32 (where the compiler may fuse a
    product into a sum)."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding

    from linearize.hf.attention import apply_rotary
    from linearize.hf.triton_rope import rotary_problem

    g = torch.Generator(device="cuda").manual_seed(length)
    q = (torch.randn(2, length, 9, 64, generator=g, device="cuda") * 3).to(dtype).transpose(1, 2).requires_grad_(True)
    k = (torch.randn(2, length, 3, 64, generator=g, device="cuda") * 3).to(dtype).transpose(1, 2).requires_grad_(True)
    rotary = LlamaRotaryEmbedding(LlamaConfig(head_dim=64, hidden_size=576, num_attention_heads=9, rope_theta=100000.0)).cuda()
    cos, sin = rotary(q, torch.arange(length, device="cuda")[None] + 5)
    grads = tuple(torch.randn(x.shape, generator=g, device="cuda").to(dtype) for x in (q, k))
    assert rotary_problem(q, k, cos, sin) is None
    got = apply_rotary(q, k, (cos, sin))
    got += torch.autograd.grad(got, (q, k), grads)
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
    expected = apply_rotary(q, k, (cos, sin))
    expected += torch.autograd.grad(expected, (q, k), grads)
    for name, mine, theirs in zip(("q", "k", "dq", "dk"), got, expected):
        assert_close(mine, theirs, name, 0.0 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("length", [1, 4099])
def test_prefix_state_kernels_match_the_pytorch_sums(length):
    """The prefix states of an inference prefill (triton_window.py's two kernels) at SmolLM2's kv heads (3, feature maps
    128 wide, values 64), bf16 v strided as a projection leaves it, pads masked, from a carried state: within 1e-5 of the
    PyTorch path's (float32 products, a different order of sums)."""
    from linearize.hf import triton_window

    g = torch.Generator(device="cuda").manual_seed(length)
    fk = torch.softmax(torch.randn(2, 3, length, 128, generator=g, device="cuda"), -1)
    v = torch.randn(2, length, 3, 64, generator=g, device="cuda").bfloat16().transpose(1, 2)
    mask = torch.rand(2, length, generator=g, device="cuda") > 0.2
    S = torch.rand(2, 3, 128, 64, generator=g, device="cuda").requires_grad_(True)
    z = torch.rand(2, 3, 128, generator=g, device="cuda")
    with torch.no_grad():
        got = triton_window.prefix_states(fk, v, mask, S, z, triton_window.CHUNK)
    expected = triton_window.prefix_states(fk, v, mask, S, z, triton_window.CHUNK)
    assert expected[0].requires_grad and not got[0].requires_grad
    for name, mine, theirs in zip(("S", "z"), got, expected):
        assert_close(mine, theirs.detach(), name, 1e-5)


def later_chunk_memory(model, ids: torch.Tensor, prefix: int) -> tuple[int, torch.Tensor]:
    """Bytes a chunk after `prefix` cached tokens raises the CUDA peak by, and its last logits."""
    from linearize.hf.cache import returned_cache

    with torch.no_grad():
        cache = returned_cache(model(ids[:, :prefix], use_cache=True, logits_to_keep=1))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        last = model(ids[:, prefix:], cache=cache, use_cache=True, logits_to_keep=1).logits
        return torch.cuda.max_memory_allocated() - before, last


def test_a_later_chunk_of_an_unpadded_batch_holds_one_mask_not_one_per_sequence(monkeypatch):
    """bf16 on CUDA, batch 32: a 1,024-token chunk after 7,168 cached tokens. transformers' mask, one per sequence,
    raised the peak by a byte an element (32 x 1,024 x 8,192 bytes = 256 MiB) more than the batch's one mask on an
    H200 (256 and 260 MiB, beside some 320 MiB of the chunk's own cache growth and activations in both); kept layers of
    both kinds must save at least three quarters of that. Every chunked prefill's last logits are the one-shot
    prefill's."""
    from linearize.hf.modeling_linearized import LinearizedForCausalLM

    tiny = tiny_model(dtype=torch.bfloat16, hidden_size=128, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8192)
    ids = random_ids(32, 8192).cuda()
    added = {}
    for keep_as in ("attention", "qwen3_5_attention"):
        model = linearize.convert(copy.deepcopy(tiny), "hedgehog_swa", keep_attention=[1], keep_as=keep_as, window=4).cuda()
        with torch.no_grad():
            whole = model(ids, use_cache=False, logits_to_keep=1).logits
        added[keep_as], last = later_chunk_memory(model, ids, 7168)
        assert rel(last, whole) < LIMIT[torch.bfloat16], keep_as
        if keep_as == "attention":
            with monkeypatch.context() as patch:
                patch.setattr(LinearizedForCausalLM, "_one_mask_for_the_batch", lambda self, *args: None)
                added["transformers"], last = later_chunk_memory(model, ids, 7168)
            assert rel(last, whole) < LIMIT[torch.bfloat16]
    mib = {name: round(value / 2**20) for name, value in added.items()}
    saved = 3 * (ids.shape[0] - 1) * 1024 * 8192 // 4
    assert added["attention"] < added["transformers"] - saved, mib
    assert added["qwen3_5_attention"] < added["transformers"] - saved, mib


@pytest.mark.parametrize("keep_as", ["attention", "qwen3_5_attention"])
def test_a_decode_step_runs_its_softmax_layers_on_flash_not_cudnn(keep_as):
    """An eager bf16 decode step of a converted model's kept softmax layers, unpadded: SDPA runs flash attention, not
    cuDNN, whose graph builds cost 37-66 ms at each new key length on an H200 (twentieth session). Its logits are the
    uncached forward's."""
    from torch.profiler import ProfilerActivity, profile

    tiny = tiny_model(dtype=torch.bfloat16, num_hidden_layers=2, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    model = linearize.convert(tiny, "hedgehog_swa", keep_attention=[1], keep_as=keep_as, window=4).cuda().eval()
    ids = random_ids(1, 38).cuda()
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :37], cache=cache, use_cache=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step = model(ids[:, 37:], cache=cache, use_cache=True, position_ids=torch.tensor([[37]], device="cuda")).logits
        whole = model(ids, use_cache=False).logits[:, -1:]
    attention = sorted({event.name for event in prof.events() if "attention" in event.name})
    assert any("flash_attention" in name for name in attention), attention
    assert not any("cudnn_attention" in name for name in attention), attention
    assert rel(step, whole) < LIMIT[torch.bfloat16]


def test_a_profiled_stage_on_the_gpu_counts_kernels_not_annotations():
    """On CUDA the profile's kernel time is the kernels' own (the phases' ranges, which CUDA also shows, left out), so it
    fits in the wall time, and the matrix products of the layers are found as such."""
    from linearize.distillation import AttentionTransferConfig, Session
    from linearize.distillation.stages import attention_transfer
    from tests.tiny import tiny_data

    model = linearize.convert(tiny_model("llama", dtype=torch.float32), "hedgehog_swa", window=4).cuda()
    run = Session(progress=False, log=lambda message: None)
    attention_transfer.run(model, tiny_data(seq_len=32), AttentionTransferConfig(tokens=32 * 2 * 4, batch_size=2, profile_steps=2), run)
    profile = run.reports[-1]["profile"]
    assert 0 < profile["kernel_ms_per_step"] <= 1.05 * profile["wall_ms_per_step"]
    assert profile["kernel_groups_ms_per_step"]["matrix products"] > 0
    assert all("device_ms" in phase for phase in profile["phases"].values())


@pytest.mark.parametrize("k, temperature, ce_grad", [(0, 1.0, True), (0, 2.0, False), (256, 1.0, True), (1000, 2.0, False)])
def test_the_fused_kl_matches_the_pytorch_rows_at_a_real_vocabulary(k, temperature, ce_grad):
    """Llama-3's vocabulary (128,256: 31 blocks and a short one) in bf16, as lora_kd hands it the logits under
    autocast: the kernel's losses and gradients against the PyTorch form's, for the teacher's logits (k = 0: the dense
    kernel) and for its top k kept as the cache keeps them (float16 log-probabilities, int32 ids: the top-k kernel)."""
    from linearize.distillation import kd, triton_kl
    from linearize.distillation.teacher_logits import top_k

    g = torch.Generator(device="cuda").manual_seed(0)
    rows, vocab = 48, 128256
    student, teacher = ((torch.randn(rows, vocab, generator=g, device="cuda") * 4).bfloat16() for _ in range(2))
    if k:
        kept = top_k(teacher[None], k, temperature)
        teacher = kd.TeacherTopK(kept.log_probs.half(), kept.indices.int(), kept.log_rest).rows()
    kernel, problem = (triton_kl.sparse_kl_rows, triton_kl.sparse_kl_problem) if k else (triton_kl.kl_rows, triton_kl.fused_kl_problem)
    targets = torch.randint(vocab, (rows,), generator=g, device="cuda")
    targets[::7] = -1
    kl_scale = torch.rand(rows, generator=g, device="cuda")
    ce_scale = torch.rand(rows, generator=g, device="cuda") if ce_grad else None
    assert problem(student, teacher) is None
    got = kernel(student, teacher, targets, temperature, kl_scale, ce_scale, torch.bfloat16)
    expected = kd._chunk_losses(student, teacher, targets, temperature, kl_scale, ce_scale, torch.float32)
    assert torch.allclose(got[0], expected[0], rtol=1e-4, atol=1e-4) and torch.allclose(got[1], expected[1], rtol=1e-5, atol=1e-4)
    for a, b in zip(got[2:], expected[2:]):
        assert (a is None) == (b is None)
        if b is not None:
            assert a.dtype == torch.bfloat16 and rel(a, b) < 1e-2


def test_the_top_k_kernels_keep_a_small_rest_exact_on_the_gpu(monkeypatch):
    """The float64 difference that keeps a rest of 4e-10 of a row's mass (tests/test_kd.py and test_teacher_logits.py
    check it under Triton's interpreter) holds as compiled for the GPU, where the two sums' terms must come out of the
    same float32 arithmetic: the teacher's top-k rest and the top-k KL's, against the PyTorch forms."""
    import math

    from linearize.distillation import kd, teacher_logits, triton_kl

    vocab = 9000
    logits = torch.zeros(2, vocab, device="cuda")
    logits[:, :3] = 20.0 + math.log(vocab)
    logits[:, 8000] = 21.0 + math.log(vocab)
    log_probs, ids, rest = triton_kl.top_k_rows(logits, 4, 1.0)
    monkeypatch.setenv("LINEARIZE_FUSED_STEP", "off")
    expected = teacher_logits.top_k(logits[None], 4, 1.0)
    assert torch.equal(ids.sort(-1).values, expected.indices[0].sort(-1).values) and -23 < rest.max() < -20
    assert torch.allclose(rest, expected.log_rest[0], rtol=1e-5)
    top = kd.TeacherTopK(torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.09]] * 2, device="cuda")), ids, torch.log(torch.full((2,), 0.01, device="cuda")))
    scale, targets = torch.ones(2, device="cuda"), torch.zeros(2, dtype=torch.long, device="cuda")
    got = triton_kl.sparse_kl_rows(logits, top, targets, 1.0, scale, None, torch.float32)
    reference = kd._chunk_losses(logits, top, targets, 1.0, scale, None, torch.float32)
    assert torch.allclose(got[0], reference[0], rtol=1e-5) and torch.allclose(got[2], reference[2], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("teacher_top_k", [0, 8], ids=["full", "cached"])
def test_a_training_step_on_cuda_never_waits_for_the_gpu(monkeypatch, teacher_top_k):
    """Between logged steps, an optimizer step of lora_kd (the KD losses through the fused KL, the deferred finite
    check, the fused optimizer) makes no call that synchronises the host with the GPU (torch's sync debug mode, each
    warning recorded with the frames that made it); with cached teacher logits too, over six windows, so that the
    watched steps both compute and read back. transformers' own mask code reads the position ids once a forward to
    detect packed sequences (`find_packed_sequence_indices`, outside compiled code): it is left out here, as it finds
    none."""
    import traceback
    import warnings

    from transformers import masking_utils

    from linearize.distillation import LoraKDConfig, Session, loop
    from linearize.distillation.stages import lora_kd
    from tests.tiny import tiny_data

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    seen, original = [], loop._Stage.optimizer_step

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            seen.append(" <- ".join(f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}" for frame in traceback.extract_stack()[-2:-9:-1]))

    def watched(self, step):
        if not 2 <= step < self.steps - 1:
            return original(self, step)
        assert self.defer
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")  # outside the recording: switching it on warns that it is experimental
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                return original(self, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(loop._Stage, "optimizer_step", watched)
    model = linearize.convert(tiny_model("llama", dtype=torch.float32), "hedgehog_swa", window=4).cuda()
    config = LoraKDConfig(tokens=32 * 2 * 6, batch_size=2, log_every=100, teacher_top_k=teacher_top_k)
    lora_kd.run(model, tiny_data(seq_len=32, train_chars=210 if teacher_top_k else 20_000), config, Session(progress=False, log=lambda message: None))
    assert not seen, seen
