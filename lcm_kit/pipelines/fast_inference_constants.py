"""The constants the fast path of :class:`~lcm_kit.pipelines.pipeline_lcm.LCMPipeline` computes once instead of
every call or step: prompt embeddings of a repeated prompt, a schedule's timesteps and boundary scalings, the guidance
embedding, and each step's noise drawn before the loop."""

from __future__ import annotations

import torch
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from ..consistency import guidance_scale_embedding, lcm_boundary_scalings
from .fast_inference_modules import FastSchedule, cache_get, cache_put, hashable, param_dtype

CACHE_SIZE = 8  # schedules and guidance embeddings kept (they are a few bytes each)


class FastInferenceConstants:
    """Cached per-call constants of the fast loop; the caches live in ``self._fast_state`` and are dropped with it."""

    def _fast_prompt_embeds(self, args: dict, device, do_cfg: bool, lora_scale):
        state = self._fast_state
        prompt, negative_prompt = args["prompt"], args["negative_prompt"]
        key = None
        given_embeds = args["prompt_embeds"] is not None or args["negative_prompt_embeds"] is not None
        if not given_embeds and state.settings.prompt_cache_size:
            key = (hashable(prompt), hashable(negative_prompt), args["num_images_per_prompt"], do_cfg,
                   args["clip_skip"], lora_scale, device, param_dtype(self.text_encoder))
            cached = cache_get(state.prompt_cache, key)
            if cached is not None:
                state.stats["prompt_cache_hits"] += 1
                return cached
            state.stats["prompt_cache_misses"] += 1
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            args["num_images_per_prompt"],
            do_cfg,
            negative_prompt=negative_prompt,
            prompt_embeds=args["prompt_embeds"],
            negative_prompt_embeds=args["negative_prompt_embeds"],
            lora_scale=lora_scale,
            clip_skip=args["clip_skip"],
        )
        unet_embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
        result = (unet_embeds, prompt_embeds.dtype)
        if key is not None:
            cache_put(state.prompt_cache, key, result, state.settings.prompt_cache_size)
        return result

    def _fast_schedule(self, args: dict, device) -> FastSchedule:
        state = self._fast_state
        scheduler = self.scheduler
        custom = args["timesteps"]
        try:
            custom_key = None if custom is None else tuple(custom.tolist() if hasattr(custom, "tolist") else custom)
            key = (None if custom is not None else args["num_inference_steps"], custom_key,
                   args["original_inference_steps"], device)
            hash(key)
        except TypeError:  # not a sequence of numbers: the scheduler raises the error that names it
            key = None
        cached = None if key is None else cache_get(state.schedules, key)
        if cached is not None and cached.scheduler is scheduler and cached.config is scheduler.config:
            return cached
        timesteps, _ = retrieve_timesteps(
            scheduler, args["num_inference_steps"] if custom is None else None, device, custom,
            original_inference_steps=args["original_inference_steps"],
        )
        # The step's numbers as CPU 0-d tensors, computed as the scheduler computes them from a CPU timestep: they
        # enter the kernels as scalars, so the loop never reads a device value back.
        timesteps_cpu = timesteps.cpu()
        sigma_data = getattr(scheduler, "sigma_data", 0.5)
        alphas, alphas_prev, c_skip, c_out = [], [], [], []
        for i, t in enumerate(timesteps_cpu):
            alphas.append(scheduler.alphas_cumprod[int(t)])
            last = i == len(timesteps_cpu) - 1
            alphas_prev.append(None if last else scheduler.alphas_cumprod[int(timesteps_cpu[i + 1])])
            skip, out = lcm_boundary_scalings(t, scheduler.config.timestep_scaling, sigma_data)
            c_skip.append(skip)
            c_out.append(out)
        schedule = FastSchedule(scheduler, scheduler.config, timesteps, alphas, alphas_prev, c_skip, c_out)
        if key is not None:
            cache_put(state.schedules, key, schedule, CACHE_SIZE)
        return schedule

    def _fast_w_embedding(self, guidance_scale: float, num_images: int, device, dtype):
        state = self._fast_state
        dim = self.unet.config.time_cond_proj_dim
        key = (float(guidance_scale), num_images, dim, device, dtype)
        cached = cache_get(state.w_embeddings, key)
        if cached is None:
            w = torch.full((num_images,), guidance_scale - 1.0)
            cached = guidance_scale_embedding(w, embedding_dim=dim).to(device=device, dtype=dtype)
            cache_put(state.w_embeddings, key, cached, CACHE_SIZE)
        return cached

    @staticmethod
    def _fast_noises(latents: torch.Tensor, generator, count: int) -> list[torch.Tensor]:
        """The fresh noise of the first ``count`` steps, drawn as ``randn_tensor`` would draw it inside each step
        (same generator order, so the same values) and moved to the device in one copy."""
        if count == 0:
            return []
        generator_device = (generator[0] if isinstance(generator, list) else generator).device if generator else None
        draw_device = torch.device("cpu") if generator_device is not None and generator_device.type == "cpu" else (
            latents.device
        )
        noises = [randn_tensor(latents.shape, generator=generator, device=draw_device, dtype=latents.dtype)
                  for _ in range(count)]
        return list(torch.stack(noises).to(latents.device).unbind(0))
