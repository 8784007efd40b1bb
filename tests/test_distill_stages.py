"""The distillation stages on tiny models: what trains, what stays bit-identical, and that the losses fall."""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

import linearize
from linearize.distillation import AttentionTransferConfig, LoraKDConfig, Session, layer_errors
from linearize.distillation.loop import TrainConfig, compile_layers, train
from linearize.distillation.stages import attention_transfer, lora_kd
from linearize.hf.errors import LinearizeError
from tests.tiny import assert_reloaded, tiny_data, tiny_model

LOG = []


@pytest.fixture(scope="module")
def data():
    return tiny_data(seq_len=32)


def session(**kwargs):
    return Session(log=LOG.append, progress=False, **kwargs)


def student(mixer="hedgehog_swa", **options):
    options = options or ({"window": 4} if mixer in ("hedgehog_swa", "gla") else {})
    return linearize.convert(tiny_model("llama", dtype=torch.float32), mixer, **options)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def kl_to(teacher_logits, model, windows):
    # The teacher's logits come from before distillation: after a merge, teacher_mode would use merged weights.
    with torch.no_grad():
        return lora_kd.kd_losses(model(input_ids=windows, use_cache=False).logits, teacher_logits, windows, 1.0)[0].item()


def test_attention_transfer_lowers_every_layer_and_trains_only_new_parameters(data):
    model = student()
    windows = data.heldout_windows(32, 1024)
    before, weights = layer_errors(model, windows), snapshot(model)
    config = AttentionTransferConfig(tokens=32 * 4 * 12, batch_size=4, lr=0.1, log_every=1)
    run = session()
    model = attention_transfer.run(model, data, config, run)
    after = layer_errors(model, windows)
    assert set(before) == set(after) == {0, 1, 2}
    for i in before:
        assert after[i]["normalized"] < 0.6 * before[i]["normalized"], (i, before[i], after[i])
    new = {name for name, p in model.named_parameters() if any(p is q for m in linearize.hf.mixers.mixers_in(model) for q in m.new_parameters())}
    assert new and all(".feature_" in n or "window_logit" in n for n in new)
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]) != (name in new), name
        assert not p.requires_grad
    report = run.reports[-1]
    assert report["steps"] == 12 and report["layers"] == [0, 1, 2]
    assert 0 < report["first_step_seconds"] <= report["seconds"]
    first, last = report["first"], report["last"]
    assert len(first["layer_mse"]) == len(first["layer_normalized"]) == 3
    assert all(b < a for a, b in zip(first["layer_normalized"], last["layer_normalized"]))


