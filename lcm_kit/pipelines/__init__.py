"""Pipelines: ``LCMPipeline`` (SD 1.x / 2.x text-to-image and image-to-image with a latent consistency model)."""

from lcm_kit.pipelines.pipeline_lcm import LCMPipeline, as_consistency_scheduler

__all__ = ["LCMPipeline", "as_consistency_scheduler"]
