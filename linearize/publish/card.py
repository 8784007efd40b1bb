"""The model card (README.md) of a pushed converted model: Hub front matter, what was converted and how, the
token budget (from the run record), the report's tables and figures when there is a report (from its numbers,
report.json), and how to load it. An exported model's card (`exported_model_card`) says the same of the run and,
instead of the remote code, which native architecture it is and which engines serve it (linearize.export.TARGETS)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from linearize.export import TARGETS, Target
from linearize.hf.configuration_linearized import LinearizedConfig
from linearize.record import RunRecord
from linearize.report import markdown
from linearize.sources import classify_source

# The embedded default teacher: what its alias stands for on the Hub, and its license.
KNOWN_TEACHERS = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}


def front_matter(text: str) -> dict[str, Any]:
    """The YAML metadata block at the top of a README, or {}."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def teacher_identity(source: str | None) -> tuple[str | None, str | None]:
    """(Hub id, license) of the teacher, where they can be known without a network call: the embedded alias, a
    local folder's README front matter, or a Hub id's README in the local Hugging Face cache."""
    if not source:
        return None, None
    found = classify_source(source, names=KNOWN_TEACHERS)
    if found.kind == "name":
        return KNOWN_TEACHERS[found.text]
    if found.kind == "folder":
        readme = found.path / "README.md"
        meta = front_matter(readme.read_text(errors="replace")) if readme.is_file() else {}
        base = meta.get("base_model")
        return (base if isinstance(base, str) else None), meta.get("license")
    # Only `org/name`: push cuts a local path to its last component, so a bare `name` may be a folder elsewhere.
    if found.kind == "hub" and "/" in found.text:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(found.text, "README.md")
        meta = front_matter(Path(cached).read_text(errors="replace")) if isinstance(cached, str) else {}
        return found.text, meta.get("license")
    return None, None


def token_budget(recipe: dict[str, Any] | None, record: RunRecord | None) -> int | None:
    """Training tokens: what the run recorded over its stages, else what the recipe's stages ask for (`tokens`)."""
    if record is not None and record.tokens is not None:
        return record.tokens
    stages = [stage for stage in (recipe or {}).get("stages") or [] if isinstance(stage, dict)]
    counts = [stage["tokens"] for stage in stages if isinstance(stage.get("tokens"), int)]
    return sum(counts) if counts else None


def evaluation(summary: dict[str, Any] | None) -> str:
    """The report's tables (from its report.json, the summary `linearize report` writes), with its figures under
    report/ in the repo, nested under the card's own headings."""
    if not summary:
        return ""
    figures = {key: f"report/{name}" for key, name in summary.get("figures", {}).items()}
    return markdown.render(summary, figures, title=None, level=3)


def _front_matter(tags: list[str], base: str | None, license_: str | None) -> str:
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "transformers"
    if license_:
        meta["license"] = license_
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = tags
    return "\n".join(["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---"])


def _run(recipe: dict[str, Any] | None, record: RunRecord | None, summary: dict[str, Any] | None) -> list[str]:
    """The run's sections: its token budget and recipe, and the report's tables."""
    budget = token_budget(recipe, record)
    lines = ["## Recipe", "", f"Training tokens: {f'{budget:,}' if budget is not None else 'not recorded'}."]
    if recipe:
        lines += ["", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```"]
    report = evaluation(summary)
    if report:
        lines += ["", "## Evaluation", "", report.strip()]
    return lines


def _export_line(config: LinearizedConfig) -> list[str]:
    """How to export the model, where its layers are exactly a target's mixers (a target needs all of them: qwen3_5
    cannot generate from Gated DeltaNet layers alone)."""
    for target in TARGETS.values():
        if set(config.mixer_names()) == set(target.mixers):
            return [
                "",
                f"Its layers are all {target.name}'s, so `linearize export FOLDER --to {target.name} --out OUT` (FOLDER: a local copy of "
                f"this repository) writes it as transformers' native `{target.architecture}`, which needs no remote code and which "
                "serving engines run.",
            ]
    return []


def _layers(config: LinearizedConfig) -> list[str]:
    mixers = Counter(config.mixer_names())
    lines = ["## Layers", "", "| mixer | layers | options |", "|---|---|---|"]
    for name, count in sorted(mixers.items()):
        options = next(entry.options for entry in config.plan if entry.mixer == name)
        lines.append(f"| {name} | {count} | {', '.join(f'{k}={v}' for k, v in options.items()) or '–'} |")
    return lines + _export_line(config)


def _how_to_load(repo_id: str) -> list[str]:
    return [
        "## How to load",
        "",
        "With linearize installed (`pip install linearize`), no remote code is needed:",
        "",
        "```python",
        "import linearize  # registers the converted architecture with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        "```",
        "",
        "Without linearize, the modeling code shipped in this repository loads with `trust_remote_code=True`:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        'inputs = tokenizer("It is a truth universally acknowledged, that", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0]))",
        "```",
        "",
        "Converted layers keep a fixed-size recurrent state instead of a key/value cache, so memory does not grow with "
        "context; assisted (speculative) generation is not supported, as a recurrent state cannot be rolled back.",
        "",
    ]