def test_gradient_checkpointing_gives_the_same_training(data):
    results = []
    for checkpointing in (False, True):
        model = student()
        config = AttentionTransferConfig(tokens=32 * 2 * 3, batch_size=2, gradient_checkpointing=checkpointing)
        results.append(snapshot(attention_transfer.run(model, data, config, session())))
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_compiled_stages_train_like_eager_ones(data):
    """torch.compile (inductor) on each decoder layer fuses the mixers' operations: both stages must reach the same
    weights, the identical layers share one compiled graph, and every stage hands back a plain eager model."""
    results, keys = [], []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = student()
        graphs = counters["stats"]["unique_graphs"]
        model = attention_transfer.run(model, data, AttentionTransferConfig(tokens=32 * 2 * 3, batch_size=2, compile=compiled), session())
        assert counters["stats"]["unique_graphs"] - graphs == (1 if compiled else 0)  # one graph for all three layers
        assert not any(m._compiled_call_impl for m in model.modules())
        model = lora_kd.run(model, data, LoraKDConfig(tokens=32 * 2 * 2, batch_size=2, lr=1e-2, compile=compiled), session())
        assert not any(m._compiled_call_impl for m in model.modules())
        results.append(snapshot(model))
        keys.append(list(model.state_dict()))
    assert keys[1] == keys[0]
    start = snapshot(student())
    changed = [k for k in start if not torch.equal(results[0][k], start[k])]
    assert any("feature" in k for k in changed) and any("q_proj" in k for k in changed)
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_hybrid_stages_train_like_eager_ones_within_dynamos_recompile_limit(data, monkeypatch):
    """hybrid_gdn's layers (gated delta rule with a softmax window, one layer kept as attention) compile too, and
    train its mixer parameters and window shares as eager does. They compile to several variants per stage (softmax
    and converted layers, with and without gradients in, the teacher's pass), and earlier stages' variants stay: past
    dynamo's limit the rest would run eagerly. Here a limit of 2 fails loudly if a stage's raised limit is missing."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = linearize.convert(tiny_model("llama", dtype=torch.float32), "gated_deltanet", keep_attention=[1], window=4)
        model = attention_transfer.run(model, data, AttentionTransferConfig(tokens=32 * 2 * 3, batch_size=2, compile=compiled), session())
        kd = LoraKDConfig(tokens=32 * 2 * 2, batch_size=2, lr=1e-2, compile=compiled, train_new_parameters=True)
        results.append(snapshot(lora_kd.run(model, data, kd, session())))
    assert torch._dynamo.config.recompile_limit == 2
    start = snapshot(linearize.convert(tiny_model("llama", dtype=torch.float32), "gated_deltanet", keep_attention=[1], window=4))
    changed = [k for k in start if not torch.equal(results[0][k], start[k])]
    assert any("window_logit" in k for k in changed) and any("q_proj" in k for k in changed)
    # Inductor's code sums in other orders than eager's, by CPU (AVX2 or AVX-512), and Adam's first steps (about lr times
    # the gradient's sign) carry a gradient's last bits into the weights: 1.8e-5 apart at most on a 2-core AMD EPYC
    # (AVX2), against steps of lr = 1e-2 that a wrong gradient would change.
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-4, atol=5e-5, msg=name)


def test_a_new_stage_length_compiles_static_graphs_of_its_own(monkeypatch):
    """Compiled layers keep static shapes when the next stage changes the length: with dynamo's automatic dynamic
    shapes the second length would trace with a symbolic size (which inductor failed to generate on CUDA)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")
    compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **kwargs: compile(module, backend=counter, **kwargs))
    torch._dynamo.reset()
    model = linearize.convert(tiny_model("llama", dtype=torch.float32), "gated_deltanet", window=4)
    compile_layers(model)
    with torch.no_grad():
        for length in (16, 40):
            model(torch.randint(0, 100, (2, length)), use_cache=False)
    symbolic = [n.name for g in counter.graphs for n in g.graph.nodes if isinstance(n.meta.get("example_value"), torch.SymInt)]
    assert counter.frame_count == 2 and symbolic == []
    torch._dynamo.reset()


def test_a_compiled_stage_that_fails_hands_back_an_eager_model(data):
    model = student()
    compiled = []

    def fail(wrapped, batch, weights):
        compiled.append(sum(bool(m._compiled_call_impl) for m in model.modules()))
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        train(model, data, TrainConfig(tokens=64, compile=True), session(), dict(model.named_parameters()), fail)
    assert compiled == [3]  # the three decoder layers, compiled for the stage
    assert not any(m._compiled_call_impl for m in model.modules())


def test_mixers_without_parameters_are_skipped_with_a_note(data):
    model = student("gla")
    weights = snapshot(model)
    run = session()
    LOG.clear()
    attention_transfer.run(model, data, AttentionTransferConfig(tokens=1000), run)
    assert any("add no parameters" in m for m in LOG) and any("nothing to train" in m for m in LOG)
    assert run.reports[-1]["skipped"] == "no new parameters"
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


@pytest.mark.core
def test_lora_kd_lowers_kl_keeps_the_teacher_and_merges_into_a_plain_model(data, tmp_path):
    teacher = tiny_model("llama", dtype=torch.float32)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10)  # a peaked next-token distribution, as trained models have
    windows = data.heldout_windows(32, 512)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=windows).logits
    model = linearize.convert(teacher, "hedgehog_swa", window=4)
    kl_before = kl_to(teacher_logits, model, windows)
    base = snapshot(model)
    config = LoraKDConfig(tokens=32 * 4 * 48, batch_size=4, lr=0.003, warmup_steps=4, merge=False, train_new_parameters=True, log_every=4)
    peft_model = lora_kd.run(model, data, config, session())

    with torch.no_grad(), peft_model.disable_adapter(), linearize.teacher_mode(peft_model):
        assert torch.allclose(peft_model(input_ids=windows).logits, teacher_logits, atol=1e-5, rtol=0)
    for name, p in peft_model.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        plain = name.replace(".base_layer", "")
        assert torch.equal(p, base[plain]) != (".feature_" in name or "window_logit" in name), name
    with torch.no_grad():
        adapted = peft_model(input_ids=windows, use_cache=False).logits

    merged = peft_model.merge_and_unload()
    assert type(merged) is linearize.LinearizedForCausalLM
    assert not any("peft" in type(m).__module__ for m in merged.modules())
    assert not any("lora_" in k or "base_layer" in k for k in merged.state_dict())
    assert not hasattr(merged, "peft_config")
    with torch.no_grad():
        merged_logits = merged(input_ids=windows, use_cache=False).logits
    assert torch.allclose(merged_logits, adapted, atol=1e-4, rtol=0)
    assert kl_to(teacher_logits, merged, windows) < 0.85 * kl_before

    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_reloaded(reloaded, merged, input_ids=windows, use_cache=False)


