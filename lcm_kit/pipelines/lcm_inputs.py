"""The input checks of :class:`~lcm_kit.pipelines.pipeline_lcm.LCMPipeline`: every argument validated before any
model runs, with an error naming the argument, the value received and what is allowed."""

from __future__ import annotations

import math
import numbers

import numpy as np
import PIL.Image
import torch

from ..schedulers.scheduling_lcm import ConsistencyScheduler

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def without_alpha(image):
    """PIL images with transparency composited over white (as the training data loader does): a 4-channel image
    would otherwise be read as latents."""
    if isinstance(image, list):
        return [without_alpha(item) for item in image]
    if isinstance(image, PIL.Image.Image) and (image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info):
        rgba = image.convert("RGBA")
        return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image


class LCMPipelineInputChecks:
    """``check_inputs`` of LCMPipeline (a mixin: it reads the pipeline's components and guidance state)."""

    def check_inputs(
        self,
        prompt,
        height,
        width,
        prompt_embeds=None,
        negative_prompt=None,
        negative_prompt_embeds=None,
        num_images_per_prompt=1,
        generator=None,
        image=None,
        strength=None,
        gamma=None,
        output_type="pil",
        callback_on_step_end_tensor_inputs=None,
        num_inference_steps=None,
        guidance_scale=None,
        latents=None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
    ):
        """Raise ``ValueError`` / ``TypeError`` naming the argument, the value received and what is allowed."""
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not is_int(value) or value <= 0 or value % factor != 0):
                raise ValueError(
                    f"`{name}` must be a positive int, a multiple of the VAE scale factor {factor}, got {value!r}."
                )
        if num_inference_steps is not None and (not is_int(num_inference_steps) or num_inference_steps < 1):
            raise ValueError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}.")
        if guidance_scale is not None and not is_finite_number(guidance_scale):
            raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass one of `prompt` (str or list of str) or `prompt_embeds`; got neither.")
        if prompt is not None:
            if isinstance(prompt, list):
                if not prompt or not all(isinstance(p, str) for p in prompt):
                    raise ValueError(f"`prompt` must be a str or a non-empty list of str, got {prompt!r}.")
            elif not isinstance(prompt, str):
                raise ValueError(f"`prompt` must be a str or a list of str, got {type(prompt).__name__}.")
        if prompt_embeds is not None and (not torch.is_tensor(prompt_embeds) or prompt_embeds.ndim != 3):
            raise ValueError(
                "`prompt_embeds` must be a tensor of shape (batch, sequence, hidden), got "
                f"{tuple(prompt_embeds.shape) if torch.is_tensor(prompt_embeds) else type(prompt_embeds).__name__}."
            )
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if negative_prompt_embeds is not None:
            if prompt_embeds is None:
                raise ValueError("`negative_prompt_embeds` needs `prompt_embeds` (not `prompt`) of the same shape.")
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    "`negative_prompt_embeds` must have the shape of `prompt_embeds`, got "
                    f"{tuple(negative_prompt_embeds.shape)} vs {tuple(prompt_embeds.shape)}."
                )
        if isinstance(prompt, list) and isinstance(negative_prompt, list) and len(prompt) != len(negative_prompt):
            raise ValueError(
                f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {len(prompt)}; they must match."
            )
        if (negative_prompt is not None or negative_prompt_embeds is not None) and not self.do_classifier_free_guidance:
            why = (
                "this UNet is a distilled LCM (guidance comes from the w-embedding, the negative prompt is unused)"
                if self.is_distilled
                else f"guidance_scale={self._guidance_scale} <= 1 means no classifier-free guidance"
            )
            raise ValueError(f"A negative prompt was given but would be ignored: {why}. Drop it or raise guidance.")
        if not is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be an int >= 1, got {num_images_per_prompt!r}.")
        batch = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        if isinstance(generator, list) and len(generator) != batch * num_images_per_prompt:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but the batch has "
                f"{batch * num_images_per_prompt} images (prompts x num_images_per_prompt); pass one per image."
            )
        if image is None and strength is not None:
            raise ValueError(f"`strength`={strength} was given without `image`; strength is only for img2img.")
        if image is not None:
            if strength is not None and not (is_finite_number(strength) and 0 < strength <= 1):
                raise ValueError(
                    f"`strength` must be in (0, 1] (how much of the image is re-noised), got {strength!r}."
                )
            self._check_image(image, height, width)
        if latents is not None:
            self._check_latents(latents, batch * num_images_per_prompt, height, width, image is not None)
        if gamma is not None:
            if not is_finite_number(gamma) or not 0.0 <= gamma <= 1.0:
                raise ValueError(f"`gamma` must be a number in [0, 1], got {gamma!r}.")
            if not isinstance(self.scheduler, ConsistencyScheduler) and gamma != 1.0:
                raise ValueError(
                    f"`gamma`={gamma} needs a ConsistencyScheduler; {type(self.scheduler).__name__} only does "
                    "gamma=1 (fresh-noise LCM multistep)."
                )
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise ValueError("Pass either `ip_adapter_image` or `ip_adapter_image_embeds`, not both.")
        if ip_adapter_image_embeds is not None:
            if not isinstance(ip_adapter_image_embeds, list):
                raise ValueError(
                    f"`ip_adapter_image_embeds` must be a list of tensors, got {type(ip_adapter_image_embeds).__name__}."
                )
            if any(not torch.is_tensor(e) or e.ndim not in (3, 4) for e in ip_adapter_image_embeds):
                raise ValueError("`ip_adapter_image_embeds` must be a list of 3-D or 4-D tensors.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` may only name {self._callback_tensor_inputs}, got {unknown}."
                )

    def _check_image(self, image, height, width) -> None:
        """An img2img input: PIL images, arrays or tensors of pixels (or of latents, diffusers' convention), every
        image the same size, at least one latent pixel."""
        images = image if isinstance(image, list) else [image]
        if not images:
            raise ValueError("`image` is an empty list; pass at least one image.")
        sizes = set()
        for item in images:
            if isinstance(item, PIL.Image.Image):
                sizes.add((item.height, item.width))
            elif torch.is_tensor(item) or isinstance(item, np.ndarray):
                if item.ndim not in (3, 4):
                    raise ValueError(f"`image` arrays / tensors must be 3-D or 4-D, got shape {tuple(item.shape)}.")
                finite = (
                    (not item.is_floating_point() or item.device.type == "meta" or bool(torch.isfinite(item).all()))
                    if torch.is_tensor(item)
                    else (not np.issubdtype(item.dtype, np.floating) or bool(np.isfinite(item).all()))
                )
                if not finite:
                    raise ValueError("`image` holds NaN or infinite values.")
                sizes.add(tuple(item.shape[-2:]) if torch.is_tensor(item) else tuple(item.shape[-3:-1]))
            else:
                raise ValueError(
                    f"`image` must be a PIL image, a numpy array, a torch tensor or a list of them, got {type(item)}."
                )
        if len(sizes) > 1:
            raise ValueError(f"`image` holds images of different sizes {sorted(sizes)}; resize them to one size.")
        (size,) = sizes
        if min(size) < self.vae_scale_factor:
            raise ValueError(
                f"`image` of size {size[1]}x{size[0]} is smaller than one latent pixel "
                f"({self.vae_scale_factor}x{self.vae_scale_factor}); pass a larger image."
            )

    def _check_latents(self, latents, num_images, height, width, img2img: bool) -> None:
        if not torch.is_tensor(latents):
            raise ValueError(f"`latents` must be a torch tensor, got {type(latents).__name__}.")
        factor = self.vae_scale_factor
        channels = self.unet.config.in_channels
        if img2img:
            expected_hw = None if height is None or width is None else (height // factor, width // factor)
        else:
            sample = self.unet.config.sample_size
            expected_hw = ((height or sample * factor) // factor, (width or sample * factor) // factor)
        if latents.ndim != 4 or latents.shape[0] != num_images or latents.shape[1] != channels or (
            expected_hw is not None and tuple(latents.shape[-2:]) != expected_hw
        ):
            expected = (num_images, channels, *(expected_hw or ("H", "W")))
            raise ValueError(
                f"`latents` must have shape {expected} (batch, UNet in_channels, height / {factor}, width / {factor}), "
                f"got {tuple(latents.shape)}."
            )
        if latents.is_floating_point() and latents.device.type != "meta" and not bool(torch.isfinite(latents).all()):
            raise ValueError("`latents` holds NaN or infinite values.")
