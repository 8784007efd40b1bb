"""Configuration of a converted model: the teacher's own config plus the per-layer plan that rebuilds it."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig

from .errors import LinearizeError
from .plan import LayerPlan


class LinearizedConfig(PreTrainedConfig):
    """`text_config` is the teacher's config; `layers` is the layer plan as config.json holds it, one
    `{"mixer": name, "options": {...}}` per layer, and `plan` the same as a `LayerPlan` (read and set through it).

    The plan alone is enough to rebuild the model on load: the teacher architecture is built from
    `text_config`, then each layer's attention is replaced as the plan says, then the weights load.
    `source` names the teacher; `selection` holds per-layer figures when layers were chosen automatically.
    """

    model_type = "linearized"

    def __init__(
        self,
        text_config: PreTrainedConfig | dict | None = None,
        layers: LayerPlan | list[dict[str, Any]] | None = None,
        source: str | None = None,
        selection: dict[str, Any] | None = None,
        tuned_projections: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        if text_config is None:
            text_config = {"model_type": "llama"}
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            model_type = text_config.pop("model_type", None)
            if model_type is None:
                raise LinearizeError("text_config has no model_type; this config.json was not written by linearize")
            text_config = AutoConfig.for_model(model_type, **text_config)
        self.text_config = text_config
        self.plan = layers if isinstance(layers, LayerPlan) else LayerPlan.from_json(layers or [])
        self.source = source
        self.selection = selection
        # True once distillation changed the teacher's own q/k/v/o (LoRA merged): teacher_mode then runs softmax
        # attention on tuned projections, close to but no longer exactly the original teacher.
        self.tuned_projections = tuned_projections
        self.use_cache = use_cache
        super().__init__(**kwargs)

    @property
    def plan(self) -> LayerPlan:
        """The layer plan, typed; setting it rewrites `layers`."""
        return LayerPlan.from_json(self.layers)

    @plan.setter
    def plan(self, plan: LayerPlan) -> None:
        self.layers = plan.to_json()

    def mixer_names(self) -> list[str]:
        return self.plan.mixer_names()
