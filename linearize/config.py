"""Recipes as data: one YAML per run, loaded into dataclasses, validated, with `key=value` overrides.

Unknown keys are errors that name the closest valid key; values are converted to the declared types.
Distillation stages are tagged by `kind`: each module of `linearize.distillation.stages` registers its kind with
its config dataclass and its runner (`register_stage`), and `stage_kinds()` imports them all on first use.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import pkgutil
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .hf.errors import LinearizeError
from .hf.typed import coerce

PRECISIONS = ("auto", "bf16", "fp16", "no")
STAGE_PACKAGE = "linearize.distillation.stages"


@dataclass(frozen=True)
class StageKind:
    """A distillation stage a recipe can name: its `kind`, its config dataclass (a `TrainConfig` with a `kind`
    field) and its runner, `run(model, data, config, session) -> model`."""

    kind: str
    config: type
    run: Callable


_STAGE_KINDS: dict[str, StageKind] = {}


def register_stage(kind: str, config: type, run: Callable) -> None:
    """Register a stage kind; a duplicate kind, or a config whose `kind` field does not default to it, raises.

    A new stage is one new module in linearize/distillation/stages/ that ends with its registration:
        >>> register_stage("my_stage", MyStageConfig, run)
    """
    if kind in _STAGE_KINDS:
        raise ValueError(f"stage kind {kind!r} is already registered by {_STAGE_KINDS[kind].config.__qualname__}")
    defaults = {f.name: f.default for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else {}
    if defaults.get("kind") != kind or not callable(run):
        raise ValueError(f"stage kind {kind!r}: register a config dataclass whose `kind` field defaults to {kind!r}, and a callable run")
    _STAGE_KINDS[kind] = StageKind(kind, config, run)


def stage_kinds() -> dict[str, StageKind]:
    """Every registered stage kind by name; the first call imports each module of `linearize.distillation.stages`."""
    _import_stage_modules()
    return dict(_STAGE_KINDS)


@functools.cache
def _import_stage_modules() -> None:
    package = importlib.import_module(STAGE_PACKAGE)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{STAGE_PACKAGE}.{module.name}")


@dataclass
class SelectionConfig:
    """How `keep_attention: auto:N` scores layers: by the attention-transfer error of each converted layer,
    normalised by the mean square of the teacher's output there (raw errors grow with depth), on held-out text.

    kl: also score each layer by the KL(teacher || student) of the logits when only that layer is converted,
        and rank by it (one extra forward pass per layer); the normalised error is recorded either way.
    restore: also score each layer by how much the KL of the fully converted model falls when that layer alone
        goes back to softmax attention (one forward pass per layer). Each scorer then proposes its N layers, the
        KL of the model with each proposal restored is measured, and the lowest wins; every proposal is recorded.
    tokens: held-out tokens the scores are measured on, in windows of `seq_len` tokens (default data.seq_len;
        longer windows choose by what long context needs).
    batch_size: windows per forward pass while scoring.
    retrieval: also score each layer by how much restoring it lowers the KL at the answers of this many retrieval
        tasks (passkey, needle and multi-key needle of the training pool, `seq_len` tokens each, filled with held-out
        text; one forward pass per layer). It proposes its layers, and so do it and the single-layer KL ranking
        (the error ranking without `kl`) in turn; the proposal with the lowest sum of the KL on text and at the
        answers wins. 0: text only.
    heads: keep the layers of the teacher's retrieval heads, found on this many retrieval tasks of the training pool
        (as `retrieval` makes them; one forward pass of the teacher each): a layer scores the largest share of
        attention that one of its heads gives, where an answer is due, to the answer's digits where the context
        states them. This proposal is kept whatever the others measure; they are still measured and recorded.
        0: off.
    opening: with `heads`, choose this many of the N kept layers another way: with the heads' strongest N - opening
        layers on softmax, add one at a time the converted layer whose restoring most raises the log-probability
        of the first token of the answers of the `heads` tasks (where the model decides to answer at all; a student
        that keeps its teacher's heads can still copy a passkey it no longer starts). 0: the heads alone.
    lead: with `heads`, make this many of the N kept layers the converted layers just before the earliest of the
        heads' strongest N - lead layers (nearest first; after it where too few precede it): the layers that build
        what the first retrieval heads read. 0: the heads alone. Set one of `opening` and `lead`.
    around: with `lead`, take the lead layers nearest the earliest of the heads' layers on either side (nearest
        first, the one before at equal distance) instead of before it: `lead: 2, around: true` keeps the layers on
        both sides of it.
    """

    kl: bool = False
    restore: bool = False
    tokens: int = 16384
    seq_len: int | None = None
    batch_size: int = 4
    retrieval: int = 0
    heads: int = 0
    opening: int = 0
    lead: int = 0
    around: bool = False

    def __post_init__(self):
        if self.tokens < 1 or self.batch_size < 1 or (self.seq_len is not None and self.seq_len < 8):
            raise LinearizeError(
                f"convert.selection.tokens and batch_size must be positive and seq_len at least 8, got {self.tokens}, {self.batch_size} and {self.seq_len}"
            )
        for name in ("retrieval", "heads"):
            if getattr(self, name) < 0:
                raise LinearizeError(f"convert.selection.{name} is a number of retrieval tasks, 0 or more; got {getattr(self, name)}")
        for name in ("opening", "lead"):
            if getattr(self, name) < 0 or (getattr(self, name) and not self.heads):
                raise LinearizeError(
                    f"convert.selection.{name}={getattr(self, name)}: it is a number of layers (0 or more) chosen beside the retrieval heads'; set convert.selection.heads too"
                )
        if self.around and not self.lead:
            raise LinearizeError("convert.selection.around=true places lead layers but lead is 0; set convert.selection.lead (e.g. 2), or around=false")
        if self.opening and self.lead:
            raise LinearizeError(
                f"convert.selection.opening={self.opening} and lead={self.lead} both choose layers beside the retrieval heads'; set one of them to 0"
            )


@dataclass
class ConvertConfig:
    """Which mixer replaces attention, where, and with which options (see `linearize mixers`).

    keep_attention also takes `auto:N` (N layers) or `auto:F` (a fraction F of the layers): every layer is
    converted, and after the first attention_transfer stage (or before the first stage when there is none)
    the N layers whose conversion hurts most go back to softmax attention (see `selection`).
    keep_as: the mixer of the layers that keep softmax attention: `attention` (the teacher's own layer) or, for a
    model that exports to a native architecture, that architecture's softmax layer (`qwen3_5_attention`).
    """

    mixer: str = "hedgehog_swa"
    keep_attention: Any = field(default_factory=list)
    keep_as: str = "attention"
    layers: Any = None
    hybrid: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    mixer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    selection: SelectionConfig = field(default_factory=SelectionConfig)


@dataclass
class DataConfig:
    """Training and held-out text, tokenised and packed into windows of `seq_len` tokens.

    train / heldout: a packaged text (prideprejudice, persuasion), a .txt/.jsonl/.json/.parquet/.csv file or
        a folder of them, or a Hub dataset id. An empty `heldout` holds out the tail of the training windows
        (`heldout_fraction` of them) or, when streaming, the first windows of the stream.
    split / name: the Hub dataset's split and configuration name; `heldout_split` is the split read when
        `heldout` is a Hub id (default: `split`).
    text_field: the column holding plain text; with `chat_template`, `messages_field` holds conversations
        (lists of {role, content}) rendered with the tokenizer's chat template.
    streaming: read the training set lazily (big Hub sets); windows come in stream order, no shuffling.
    heldout_tokens: at most this many held-out tokens are kept.
    allow_longer: train on windows longer than the model's positions (`max_position_embeddings`); refused
        otherwise, as `linearize eval` refuses such lengths without --allow-longer.
    retrieval: the share of training windows made retrieval tasks with their answers (0: none), of
        `retrieval_kinds` (passkey, needle, multikey, kv, vt; see linearize.distillation.retrieval_mix), built
        from other text and answers than `linearize eval`'s probes.
    retrieval_weight: how many times a prose position's weight the positions that predict a task's answer get in
        LoRA KD's losses (1: the same). A tenth of 512-token windows as tasks puts about 0.14% of the positions
        at answers; a weight of 100 gives them about an eighth of the loss.
    """

    train: str = "prideprejudice"
    heldout: str | None = "persuasion"
    seq_len: int = 512
    text_field: str = "text"
    messages_field: str = "messages"
    split: str = "train"
    heldout_split: str | None = None
    name: str | None = None
    heldout_fraction: float = 0.05
    heldout_tokens: int = 65536
    chat_template: bool = False
    streaming: bool = False
    allow_longer: bool = False
    retrieval: float = 0.0
    retrieval_kinds: list[str] = field(default_factory=lambda: ["passkey", "needle", "multikey", "kv", "vt"])
    retrieval_weight: float = 1.0

    def __post_init__(self):
        if self.seq_len < 8:
            raise LinearizeError(f"data.seq_len must be at least 8, got {self.seq_len}")
        if not 0 < self.heldout_fraction < 1:
            raise LinearizeError(f"data.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if not 0 <= self.retrieval < 1:
            raise LinearizeError(f"data.retrieval is a share of the training windows, in [0, 1); got {self.retrieval}")
        if not self.retrieval_weight > 0:
            raise LinearizeError(f"data.retrieval_weight must be positive (1 weighs answers as prose); got {self.retrieval_weight}")
        if self.retrieval_weight != 1 and not self.retrieval:
            raise LinearizeError("data.retrieval_weight weighs retrieval answers, but data.retrieval is 0; set data.retrieval too, or leave the weight at 1")
        if self.heldout_tokens < 1:
            raise LinearizeError(f"data.heldout_tokens must be positive, got {self.heldout_tokens}")
        if not self.train:
            raise LinearizeError("data.train is empty; name a packaged text, a file or folder, or a Hub dataset id")
        if self.heldout == self.train and (self.heldout_split or self.split) == self.split:
            raise LinearizeError(
                f"data.heldout is the training data itself ({self.train!r}, split {self.split!r}); set data.heldout_split "
                "(e.g. validation), or leave data.heldout empty to hold out part of the training data"
            )


@dataclass
class EvalConfig:
    """The short evaluation `linearize run` ends with: held-out perplexity and a side-by-side generation."""

    perplexity_tokens: int = 8192
    seq_len: int = 512
    prompt: str = "It is a truth universally acknowledged, that"
    max_new_tokens: int = 40


@dataclass
class Recipe:
    """One run: the teacher, the conversion, the distillation stages, the evaluation and where outputs go.

    precision: mixed precision of distillation: auto (bf16 autocast on a CUDA GPU that has it, else none),
    bf16, fp16 or no; trainable parameters stay in float32 under autocast.
    serve: options that add and change no parameter (a mixer's runtime options, `linearize.set_options`) given to
    the distilled student before it is scored and saved: e.g. more kept keys (`keep`) than it distilled with.
    """

    teacher: str = "smollm2-135m"
    dtype: str = "float32"
    output: str = "out/run"
    seed: int = 0
    precision: str = "auto"
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[Any] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise LinearizeError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _closest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def from_dict(cls, data: Any, where: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys raise with the closest valid one."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise LinearizeError(f"{where or cls.__name__} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise LinearizeError(f"unknown key {path!r}; {_closest(str(key), list(fields))}valid keys here: {', '.join(fields)}")
        if cls is Recipe and key == "stages":
            values[key] = [stage_from_dict(s, f"stages[{i}]") for i, s in enumerate(value or [])]
        else:
            values[key] = coerce(value, hints[key], path, nested=from_dict)
    return cls(**values)


def stage_from_dict(data: Any, where: str):
    """Build the config of the stage kind `data` names (its `kind` key)."""
    kinds = stage_kinds()
    if not isinstance(data, dict) or "kind" not in data:
        raise LinearizeError(f"{where} needs a 'kind' (one of: {', '.join(sorted(kinds))})")
    kind = data["kind"]
    if kind not in kinds:
        raise LinearizeError(f"{where}: unknown stage kind {kind!r}; {_closest(str(kind), list(kinds))}available: {', '.join(sorted(kinds))}")
    return from_dict(kinds[kind].config, data, where)


def _glued_key(value: Any, path: str) -> tuple[str, str] | None:
    """A mapping key anywhere in `value` (at `path`) that YAML read from `name:value` written without a space
    (`{window:256}` is the one key 'window:256', with no value), and the dotted path of its parent."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if item is None and isinstance(key, str) and ":" in key and "://" not in key:
            return path, key
        glued = _glued_key(item, f"{path}.{key}")
        if glued:
            return glued
    return None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML; list items addressed by index) to raw recipe data."""
    for item in overrides:
        if "=" not in item:
            raise LinearizeError(f"override {item!r} must look like key=value, e.g. data.seq_len=256")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        glued = _glued_key(value, key.strip())
        if glued:
            path, name = glued
            name, after = name.split(":", 1)
            raise LinearizeError(
                f"override {item!r}: YAML reads '{name}:{after}' as one key with no value; write '{name}: {after}' with a space, or {path}.{name}={after}"
            )
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise LinearizeError(f"override {key!r}: {part!r} is not an index of a list of {len(node)}")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise LinearizeError(f"override {key!r}: {last!r} is not an index of a list of {len(node)}")
            node[int(last)] = value
        else:
            node[last] = value
    return data


RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: a path, or the name of a shipped recipe (`linearize recipes` lists them)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise LinearizeError(f"recipe file {str(path)!r} does not exist")
        return path
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = shipped_recipes()
    raise LinearizeError(f"no recipe {str(name_or_path)!r}; {_closest(str(name_or_path), names)}shipped recipes: {', '.join(names)}")


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_summary(name: str) -> str:
    """The first sentence of a shipped recipe's description (the comment lines after its command and overrides)."""
    comments = [line.lstrip("#").strip() for line in (RECIPE_DIR / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]
    text = " ".join(line for line in comments[1:] if not line.startswith(("Override any key", "linearize ")))
    return text.split(". ")[0].rstrip(".")


def load_recipe(name_or_path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load, override and validate a recipe."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise LinearizeError(f"recipe {str(path)!r} is not valid YAML: {str(error).splitlines()[0]}") from None
    return from_dict(Recipe, apply_overrides(data, list(overrides)))
