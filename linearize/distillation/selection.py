"""Choosing which layers keep softmax attention (`convert.keep_attention: auto:N`).

Each converted layer is scored by how much converting it hurts: its attention-transfer error on held-out text,
normalised by the mean square of the teacher's output in that layer. The raw error is a poor guide, because
the residual stream (and with it every layer's output) grows with depth, so raw errors rank deep layers first
whatever their quality. Optionally each layer is also scored end to end: by the KL divergence of the logits when
only that layer is converted (`kl`), or by how much the KL of the fully converted model falls when that layer
alone goes back to softmax attention (`restore`, as fla-org's hybrid distillation chooses). The N worst layers
go back to the teacher's attention; with `restore`, each scorer proposes N layers and the proposal whose model
is measured closest to the teacher wins. Text alone does not show which layers retrieve from far back: with
`retrieval`, each layer is also scored at the answers of retrieval tasks (how much restoring it lowers the KL
there), and the proposals are measured on text and at the answers together. With `heads`, the layers kept are those of
the teacher's own retrieval heads: the heads that, where an answer is due, attend to the place in the context that
states it (its needle). That is read from the teacher alone, so it needs no converted layer to be any good yet.
"""

from __future__ import annotations

import itertools
import random
import re
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SelectionConfig
from ..hf.attention import apply_rotary, repeat_heads
from ..hf.errors import LinearizeError
from ..hf.mixers import mixers_in, teacher_mode
from ..hf.plan import ATTENTION
from ..surgery import revert_to_attention
from .stages.attention_transfer import layer_errors
from .retrieval_mix import task_window

AUTO = re.compile(r"auto:([0-9]*\.?[0-9]+)")


def auto_amount(selection: Any, what: str = "keep_attention") -> float | None:
    """The N or fraction F of `auto:N` / `auto:F` (in `what`, for errors); None when the selection is not automatic."""
    if not isinstance(selection, str) or not selection.strip().startswith("auto"):
        return None
    match = AUTO.fullmatch(selection.strip())
    amount = float(match.group(1)) if match else 0.0
    if amount <= 0 or (amount >= 1 and amount != int(amount)):
        raise LinearizeError(
            f"{what}: cannot read {selection!r}; use auto:N for N layers (e.g. auto:4) or auto:F for a fraction (e.g. auto:0.25)"
        )
    return amount


def auto_count(amount: float, num_layers: int, what: str = "keep_attention") -> int:
    """The layers `auto:amount` chooses out of `num_layers`: at least one, and not all."""
    count = round(amount * num_layers) if amount < 1 else int(amount)
    if not 1 <= count < num_layers:
        raise LinearizeError(
            f"{what}: auto:{amount:g} chooses {count} of {num_layers} layers; choose at least one and leave at least one"
        )
    return count


