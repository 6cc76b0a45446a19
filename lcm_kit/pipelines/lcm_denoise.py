"""The LCM multistep denoising loop shared by :class:`~lcm_kit.pipelines.pipeline_lcm.LCMPipeline` (SD 1.x / 2.x)
and :class:`~lcm_kit.pipelines.pipeline_lcm_xl.LCMXLPipeline` (SDXL): the pipelines differ only in how the UNet is
conditioned, which each passes in as a function of the step's conditioning tensors."""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from ..consistency import guidance_scale_embedding
from .lcm_inputs import without_alpha

DISTILLED_DEFAULT_GUIDANCE = 8.5  # w = 7.5 + 1: the common distillation target of published LCMs
LORA_DEFAULT_GUIDANCE = 1.0  # LCM-LoRA: no classifier-free guidance
IMG2IMG_DEFAULT_STRENGTH = 0.8  # diffusers' image-to-image pipelines' default


class ConsistencyDenoisingLoop:
    """The guidance rules and ``_consistency_denoise`` (a mixin over a diffusers pipeline with ``unet``,
    ``scheduler`` and ``progress_bar``)."""

    @property
    def is_distilled(self) -> bool:
        """True for a fully distilled LCM (guidance enters the UNet as a w-embedding), False for LCM-LoRA."""
        return self.unet.config.time_cond_proj_dim is not None

    @property
    def default_guidance_scale(self) -> float:
        """What ``guidance_scale=None`` means: 8.5 for a distilled LCM, 1.0 (no guidance) for an LCM-LoRA."""
        return DISTILLED_DEFAULT_GUIDANCE if self.is_distilled else LORA_DEFAULT_GUIDANCE

    @property
    def do_classifier_free_guidance(self) -> bool:
        # Real CFG only for a UNet without guidance conditioning (LCM-LoRA) and a scale above 1.
        return self._guidance_scale > 1 and not self.is_distilled

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    def _begin_call(self, guidance_scale, clip_skip, cross_attention_kwargs, callback_on_step_end,
                    callback_on_step_end_tensor_inputs, image, timesteps, num_inference_steps, **checked):
        """The start of every ``__call__``: the guidance default and call state, alpha composited away, every input
        checked (``checked``: the other arguments of ``check_inputs``). Returns ``(guidance_scale, image,
        callback_on_step_end_tensor_inputs)``."""
        if self.scheduler is None:
            raise ValueError(f"This {type(self).__name__} has no scheduler (built with scheduler=None); set "
                             "`pipe.scheduler`.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        image = without_alpha(image)
        self.check_inputs(
            image=image,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            num_inference_steps=num_inference_steps if timesteps is None else None,
            guidance_scale=guidance_scale,
            **checked,
        )
        return guidance_scale, image, callback_on_step_end_tensor_inputs

    def _w_embedding(self, num_images: int, guidance_scale: float, device, dtype) -> torch.Tensor | None:
        """A distilled LCM's guidance embedding of ``w = guidance_scale - 1`` (diffusers' convention); ``None`` for
        an LCM-LoRA."""
        if not self.is_distilled:
            return None
        w = torch.full((num_images,), guidance_scale - 1.0)
        return guidance_scale_embedding(w, embedding_dim=self.unet.config.time_cond_proj_dim).to(device, dtype)

    def _consistency_denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor | None],
        unet_kwargs: Callable[[dict, int], dict],
        step_kwargs: dict,
        cross_attention_kwargs: dict | None,
        callback_on_step_end: Callable | None,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> torch.Tensor:
        """Run LCM multistep sampling from ``latents`` over ``timesteps``; returns the last denoised prediction (the
        consistency function's output).

        ``conditioning`` holds the tensors a step callback may read and replace (``prompt_embeds`` is the
        ``[negative, positive]`` batch under classifier-free guidance); ``unet_kwargs(conditioning, batch)`` turns
        them into the UNet's keyword arguments for ``batch`` latents. Guidance is re-read at every step, so a
        callback may turn it off part-way (diffusers' ``SDCFGCutoffCallback`` / ``SDXLCFGCutoffCallback``)."""
        denoised = latents
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                prompt_embeds = conditioning["prompt_embeds"]
                do_cfg = self.do_classifier_free_guidance and prompt_embeds.shape[0] == 2 * latents.shape[0]
                latents = latents.to(prompt_embeds.dtype)
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                model_pred = self.unet(
                    model_input,
                    t,
                    cross_attention_kwargs=cross_attention_kwargs,
                    return_dict=False,
                    **unet_kwargs(conditioning, latents.shape[0]),
                )[0]
                if do_cfg:
                    pred_uncond, pred_cond = model_pred.chunk(2)
                    model_pred = pred_uncond + self._guidance_scale * (pred_cond - pred_uncond)

                latents, denoised = self.scheduler.step(model_pred, t, latents, **step_kwargs, return_dict=False)

                if callback_on_step_end is not None:
                    visible = {"latents": latents, "denoised": denoised, **conditioning}
                    callback_kwargs = {k: visible[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    denoised = callback_outputs.pop("denoised", denoised)
                    for name in conditioning:
                        conditioning[name] = callback_outputs.pop(name, conditioning[name])
                progress_bar.update()
        return denoised


def cond_half(tensor: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """The conditional half of a ``[uncond, cond]`` tensor once guidance is off (a callback kept only the
    conditional prompt embeddings); otherwise the tensor as is."""
    if tensor is not None and tensor.shape[0] == 2 * batch:
        return tensor.chunk(2)[-1]
    return tensor
