"""How LCMPipeline is loaded and saved: folders stock diffusers reads without lcm-kit (schedulers saved as the
diffusers scheduler they equal), lcm-kit's schedulers back on load, and LoRA files read as safetensors only."""

from __future__ import annotations

import json
import os

from diffusers import LCMScheduler, TCDScheduler

from ..schedulers import ConsistencyScheduler, TrajectoryConsistencyScheduler


class LCMPipelineLoading:
    """``load_lora_weights``, ``from_pretrained`` and ``save_pretrained`` of LCMPipeline and LCMXLPipeline (a mixin
    over diffusers' ``DiffusionPipeline`` and LoRA loader)."""

    #: The stock diffusers pipeline ``save_pretrained`` names in ``model_index.json``: (distilled LCM, LCM-LoRA base).
    stock_pipeline_names = ("LatentConsistencyModelPipeline", "StableDiffusionPipeline")

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, hotswap: bool = False,
                          **kwargs):
        """diffusers' ``load_lora_weights``, safetensors only: a pickled file (``.bin`` / ``.pt`` / ``.ckpt``, or a
        ``weight_name`` naming one) is refused instead of unpickled, and a folder or repo without a ``.safetensors``
        file fails instead of falling back to ``torch.load``. For a load that checks every key, alpha and shape
        first, use ``lcm_kit.lora.load_lora_weights_strict(pipe, ...)``."""
        source = pretrained_model_name_or_path_or_dict
        names = [str(kwargs["weight_name"])] if kwargs.get("weight_name") is not None else []
        if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
            names.append(os.fspath(source))
        pickled = [name for name in names if not name.endswith(".safetensors")]
        if pickled:
            raise ValueError(
                f"LoRA {pickled[0]!r} is not a .safetensors file: LCMPipeline reads safetensors only and never "
                "unpickles a file (unpickling can run code); convert it once with safetensors.torch.save_file."
            )
        kwargs["use_safetensors"] = True  # diffusers' lora_state_dict then refuses pickles (allow_pickle=False)
        return super().load_lora_weights(source, adapter_name=adapter_name, hotswap=hotswap, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``; a folder's ``LCMScheduler`` / ``TCDScheduler`` (what :meth:`save_pretrained`
        writes) comes back as the ``ConsistencyScheduler`` / ``TrajectoryConsistencyScheduler`` it equals, unless
        ``scheduler=`` is passed."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if "scheduler" not in kwargs and type(pipe.scheduler) is LCMScheduler:
            pipe.scheduler = ConsistencyScheduler.from_config(pipe.scheduler.config)
        if "scheduler" not in kwargs and type(pipe.scheduler) is TCDScheduler:
            pipe.scheduler = TrajectoryConsistencyScheduler.from_config(pipe.scheduler.config)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """diffusers' ``save_pretrained``, written so that stock diffusers loads the folder without lcm-kit: the
        ``ConsistencyScheduler`` is saved as the diffusers scheduler it equals (``LCMScheduler`` at ``gamma=1``)
        and ``model_index.json`` names ``LatentConsistencyModelPipeline`` (a distilled LCM UNet) or
        ``StableDiffusionPipeline`` (an SD UNet, for LCM-LoRA use, or a distilled one with ``TCDScheduler``), so
        ``DiffusionPipeline.from_pretrained`` and ``AutoPipelineForText2Image`` load it; ``LCMPipeline.from_pretrained``
        gets its lcm-kit scheduler back."""
        scheduler = self.scheduler
        stock_scheduler = _stock_scheduler(scheduler)
        if stock_scheduler is not scheduler:
            self.register_modules(scheduler=stock_scheduler)
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            if stock_scheduler is not scheduler:
                self.register_modules(scheduler=scheduler)
        index_file = os.path.join(save_directory, "model_index.json")
        index = json.loads(open(index_file, encoding="utf-8").read())
        # A distilled UNet with TCDScheduler (PCM / TCD) is named StableDiffusionPipeline, which feeds the
        # w-embedding too: LatentConsistencyModelPipeline passes eta=None, which TCDScheduler.step rejects.
        distilled_name = self.is_distilled and not isinstance(stock_scheduler, TCDScheduler)
        index["_class_name"] = self.stock_pipeline_names[0 if distilled_name else 1]
        with open(index_file, "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _stock_scheduler(scheduler):
    """The diffusers scheduler an lcm-kit scheduler equals, when there is one (``LCMScheduler`` for a
    ``ConsistencyScheduler`` at ``gamma=1``; ``TCDScheduler`` for a ``TrajectoryConsistencyScheduler``, whose
    ``gamma`` stock pipelines pass per call as ``eta``); otherwise the scheduler itself."""
    config = {k: v for k, v in scheduler.config.items() if k != "gamma"} if scheduler is not None else None
    if type(scheduler) is ConsistencyScheduler and scheduler.config.gamma == 1.0:
        return LCMScheduler.from_config(config)
    if type(scheduler) is TrajectoryConsistencyScheduler:
        return TCDScheduler.from_config(config)
    return scheduler