@torch.no_grad()
def _restored_means(
    model: nn.Module, windows: torch.Tensor, batch_size: int, restored: list[set[int]], mask: torch.Tensor | None,
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> list[float]:
    """For each set of layers in `restored` put back on softmax attention, the mean over `windows` (at the positions
    `mask` marks, or all) of `score(logits, teacher_logits, batch)`, a value per position (the teacher's logits are
    computed once per batch)."""
    device = next(model.parameters()).device
    mixers = mixers_in(model)
    totals = [0.0] * len(restored)
    positions = 0
    masks = mask.split(batch_size) if mask is not None else itertools.repeat(None)
    for batch, chosen in zip(windows.split(batch_size), masks):
        batch = batch.to(device)
        positions += batch.numel() if chosen is None else int(chosen.sum())
        with teacher_mode(model):
            teacher = model(input_ids=batch, use_cache=False).logits
            for n, layers in enumerate(restored):
                for mixer in mixers:
                    mixer.teacher = mixer.layer_idx in layers
                value = score(model(input_ids=batch, use_cache=False).logits, teacher, batch)
                totals[n] += (value if chosen is None else value[chosen.to(device)]).sum().item()
    return [total / positions for total in totals]


def _kl(model: nn.Module, windows: torch.Tensor, batch_size: int, restored: list[set[int]], mask: torch.Tensor | None = None) -> list[float]:
    """KL(teacher || model) per token on `windows` (at the positions `mask` marks, or all) for each set of layers in
    `restored` put back on softmax attention."""
    return _restored_means(model, windows, batch_size, restored, mask, lambda logits, teacher, batch: token_kl(logits, teacher))


def next_token_logprobs(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """The log-probability each position gives the token that follows it in `batch` (0 at the last position), in
    float32 at least."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    taken = F.log_softmax(logits[:, :-1].to(dtype), dim=-1).gather(-1, batch[:, 1:, None])[..., 0]
    return F.pad(taken, (0, 1))


def openings(answers: torch.Tensor) -> torch.Tensor:
    """Of the positions that predict an answer (`answers`), each row's first: where the answer's first token is
    chosen, i.e. where the model decides to answer at all."""
    first = torch.zeros_like(answers)
    rows = answers.any(-1).nonzero()[:, 0]
    first[rows, answers[rows].float().argmax(-1)] = True
    return first


def opening_gains(
    model: nn.Module, tasks: torch.Tensor, answers: torch.Tensor, base: list[int], count: int, batch_size: int = 4,
) -> tuple[list[int], list[dict[str, Any]]]:
    """`count` more layers to restore beside `base`, chosen one at a time: each step restores, in turn, every converted
    layer not yet chosen beside those chosen, and adds the one that most raises the mean log-probability of the
    tasks' answer openings (`openings`). Returns the layers added and, per step, the layers it started from, their
    opening log-probability and each candidate's gain."""
    layers = sorted(m.layer_idx for m in mixers_in(model))
    first = openings(answers)
    chosen, steps = list(base), []
    for _ in range(count):
        candidates = [i for i in layers if i not in chosen]
        restored = [set(chosen)] + [set(chosen) | {i} for i in candidates]
        before, *each = _restored_means(model, tasks, batch_size, restored, first, lambda logits, teacher, batch: next_token_logprobs(logits, batch))
        gains = {i: value - before for i, value in zip(candidates, each)}
        added = max(gains, key=gains.get)
        steps.append({"from": sorted(chosen), "opening_logprob": before, "gains": {str(i): gain for i, gain in gains.items()}, "added": added})
        chosen.append(added)
    return chosen[len(base):], steps


def token_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at every position of (batch, sequence, vocabulary) logits, in float32 at least."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    log_student, log_teacher = F.log_softmax(student.to(dtype), dim=-1), F.log_softmax(teacher.to(dtype), dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)


def single_layer_kl(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict[int, float]:
    """Per converted layer: KL(teacher || model) of the logits when only that layer is converted, per token."""
    layers = sorted(m.layer_idx for m in mixers_in(model))
    return dict(zip(layers, _kl(model, windows, batch_size, [set(layers) - {i} for i in layers])))


def restore_gains(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, mask: torch.Tensor | None = None) -> tuple[float, dict[int, float]]:
    """The KL of the fully converted model (at the positions `mask` marks, or all), and per layer how much it falls
    when that layer alone is restored."""
    layers = sorted(m.layer_idx for m in mixers_in(model))
    converted, *each = _kl(model, windows, batch_size, [set()] + [{i} for i in layers], mask)
    return converted, {i: converted - kl for i, kl in zip(layers, each)}


# The tasks a small teacher answers: SmolLM2-135M scores near 0 on key-value retrieval and variable tracking
# (BENCHMARKS.md), where the KL at the answer would measure noise.
SELECTION_KINDS = ("passkey", "needle", "multikey")


def retrieval_windows(tokenizer, filler: torch.Tensor, count: int, setting: str = "retrieval") -> tuple[torch.Tensor, torch.Tensor]:
    """`count` retrieval tasks of the training pool (passkey, needle and multi-key needle in turn, at seeded
    depths), each as long as a row of `filler` and filled from its first tokens, the answer at the end; and the
    mask of the positions that predict an answer token. `setting` names the option that asked for them, in errors."""
    if tokenizer is None:
        raise LinearizeError(f"convert.selection.{setting} needs the tokenizer: pass tokenizer=... to distill(), or set convert.selection.{setting}=0")
    seq_len = filler.shape[1]
    windows, mask = [], torch.zeros(count, seq_len, dtype=torch.bool)
    for i in range(count):
        rng = random.Random(f"selection:{i}")
        try:
            window, asks = task_window(tokenizer, SELECTION_KINDS[i % len(SELECTION_KINDS)], seq_len, rng.random(), rng, filler[i % len(filler)])
        except LinearizeError as error:
            raise LinearizeError(f"convert.selection.{setting}: {error}; raise convert.selection.seq_len") from None
        windows.append(window)
        mask[i, asks] = True
    return torch.stack(windows), mask


def needles(tasks: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Per task (a row of `tasks`, its answer-predicting positions marked in `answers`), the positions before its
    answer where the context states the answer's digits (the answer without its full stop), every place they occur
    (a passkey is stated twice). A row whose context does not hold them has none marked."""
    found = torch.zeros_like(answers)
    for row, (task, mask) in enumerate(zip(tasks.tolist(), answers)):
        first = int(mask.nonzero()[0]) + 1  # the answer's first token
        digits = task[first:-1]
        for start in range(first - len(digits) + 1):
            if task[start : start + len(digits)] == digits:
                found[row, start : start + len(digits)] = True
    return found


@torch.no_grad()
def retrieval_heads(model: nn.Module, tasks: torch.Tensor, answers: torch.Tensor, batch_size: int = 4) -> dict[int, list[float]]:
    """Per converted layer, per head: the teacher's attention (its own softmax, from the converted model under
    `teacher_mode`), from the positions that predict an answer token, on the tokens of the task's context that state
    the answer (`needles`), averaged over those positions and the tasks. A head near 1 reads the answer off its
    needle; near 0, it looks elsewhere. Tasks whose context does not hold the answer are left out."""
    device = next(model.parameters()).device
    needle = needles(tasks, answers)
    rows = needle.any(-1)
    if not bool(rows.any()):
        raise LinearizeError("convert.selection.heads: no task states its answer in its context; raise convert.selection.seq_len")
    tasks, answers, needle = tasks[rows], answers[rows], needle[rows]
    mixers = mixers_in(model)
    totals = {m.layer_idx: torch.zeros(m.spec.num_heads, dtype=torch.float64) for m in mixers}
    batch_answers, batch_needles = [None], [None]

    def attention_on_needles(mixer, args, kwargs):
        spec = mixer.spec
        hidden = args[0] if args else kwargs["hidden_states"]
        q, k, _ = mixer.project(hidden)
        q, k = apply_rotary(q, k, kwargs.get("position_embeddings"))
        k = repeat_heads(k, spec.groups).float()
        keys = torch.arange(k.shape[2], device=k.device)
        for b, (asks, needle_row) in enumerate(zip(batch_answers[0], batch_needles[0])):
            at = asks.nonzero()[:, 0]
            scores = torch.einsum("hpd,htd->hpt", q[b][:, at].float(), k[b]) * spec.scaling
            if spec.softcap:
                scores = torch.tanh(scores / spec.softcap) * spec.softcap
            unseen = keys[None, :] > at[:, None]
            if spec.sliding_window:
                unseen |= keys[None, :] <= at[:, None] - spec.sliding_window
            probs = scores.masked_fill(unseen, float("-inf")).softmax(-1)
            totals[mixer.layer_idx] += probs[..., needle_row].sum(-1).mean(-1).double().cpu()

    hooks = [m.register_forward_pre_hook(attention_on_needles, with_kwargs=True) for m in mixers]
    try:
        with teacher_mode(model):
            for batch, asks, needle_rows in zip(tasks.split(batch_size), answers.split(batch_size), needle.split(batch_size)):
                batch_answers[0], batch_needles[0] = asks.to(device), needle_rows.to(device)
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: (total / len(tasks)).tolist() for layer, total in totals.items()}


def leading_layers(chosen: list[int], converted: list[int], count: int, around: bool = False) -> list[int]:
    """The `count` layers of `converted` nearest before the earliest of `chosen`, nearest first; where too few
    precede it, then the nearest after it that are not chosen. With `around`, the nearest on either side (the one
    before at equal distance).

    >>> leading_layers([7, 14, 18], list(range(30)), 2)
    [6, 5]
    >>> leading_layers([1, 14], list(range(30)), 2)
    [0, 2]
    >>> leading_layers([7, 14, 18], list(range(30)), 3, around=True)
    [6, 8, 5]
    """
    first = min(chosen)
    before = sorted((i for i in converted if i < first), reverse=True)
    after = [i for i in sorted(converted) if i > first and i not in chosen]
    if around:
        return sorted(before + after, key=lambda i: (abs(i - first), i > first))[:count]
    return (before + after)[:count]


def by_heads(heads: dict[int, list[float]], count: int, lead: int = 0, around: bool = False) -> list[int]:
    """Layers ranked by their strongest retrieval head (`retrieval_heads`), best first; with `lead`, the first `count`
    are the heads' strongest `count - lead` and the `lead` converted layers just before the first of them (with
    `around`, nearest it on either side; `leading_layers`), the rest after them in the heads' order.

    >>> by_heads({0: [0.1], 1: [0.2], 2: [0.9], 3: [0.5]}, 2, lead=1)
    [2, 1, 3, 0]
    """
    ranking = sorted(heads, key=lambda layer: max(heads[layer]), reverse=True)
    if not lead:
        return ranking
    base = ranking[: count - lead]
    front = base + leading_layers(base, sorted(heads), lead, around)
    return front + [layer for layer in ranking if layer not in front]


def interleaved(*rankings: list[int]) -> list[int]:
    """One ranking from several: their layers taken in turn, best first, each once."""
    order: list[int] = []
    for layer in (layer for ranks in zip(*rankings) for layer in ranks):
        if layer not in order:
            order.append(layer)
    return order


METHODS = {
    "error": "attention-transfer MSE / teacher output mean square",
    "kl": "single-layer logit KL",
    "restore": "restore-one-layer KL gain",
    "retrieval": "restore-one-layer KL gain at retrieval answers",
    "both": "retrieval and text rankings in turn",
    "heads": "the teacher's retrieval heads (attention on the answer's needle)",
    "heads_opening": "the teacher's retrieval heads, then the layers that most raise the answer's opening",
    "heads_lead": "the teacher's retrieval heads, and the layers just before the first of them",
    "heads_around": "the teacher's retrieval heads, and the layers around the first of them",
}


def select_attention(
    model: nn.Module, windows: torch.Tensor, count: int, config: SelectionConfig, keep_as: str = ATTENTION, options: dict[str, Any] | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Score every converted layer on `windows`, revert the `count` worst to softmax attention (the teacher's layer,
    or the mixer `keep_as` with `options`: see `revert_to_attention`), and record the
    choice and the per-layer figures in `model.config.selection` (saved with the model). Returns that record, with
    the seconds it took, which the config leaves out (`saved_record`).
    With `config.restore`, each scorer proposes its layers and the proposal whose restored model has the lowest
    KL to the teacher wins (`candidates` records each proposal and its KL).
    With `config.retrieval` (N tasks, made with `tokenizer` from the rows of `windows`), layers are also scored by how
    much restoring each lowers the KL at the tasks' answers; that ranking proposes its layers, and so do it and the
    single-layer KL ranking (the error ranking without `config.kl`) in turn; every proposal is measured on both,
    and the lowest sum of the two KLs wins. With `config.heads` (N tasks), each layer is scored by its strongest
    retrieval head in the teacher (`retrieval_heads`), and that ranking's layers are kept whatever the other
    proposals measure (they are measured and recorded as without it); with `config.opening` too, the last of those
    layers are chosen by `opening_gains` on the same tasks instead (its steps recorded under `opening`); with
    `config.lead`, they are the converted layers just before the first of the others (with `config.around`, nearest
    it on either side; `leading_layers`; recorded under `lead`). `seconds` gives what each scorer took, the
    measurement of the proposals (`candidates`, `candidates_at_answers`) and the whole selection (`total`).

    Example:
        >>> select_attention(student, data.heldout_windows(max_tokens=16384), 4, SelectionConfig())["kept_attention"]
    """
    began, seconds = time.perf_counter(), {}

    def timed(name: str, measure: Callable[..., Any], *args: Any) -> Any:
        """`measure(*args)`, its seconds recorded under `name` (each scorer ends by reading its figures to the host)."""
        start = time.perf_counter()
        result = measure(*args)
        seconds[name] = round(time.perf_counter() - start, 2)
        return result

    for name in ("opening", "lead"):
        if getattr(config, name) >= count:  # before any scoring: refused at once
            raise LinearizeError(
                f"convert.selection.{name}={getattr(config, name)} leaves none of the {count} kept layers to the retrieval heads; set it below {count}"
            )
    tasks, answers = retrieval_windows(tokenizer, windows, config.retrieval) if config.retrieval else (None, None)
    was_training = model.training
    model.eval()
    errors = timed("error", layer_errors, model, windows, config.batch_size)
    if count >= len(errors):
        model.train(was_training)
        raise LinearizeError(f"keep_attention: auto keeps {count} layers but only {len(errors)} are converted; keep fewer")
    scores = {"error": {i: e["normalized"] for i, e in errors.items()}}
    if config.kl:
        scores["kl"] = timed("kl", single_layer_kl, model, windows, config.batch_size)
    if config.restore:
        converted, scores["restore"] = timed("restore", restore_gains, model, windows, config.batch_size)
    if tasks is not None:
        converted_answers, scores["retrieval"] = timed("retrieval", restore_gains, model, tasks, config.batch_size, answers)
    if config.heads:
        head_tasks = retrieval_windows(tokenizer, windows, config.heads, "heads")
        heads = timed("heads", retrieval_heads, model, *head_tasks, config.batch_size)
        scores["heads"] = {layer: max(per_head) for layer, per_head in heads.items()}
    rankings = {name: sorted(errors, key=lambda i: score[i], reverse=True) for name, score in scores.items()}
    if config.opening:
        base = rankings["heads"][: count - config.opening]
        added, opening_steps = timed("opening", opening_gains, model, *head_tasks, base, config.opening, config.batch_size)
        rankings["heads_opening"] = base + added + [i for i in rankings["heads"] if i not in base + added]
        scores["opening"] = {int(i): gain for i, gain in opening_steps[0]["gains"].items()}
    lead_method = "heads_around" if config.around else "heads_lead"
    if config.lead:
        rankings[lead_method] = by_heads(heads, count, config.lead, config.around)
    if tasks is not None:
        rankings["both"] = interleaved(rankings["retrieval"], rankings["kl" if config.kl else "error"])
    proposals = {name: sorted(ranking[:count]) for name, ranking in rankings.items()}
    candidates = None
    if config.restore or tasks is not None:
        kept = [set(keep) for keep in proposals.values()]
        measured = timed("candidates", _kl, model, windows, config.batch_size, kept)
        candidates = {name: {"kept_attention": keep, "kl": kl} for (name, keep), kl in zip(proposals.items(), measured)}
        if tasks is not None:
            at_answers = timed("candidates_at_answers", _kl, model, tasks, config.batch_size, kept, answers)
            for candidate, kl in zip(candidates.values(), at_answers):
                candidate["answer_kl"] = kl
    if config.heads:
        method = "heads_opening" if config.opening else lead_method if config.lead else "heads"
    elif candidates is not None:
        method = min(candidates, key=lambda name: candidates[name]["kl"] + candidates[name].get("answer_kl", 0.0))
    else:
        method = "kl" if config.kl else "error"
    model.train(was_training)
    ranked = rankings[method]
    extra = {"kl": "kl", "restore": "restore_gain", "retrieval": "retrieval_gain", "heads": "retrieval_head", "opening": "opening_gain"}
    figures = [
        {"layer": i, **errors[i], **{extra[name]: score[i] for name, score in scores.items() if name in extra and i in score}, "rank": ranked.index(i) + 1}
        for i in sorted(errors)
    ]
    selection = {"method": METHODS[method], "kept_attention": proposals[method], "tokens": int(windows.numel()), "layers": figures}
    if config.restore:
        selection["converted_kl"] = converted
    if tasks is not None:
        selection.update(converted_answer_kl=converted_answers, retrieval_tasks=config.retrieval)
    if config.heads:
        selection.update(head_tasks=config.heads, heads={str(layer): per_head for layer, per_head in heads.items()})
    if config.opening:
        selection["opening"] = opening_steps
    if config.lead:
        base = rankings["heads"][: count - config.lead]
        selection["lead"] = {
            "layers": rankings[lead_method][count - config.lead : count], "first_head_layer": min(base),
            "in_place_of": rankings["heads"][count - config.lead : count], **({"around": True} if config.around else {}),
        }
    if candidates is not None:
        selection["candidates"] = {METHODS[name]: c for name, c in candidates.items()}
    selection["seconds"] = {**seconds, "total": round(time.perf_counter() - began, 2)}
    revert_to_attention(model, proposals[method], keep_as, options)
    model.config.selection = saved_record(selection)
    return selection


def saved_record(selection: dict[str, Any]) -> dict[str, Any]:
    """What the model's config keeps of a selection: all but its `seconds`, so that a run, resumed or repeated,
    saves the same config."""
    return {key: value for key, value in selection.items() if key != "seconds"}


def apply_selection(model: nn.Module, selection: dict[str, Any], keep_as: str = ATTENTION, options: dict[str, Any] | None = None) -> None:
    """Replay a recorded selection (a resumed run reuses the choice instead of measuring again)."""
    revert_to_attention(model, selection["kept_attention"], keep_as, options)
    model.config.selection = saved_record(selection)
