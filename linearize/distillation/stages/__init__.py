"""The distillation stages, one module each: a config dataclass, a `run(model, data, config, session) -> model`
and, at the end, `register_stage(kind, config, run)`. `linearize.config.stage_kinds()` imports every module here,
so a new stage is one new file in this folder.
"""