def test_lora_targets_and_checks():
    model = student()
    config = LoraKDConfig(tokens=1000)
    targets = lora_kd.lora_targets(model, config)
    assert len(targets) == 12 and all(t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) and ".attn." in t for t in targets)
    assert len(lora_kd.lora_targets(model, LoraKDConfig(tokens=1000, targets=["q_proj", "v_proj"]))) == 6
    hybrid = linearize.convert(tiny_model("llama", dtype=torch.float32), "hedgehog", keep_attention=[1])
    assert len(lora_kd.lora_targets(hybrid, config)) == 8
    assert len(lora_kd.lora_targets(hybrid, LoraKDConfig(tokens=1000, converted_only=False))) == 12
    with pytest.raises(LinearizeError, match="'qkv' is not a linear module of layer 0's attention"):
        lora_kd.lora_targets(model, LoraKDConfig(tokens=1000, targets=["qkv"]))
    with pytest.raises(LinearizeError, match="not both zero"):
        LoraKDConfig(kl_weight=0, ce_weight=0)


def test_budgets_must_hold_a_step(data):
    with pytest.raises(LinearizeError, match="tokens must be a positive budget"):
        TrainConfig(tokens=0)
    with pytest.raises(LinearizeError, match="less than one optimizer step of 128 tokens"):
        attention_transfer.run(student(), data, AttentionTransferConfig(tokens=100, batch_size=4), session())


def test_metric_records_carry_mfu_against_the_peak_they_are_measured_against(data, monkeypatch):
    """MFU = tokens/s x FLOPs per token (4 per non-embedding parameter in attention transfer) / peak; on a CPU without
    LINEARIZE_PEAK_TFLOPS no MFU is reported."""
    from linearize.distillation.loop import non_embedding_parameters

    config = AttentionTransferConfig(tokens=32 * 2 * 2, batch_size=2, log_every=1)
    session = Session(progress=False)
    attention_transfer.run(student(), data, config, session)
    assert not any("mfu" in r for r in session.records)
    monkeypatch.setenv("LINEARIZE_PEAK_TFLOPS", "0.001")
    model, session = student(), Session(progress=False)
    per_token = 4 * non_embedding_parameters(model)
    attention_transfer.run(model, data, config, session)
    logged = [r for r in session.records if "tokens_per_s" in r]
    assert logged and all(r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / 1e9, rel=1e-3) for r in logged)
    monkeypatch.setenv("LINEARIZE_PEAK_TFLOPS", "fast")
    with pytest.raises(LinearizeError, match="LINEARIZE_PEAK_TFLOPS"):
        attention_transfer.run(student(), data, config, Session(progress=False))


def test_a_profiled_stage_trains_as_an_unprofiled_one_and_says_where_its_time_goes(data):
    from linearize.distillation.profiling import PHASES

    results = []
    for steps in (0, 2):
        config = AttentionTransferConfig(tokens=32 * 2 * 4, batch_size=2, profile_steps=steps)
        run = session()
        results.append(snapshot(attention_transfer.run(student(), data, config, run)))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    profile = run.reports[-1]["profile"]
    assert profile["steps"] == 2 and profile["first_step"] == 2
    assert list(profile["phases"]) == list(PHASES) and all(p["host_ms"] > 0 for p in profile["phases"].values())
    assert sum(p["host_ms"] for p in profile["phases"].values()) <= profile["wall_ms_per_step"]
    text = run.profiles["profile-stage0-attention_transfer.txt"]
    assert text.startswith("profiled steps 2-3: ") and "Self CPU" in text and "linearize.forward" in text
    assert any("profiled steps 2-3" in line for line in LOG)
    with pytest.raises(LinearizeError, match=r"stages\[0\] \(attention_transfer\): profile_steps=4 needs at least 5 optimizer steps .* pay for 4; lower profile_steps or raise tokens"):
        attention_transfer.run(student(), data, AttentionTransferConfig(tokens=32 * 2 * 4, batch_size=2, profile_steps=4), session())
    with pytest.raises(LinearizeError, match="profile_steps not negative"):
        AttentionTransferConfig(profile_steps=-1)


