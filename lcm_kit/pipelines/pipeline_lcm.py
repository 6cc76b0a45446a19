"""LCMPipeline: few-step text-to-image and image-to-image for SD 1.x / 2.x with a latent consistency model.

One pipeline for both kinds of latent consistency model:

* a **fully distilled LCM** (the UNet has ``time_cond_proj_dim``): guidance is baked into the UNet and fed as a
  w-embedding, exactly as diffusers' ``LatentConsistencyModelPipeline``;
* an **LCM-LoRA** on an ordinary SD UNet (``pipe.load_lora_weights(...)``): no guidance by default, optional real
  classifier-free guidance with a negative prompt.

Built on diffusers: the class subclasses ``LatentConsistencyModelPipeline`` (prompt encoding, latent preparation,
safety checker, LoRA / textual-inversion loaders, ``StableDiffusionMixin`` helpers) and only adds what that pipeline
lacks: the LoRA guidance branch, img2img, ``gamma``, the scheduler conversion and stricter input checks.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, LCMScheduler, TCDScheduler, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_img2img import (
    LatentConsistencyModelImg2ImgPipeline,
)
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
    LatentConsistencyModelPipeline,
    retrieve_timesteps,
)
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.utils import USE_PEFT_BACKEND, logging, scale_lora_layers, unscale_lora_layers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ..schedulers import ConsistencyScheduler, TrajectoryConsistencyScheduler
from .execution_device import ExecutionDeviceMixin
from .fast_inference import FastInferenceMixin, with_fast_inference
from .lcm_denoise import IMG2IMG_DEFAULT_STRENGTH, ConsistencyDenoisingLoop, cond_half
from .lcm_inputs import LCMPipelineInputChecks
from .lcm_loading import LCMPipelineLoading

logger = logging.get_logger(__name__)



def as_consistency_scheduler(scheduler):
    """Return ``scheduler`` if it already runs LCM multistep sampling (``ConsistencyScheduler`` or diffusers'
    ``LCMScheduler``); otherwise a ``ConsistencyScheduler`` built from its config (betas, prediction type,
    timestep offsets carry over, so an SD folder's DDIM/PNDM/Euler scheduler becomes the matching LCM one).
    ``None`` stays ``None`` (a pipeline built only to encode prompts)."""
    if scheduler is None or isinstance(scheduler, (ConsistencyScheduler, LCMScheduler)):
        return scheduler
    if isinstance(scheduler, TCDScheduler):  # a TCD model keeps TCD sampling, exactly
        return TrajectoryConsistencyScheduler.from_config(scheduler.config)
    converted = ConsistencyScheduler.from_config(scheduler.config)
    logger.info(
        f"LCMPipeline: replaced the {type(scheduler).__name__} by a ConsistencyScheduler built from its config "
        "(latent consistency models need LCM multistep sampling)."
    )
    return converted


class LCMPipeline(
    FastInferenceMixin,
    ConsistencyDenoisingLoop,
    LCMPipelineInputChecks,
    LCMPipelineLoading,
    ExecutionDeviceMixin,
    LatentConsistencyModelPipeline,
):
    r"""Few-step generation with a latent consistency model on Stable Diffusion 1.x / 2.x components.

    Components are those of diffusers' ``StableDiffusionPipeline`` (``vae``, ``text_encoder``, ``tokenizer``,
    ``unet``, ``scheduler``, optional ``safety_checker``, ``feature_extractor``, ``image_encoder``), so
    ``LCMPipeline.from_pretrained(<any SD 1.x/2.x folder or Hub id>)`` and ``LCMPipeline.from_pipe(sd_pipe)``
    work. LoRA (``load_lora_weights``, ``fuse_lora``, ``unfuse_lora``, ``set_adapters``), textual inversion and
    single-file loading come from the diffusers mixins.

    **Scheduler.** Whatever scheduler the components carry, the pipeline samples with LCM multistep sampling: a
    ``ConsistencyScheduler`` or diffusers ``LCMScheduler`` is kept as given; any other scheduler (an SD folder ships
    DDIM or PNDM) is replaced in ``__init__`` by ``ConsistencyScheduler.from_config(scheduler.config)``. Converting
    in ``__init__`` (rather than in ``from_pretrained``) covers every way of building the pipeline: direct
    construction, ``from_pretrained``, ``from_pipe`` and ``from_single_file``.

    **Fast inference.** ``pipe.enable_fast_inference()`` (off by default) fuses LoRA weights, switches to SDPA and
    channels_last, compiles the UNet and VAE decode (CUDA graphs on CUDA) and runs a denoising loop without host-device
    syncs; unsupported calls fall back to the normal path (:mod:`lcm_kit.pipelines.fast_inference`).
    """

    # `negative_prompt_embeds` is only present under classifier-free guidance (LCM-LoRA, guidance_scale > 1);
    # `prompt_embeds` is then the [negative, positive] batch the UNet sees, as in StableDiffusionPipeline.
    _callback_tensor_inputs = ["latents", "denoised", "prompt_embeds", "negative_prompt_embeds", "w_embedding"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: ConsistencyScheduler | LCMScheduler,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        requires_safety_checker: bool = True,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=as_consistency_scheduler(scheduler),
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )

    # The img2img latent preparation (VAE encode, then noise at the first timestep) is diffusers' own, so the
    # generator is consumed in the same order and img2img output matches LatentConsistencyModelImg2ImgPipeline.
    prepare_image_latents = LatentConsistencyModelImg2ImgPipeline.prepare_latents

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        lora_scale=None,
        clip_skip=None,
    ):
        """diffusers' ``encode_prompt``; only the ``clip_skip`` embedding of the prompt is computed here when the
        text encoder has no ``.text_model`` (transformers >= 5 flattened ``CLIPTextModel``, which diffusers'
        clip_skip path still expects). As in diffusers, ``clip_skip`` applies to the prompt, not the negative."""
        if clip_skip is not None and prompt_embeds is None and not hasattr(self.text_encoder, "text_model"):
            prompt_embeds = self._clip_skip_prompt_embeds(prompt, device, clip_skip, lora_scale)
        prompt_embeds, negative_prompt_embeds = super().encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        return prompt_embeds, negative_prompt_embeds

    def _clip_skip_prompt_embeds(self, prompt, device, clip_skip: int, lora_scale=None) -> torch.Tensor:
        """CLIP hidden state ``clip_skip`` layers before the last, through the final layer norm."""
        if isinstance(self, TextualInversionLoaderMixin):
            prompt = self.maybe_convert_prompt(prompt, self.tokenizer)
        tokens = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        attention_mask = tokens.attention_mask.to(device) if use_mask else None
        scale_text_lora = lora_scale is not None and USE_PEFT_BACKEND
        if scale_text_lora:
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            hidden_states = self.text_encoder(
                tokens.input_ids.to(device), attention_mask=attention_mask, output_hidden_states=True
            ).hidden_states
            final_layer_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
            return final_layer_norm(hidden_states[-(clip_skip + 1)])
        finally:
            if scale_text_lora:
                unscale_lora_layers(self.text_encoder, lora_scale)

    @with_fast_inference
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 4,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        gamma: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        image: PipelineImageInput | None = None,
        strength: float | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ) -> StableDiffusionPipelineOutput | tuple:
        r"""Generate images in a few consistency steps (text-to-image, or image-to-image when ``image`` is given).

        Args:
            prompt: prompt(s); or pass ``prompt_embeds``.
            height, width: output size in pixels, multiples of ``vae_scale_factor``. Default: the UNet's sample size
                times the VAE factor (text-to-image) or the input image's size (image-to-image).
            num_inference_steps: consistency steps, 1-8 is the useful range (default 4).
            original_inference_steps: size of the DDIM grid the model was distilled on (scheduler default 50); the
                steps are drawn from it.
            timesteps: custom descending timesteps from that grid (instead of ``num_inference_steps``).
            guidance_scale: which value to pick depends on the model:

                * **LCM-LoRA** (ordinary SD UNet + LoRA): ``1.0`` (default) = no classifier-free guidance, one UNet
                  pass per step — this is what LCM-LoRA was distilled for. ``1.0 < s <= 2.0`` adds real CFG with
                  ``negative_prompt`` (``uncond + s (cond - uncond)``, two UNet passes per step) for a little more
                  prompt adherence; higher values burn the image.
                * **Distilled LCM** (UNet with ``time_cond_proj_dim``): guidance is the w-embedding with
                  ``w = guidance_scale - 1`` (diffusers' convention). Pick the w the model was distilled for plus
                  one, e.g. ``8.5`` (default) for the published LCM-Dreamshaper (w = 7.5). No negative prompt.

            negative_prompt, negative_prompt_embeds: only for LCM-LoRA with ``guidance_scale > 1`` (an error
                otherwise, since they would be ignored). Default negative prompt: ``""``.
            gamma: trajectory-consistency stochasticity of the ``ConsistencyScheduler`` in [0, 1] for this call:
                1 = LCM's fresh-noise multistep (default, the scheduler's configured value), 0 = deterministic
                DDIM-style move along the predicted trajectory.
            num_images_per_prompt, generator, latents: as in diffusers (one generator per image if a list).
            image, strength: image-to-image. ``strength`` in (0, 1] (default 0.8, as diffusers' img2img pipelines)
                is passed to ``scheduler.set_timesteps`` so the schedule starts at ``strength`` of the way into the
                distillation grid; the image is VAE-encoded and noised to the first timestep. ``strength`` without
                ``image`` is an error. Images with an alpha channel are composited over white first (a 4-channel
                array or tensor is read as latents, diffusers' convention).
            ip_adapter_image, ip_adapter_image_embeds: IP-Adapter conditioning (``pipe.load_ip_adapter(...)``).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (the final denoised latents).
            return_dict: return a ``StableDiffusionPipelineOutput`` (else a tuple ``(images, nsfw)``).
            cross_attention_kwargs: passed to the attention processors (``{"scale": s}`` scales the LoRA).
            clip_skip: number of final CLIP layers to skip.
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in diffusers; tensors from
                ``_callback_tensor_inputs`` may be read and replaced (``latents``, ``denoised``, ``prompt_embeds``,
                ``negative_prompt_embeds``, ``w_embedding``). A callback may also change ``pipe._guidance_scale``
                (diffusers' ``SDCFGCutoffCallback`` turns classifier-free guidance off part-way): it is read at
                every step.
        """
        guidance_scale, image, callback_on_step_end_tensor_inputs = self._begin_call(
            guidance_scale, clip_skip, cross_attention_kwargs, callback_on_step_end,
            callback_on_step_end_tensor_inputs, image, timesteps, num_inference_steps,
            prompt=prompt, height=height, width=width, prompt_embeds=prompt_embeds, negative_prompt=negative_prompt,
            negative_prompt_embeds=negative_prompt_embeds, num_images_per_prompt=num_images_per_prompt,
            generator=generator, strength=strength, gamma=gamma, output_type=output_type, latents=latents,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
        )
        if image is None:
            height = height or self.unet.config.sample_size * self.vae_scale_factor
            width = width or self.unet.config.sample_size * self.vae_scale_factor
        elif strength is None:
            strength = IMG2IMG_DEFAULT_STRENGTH

        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        num_images = batch_size * num_images_per_prompt
        device = self._execution_device
        do_cfg = self.do_classifier_free_guidance

        # 1. Text conditioning (diffusers' encode_prompt, incl. textual inversion, LoRA scale and clip_skip).
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            do_cfg,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        if do_cfg:
            # One batched UNet pass over [uncond, cond], as StableDiffusionPipeline does.
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        added_cond_kwargs = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, num_images, do_cfg
            )
            added_cond_kwargs = {"image_embeds": image_embeds}

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
            latents = self.prepare_latents(
                num_images,
                self.unet.config.in_channels,
                height,
                width,
                prompt_embeds.dtype,
                device,
                generator,
                latents,
            )

        # 4. Guidance embedding of a distilled LCM: w = guidance_scale - 1 (diffusers' convention).
        w_embedding = self._w_embedding(num_images, guidance_scale, device, latents.dtype)

        step_kwargs = {"generator": generator}
        if gamma is not None and isinstance(self.scheduler, ConsistencyScheduler):
            step_kwargs["gamma"] = gamma

        # 5. LCM multistep sampling. Guidance is read at every step: a callback may turn it off part-way.
        self._num_timesteps = len(timesteps)
        conditioning = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds,
                        "w_embedding": w_embedding}

        def unet_kwargs(tensors, batch):
            kwargs = {"encoder_hidden_states": tensors["prompt_embeds"], "timestep_cond": tensors["w_embedding"],
                      "added_cond_kwargs": None}
            if added_cond_kwargs is not None:
                embeds = added_cond_kwargs["image_embeds"]
                if tensors["prompt_embeds"].shape[0] == batch:  # guidance turned off: the conditional half
                    embeds = [cond_half(e, batch) for e in embeds]
                kwargs["added_cond_kwargs"] = {"image_embeds": embeds}
            return kwargs

        denoised = self._consistency_denoise(latents, timesteps, conditioning, unet_kwargs, step_kwargs,
                                             cross_attention_kwargs, callback_on_step_end,
                                             callback_on_step_end_tensor_inputs)
        prompt_embeds = conditioning["prompt_embeds"]

        # 6. Decode the last denoised prediction (the consistency function's output).
        denoised = denoised.to(prompt_embeds.dtype)
        if output_type == "latent":
            images, has_nsfw_concept = denoised, None
        else:
            decoded = self.vae.decode(denoised / self.vae.config.scaling_factor, return_dict=False)[0]
            decoded, has_nsfw_concept = self.run_safety_checker(decoded, device, prompt_embeds.dtype)
            flagged = has_nsfw_concept if has_nsfw_concept is not None else [False] * decoded.shape[0]
            do_denormalize = [not nsfw for nsfw in flagged]
            images = self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=do_denormalize)

        self.maybe_free_model_hooks()
        if not return_dict:
            return images, has_nsfw_concept
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=has_nsfw_concept)