def model_card(
    config: LinearizedConfig,
    repo_id: str,
    recipe: dict[str, Any] | None = None,
    record: RunRecord | None = None,
    summary: dict[str, Any] | None = None,
) -> str:
    """The card of `config`'s model pushed as `repo_id`: `recipe` (as saved in recipe.yaml), the run's `record`
    (its results.json) and a report's `summary` (its report.json) when there are any."""
    base, license_ = teacher_identity(config.source)
    converted = len(config.plan.converted())
    teacher = f"[{base}](https://huggingface.co/{base})" if base else f"`{config.source or 'an unrecorded teacher'}`"
    tags = ["linearize", "linear-attention", "distillation"] + sorted(f"mixer:{name}" for name in set(config.mixer_names()))
    lines = [
        _front_matter(tags, base, license_),
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{teacher} converted to linear-time attention with [linearize](https://pypi.org/project/linearize/): "
        f"{converted} of {len(config.plan)} softmax attention layers were replaced by mixers that reuse the teacher's "
        "query/key/value/output weights, then distilled back towards the teacher.",
        "",
        *_layers(config),
        "",
        *_run(recipe, record, summary),
    ]
    return "\n".join(lines + ["", *_how_to_load(repo_id)])


def _command(command: str, repo_id: str) -> str:
    """An engine's command line for this repo: PATH becomes the repo id, quoted where it is a Python argument."""
    return command.replace("(PATH)", f'("{repo_id}")').replace("PATH", repo_id)


def _serving(target: Target, repo_id: str) -> list[str]:
    lines = ["## Serving", "", f"Engines that run `{target.architecture}`:", "", "| engine | versions | command |", "|---|---|---|"]
    for engine, versions, command in target.engines:
        lines.append(f"| {engine} | {versions.replace('|', '/')} | `{_command(command, repo_id)}` |")
    return lines


def _exported_how_to_load(target: Target, repo_id: str) -> list[str]:
    return [
        "## How to load",
        "",
        f"A native transformers `{target.architecture}`: it loads without `trust_remote_code` and without linearize.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        'inputs = tokenizer("It is a truth universally acknowledged, that", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0]))",
        "```",
        "",
        "Its linear_attention layers keep a fixed-size recurrent state instead of a key/value cache, so their memory does "
        "not grow with context.",
        "",
    ]


def exported_model_card(
    target: Target,
    layer_types: Sequence[str],
    repo_id: str,
    teacher: str | None = None,
    logit_check: tuple[float, str] | None = None,
    recipe: dict[str, Any] | None = None,
    record: RunRecord | None = None,
    summary: dict[str, Any] | None = None,
) -> str:
    """The card of a model `linearize export` wrote as `target` with `layer_types`, pushed as `repo_id`: its
    `teacher` (else the recipe's), the export's `logit_check` (relative logit difference, dtype), and the source
    run's `recipe`, `record` and a report's `summary` when there are any."""
    recorded = recipe or (record.recipe if record is not None else None) or {}
    source = teacher or (recorded.get("teacher") if isinstance(recorded.get("teacher"), str) else None)
    base, license_ = teacher_identity(source)
    named = f"[{base}](https://huggingface.co/{base})" if base else f"`{source or 'an unrecorded teacher'}`"
    counts = Counter(layer_types)
    tags = ["linearize", "linear-attention", target.name] + (["hybrid"] if len(counts) > 1 else [])
    lines = [
        _front_matter(tags, base, license_),
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{named} converted to linear-time attention with [linearize](https://pypi.org/project/linearize/) and exported "
        f"as transformers' native `{target.architecture}`: it loads without `trust_remote_code`, and the serving engines "
        "below run it.",
        "",
        "## Layers",
        "",
        "| layer type | layers | which |",
        "|---|---|---|",
        *(
            f"| {kind} | {count} | {', '.join(str(i) for i, t in enumerate(layer_types) if t == kind)} |"
            for kind, count in sorted(counts.items(), key=lambda item: -item[1])
        ),
    ]
    if logit_check is not None:
        difference, dtype = logit_check
        lines += ["", f"The export checked that its logits are the linearize student's: relative difference {difference:.1e} ({dtype or 'its dtype'})."]
    lines += ["", *_serving(target, repo_id), "", *_run(recipe, record, summary)]
    return "\n".join(lines + ["", *_exported_how_to_load(target, repo_id)])
