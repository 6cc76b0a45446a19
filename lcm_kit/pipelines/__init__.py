"""Pipelines: ``LCMPipeline`` (:mod:`.pipeline_lcm`: SD 1.x / 2.x text-to-image and image-to-image with a latent
consistency model), ``LCMXLPipeline`` (:mod:`.pipeline_lcm_xl`: the same for SDXL) and ``CMPipeline``
(:mod:`.pipeline_cm`: diffusers' ``ConsistencyModelPipeline`` with sigma lists, seeded class labels and latent
models)."""

from .pipeline_cm import CMPipeline
from .pipeline_lcm import LCMPipeline, as_consistency_scheduler
from .pipeline_lcm_xl import LCMXLPipeline

__all__ = ["LCMPipeline", "LCMXLPipeline", "CMPipeline", "as_consistency_scheduler"]
