"""Kernel selection: the PyTorch path on CPU, fla chosen on CUDA when usable, a one-time warning and the PyTorch
path when it is missing, too old or the shape rules it out, and clear errors when forcing fla where it cannot run."""

import warnings

import pytest
import torch

import linearize
from linearize import LinearizeError
from linearize.decode import GraphDecoder, end_at_eos
from linearize.hf import kernel_dispatch as kernels
from linearize.hf.ops_gated import chunk_gla
from tests.tiny import greedy_steps, random_ids, tiny_model


def test_cpu_uses_the_pytorch_path():
    assert kernels.backend(torch.device("cpu"), (64, 64), torch.float32) == ("torch", None)
    q = k = v = torch.randn(1, 2, 9, 8)
    gk = torch.nn.functional.logsigmoid(torch.randn(1, 2, 9, 8))
    o, state = kernels.gla(q, k, v, gk, output_state=True)
    ref, ref_state = chunk_gla(q, k, v, gk)
    assert torch.equal(o, ref) and torch.equal(state, ref_state)


@pytest.mark.parametrize("decode", [False, True])
def test_grouped_queries_take_and_give_one_state_per_key_head(decode):
    """The dispatch's chunked form computes grouped queries once per key head, and its recurrence (decode) on the key
    heads repeated: both equal the chunked form of the repeated heads, with the state cut to one per key head."""
    torch.manual_seed(3)
    q = torch.randn(1, 6, 5, 8, dtype=torch.float64)
    k, v = torch.randn(1, 2, 5, 8, dtype=torch.float64), torch.randn(1, 2, 5, 9, dtype=torch.float64)
    gk = torch.nn.functional.logsigmoid(torch.randn(1, 2, 5, 8, dtype=torch.float64))
    state = torch.randn(1, 2, 8, 9, dtype=torch.float64)
    o, final = kernels.gla(q, k, v, gk, initial_state=state, decode=decode, output_state=True)
    ref, ref_final = chunk_gla(q, *(x.repeat_interleave(3, 1) for x in (k, v, gk)),
                               initial_state=state.repeat_interleave(3, 1))
    torch.testing.assert_close(o, ref, atol=1e-12, rtol=0)
    assert final.shape == (1, 2, 8, 9) and final.is_contiguous()
    torch.testing.assert_close(final, ref_final[:, ::3], atol=1e-12, rtol=0)


def test_forcing_fla_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "fla")
    with pytest.raises(LinearizeError, match="LINEARIZE_KERNELS=fla needs CUDA tensors"):
        kernels.backend(torch.device("cpu"), (64, 64), torch.float32)


def test_unknown_kernel_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNELS", "triton")
    with pytest.raises(LinearizeError, match="is not one of auto, torch, fla"):
        kernels.mode()


def test_shapes_fla_cannot_take_are_named():
    assert "up to 256" in kernels.shape_problem((512, 64), torch.bfloat16)
    assert "float16/bfloat16/float32" in kernels.shape_problem((64, 64), torch.float64)
    assert kernels.shape_problem((64, 128), torch.bfloat16) is None


