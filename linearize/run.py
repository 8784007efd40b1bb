"""A recipe run, from one owner: `Run.setup()`, `Run.train()` (the stages in order), `Run.save()`.

    setup: the accelerator, the resume check, the recipe's validation (nothing loaded yet), the output and
           checkpoint folders, the teacher, the conversion, the data, then the checkpoint folder's record
    train: each stage's registered runner in order (`linearize.config.stage_kinds()`), the automatic layer
           selection after the first attention_transfer stage (or before the first stage when there is none)
    save:  the output folder, atomically: model, tokenizer, recipe.yaml, results.json (a `RunRecord`), metrics

`linearize.distill` (a model in, a model out, in memory) is setup and train; `linearize.pipeline` adds scoring
and saving for `linearize run` and `linearize distill`. Checkpoints of an unfinished run live beside the output,
in `<output>.checkpoints/`, until the output folder is complete; `resume=True` continues from them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .config import Recipe, load_recipe, stage_kinds
from .distillation.data import DistillData, check_source, load_data
from .distillation.loop import count_steps
from .distillation.resume import check_checkpoints, start_checkpoints
from .distillation.retrieval_mix import check_kinds
from .distillation.selection import (
    SELECTION_KINDS, apply_selection, auto_amount, auto_count, by_heads, retrieval_heads, retrieval_windows, select_attention,
)
from .distillation.session import Session, check_resume, make_accelerator
from .hf.errors import LinearizeError
from .hf.mixers import check_option_names, get_mixer
from .layouts import select_layers
from .loaders import load_teacher
from .outputs import atomic_folder, check_output
from .record import RunRecord, StageReport
from .surgery import check_runtime_options, convert, set_options


def validate_recipe(recipe: Recipe, processes: int = 1, check_data: bool = True) -> None:
    """Checks that need nothing loaded: mixer, option and stage names, the auto selection, the data sources
    (unless `check_data` is false) and that every stage's budget pays for at least one step on `processes`."""
    plan = recipe.convert
    for name in [plan.mixer, plan.keep_as, *plan.hybrid, *plan.mixer_options]:
        get_mixer(name)
    for name, options in [(plan.mixer, plan.options), *plan.mixer_options.items()]:
        check_option_names(name, options)
    auto_amount(plan.keep_attention)
    if recipe.data.retrieval:
        check_kinds(recipe.data.retrieval_kinds)
    mixers = {plan.mixer, *plan.hybrid, *plan.mixer_options}
    options, by_layers = serve_parts(recipe.serve)
    for where, given in [("serve", options), *((f"serve.layers[{selection}]", o) for selection, o in by_layers.items())]:
        if given and not any(set(given) <= set(get_mixer(name).runtime_options) for name in mixers):
            offered = "; ".join(f"{name} takes {', '.join(get_mixer(name).runtime_options) or 'none'}" for name in sorted(mixers))
            raise LinearizeError(
                f"{where}: no mixer of this recipe takes {', '.join(map(repr, given))} after distillation ({offered}); "
                "set conversion options in convert.options"
            )
    for selection in by_layers:
        if auto_amount(selection, "serve.layers") is not None and not plan.selection.heads:
            raise LinearizeError(
                f"serve.layers: {selection!r} ranks layers by the teacher's retrieval heads; set convert.selection.heads (e.g. 12)"
            )
    for index, stage in enumerate(recipe.stages):
        count_steps(stage, stage.seq_len or recipe.data.seq_len, processes, f"stages[{index}] ({stage.kind})")
    if check_data and (recipe.stages or not recipe.data.heldout):
        check_source(recipe.data.train)
    if check_data and recipe.data.heldout:
        check_source(recipe.data.heldout)


