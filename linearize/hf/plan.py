"""The layer plan: which mixer replaces each decoder layer's attention, and with which options.

A converted model's config.json saves it as `layers`, one `{"mixer": name, "options": {...}}` per decoder layer,
and that alone rebuilds the model on load. Code reads the plan through `LayerPlan`, never through those keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import LinearizeError

# The mixer that keeps the teacher's softmax attention layer as it is.
ATTENTION = "attention"


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer: the registered name of the mixer that replaces its attention, and that mixer's options."""

    mixer: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_attention(self) -> bool:
        """Whether the layer keeps the teacher's softmax attention."""
        return self.mixer == ATTENTION

    def to_json(self) -> dict[str, Any]:
        return {"mixer": self.mixer, "options": dict(self.options)}

    @classmethod
    def from_json(cls, entry: Any, where: str = "a layer") -> LayerSpec:
        """Read one `{"mixer": name, "options": {...}}` entry (missing or null options are none)."""
        options = (entry.get("options") or {}) if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("mixer"), str) or not isinstance(options, dict):
            raise LinearizeError(
                f'{where} of the plan is {entry!r}, not {{"mixer": name, "options": {{...}}}}; '
                "restore the config.json saved with these weights, or convert the teacher again"
            )
        return cls(entry["mixer"], dict(options))


@dataclass(frozen=True)
class LayerPlan:
    """Per decoder layer, in order, the mixer that replaces its attention (`ATTENTION` keeps it).

    Example:
        >>> plan = LayerPlan.of(["attention", "hedgehog_swa"], {"hedgehog_swa": {"window": 64}})
        >>> plan.converted(), plan[1].options
        ([1], {'window': 64})
        >>> LayerPlan.from_json(plan.to_json()) == plan
        True
    """

    layers: tuple[LayerSpec, ...] = ()

    @classmethod
    def of(cls, mixers: Iterable[str], options: dict[str, dict[str, Any]] | None = None) -> LayerPlan:
        """A plan from one mixer name per layer; `options` maps a mixer name to the options all its layers take."""
        options = options or {}
        return cls(tuple(LayerSpec(name, dict(options.get(name, {}))) for name in mixers))

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerSpec]:
        return iter(self.layers)

    def __getitem__(self, index: int) -> LayerSpec:
        return self.layers[index]

    def mixer_names(self) -> list[str]:
        return [spec.mixer for spec in self.layers]

    def converted(self) -> list[int]:
        """Indices of the layers whose attention a mixer replaces."""
        return [index for index, spec in enumerate(self.layers) if not spec.is_attention]

    def with_layers(self, specs: dict[int, LayerSpec]) -> LayerPlan:
        """This plan with the layer at each index of `specs` replaced by its spec."""
        return LayerPlan(tuple(specs.get(i, spec) for i, spec in enumerate(self.layers)))

    def with_options(self, options: Iterable[dict[str, Any]]) -> LayerPlan:
        """This plan with each layer's options replaced, in order (the options the built mixers resolved)."""
        return LayerPlan(tuple(replace(spec, options=dict(new)) for spec, new in zip(self.layers, options, strict=True)))

    def to_json(self) -> list[dict[str, Any]]:
        """The `layers` list of config.json."""
        return [spec.to_json() for spec in self.layers]

    @classmethod
    def from_json(cls, data: Any) -> LayerPlan:
        """Read the `layers` list of config.json; anything else is a one-line LinearizeError."""
        if not isinstance(data, (list, tuple)):
            raise LinearizeError(
                f"the plan (layers in config.json) is {type(data).__name__}, not a list; "
                "restore the config.json saved with these weights, or convert the teacher again"
            )
        return cls(tuple(LayerSpec.from_json(entry, f"layer {index}") for index, entry in enumerate(data)))
