"""Training: the shared Accelerate loop, flags, data, Hub upload, and one module per objective.

* :mod:`lcm_kit.training.loop`        ``run_training(args, accelerator, objective, dataloader)`` + checkpoints
* :mod:`lcm_kit.training.args`        reusable argparse flag groups (diffusers' names)
* :mod:`lcm_kit.training.lcm_distill` latent consistency distillation (LCM-LoRA and full LCM)
* :mod:`lcm_kit.training.data`        datasets / webdataset shards / encoded caches
* :mod:`lcm_kit.training.hub`         model card and upload

Submodules are imported on use (``from lcm_kit.training.lcm_distill import train_lcm_lora``) so that importing
this package stays cheap.
"""

from .loop import NonFiniteLossError, TrainingObjective, TrainingResult, create_accelerator, run_training

__all__ = ["NonFiniteLossError", "TrainingObjective", "TrainingResult", "create_accelerator", "run_training"]
