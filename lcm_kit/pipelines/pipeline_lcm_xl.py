"""LCMXLPipeline: few-step text-to-image and image-to-image for Stable Diffusion XL with a latent consistency model.

The SDXL sibling of :class:`~lcm_kit.pipelines.pipeline_lcm.LCMPipeline`, with the same guidance rules, scheduler
conversion, ``gamma``, input checks and LCM multistep loop (:mod:`.lcm_denoise`). Built on diffusers'
``StableDiffusionXLPipeline``: both text encoders and tokenizers, pooled embeddings, ``add_time_ids``
micro-conditioning, ``force_zeros_for_empty_prompt``, the fp16 VAE upcast, IP-Adapter and
``StableDiffusionXLLoraLoaderMixin`` (``pipe.load_lora_weights("latent-consistency/lcm-lora-sdxl")``) are its own;
image-to-image latents come from ``StableDiffusionXLImg2ImgPipeline.prepare_latents``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.utils.torch_utils import get_module_execution_device
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ..schedulers import ConsistencyScheduler
from .execution_device import ExecutionDeviceMixin
from .lcm_denoise import IMG2IMG_DEFAULT_STRENGTH, ConsistencyDenoisingLoop, cond_half
from .lcm_inputs import LCMPipelineInputChecks, is_int
from .lcm_loading import LCMPipelineLoading
from .pipeline_lcm import as_consistency_scheduler


def _check_size(name: str, value, positive: bool) -> None:
    """``original_size`` / ``target_size`` (positive) or ``crops_coords_top_left`` (non-negative): two ints."""
    if value is None:
        return
    lowest = 1 if positive else 0
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) and v >= lowest for v in value)):
        what = "positive" if positive else "non-negative"
        raise ValueError(f"`{name}` must be a (height, width) pair of {what} ints, got {value!r}.")


class LCMXLPipeline(
    ConsistencyDenoisingLoop,
    LCMPipelineInputChecks,
    LCMPipelineLoading,
    ExecutionDeviceMixin,
    StableDiffusionXLPipeline,
):
    r"""Few-step generation with a latent consistency model on Stable Diffusion XL components.

    Components are those of diffusers' ``StableDiffusionXLPipeline`` (``vae``, ``text_encoder``, ``text_encoder_2``,
    ``tokenizer``, ``tokenizer_2``, ``unet``, ``scheduler``, optional ``image_encoder``, ``feature_extractor``), so
    ``LCMXLPipeline.from_pretrained(<SDXL folder or Hub id>)`` and ``LCMXLPipeline.from_pipe(sdxl_pipe)`` work. As in
    LCMPipeline, any scheduler that is not a ``ConsistencyScheduler`` / ``LCMScheduler`` is replaced by
    ``ConsistencyScheduler.from_config(scheduler.config)``; guidance follows the UNet: a distilled LCM (UNet with
    ``time_cond_proj_dim``) takes the w-embedding (default 8.5), an LCM-LoRA takes real classifier-free guidance only
    when ``guidance_scale > 1`` (default 1.0: none).
    """

    stock_pipeline_names = ("StableDiffusionXLPipeline", "StableDiffusionXLPipeline")
    # The [negative, positive] batches under classifier-free guidance, as in StableDiffusionXLPipeline.
    _callback_tensor_inputs = ["latents", "denoised", "prompt_embeds", "negative_prompt_embeds", "add_text_embeds",
                               "add_time_ids", "negative_pooled_prompt_embeds", "negative_add_time_ids", "w_embedding"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: ConsistencyScheduler | LCMScheduler,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=as_consistency_scheduler(scheduler),
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )

    prepare_image_latents = StableDiffusionXLImg2ImgPipeline.prepare_latents

    def check_xl_inputs(self, prompt_2, negative_prompt_2, prompt_embeds, pooled_prompt_embeds,
                        negative_prompt_embeds, negative_pooled_prompt_embeds, sizes: dict) -> None:
        """The SDXL-only arguments: second prompts, pooled embeddings, micro-conditioning sizes."""
        for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)):
            if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and value and all(isinstance(v, str) for v in value)
            ):
                raise ValueError(f"`{name}` must be a str or a non-empty list of str, got {value!r}.")
        if prompt_2 is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt_2` or `prompt_embeds`, not both.")
        if negative_prompt_2 is not None and not self.do_classifier_free_guidance:
            raise ValueError("`negative_prompt_2` was given but would be ignored: there is no classifier-free "
                             "guidance (a distilled LCM, or guidance_scale <= 1). Drop it or raise guidance.")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("`prompt_embeds` needs `pooled_prompt_embeds` too (SDXL conditions on both); get them "
                             "from `pipe.encode_prompt(...)`.")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("`negative_prompt_embeds` needs `negative_pooled_prompt_embeds` too.")
        for name, value in (("pooled_prompt_embeds", pooled_prompt_embeds),
                            ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds)):
            if value is not None and (not torch.is_tensor(value) or value.ndim != 2 or (
                    prompt_embeds is not None and value.shape[0] != prompt_embeds.shape[0])):
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"`{name}` must be a (batch, projection_dim) tensor with the batch of "
                                 f"`prompt_embeds`, got {shape}.")
        for name, value in sizes.items():
            _check_size(name, value, positive="crops" not in name)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 4,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        gamma: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        image: PipelineImageInput | None = None,
        strength: float | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ) -> StableDiffusionXLPipelineOutput | tuple:
        r"""Generate images in a few consistency steps (text-to-image, or image-to-image when ``image`` is given).

        The arguments are LCMPipeline's (``num_inference_steps``, ``original_inference_steps``, ``timesteps``,
        ``guidance_scale``, ``gamma``, ``image`` / ``strength`` (default 0.8, passed to ``scheduler.set_timesteps``
        as in LCMPipeline), ``output_type``, callbacks, ...) and StableDiffusionXLPipeline's SDXL ones:

        Args:
            prompt_2, negative_prompt_2: the prompts for ``tokenizer_2`` / ``text_encoder_2`` (default: ``prompt`` /
                ``negative_prompt``).
            pooled_prompt_embeds, negative_pooled_prompt_embeds: pooled embeddings, required with ``prompt_embeds``
                / ``negative_prompt_embeds``.
            height, width: default ``unet.config.sample_size * vae_scale_factor`` (1024 for SDXL) for text-to-image,
                the image's size for image-to-image.
            original_size, crops_coords_top_left, target_size: SDXL micro-conditioning (default: ``(height, width)``,
                ``(0, 0)``, ``(height, width)``); ``negative_*`` the same for the unconditional branch.

        Without a negative prompt, the unconditional embeddings are zeros when the pipeline's
        ``force_zeros_for_empty_prompt`` is set (SDXL's default), as in diffusers.
        """
        guidance_scale, image, callback_on_step_end_tensor_inputs = self._begin_call(
            guidance_scale, clip_skip, cross_attention_kwargs, callback_on_step_end,
            callback_on_step_end_tensor_inputs, image, timesteps, num_inference_steps,
            prompt=prompt, height=height, width=width, prompt_embeds=prompt_embeds, negative_prompt=negative_prompt,
            negative_prompt_embeds=negative_prompt_embeds, num_images_per_prompt=num_images_per_prompt,
            generator=generator, strength=strength, gamma=gamma, output_type=output_type, latents=latents,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
        )
        sizes = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                     target_size=target_size, negative_original_size=negative_original_size,
                     negative_crops_coords_top_left=negative_crops_coords_top_left,
                     negative_target_size=negative_target_size)
        self.check_xl_inputs(prompt_2, negative_prompt_2, prompt_embeds, pooled_prompt_embeds,
                             negative_prompt_embeds, negative_pooled_prompt_embeds, sizes)
        if image is None:
            height = height or self.default_sample_size * self.vae_scale_factor
            width = width or self.default_sample_size * self.vae_scale_factor
        elif strength is None:
            strength = IMG2IMG_DEFAULT_STRENGTH

        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        num_images = batch_size * num_images_per_prompt
        device = self._execution_device
        do_cfg = self.do_classifier_free_guidance

        # 1. Text conditioning: diffusers' SDXL encode_prompt (both encoders, pooled, zeroed empty negative).
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
            self.encode_prompt(
                prompt=prompt,
                prompt_2=prompt_2,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=do_cfg,
                negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                lora_scale=lora_scale,
                clip_skip=clip_skip,
            )
        )

        # 2. Timesteps; img2img passes strength so the schedule starts part-way into the grid.
        set_timesteps_kwargs = dict(original_inference_steps=original_inference_steps)
        if image is not None:
            image = self.image_processor.preprocess(image, height=height, width=width)
            set_timesteps_kwargs["strength"] = strength
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, **set_timesteps_kwargs
        )

        # 3. Initial latents: pure noise, or the encoded image noised to the first timestep.
        if latents is None and image is not None:
            latents = self.prepare_image_latents(
                image, timesteps[:1], batch_size, num_images_per_prompt, prompt_embeds.dtype, device, generator
            )
        elif image is None:
            latents = self.prepare_latents(num_images, self.unet.config.in_channels, height, width,
                                           prompt_embeds.dtype, device, generator, latents)
        height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])

        # 4. Micro-conditioning and the guidance embedding.
        projection_dim = (int(pooled_prompt_embeds.shape[-1]) if self.text_encoder_2 is None
                          else self.text_encoder_2.config.projection_dim)

        def time_ids(original, crops, target):
            return self._get_add_time_ids(original or (height, width), crops, target or (height, width),
                                          dtype=prompt_embeds.dtype, text_encoder_projection_dim=projection_dim)

        add_time_ids = time_ids(original_size, crops_coords_top_left, target_size)
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = time_ids(negative_original_size, negative_crops_coords_top_left,
                                             negative_target_size)
        else:
            negative_add_time_ids = add_time_ids
        add_text_embeds = pooled_prompt_embeds
        if do_cfg:
            # One batched UNet pass over [uncond, cond], as StableDiffusionXLPipeline does.
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            add_text_embeds = torch.cat([negative_pooled_prompt_embeds, add_text_embeds])
            add_time_ids = torch.cat([negative_add_time_ids, add_time_ids])
        add_time_ids = add_time_ids.to(device).repeat(num_images, 1)
        image_embeds = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, num_images, do_cfg
            )
        w_embedding = self._w_embedding(num_images, guidance_scale, device, latents.dtype)

        step_kwargs = {"generator": generator}
        if gamma is not None and isinstance(self.scheduler, ConsistencyScheduler):
            step_kwargs["gamma"] = gamma

        # 5. LCM multistep sampling.
        self._num_timesteps = len(timesteps)
        conditioning = {
            "prompt_embeds": prompt_embeds.to(device),
            "negative_prompt_embeds": negative_prompt_embeds,
            "add_text_embeds": add_text_embeds.to(device),
            "add_time_ids": add_time_ids,
            "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
            "negative_add_time_ids": negative_add_time_ids,
            "w_embedding": w_embedding,
        }

        def unet_kwargs(tensors, batch):
            added = {"text_embeds": tensors["add_text_embeds"], "time_ids": tensors["add_time_ids"]}
            if image_embeds is not None:
                guided = tensors["prompt_embeds"].shape[0] == 2 * batch
                added["image_embeds"] = image_embeds if guided else [cond_half(e, batch) for e in image_embeds]
            return {"encoder_hidden_states": tensors["prompt_embeds"], "timestep_cond": tensors["w_embedding"],
                    "added_cond_kwargs": added}

        denoised = self._consistency_denoise(latents, timesteps, conditioning, unet_kwargs, step_kwargs,
                                             cross_attention_kwargs, callback_on_step_end,
                                             callback_on_step_end_tensor_inputs)

        # 6. Decode the last denoised prediction.
        if output_type == "latent":
            images = denoised
        else:
            images = self.image_processor.postprocess(self._decode(denoised), output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return StableDiffusionXLPipelineOutput(images=images)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode as StableDiffusionXLPipeline does it: an fp16 VAE with ``force_upcast`` (SDXL's VAE overflows
        in fp16) decodes in fp32 and goes back to fp16; latents_mean / latents_std are undone when configured;
        the invisible watermark is applied when the pipeline has one."""
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.upcast_vae()
            latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        else:
            latents = latents.to(self.vae.dtype)
        config = self.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        decoded = self.vae.decode(latents.to(get_module_execution_device(self.vae)), return_dict=False)[0]
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        if self.watermark is not None:
            decoded = self.watermark.apply_watermark(decoded)
        return decoded
