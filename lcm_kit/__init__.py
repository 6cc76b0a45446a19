"""lcm-kit: latent consistency models for diffusers.

Public API (imported lazily so ``import lcm_kit`` stays cheap)::

    from lcm_kit import ConsistencyScheduler, LCMPipeline, LCMXLPipeline
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ConsistencyScheduler": "lcm_kit.schedulers",
    "ConsistencySchedulerOutput": "lcm_kit.schedulers",
    "TrajectoryConsistencyScheduler": "lcm_kit.schedulers",
    "TrajectoryConsistencySchedulerOutput": "lcm_kit.schedulers",
    "LCMPipeline": "lcm_kit.pipelines",
    "LCMXLPipeline": "lcm_kit.pipelines",
    "CMMultistepScheduler": "lcm_kit.schedulers",
    "CMPipeline": "lcm_kit.pipelines",
    "add_lcm_lora": "lcm_kit.lora",
    "save_lora_weights": "lcm_kit.lora",
    "load_lora_weights_strict": "lcm_kit.lora",
    "check_lora_applied": "lcm_kit.lora",
    "export_kohya": "lcm_kit.lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lcm_kit' has no attribute {name!r}")
