"""`CMPipeline`: diffusers' `ConsistencyModelPipeline` plus sigma lists, seeded class labels and VAE latents.

The stock pipeline samples a consistency ``UNet2DModel`` folder; this subclass loads the same folders and adds what
lcm-kit's consistency models need:

* ``sigmas=[80.0, 0.821]``: any descending noise-level list (through
  :class:`~lcm_kit.schedulers.scheduling_cm.CMMultistepScheduler`, built from the folder's scheduler
  config; the stored scheduler is not changed, so the folder stays loadable by the stock pipeline);
* class-conditional models: labels given as an int, a list or a tensor (checked against ``num_class_embeds``), or
  drawn from ``generator`` when omitted (the stock pipeline draws them from the global RNG);
* latent-space models: an optional ``vae`` (``AutoencoderKL``) decodes the sampled latents;
* any channel count (the stock pipeline's ``latents`` check assumes 3).

With the same class labels, inputs and generator, the images equal the stock pipeline's.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, ConsistencyModelPipeline, UNet2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..sampling import consistency_sample
from ..schedulers.scheduling_cm import CMMultistepScheduler
from .execution_device import ExecutionDeviceMixin


class CMPipeline(ExecutionDeviceMixin, ConsistencyModelPipeline):
    """
    One- and few-step sampling of a consistency model (`UNet2DModel` + `CMStochasticIterativeScheduler` folder).

    Args:
        unet ([`UNet2DModel`]): the consistency model backbone (optionally class-conditional via `num_class_embeds`).
        scheduler: a `CMStochasticIterativeScheduler` or [`CMMultistepScheduler`] (same config).
        vae ([`AutoencoderKL`], *optional*): for latent-space models; load it with
            `CMPipeline.from_pretrained(folder, vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"))`.
    """

    _optional_components = ["vae"]
    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet: UNet2DModel, scheduler, vae: AutoencoderKL | None = None) -> None:
        super().__init__(unet=unet, scheduler=scheduler)
        self.register_modules(vae=vae)

    def _class_labels(self, batch_size, class_labels, generator, device):
        num_classes = self.unet.config.num_class_embeds
        if num_classes is None:
            if class_labels is not None:
                raise ValueError(f"class_labels={class_labels!r} given, but the unet is unconditional (num_class_embeds=None).")
            return None
        if class_labels is None:
            gen = generator[0] if isinstance(generator, list) else generator
            gen_device = gen.device if gen is not None else torch.device("cpu")
            class_labels = torch.randint(0, num_classes, (batch_size,), generator=gen, device=gen_device)
        elif isinstance(class_labels, int):
            class_labels = torch.full((batch_size,), class_labels, dtype=torch.long)
        else:
            class_labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if class_labels.numel() != batch_size:
            raise ValueError(f"class_labels must hold batch_size={batch_size} labels, got {class_labels.numel()}.")
        if class_labels.min() < 0 or class_labels.max() >= num_classes:
            raise ValueError(f"class_labels must lie in [0, num_class_embeds={num_classes}), got {class_labels.tolist()}.")
        return class_labels.to(device)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: torch.Tensor | list[int] | int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """
        Sample `batch_size` images.

        Args:
            batch_size (`int`): number of images.
            class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*): labels of a class-conditional model
                (drawn from `generator` when omitted).
            num_inference_steps (`int`, *optional*): steps on the scheduler's Karras grid (default 1).
            timesteps (`list[int]`, *optional*): descending indices into that grid (diffusers' convention).
            sigmas (`list[float]`, *optional*): descending noise levels, e.g. `[80.0, 0.821]`.
            generator (`torch.Generator`, *optional*): for the initial noise, the re-noising and drawn labels.
            latents (`torch.Tensor`, *optional*): standard-normal initial noise (scaled by the first sigma here).
            output_type (`str`): `"pil"`, `"np"`, `"pt"`, or `"latent"` (the raw samples, before the VAE).
            return_dict (`bool`): return an `ImagePipelineOutput` (default) or a tuple.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        device = self._execution_device
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        labels = self._class_labels(batch_size, class_labels, generator, device)
        scheduler = self.scheduler
        if not isinstance(scheduler, CMMultistepScheduler):
            scheduler = CMMultistepScheduler.from_config(scheduler.config)
        sample = consistency_sample(self.unet, scheduler, latents.to(device, self.unet.dtype),
                                    num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                                    class_labels=labels, generator=generator)
        if output_type == "latent":
            image = sample
        else:
            if self.vae is not None:
                sample = self.vae.decode(sample.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            image = self.postprocess_image(sample, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