@pytest.mark.parametrize("tilelang", [False, True], ids=["no-tilelang", "tilelang"])
def test_which_gated_backward_fla_may_train_through_on_hopper(monkeypatch, request, tilelang):
    """fla 0.6 on Hopper with Triton 3.4 to 3.7.0: the gated backward trains through fla only with tilelang, and then
    not simple_gla in 16 bits (fla raises there: H200, thirty-second session); other GPUs and Tritons are not held."""
    import importlib.util

    import triton

    find_spec = importlib.util.find_spec

    def machine(capability, version):  # the facts gated_backward_problem reads, asked anew
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(triton, "__version__", version)
        kernels._held_backward.cache_clear()

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "tilelang" and tilelang else find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    request.addfinalizer(kernels._held_backward.cache_clear)  # the real machine's facts, asked anew after the test
    machine((9, 0), "3.6.0")
    for kernel in ("gated_delta_rule", "simple_gla"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            problem = kernels.gated_backward_problem(kernel, dtype)
            if tilelang and (kernel == "gated_delta_rule" or dtype == torch.float32):
                assert problem is None
            else:
                assert "wrong on Hopper with Triton 3.6.0" in problem
                assert ("float32 only, not " + str(dtype)) in problem if tilelang else "or tilelang" in problem
    machine((9, 0), "3.7.1")
    assert kernels.gated_backward_problem("simple_gla", torch.bfloat16) is None
    machine((8, 0), "3.6.0")
    assert kernels.gated_backward_problem("simple_gla", torch.bfloat16) is None


def test_training_through_a_held_gated_kernel_takes_the_pytorch_path(monkeypatch):
    """Where `gated_backward_problem` names a problem for the kernel and the dtype fla would read, a call that needs
    gradients warns once and runs the PyTorch path; without gradients (inference) it stays on fla."""
    from linearize.hf.ops_gated import chunk_simple_gla

    monkeypatch.setattr(kernels, "backend", lambda device, head_dims, dtype: ("fla", None))
    held = []
    monkeypatch.setattr(kernels, "gated_backward_problem", lambda kernel, dtype=torch.float32: held.append((kernel, dtype)) or f"{kernel} held")
    monkeypatch.setattr(kernels, "_warned", set())
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    g = -torch.rand(1, 2, 5)
    with pytest.warns(UserWarning, match="simple_gla held for training; using the PyTorch path"):
        o, _ = kernels.simple_gla(q, q, q, g, dtype=torch.bfloat16)
    assert held == [("simple_gla", torch.bfloat16), ("simple_gla", torch.float32), ("simple_gla", torch.bfloat16)]
    assert o.dtype == torch.float32  # the PyTorch path's
    o.sum().backward()
    seen = {}
    monkeypatch.setattr(kernels, "fla_chunk_simple_gla", _fla_stand_in(chunk_simple_gla, seen, "simple_gla"), raising=False)
    with torch.no_grad():
        kernels.simple_gla(q, q, q, g, dtype=torch.bfloat16)
    assert seen["simple_gla"][:3] == [torch.bfloat16] * 3 and len(held) == 3  # inference: fla, nothing asked
    with pytest.warns(UserWarning, match="gated_delta_rule held"):
        kernels.gated_delta_rule(q, q, q, g, torch.rand(1, 2, 5))
    assert held[-1] == ("gated_delta_rule", torch.float32)


def test_a_16_bit_simple_gla_trains_through_fla_in_float32_where_only_that_trains(monkeypatch):
    """With tilelang on Hopper and Triton 3.4-3.7.0, fla trains simple_gla in float32 only: a bf16 model's `mamba2`
    then hands fla q, k and v in float32 while gradients flow (and bf16 otherwise), and gets the PyTorch path's
    output and gradients."""
    from linearize.hf.ops_gated import chunk_simple_gla

    seen = {}
    monkeypatch.setattr(kernels, "fla_chunk_simple_gla", _fla_stand_in(chunk_simple_gla, seen, "simple_gla"), raising=False)
    monkeypatch.setattr(kernels, "backend", lambda device, head_dims, dtype: ("fla", None))
    monkeypatch.setattr(kernels, "gated_backward_problem", lambda kernel, dtype=torch.float32: None if dtype == torch.float32 else "16 bits held")
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=generator, requires_grad=True) for _ in range(3))
    g = -torch.rand(1, 2, 9, generator=generator)
    o, _ = kernels.simple_gla(q, k, v, g, dtype=torch.bfloat16)
    assert seen["simple_gla"][:4] == [torch.float32] * 4
    expected, _ = chunk_simple_gla(q, k, v, g)
    torch.testing.assert_close(o, expected)
    grads = torch.autograd.grad(o.sum(), (q, k, v))
    torch.testing.assert_close(grads, torch.autograd.grad(expected.sum(), (q, k, v)))
    with torch.no_grad():
        kernels.simple_gla(q, k, v, g, dtype=torch.bfloat16)
    assert seen["simple_gla"][:3] == [torch.bfloat16] * 3