def serve_parts(serve: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A recipe's `serve` as the options for every converted layer that takes them and, from its `layers` key, the
    options for the layers of each selection (indices or a pattern as `keep_attention` takes, or `auto:N` / `auto:F`:
    the layers of the teacher's strongest retrieval heads, as `convert.selection` finds them), set after those."""
    options = {key: value for key, value in serve.items() if key != "layers"}
    by_layers = serve.get("layers") or {}
    if not isinstance(by_layers, dict) or not all(isinstance(o, dict) and o for o in by_layers.values()):
        raise LinearizeError(
            f"serve.layers must map layer selections to options, e.g. {{'6,7': {{keep: 1024}}}} or {{auto:0.25: {{keep: 1536}}}}; got {by_layers!r}"
        )
    return options, {str(selection): given for selection, given in by_layers.items()}


def is_converted(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "linearized"


def prepare_student(model: nn.Module, recipe: Recipe, log: Callable[[str], None] = print) -> tuple[nn.Module, int | None]:
    """Convert a teacher as the recipe says (every layer, when the kept layers are chosen automatically);
    a model that is already converted is used as it is. Returns the student and the number of layers to keep."""
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    lengths = [("data.seq_len", recipe.data.seq_len)] + [(f"stages[{i}].seq_len", s.seq_len) for i, s in enumerate(recipe.stages) if s.seq_len]
    name, longest = max(lengths, key=lambda item: item[1])
    if positions and longest > positions and not recipe.data.allow_longer:
        raise LinearizeError(
            f"{name}={longest} is beyond the model's {positions} positions (max_position_embeddings); "
            "train on shorter windows, or set data.allow_longer=true to train past them"
        )
    plan = recipe.convert
    if is_converted(model):
        log("the model is already converted: the recipe's convert section is not used")
        return model, None
    log(f"converting to {plan.mixer}")
    amount = auto_amount(plan.keep_attention)
    count = None if amount is None else auto_count(amount, model.config.num_hidden_layers)
    kept = ()
    if amount is None:
        try:
            kept = select_layers(model.config.num_hidden_layers, plan.keep_attention, "convert.keep_attention")
        except LinearizeError as error:
            raise LinearizeError(f"{error} (a recipe's layers are its teacher's; convert.keep_attention=auto:0.25 chooses a quarter of this model's)") from None
    student = convert(
        model,
        plan.mixer,
        keep_attention=kept,
        layers=plan.layers,
        hybrid=plan.hybrid,
        mixer_options=plan.mixer_options,
        source=recipe.teacher,
        keep_as=plan.keep_as,
        **plan.options,
    )
    return student, count


def checkpoint_folder(out: Path) -> Path:
    return out.parent / f"{out.name}.checkpoints"


class Run:
    """One recipe run. `out` is the folder `save()` writes (None in memory only); `checkpoints` the folder stages
    checkpoint into (default beside `out`; None keeps none); `resume` continues from it, `overwrite` starts again.

    Example:
        >>> run = Run(load_recipe("quickstart"), out="out/quickstart").setup()
        >>> run.save(run.record(student=run.train()))
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        out: str | Path | None = None,
        checkpoints: str | Path | None = None,
        overwrite: bool = False,
        resume: bool = False,
        log: Callable[[str], None] = print,
        progress: bool = True,
    ):
        if resume and overwrite:
            raise LinearizeError("--resume continues a run and --overwrite starts it again; pass one of them")
        self.recipe, self.overwrite, self.resume = recipe, overwrite, resume
        self.out = Path(out) if out is not None else None
        if checkpoints is None and self.out is not None and recipe.stages:
            checkpoints = checkpoint_folder(self.out)
        self.checkpoints = Path(checkpoints) if checkpoints is not None else None
        self.accelerator = make_accelerator(recipe.precision)
        check_resume(self.accelerator, resume)
        self.session = Session(self.accelerator, None, log, progress)  # under `accelerate launch`, only the main process speaks
        self.started_at = time.time()
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        self.data: DistillData | None = None
        self.keep: int | None = None

    def setup(self, model: nn.Module | None = None, tokenizer: Any = None, data: Any = None) -> "Run":
        """Everything before the stages: checks that need nothing loaded first, then teacher (the recipe's, unless
        `model` is given), student and data (see `distill` for what `data` may be). Nothing is written before the
        model and data are loaded, so a mistake found while loading leaves no trace on disk."""
        if isinstance(data, DistillData):  # its windows, not the recipe's data section, set the step size
            self.recipe = dataclasses.replace(self.recipe, data=dataclasses.replace(self.recipe.data, seq_len=data.seq_len))
        recipe, say = self.recipe, self.session.say
        validate_recipe(recipe, self.accelerator.num_processes, check_data=data is None)
        if self.out is not None:
            self.out = check_output(self.out, self.overwrite)
        if self.checkpoints is not None:
            check_checkpoints(self.checkpoints, recipe, self.resume, self.overwrite)
        elif self.resume:
            raise LinearizeError(
                "nothing to resume: this recipe has no distillation stages" if self.out is not None
                else "nothing to resume without a checkpoint folder: pass checkpoints=FOLDER"
            )
        torch.manual_seed(recipe.seed)
        if model is None:
            say(f"loading teacher {recipe.teacher}")
            model, tokenizer = load_teacher(recipe.teacher, dtype=recipe.dtype)
        self.model, self.keep = prepare_student(model, recipe, say)
        options, by_layers = serve_parts(recipe.serve)  # checked against the converted layers before any training
        if options:
            check_runtime_options(self.model, **options)
        ranked_by_heads = False
        for selection, given in by_layers.items():
            amount = auto_amount(selection, "serve.layers")
            chosen = None if amount is not None else select_layers(len(self.model.config.plan), selection, "serve.layers")
            layers = check_runtime_options(self.model, chosen, **given)
            if amount is not None:
                auto_count(amount, len(layers), "serve.layers")
                ranked_by_heads = True
        self.model.to(self.accelerator.device)
        self.tokenizer, self.data = tokenizer, self._data(data, tokenizer)
        say(f"data: {self.data.description}")
        selecting = recipe.convert.selection
        for setting in ("retrieval", "heads"):  # the tokenizer and a length the tasks fit, before training
            if (self.keep is not None or (ranked_by_heads and setting == "heads")) and getattr(selecting, setting):
                retrieval_windows(tokenizer, self.data.heldout_windows(selecting.seq_len, selecting.tokens)[:1], len(SELECTION_KINDS), setting)
        if self.checkpoints is not None:
            if self.accelerator.is_main_process:
                start_checkpoints(self.checkpoints, recipe, self.model, self.resume, say)
            self.accelerator.wait_for_everyone()
        self.session.checkpoints = self.checkpoints
        return self

    def _data(self, data: Any, tokenizer: Any) -> DistillData:
        recipe = self.recipe
        if isinstance(data, DistillData):
            return data
        if tokenizer is None:
            raise LinearizeError("pass tokenizer=... to distill() so the data can be tokenised, or pass a prepared DistillData")
        train = bool(recipe.stages)
        if data is None:
            return load_data(recipe.data, tokenizer, train=train, seed=recipe.seed)
        if isinstance(data, (str, Path)):
            return load_data(dataclasses.replace(recipe.data, train=str(data)), tokenizer, train=train, seed=recipe.seed)
        return load_data(recipe.data, tokenizer, train=train, seed=recipe.seed, dataset=data)

    def train(self, on_stage: Callable[[StageReport, nn.Module], None] | None = None) -> nn.Module:
        """The recipe's stages in order, each from its own seed (so a resumed run builds every stage, e.g. its
        LoRA init, as an unbroken one); with `keep_attention: auto` the layers are chosen after the first
        attention_transfer stage, or before the first stage when there is none. `on_stage(report, model)` is
        called after each stage (and the selection that follows it), e.g. to score it. The recipe's `serve` options
        are set last (`linearize.set_options`). Returns the distilled model."""
        from accelerate.utils import set_seed

        if self.model is None:
            raise LinearizeError("call Run.setup() before Run.train()")
        recipe, kinds = self.recipe, stage_kinds()
        order = [stage.kind for stage in recipe.stages]
        select_after = order.index("attention_transfer") if "attention_transfer" in order else -1
        if self.keep is not None and select_after == -1:
            self._select()
        for index, stage in enumerate(recipe.stages):
            self.session.stage_index = index
            set_seed(recipe.seed + index)
            data = self.data.with_seq_len(stage.seq_len) if stage.seq_len else self.data
            self.model = kinds[stage.kind].run(self.model, data, stage, self.session)
            if self.keep is not None and index == select_after:
                self._select()
            if on_stage is not None:
                on_stage(StageReport.from_dict(self.session.reports[-1]), self.model)
        if recipe.serve:
            self._serve()
        return self.model

    def _serve(self) -> None:
        """The recipe's `serve` options on every converted layer that takes them, then those of `serve.layers` on
        their layers; `auto:N` ranks the layers that take them by the teacher's strongest retrieval head on
        `convert.selection.heads` tasks (with `convert.selection.lead`), as `keep_attention`'s heads proposal does."""
        options, by_layers = serve_parts(self.recipe.serve)
        say = self.session.say

        def listed(given: dict[str, Any]) -> str:
            return ", ".join(f"{key}={value}" for key, value in given.items())

        if options:
            layers = set_options(self.model, **options)
            say(f"served with {listed(options)} in {len(layers)} layers (serve)")
        for selection, given in by_layers.items():
            amount = auto_amount(selection, "serve.layers")
            chosen = selection if amount is None else self._head_layers(amount, given)
            layers = set_options(self.model, layers=chosen, **given)
            how = "" if amount is None else ": the teacher's retrieval heads"
            say(f"served with {listed(given)} in layers {layers} (serve.layers {selection}{how})")
            self.session.record({"event": "serve", "selection": selection, "layers": layers, "options": given})

    def _head_layers(self, amount: float, given: dict[str, Any]) -> list[int]:
        """The `auto:amount` layers, of those that take `given`, whose strongest head in the teacher reads the
        answers of `convert.selection.heads` retrieval tasks off their needles (`retrieval_heads`, `by_heads`)."""
        settings = self.recipe.convert.selection
        takers = {mixer.layer_idx for mixer in check_runtime_options(self.model, **given)}
        count = auto_count(amount, len(takers), "serve.layers")
        windows = self.data.heldout_windows(settings.seq_len, max_tokens=settings.tokens)
        tasks = retrieval_windows(self.tokenizer, windows, settings.heads, "heads")
        was_training = self.model.training
        self.model.eval()
        heads = retrieval_heads(self.model, *tasks, settings.batch_size)
        self.model.train(was_training)
        strongest = {layer: per_head for layer, per_head in heads.items() if layer in takers}
        return sorted(by_heads(strongest, count, settings.lead, settings.around)[:count])

    def _select(self) -> dict[str, Any]:
        """Auto selection, or its replay from the checkpoint folder when resuming; logged and recorded."""
        session, plan = self.session, self.recipe.convert
        settings, keep_as = plan.selection, (plan.keep_as, plan.mixer_options.get(plan.keep_as))
        saved = None if session.checkpoints is None else session.checkpoints / "selection.json"
        if saved is not None and saved.is_file():
            selection = json.loads(saved.read_text())
            apply_selection(self.model, selection, *keep_as)
            session.say(f"selection (from {saved}): softmax attention kept in layers {selection['kept_attention']}")
            return selection
        windows = self.data.heldout_windows(settings.seq_len, max_tokens=settings.tokens)
        selection = select_attention(self.model, windows, self.keep, settings, *keep_as, tokenizer=self.tokenizer)
        session.record({"event": "selection", **selection})
        if saved is not None and session.main:
            saved.write_text(json.dumps(selection, indent=2))
        rows = ", ".join(
            f"{f['layer']}: {f['normalized']:.3g}" + (f"/kl {f['kl']:.3g}" if "kl" in f else "")
            + (f"/restore {f['restore_gain']:.3g}" if "restore_gain" in f else "")
            + (f"/retrieval {f['retrieval_gain']:.3g}" if "retrieval_gain" in f else "")
            + (f"/head {f['retrieval_head']:.3g}" if "retrieval_head" in f else "")
            + (f"/opening {f['opening_gain']:.3g}" if "opening_gain" in f else "") for f in selection["layers"]
        )
        session.say(f"selection by {selection['method']}: softmax attention kept in layers {selection['kept_attention']} (per layer {rows})")
        for step in selection.get("opening", []):
            session.say(
                f"  with layers {step['from']} on softmax the answers open at log-probability {step['opening_logprob']:.3f};"
                f" layer {step['added']} added ({step['gains'][str(step['added'])]:+.3f})"
            )
        if "lead" in selection:
            lead = selection["lead"]
            where = "around" if lead.get("around") else "before"
            session.say(f"  layers {lead['layers']} kept {where} the first retrieval-head layer {lead['first_head_layer']}, in place of {lead['in_place_of']}")
        spent = selection["seconds"]
        parts = ", ".join(f"{name} {value:.1f} s" for name, value in spent.items() if name != "total")
        session.say(f"  selection took {spent['total']:.1f} s ({parts})")
        for method, candidate in (selection.get("candidates") or {}).items():
            answers = f", at retrieval answers {candidate['answer_kl']:.4g}" if "answer_kl" in candidate else ""
            session.say(f"  proposed by {method}: layers {candidate['kept_attention']}, KL to the teacher {candidate['kl']:.4g}{answers}")
        return selection

    def record(self, **scores: Any) -> RunRecord:
        """The run's record so far: recipe, data, stages, selection, seconds, and the given `Scores`
        (teacher=, converted=, distilled=)."""
        return RunRecord(
            recipe=self.recipe.to_dict(),
            output=str(self.out or ""),
            data=self.data.description if self.data is not None else "",
            seconds=round(time.time() - self.started_at, 1),
            stages=[StageReport.from_dict(report) for report in self.session.reports],
            selection=getattr(getattr(self.model, "config", None), "selection", None),
            **scores,
        )

    def save(self, record: RunRecord) -> None:
        """Write the output folder atomically (main process), then drop the checkpoints it supersedes."""
        if self.out is None:
            raise LinearizeError("this run has no output folder: pass out=... to Run, or save the model yourself")
        session, model = self.session, self.model
        if hasattr(model, "merge_and_unload"):
            # A lora_kd stage with merge: false hands back the peft model; the saved folder must not need peft.
            session.say("merging the LoRA adapters before saving (merge: false applies to the Python API)")
            model = model.merge_and_unload()
        if session.main:
            session.say(f"saving to {self.out}")
            with atomic_folder(self.out, self.overwrite) as staging:
                model.save_pretrained(staging)
                self.tokenizer.save_pretrained(staging)
                (staging / "recipe.yaml").write_text(yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))
                record.save(staging)
                if session.records:
                    (staging / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in session.records))
                for name, text in session.profiles.items():
                    (staging / name).write_text(text)
            if self.checkpoints is not None:
                shutil.rmtree(self.checkpoints, ignore_errors=True)
        self.accelerator.wait_for_everyone()