@pytest.mark.parametrize(
    "name, group",
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matrix products"),
        ("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NTN", "matrix products"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
        ("triton_poi_fused__to_copy_add_mul_0", "compiled (inductor)"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "ATen elementwise and reductions"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
        ("Memcpy HtoD (Pageable -> Device)", "copies"),
        ("_window_linear_prefill_kernel", "Triton (linearize, fla)"),
        ("chunk_gated_delta_rule_fwd_kernel_h_blockdim64", "Triton (linearize, fla)"),
    ],
)
def test_kernels_are_grouped_by_kind(name, group):
    from linearize.distillation.profiling import kernel_group

    assert kernel_group(name) == group


def test_lora_kd_losses_multiply_at_the_training_precision(data, monkeypatch):
    """Under bf16 mixed precision the chunked losses' head runs in bf16, as the model's own head does: the losses are
    computed outside the prepared model's forward, which alone brought the autocast (float32 products before)."""
    from linearize.distillation import kd

    seen = []
    logits = kd._logits
    monkeypatch.setattr(kd, "_logits", lambda x, weight, bias: seen.append(logits(x, weight, bias).dtype) or logits(x, weight, bias))
    config = LoraKDConfig(tokens=32 * 2 * 2, batch_size=2, kl_chunk=16)
    mixed = session()
    # accelerate's state is one per process, so this process's accelerator is given bf16 autocast as its own.
    monkeypatch.setattr(mixed.accelerator, "autocast", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    lora_kd.run(student(), data, config, mixed)
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    lora_kd.run(student(), data, config, session())
    assert seen and set(seen) == {torch.float32}


def test_a_stage_that_fails_while_profiled_ends_the_recording(data, monkeypatch):
    """A stage stopped in its profiled steps ends torch.profiler's recording, which would otherwise go on recording
    whatever the process does next; the next profiled stage records its own steps."""
    calls, loss = [], attention_transfer.transfer_loss

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("stopped in step 3")
        return loss(*args)

    config = AttentionTransferConfig(tokens=32 * 2 * 4, batch_size=2, profile_steps=2)
    monkeypatch.setattr(attention_transfer, "transfer_loss", failing)
    with pytest.raises(RuntimeError, match="stopped in step 3"):
        attention_transfer.run(student(), data, config, session())
    assert not torch.autograd._profiler_enabled()
    monkeypatch.setattr(attention_transfer, "transfer_loss", loss)
    run = session()
    attention_transfer.run(student(), data, config, run)
    assert run.reports[-1]["profile"]["steps"] == 2


def test_a_deferred_check_stops_at_the_next_step_with_the_last_good_weights(data, monkeypatch):
    """Where the check is deferred (CUDA; here the CPU, as if it were), the fused optimizer skips a NaN step on the
    device and the host stops the stage one step later, naming the bad step: the weights are those of the last good
    one. Unpoisoned, it trains as the checked-at-once loop does."""
    from linearize.distillation import loop

    snapshots, original = [], loop._Stage.optimizer_step

    def recorded(self, step):
        out = original(self, step)
        snapshots.append({n: p.detach().clone() for n, p in self.params.items()})
        return out

    monkeypatch.setattr(loop._Stage, "optimizer_step", recorded)
    config = LoraKDConfig(tokens=32 * 2 * 8, batch_size=2, lr=1e-2, log_every=100)
    trained = []
    for devices in ((), ("cpu",)):
        monkeypatch.setattr(loop, "DEFERRED_CHECK_DEVICES", devices)
        snapshots.clear()
        trained.append(snapshot(lora_kd.run(student(), data, config, session())))
        assert len(snapshots) == 8
    # torch's fused AdamW rounds differently from its foreach one (up to 3e-7 apart here); a skipped or
    # repeated step would move the weights by about lr = 1e-2
    assert all(torch.allclose(trained[0][n], trained[1][n], rtol=1e-4, atol=1e-6) for n in trained[0])
    calls, kd_losses = {"n": 0}, lora_kd.kd_losses

    def poisoned(*args):
        calls["n"] += 1
        kl, ce = kd_losses(*args)
        return (kl * float("nan"), ce) if calls["n"] == 4 else (kl, ce)

    monkeypatch.setattr(lora_kd, "kd_losses", poisoned)
    snapshots.clear()
    with pytest.raises(LinearizeError, match=r"stages\[0\] \(lora_kd\) step 4: the loss is nan; stopped before updating the weights"):
        lora_kd.run(student(), data, config, session())
    assert len(snapshots) == 4  # the fifth step stopped in its checks, before its optimizer step
    assert all(torch.equal(snapshots[3][n], snapshots[2][n]) and not torch.equal(snapshots[2][n], snapshots[1][n]) for n in snapshots[2])