def test_graph_decoder_refuses_what_it_cannot_capture():
    with pytest.raises(LinearizeError, match="needs the model on a CUDA device"):
        GraphDecoder(linearize.convert(tiny_model(dtype=torch.float32), "hedgehog"))
    with pytest.raises(LinearizeError, match=r"softmax layers grow their cache\); use model.generate\(\)"):
        GraphDecoder(linearize.convert(tiny_model(dtype=torch.float32), "hedgehog", keep_attention=[0]))
    kept = linearize.convert(tiny_model(dtype=torch.float32), "hedgehog_swa", window=4, keep=2, keep_block=8)
    with pytest.raises(LinearizeError, match="needs the model on a CUDA device"):  # kept keys: two kinds of step, captured
        GraphDecoder(kept)
    kept.config.layers[1]["options"]["keep_block"] = 4
    with pytest.raises(LinearizeError, match=r"decide their kept keys every \[4, 8\] steps; give them one keep_block"):
        GraphDecoder(kept)


def test_captured_steps_replay_each_kind_at_its_positions(monkeypatch):
    """Kept keys decided every 4 steps (keep_block 4): after 5 tokens, the steps at counts 5 and 7 are captured, one of
    each kind, and each later step replays the graph of its kind (a deciding step after counts 7, 11, ...)."""
    decoder = object.__new__(GraphDecoder)
    decoder.period, replayed = 4, []

    class Graph:
        def __init__(self, kind):
            self.kind = kind

        def replay(self):
            replayed.append(self.kind)

    captured = []

    def capture(cache, token, position, seen):
        captured.append(seen)
        return Graph(decoder.decides(seen)), token.clone(), position.clone(), token.clone()

    monkeypatch.setattr(decoder, "capture", capture)
    steps = decoder.steps(None, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), 5)
    assert captured == [5, 7] and set(steps.graphs) == {False, True}
    for _ in range(8):
        steps.replay(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))
    assert replayed == [False, False, True, False, False, False, True, False] and steps.seen == 13
    decoder.period = 0  # no kept keys: one kind, one graph
    assert set(decoder.steps(None, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), 5).graphs) == {False}


def test_end_at_eos_pads_after_each_rows_end_and_cuts_after_the_last():
    tokens = torch.tensor([[5, 2, 7, 2, 8], [5, 6, 9, 7, 8], [3, 4, 6, 1, 2]])
    eos = torch.tensor([2, 9])
    assert end_at_eos(tokens, eos, 0).tolist() == [[5, 2, 0, 0, 0], [5, 6, 9, 0, 0], [3, 4, 6, 1, 2]]
    assert end_at_eos(tokens[:2], eos, 0).tolist() == [[5, 2, 0], [5, 6, 9]]
    assert end_at_eos(tokens[1:], torch.tensor([2]), 0).tolist() == [[5, 6, 9, 7, 8], [3, 4, 6, 1, 2]]
    assert torch.equal(end_at_eos(tokens, None, None), tokens)


def test_end_at_eos_of_greedy_steps_is_what_generate_returns():
    """A tiny gated DeltaNet whose first row emits the end-of-sequence token (id 2) at step 11 of 20: the CUDA-graph
    decoder's raw greedy tokens, ended this way, must equal generate()'s new tokens."""
    model = linearize.convert(tiny_model(dtype=torch.float32, hidden_size=128, num_attention_heads=2, num_key_value_heads=1), "gated_deltanet")
    ids = random_ids(2, 40)
    raw = greedy_steps(model, ids, 20)
    eos = model.generation_config.eos_token_id
    assert (raw == eos).any(), "the case must contain an end-of-sequence token"
    expected = model.generate(ids, max_new_tokens=20, do_sample=False)[:, 40:]
    assert torch.equal(end_at_eos(raw, torch.tensor([eos]), model.generation_config.pad_token_id), expected)


