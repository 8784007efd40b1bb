"""`linearize.evaluate`: tasks, perplexity and long-context retrieval, teacher beside student, in one run.

Both views of a converted model see the same data with the same settings: the task list, the token stream, the
retrieval prompts (built once, before either is scored) and the seeds.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from linearize.record import RunRecord
from linearize.textdata import cut_windows, special_prefix

from .limits import check_lengths
from .longcontext import ANSWER_TOKENS, ask, make_probe
from .perplexity import agreement, strided_perplexity, window_count
from .progress import progress_bar
from .results import Results, add_training, environment
from .scored import Scored, scored_models
from .settings import EvalSettings, eval_settings
from .suites import task_specs
from .textsource import load_text

def _perplexity(results: Results, scored: list[Scored], sources: Sequence[str], contexts: list[int], stride, max_tokens, data_options, bar):
    # At least one window of the longest context is measured, whatever max_tokens says.
    max_tokens = max(max_tokens, *contexts)
    for source in sources:
        # No tokenizer packs more than 16 characters into a token on prose: cut a large dataset before tokenising it.
        text = load_text(source, **data_options)[: 16 * max_tokens]
        # One token stream per tokenizer (both views of a converted model share it), and the special tokens that
        # tokenizer opens every text with, which open every window.
        streams: dict[int, tuple[torch.Tensor, list[int]]] = {}
        for item in scored:
            key = id(item.tokenizer)
            if key not in streams:
                ids = item.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
                streams[key] = torch.tensor(ids, dtype=torch.long), special_prefix(item.tokenizer)
            ids, prefix = streams[key]
            for context in contexts:
                task = bar.add_task(f"perplexity {item.name} @ {context}", total=window_count(ids.numel(), context, stride, prefix))
                with item.mode():
                    value, tokens = strided_perplexity(
                        item.model, ids, context, stride, prefix, on_window=lambda n: bar.advance(task, n)
                    )
                bar.remove_task(task)
                results.add(
                    item.name, "perplexity", data=str(source), context=context, stride=stride or max(1, context // 2),
                    prefix=prefix, value=value, tokens=tokens,
                )
        _agreement(results, scored, streams, str(source), contexts, bar)


def _logits(item: Scored):
    def forward(batch: torch.Tensor) -> torch.Tensor:
        with item.mode():
            return item.model(input_ids=batch, use_cache=False).logits

    return forward


def _agreement(results: Results, scored: list[Scored], streams: dict[int, tuple[torch.Tensor, list[int]]], source: str, contexts: list[int], bar):
    """KL(teacher || student) and top-1 agreement of each student with the teacher scored beside it, on the
    perplexity text cut into back-to-back windows of each context."""
    by_name = {item.name: item for item in scored}
    for student in scored:
        teacher = by_name.get(student.entry.teacher)
        if teacher is None or id(teacher.tokenizer) != id(student.tokenizer):
            continue
        ids, prefix = streams[id(student.tokenizer)]
        device = next(student.model.parameters()).device
        for context in contexts:
            windows = cut_windows(ids, context, prefix=prefix).to(device)
            task = bar.add_task(f"agreement {student.name} @ {context}", total=windows.shape[0])
            kl, top1, tokens = agreement(_logits(teacher), _logits(student), windows, on_batch=lambda n: bar.advance(task, n))
            bar.remove_task(task)
            results.add(student.name, "agreement", teacher=teacher.name, data=source, context=context, kl=kl, top1=top1, tokens=tokens)


def _training(results: Results, scored: list[Scored], folder: Path) -> None:
    """The distillation stages a saved folder records (its results.json), as `training` records of its student."""
    students = [item for item in scored if item.entry.role == "student"]
    run = RunRecord.read(folder)  # None for a results.json of some other kind
    if students and run is not None:
        add_training(results, students[0].name, run)


def _retrieval(results: Results, scored: list[Scored], kind: str, lengths: list[int], depths, trials: int, seed: int, bar):
    probes_by_tokenizer: dict[int, list] = {}
    for item in scored:
        key = id(item.tokenizer)
        if key not in probes_by_tokenizer:
            rng = random.Random(seed)
            probes_by_tokenizer[key] = [
                make_probe(item.tokenizer, kind, length, depth, rng) for length in lengths for depth in depths for _ in range(trials)
            ]
        probes = probes_by_tokenizer[key]
        task = bar.add_task(f"{kind} {item.name}", total=len(probes))
        with item.mode():
            cells = ask(item.model, item.tokenizer, probes, advance=lambda: bar.advance(task))
        bar.remove_task(task)
        for (length, depth), cell in sorted(cells.items()):
            results.add(
                item.name, kind, length=length, depth=depth, value=cell.value, trials=len(cell.hits),
                tokens=round(sum(cell.tokens) / len(cell.tokens)), misses=cell.misses,
            )


def evaluate(
    model: Any,
    tokenizer: Any = None,
    settings: EvalSettings | None = None,
    *,
    teacher: bool = True,
    name: str | None = None,
    dtype: Any = None,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **changes: Any,
) -> Results:
    """Score a model (and, for a converted model, its teacher via teacher_mode) on lm-eval tasks, perplexity and
    long-context retrieval, as `settings` (an `EvalSettings`) and the keyword `changes` to it say (tasks=, suite=,
    perplexity=, contexts=, passkey=, lengths=, ...; see `EvalSettings`). With nothing asked for, runs the offline
    default: suite "local" and perplexity on the packaged Persuasion. Beside perplexity, each student's KL to its
    teacher and top-1 next-token agreement are measured on the same text (`agreement` records); a folder saved by
    `linearize run` or `distill` adds its stages' tokens, seconds and tokens/s (`training` records).

    `model` is a loaded model (pass its `tokenizer`) or any `load_teacher` source: a converted folder, a model
    folder, a .gguf file, an alias such as smollm2-135m, a Hub id. `teacher`: also score a converted model as its
    own teacher (teacher_mode); `name`, `dtype`, `device` name and place the loaded model.

    Example:
        >>> results = linearize.evaluate("out/smollm2-hedgehog", suite="local", perplexity="persuasion", passkey=True)
        >>> results.save("out/eval.json")      # then: linearize report out/eval.json --out out/report
    """
    settings = eval_settings(settings, **changes)
    specs = task_specs(settings.tasks, settings.suite)
    scored = scored_models(model, tokenizer, teacher=teacher, name=name, dtype=dtype, device=device)
    limit_tokens = scored[0].max_length
    results = Results(settings=settings.recorded(specs), environment=environment(str(next(scored[0].model.parameters()).device)))
    for item in scored:
        results.add_model(item.entry)
    if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        _training(results, scored, Path(model))
    contexts = check_lengths(settings.contexts, limit_tokens, settings.allow_longer, "perplexity context") if settings.texts else []
    lengths = check_lengths(settings.lengths, limit_tokens, settings.allow_longer, "retrieval", extra=ANSWER_TOKENS) if settings.retrieval else []
    if specs:
        from .harness import run_tasks  # lm-eval is imported only when tasks are asked for

        records = run_tasks(scored, specs, limit=settings.limit, num_fewshot=settings.num_fewshot, batch_size=settings.batch_size, log=log)
        for model_name, record in records:
            results.add(model_name, "task", **record)
    data_options = dict(split=settings.split, name=settings.dataset_config, text_field=settings.text_field)
    with progress_bar(progress) as bar:
        if settings.texts:
            _perplexity(results, scored, settings.texts, contexts, settings.stride, settings.max_tokens, data_options, bar)
        for kind in settings.retrieval:
            _retrieval(results, scored, kind, lengths, list(settings.depths), settings.trials, settings.seed, bar)
    return results
