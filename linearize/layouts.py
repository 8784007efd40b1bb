"""Layer selections and hybrid layouts: which layers keep softmax attention and which take which mixer.

A selection is a list of indices, a string of them ("0,7", "0-3,12"), or a pattern:
  every:K      layers 0, K, 2K, ...          every:K@R   layers R, R+K, R+2K, ...
  first:N      the first N layers            last:N      the last N layers
  spread:F     a fraction F (0 < F < 1) of the layers, spread evenly; spread:N for a count N >= 1
  none         no layer
Parts join with "+", e.g. "first:1+last:1". Every index must be in range and appear once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from .hf.errors import LinearizeError
from .hf.plan import ATTENTION

PATTERN_HELP = "indices like 0,7 or 0-3, or every:K[@R], first:N, last:N, spread:F, none, joined with +"


def _spread(num_layers: int, count: int) -> list[int]:
    return sorted({min(num_layers - 1, int((j + 0.5) * num_layers / count)) for j in range(count)})


def _part(num_layers: int, part: str, what: str) -> list[int]:
    part = part.strip()
    if part in ("", "none"):
        return []
    match = re.fullmatch(r"(every|first|last|spread):([0-9.]+)(?:@(\d+))?", part)
    if match:
        kind, value, offset = match.groups()
        if kind == "spread":
            amount = float(value)
            count = round(amount * num_layers) if amount < 1 else int(amount)
            if amount <= 0 or count < 1 or count > num_layers or (amount >= 1 and amount != int(amount)):
                raise LinearizeError(f"{what}: {part!r} selects no valid number of layers out of {num_layers}; use a fraction in (0, 1) or a count")
            return _spread(num_layers, count)
        if not value.isdigit() or int(value) < 1 or (offset is not None and kind != "every"):
            raise LinearizeError(f"{what}: bad pattern {part!r}; use {PATTERN_HELP}")
        n = int(value)
        if kind == "every":
            start = int(offset or 0)
            if start >= n:
                raise LinearizeError(f"{what}: in {part!r} the offset must be below {n}")
            return list(range(start, num_layers, n))
        if n > num_layers:
            raise LinearizeError(f"{what}: {part!r} asks for {n} layers but the model has {num_layers}")
        return list(range(n)) if kind == "first" else list(range(num_layers - n, num_layers))
    indices = []
    for item in part.split(","):
        item = item.strip()
        bounds = re.fullmatch(r"(-?\d+)(?:-(\d+))?", item)
        if not bounds:
            raise LinearizeError(f"{what}: cannot read {item!r}; use {PATTERN_HELP}")
        lo = int(bounds.group(1))
        hi = int(bounds.group(2)) if bounds.group(2) is not None else lo
        indices.extend(range(lo, hi + 1))
    return indices


def select_layers(num_layers: int, selection: Any, what: str = "keep_attention") -> list[int]:
    """Resolve a selection (see module docstring) to sorted layer indices; errors name the bad layer."""
    if selection is None:
        return []
    if isinstance(selection, str):
        if selection.strip().startswith("auto"):
            raise LinearizeError(
                f"{what}: {selection!r} chooses layers by distillation; run it through `linearize run`/`linearize.distill`, "
                "or give explicit layers"
            )
        indices = [i for part in selection.split("+") for i in _part(num_layers, part, what)]
    elif isinstance(selection, Iterable):
        indices = []
        for item in selection:
            if isinstance(item, bool) or not isinstance(item, int):
                raise LinearizeError(f"{what}: layer {item!r} is not an integer index")
            indices.append(item)
    elif isinstance(selection, int) and not isinstance(selection, bool):
        indices = [selection]
    else:
        raise LinearizeError(f"{what}: cannot read {selection!r}; use {PATTERN_HELP}")
    for index in indices:
        if not 0 <= index < num_layers:
            raise LinearizeError(f"{what}: layer {index} is out of range; the model has layers 0-{num_layers - 1}")
    seen = set()
    for index in indices:
        if index in seen:
            raise LinearizeError(f"{what}: layer {index} is listed twice")
        seen.add(index)
    return sorted(indices)


def resolve_layout(
    num_layers: int,
    mixer: str,
    keep_attention: Any = (),
    layers: Any = None,
    hybrid: Mapping[str, Any] | None = None,
) -> list[str]:
    """The mixer name for every layer. `layers` limits `mixer` to those layers (others keep attention)."""
    claims: dict[int, tuple[str, str]] = {}

    def claim(indices: list[int], name: str, what: str) -> None:
        for index in indices:
            if index in claims:
                raise LinearizeError(f"layer {index} is claimed twice: by {claims[index][1]} and by {what}; give each layer one mixer")
            claims[index] = (name, what)

    claim(select_layers(num_layers, keep_attention, "keep_attention"), ATTENTION, "keep_attention")
    for name, selection in (hybrid or {}).items():
        claim(select_layers(num_layers, selection, f"hybrid[{name}]"), name, f"hybrid[{name}]")
    targets = None if layers is None else set(select_layers(num_layers, layers, "layers"))
    overlap = sorted((targets or set()) & set(claims))
    if overlap:
        raise LinearizeError(f"layer {overlap[0]} is claimed twice: by layers and by {claims[overlap[0]][1]}; give each layer one mixer")
    assignment = []
    for index in range(num_layers):
        if index in claims:
            assignment.append(claims[index][0])
        elif targets is None or index in targets:
            assignment.append(mixer)
        else:
            assignment.append(ATTENTION)
    if mixer != ATTENTION and all(name == ATTENTION for name in assignment):
        raise LinearizeError("this layout keeps softmax attention in every layer, so nothing would be converted; keep fewer layers")
    return assignment