@pytest.mark.parametrize(
    "problem, version, reason",
    [
        ("flash-linear-attention is not usable (ModuleNotFoundError: No module named 'fla')", None, "not usable"),
        (None, "0.5.2", "flash-linear-attention 0.5.2 is older than"),
    ],
)
def test_cuda_without_a_usable_fla_warns_once_and_falls_back(monkeypatch, problem, version, reason):
    """backend() only looks at the device type, so a CUDA device object stands in for a GPU here."""
    monkeypatch.setattr(kernels, "FLA_PROBLEM", problem)
    monkeypatch.setattr(kernels, "FLA_VERSION", version)
    monkeypatch.setattr(kernels, "_warned", set())
    cuda = torch.device("cuda")
    with pytest.warns(UserWarning, match=reason):
        path, why = kernels.backend(cuda, (64, 64), torch.bfloat16)
    assert path == "torch" and reason in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.backend(cuda, (64, 64), torch.bfloat16)[0] == "torch"  # once only
    monkeypatch.setenv("LINEARIZE_KERNELS", "fla")
    with pytest.raises(LinearizeError, match=r"LINEARIZE_KERNELS=fla, but .*pip install 'linearize\[gpu\]'"):
        kernels.backend(cuda, (64, 64), torch.bfloat16)


def test_a_usable_fla_is_chosen_on_cuda_unless_the_shape_rules_it_out(monkeypatch):
    monkeypatch.setattr(kernels, "FLA_PROBLEM", None)
    monkeypatch.setattr(kernels, "FLA_VERSION", "0.6.0")
    monkeypatch.setattr(kernels, "_warned", set())
    cuda = torch.device("cuda")
    assert kernels.backend(cuda, (64, 65), torch.bfloat16) == ("fla", None)
    with pytest.warns(UserWarning, match="up to 256"):
        assert kernels.backend(cuda, (512, 64), torch.bfloat16)[0] == "torch"
    monkeypatch.setenv("LINEARIZE_KERNELS", "torch")
    assert kernels.backend(cuda, (64, 64), torch.bfloat16) == ("torch", None)


def test_a_compiled_decode_step_keeps_the_recurrence_in_pytorch(monkeypatch):
    """Under torch.compile (a static cache's decode step) the one-token recurrence stays in PyTorch ops, which
    inductor fuses; prefill and an explicit LINEARIZE_KERNELS=fla still take fla."""
    monkeypatch.setattr(kernels, "backend", lambda device, head_dims, dtype: ("fla", None))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q = torch.randn(1, 2, 1, 8)
    assert not kernels._pick(q, q, decode=True)
    assert kernels._pick(q, q, decode=False)
    g, beta = -torch.rand(1, 2, 1), torch.rand(1, 2, 1)
    o, state = kernels.gated_delta_rule(q, q, q, g, beta, decode=True, output_state=True)
    expected, expected_state = kernels.recurrent_gated_delta_rule(q, q, q, g, beta)
    torch.testing.assert_close(o, expected)
    torch.testing.assert_close(state, expected_state)
    monkeypatch.setenv("LINEARIZE_KERNELS", "fla")
    assert kernels._pick(q, q, decode=True)


def _fla_stand_in(reference, seen, name):
    """An fla op's stand-in on the CPU: fla's (B, T, H, D) layout in and out, records the dtypes it was given, computes
    with the PyTorch reference in float32 and returns the output in q's dtype, as fla does."""

    def op(q, k, v, *gates, g=None, beta=None, scale=None, initial_state=None, output_final_state=False):
        gates = gates or (g, beta)
        seen[name] = [None if t is None else t.dtype for t in (q, k, v, *gates)] + [(q.shape[-1], v.shape[-1])]
        heads = [None if t is None else t.transpose(1, 2).float() for t in (q, k, v, *gates)]
        if name == "simple_gla" and heads[3] is None:
            heads[3] = heads[0].new_zeros(heads[0].shape[:3])
        o, state = reference(*heads, scale=scale, initial_state=initial_state)
        return o.to(q.dtype).transpose(1, 2), state if output_final_state else None

    return op