def distill(
    model: nn.Module,
    data: Any = None,
    recipe: Recipe | str | Path = "quickstart",
    *,
    tokenizer=None,
    overrides: list[str] = (),
    checkpoints: str | Path | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> nn.Module:
    """Convert `model` as the recipe says (unless it is already converted) and run the recipe's stages on `data`.

    `data` is a packaged name, a file, a folder or a Hub id (tokenised with `tokenizer`), a `datasets` dataset,
    a `DistillData`, or None for the recipe's own data. With `checkpoints` a folder, stages checkpoint there and
    `resume=True` continues an interrupted call. Returns the distilled model, in memory; save it yourself.

    Example:
        >>> teacher, tokenizer = linearize.load_teacher("smollm2-135m")
        >>> student = linearize.distill(teacher, "prideprejudice", "quickstart", tokenizer=tokenizer)
        >>> student.save_pretrained("out/smollm2-distilled")
    """
    if isinstance(recipe, Recipe):
        if overrides:
            raise LinearizeError("overrides apply to a recipe name or path; change the Recipe object's fields instead")
    else:
        recipe = load_recipe(recipe, list(overrides))
    run = Run(recipe, checkpoints=checkpoints, resume=resume, log=log, progress=progress)
    return run.setup(model, tokenizer, data).train()
