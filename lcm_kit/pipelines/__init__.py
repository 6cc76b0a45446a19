"""Pipelines: ``LCMPipeline`` (SD 1.x / 2.x text-to-image and image-to-image with a latent consistency model) and
``CMPipeline`` (diffusers' ``ConsistencyModelPipeline`` with sigma lists, seeded class labels and latent models)."""

from lcm_kit.pipelines.pipeline_consistency import CMPipeline
from lcm_kit.pipelines.pipeline_lcm import LCMPipeline, as_consistency_scheduler

__all__ = ["LCMPipeline", "CMPipeline", "as_consistency_scheduler"]