@pytest.mark.parametrize("mixer", ["gated_deltanet", "qwen3_5_gdn", "gla", "hedgehog", "mamba2", "bamba_mamba2"])
def test_fla_reads_a_bfloat16_models_inputs_in_bfloat16(monkeypatch, mixer):
    """A bf16 model's mixers compute q, k, v and gates in float32, and fla reads them in bf16 (half the bytes, its
    accumulation float32 either way), with even head dimensions only: gla's values carry a normaliser column (65 wide
    in SmolLM2), which goes to fla one zero column wider (fla refuses an odd 16-bit backward); hedgehog's feature maps
    go in float32 (their gradients lose too much in bf16); log-decays stay float32. The stand-ins put fla's layout around the PyTorch reference, so the logits match the
    PyTorch path's to bf16 rounding."""
    from linearize.hf.ops_delta import chunk_gated_delta_rule
    from linearize.hf.ops_gated import chunk_simple_gla

    seen = {}
    for name, reference in (("gla", chunk_gla), ("simple_gla", chunk_simple_gla), ("gated_delta_rule", chunk_gated_delta_rule)):
        monkeypatch.setattr(kernels, f"fla_chunk_{name}", _fla_stand_in(reference, seen, name), raising=False)
    model = linearize.convert(tiny_model(dtype=torch.bfloat16, hidden_size=128, num_attention_heads=4, num_key_value_heads=2), mixer)
    ids = random_ids(2, 37)
    with torch.no_grad():
        expected = model(ids).logits.float()
        monkeypatch.setattr(kernels, "backend", lambda device, head_dims, dtype: ("fla", None))
        got = model(ids).logits.float()
    ((name, dtypes),) = seen.items()
    *dtypes, (key_dim, value_dim) = dtypes
    if mixer == "hedgehog":  # its feature maps' float32 output, as it is: the normaliser column makes 33, unpadded
        assert value_dim == 33 and dtypes[:3] == [torch.float32] * 3, dtypes
    else:  # gla's values with their normaliser column: 32 + 1, one zero column more
        assert value_dim == (34 if mixer == "gla" else 32) and key_dim % 2 == 0
        assert dtypes[:3] == [torch.bfloat16] * 3, dtypes  # q, k, v
    assert dtypes[3] in (torch.float32, None), dtypes  # g: log-decays (None: plain linear attention)
    if name == "gated_delta_rule":
        assert dtypes[4] == torch.bfloat16  # beta
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2


def _recurrent_stand_in(reference, seen, name):
    """fla's fused recurrent op's stand-in: its keyword `gk` / `g` as the chunked one's positional gate."""
    chunked = _fla_stand_in(reference, seen, name)

    def op(q, k, v, gk=None, g=None, beta=None, **kwargs):
        if beta is not None:
            return chunked(q, k, v, g=g, beta=beta, **kwargs)
        return chunked(q, k, v, gk if gk is not None else g, **kwargs)

    return op


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("name", ["gla", "simple_gla", "gated_delta_rule"])
def test_odd_head_dimensions_reach_fla_even_in_16_bits_and_come_back_exact(monkeypatch, name, decode):
    """K = 5 and V = 7 in bf16: fla gets one zero column on q, k (and gla's log-decays) and v, and on the initial
    state, and the output, the final state and every gradient equal the unpadded computation on the same bf16 inputs
    (the stand-ins compute with the PyTorch reference in float32, as fla accumulates); in float32 nothing is padded."""
    from linearize.hf import ops_delta, ops_gated

    chunked = {"gla": ops_gated.chunk_gla, "simple_gla": ops_gated.chunk_simple_gla, "gated_delta_rule": ops_delta.chunk_gated_delta_rule}
    recurrent = {"gla": ops_gated.recurrent_gla, "simple_gla": ops_gated.recurrent_simple_gla,
                 "gated_delta_rule": ops_delta.recurrent_gated_delta_rule}
    reference = (recurrent if decode else chunked)[name]
    seen = {}
    monkeypatch.setattr(kernels, f"fla_chunk_{name}", _fla_stand_in(chunked[name], seen, name), raising=False)
    monkeypatch.setattr(kernels, f"fla_recurrent_{name}", _recurrent_stand_in(recurrent[name], seen, name), raising=False)
    monkeypatch.setattr(kernels, "backend", lambda device, head_dims, dtype: ("fla", None))
    generator = torch.Generator().manual_seed(0)
    length = 1 if decode else 19
    q, k = torch.randn(2, 2, 2, length, 5, generator=generator)
    v = torch.randn(2, 2, length, 7, generator=generator)
    state = torch.randn(2, 2, 5, 7, generator=generator)
    gate = {"gla": torch.nn.functional.logsigmoid(torch.randn(2, 2, length, 5, generator=generator)),
            "simple_gla": torch.nn.functional.logsigmoid(torch.randn(2, 2, length, generator=generator)),
            "gated_delta_rule": torch.nn.functional.logsigmoid(torch.randn(2, 2, length, generator=generator))}[name]
    extra = [torch.rand(2, 2, length, generator=generator)] if name == "gated_delta_rule" else []
    leaves = [t.requires_grad_() for t in (q, k, v, gate, state, *extra)]
    weights = torch.randn(2, 2, length, 7, generator=generator), torch.randn(2, 2, 5, 7, generator=generator)

    def run(via_fla: bool):
        for t in leaves:
            t.grad = None
        q, k, v, gate, state, *extra = leaves
        if via_fla:
            o, final = getattr(kernels, name)(q, k, v, gate, *extra, initial_state=state, decode=decode, output_state=True,
                                              dtype=torch.bfloat16)
        else:  # the unpadded computation on the inputs fla reads: bf16 q, k, v (and beta), float32 gates and state
            rounded = [t.bfloat16().float() for t in (q, k, v)] + [gate] + [t.bfloat16().float() for t in extra]
            o, final = reference(*rounded, initial_state=state)
            o = o.bfloat16()
        ((o.float() * weights[0]).sum() + (final * weights[1]).sum()).backward()
        return [o.float().detach(), final.detach()] + [t.grad.clone() for t in leaves]

    got, expected = run(True), run(False)
    *_, (key_dim, value_dim) = seen[name]
    assert (key_dim, value_dim) == (6, 8)
    assert got[0].shape == expected[0].shape == (2, 2, length, 7) and got[1].shape == (2, 2, 5, 7) and got[1].is_contiguous()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    seen.clear()
    with torch.no_grad():
        getattr(kernels, name)(q, k, v, gate, *extra, initial_state=state, decode=decode, output_state=True)
    assert seen[name][-1] == (5, 7)  # float32: as they are


