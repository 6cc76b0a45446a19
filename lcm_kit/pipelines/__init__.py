"""Pipelines: ``LCMPipeline`` (:mod:`.pipeline_lcm`: SD 1.x / 2.x text-to-image and image-to-image with a latent
consistency model) and ``CMPipeline`` (:mod:`.pipeline_cm`: diffusers' ``ConsistencyModelPipeline`` with sigma lists,
seeded class labels and latent models)."""

from .pipeline_cm import CMPipeline
from .pipeline_lcm import LCMPipeline, as_consistency_scheduler

__all__ = ["LCMPipeline", "CMPipeline", "as_consistency_scheduler"]
