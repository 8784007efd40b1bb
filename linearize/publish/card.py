"""The model card (README.md) of a pushed converted model: Hub front matter, what was converted and how, the
token budget, the report's tables and figures when there is a report, and how to load it."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from linearize.hf.configuration_linearized import LinearizedConfig

# The embedded default teacher: what its alias stands for on the Hub, and its license.
KNOWN_TEACHERS = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# Stage keys that hold a number of training tokens, in recipes and in the results `linearize run` writes.
TOKEN_KEYS = ("tokens", "train_tokens", "max_tokens", "token_budget")


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
    if source.strip().lower() in KNOWN_TEACHERS:
        return KNOWN_TEACHERS[source.strip().lower()]
    path = Path(source).expanduser()
    if path.is_dir():
        readme = path / "README.md"
        meta = front_matter(readme.read_text(errors="replace")) if readme.is_file() else {}
        base = meta.get("base_model")
        return (base if isinstance(base, str) else None), meta.get("license")
    if _HUB_ID.match(source):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "README.md")
        meta = front_matter(Path(cached).read_text(errors="replace")) if isinstance(cached, str) else {}
        return source, meta.get("license")
    return None, None


def token_budget(recipe: dict[str, Any] | None, run: dict[str, Any] | None) -> int | None:
    """Training tokens: what the run recorded per stage, else what the recipe's stages asked for."""
    for stages in ((run or {}).get("stages"), (recipe or {}).get("stages")):
        counts = [stage[key] for stage in stages or [] if isinstance(stage, dict) for key in TOKEN_KEYS if isinstance(stage.get(key), int)]
        if counts:
            return sum(counts)
    return None


def _report_body(report_dir: Path | None) -> str:
    """The report's sections with figure links pointing into the repo's report/ folder."""
    if report_dir is None or not (report_dir / "report.md").is_file():
        return ""
    text = (report_dir / "report.md").read_text()
    text = re.sub(r"^# .*\n+", "", text)  # the card has its own title
    text = re.sub(r"^## ", "### ", text, flags=re.M)
    return re.sub(r"\]\((?!https?://)([^)]+\.png)\)", r"](report/\1)", text)


def model_card(
    config: LinearizedConfig,
    repo_id: str,
    recipe: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
    report_dir: Path | None = None,
) -> str:
    base, license_ = teacher_identity(config.source)
    mixers = Counter(config.mixer_names())
    converted = sum(n for name, n in mixers.items() if name != "attention")
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "transformers"
    if license_:
        meta["license"] = license_
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["linearize", "linear-attention", "distillation"] + sorted(f"mixer:{name}" for name in mixers)
    teacher = f"[{base}](https://huggingface.co/{base})" if base else f"`{config.source or 'an unrecorded teacher'}`"
    budget = token_budget(recipe, run)
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{teacher} converted to linear-time attention with [linearize](https://pypi.org/project/linearize/): "
        f"{converted} of {len(config.layers)} softmax attention layers were replaced by mixers that reuse the teacher's "
        "query/key/value/output weights, then distilled back towards the teacher.",
        "",
        "## Layers",
        "",
        "| mixer | layers | options |",
        "|---|---|---|",
    ]
    for name, count in sorted(mixers.items()):
        options = next(e["options"] for e in config.layers if e["mixer"] == name)
        lines.append(f"| {name} | {count} | {', '.join(f'{k}={v}' for k, v in options.items()) or '–'} |")
    lines += ["", "## Recipe", "", f"Training tokens: {f'{budget:,}' if budget is not None else 'not recorded'}."]
    if recipe:
        lines += ["", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```"]
    report = _report_body(report_dir)
    if report:
        lines += ["", "## Evaluation", "", report.strip()]
    lines += [
        "",
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
    return "\n".join(lines)