@pytest.mark.core
@pytest.mark.parametrize("output_state", [False, True])
@pytest.mark.parametrize("name", ["gla", "simple_gla", "gated_delta_rule"])
def test_a_compiled_prefill_keeps_fla_in_one_graph(monkeypatch, name, output_state):
    """fla wraps its chunked kernels in `torch.compiler.disable`, which breaks a compiled graph at every call; a compiled
    prefill (no gradients) calls them through the custom op `FLA_CHUNK` instead: here a stand-in wrapped as fla wraps
    its own compiles in one graph (fullgraph) and gives the eager call's output and state, the reference's."""
    from linearize.hf import ops_delta, ops_gated

    reference = {"gla": ops_gated.chunk_gla, "simple_gla": ops_gated.chunk_simple_gla, "gated_delta_rule": ops_delta.chunk_gated_delta_rule}[name]
    stand_in = torch.compiler.disable(_fla_stand_in(reference, {}, name))
    monkeypatch.setattr(kernels, f"fla_chunk_{name}", stand_in, raising=False)
    monkeypatch.setattr(kernels, "backend", lambda device, head_dims, dtype: ("fla", None))
    generator = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 19, 8, generator=generator)
    state = torch.randn(2, 3, 8, 8, generator=generator)
    gate = torch.nn.functional.logsigmoid(torch.randn(2, 3, 19, *([8] if name == "gla" else []), generator=generator))
    extra = [torch.rand(2, 3, 19, generator=generator)] if name == "gated_delta_rule" else []

    def prefill(q, k, v, gate, state, *extra):
        return getattr(kernels, name)(q, k, v, gate, *extra, initial_state=state, output_state=output_state)

    with torch.no_grad():
        eager = prefill(q, k, v, gate, state, *extra)
        compiled = torch.compile(prefill, fullgraph=True, backend="eager")(q, k, v, gate, state, *extra)
        expected = reference(q, k, v, gate, *extra, initial_state=state)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[0], expected[0], rtol=1e-4, atol=1e-4)
    if output_state:
        torch.testing.assert_close(compiled[1], eager[1])
        torch.testing.assert_close(compiled[1], expected[1], rtol=1e-4, atol=1e-4)
    else:
        assert compiled[1] is None and eager[1] is None
