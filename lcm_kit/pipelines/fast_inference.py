"""The fast inference path of :class:`~lcm_kit.pipelines.pipeline_lcm.LCMPipeline`: ``pipe.enable_fast_inference()``.

A few-step consistency model spends most of its GPU time launching kernels, not computing: at 4 steps the UNet runs
four times and everything around it (scheduler arithmetic, host-device syncs, the text encoder of a prompt already
seen) is a noticeable share. ``enable_fast_inference`` removes that overhead for the common call (text-to-image):

* LoRA fused into the base weights (diffusers' ``fuse_lora``), restored bit for bit on the way out;
* ``channels_last``, SDPA attention, fp16 on CUDA;
* ``torch.compile`` of the UNet and the VAE decode (CUDA graphs on CUDA), one compile per (batch, height, width);
* a denoising loop with no host-device sync: timesteps, boundary scalings, the guidance embedding and the prompt
  embeddings of a repeated prompt are computed once and cached; the step's noise is drawn before the loop;
* optionally a small decoder (``AutoencoderTiny``) for the last decode.

Calls outside that subset (image-to-image, IP-Adapter, step callbacks, ``gamma < 1``, ...) take the pipeline's normal
path, so the switch is safe to leave on. The mixin only adds methods; ``LCMPipeline.__call__`` reaches the fast loop
through :func:`with_fast_inference`.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Callable

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
    LatentConsistencyModelPipeline,
)
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils import logging

from ..consistency import predicted_original_sample, vp_noise
from ..schedulers.scheduling_lcm import ConsistencyScheduler
from .fast_inference_constants import FastInferenceConstants
from .fast_inference_modules import FastInferenceModules, FastSettings, FastState, has_offload_hooks, param_dtype

logger = logging.get_logger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def with_fast_inference(call):
    """Decorates ``LCMPipeline.__call__``: while :meth:`FastInferenceMixin.enable_fast_inference` is on and the call
    is in the supported subset, it runs :meth:`FastInferenceMixin._fast_call`; otherwise ``call`` itself. The
    signature and docstring stay ``call``'s."""
    signature = inspect.signature(call)

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        if self._fast_state is None:
            return call(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        call_args = dict(bound.arguments)
        call_args.pop(next(iter(signature.parameters)))
        if self._fast_route(call_args):
            return self._fast_call(call_args)
        return call(self, *args, **kwargs)

    return __call__


def _state_changing(name: str):
    """A pipeline method that may change LoRA adapters, the text encoder or the tokenizer: the fast path's fused
    weights are restored first and its caches dropped after (re-fused lazily on the next call)."""
    original = getattr(LatentConsistencyModelPipeline, name)

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        state = self._fast_state
        if state is None:
            return getattr(super(FastInferenceMixin, self), name)(*args, **kwargs)
        outermost = not self._fast_in_change
        self._fast_in_change = True
        try:
            if outermost:
                self._fast_release_weights()
            return getattr(super(FastInferenceMixin, self), name)(*args, **kwargs)
        finally:
            if outermost:
                self._fast_in_change = False
                if name in ("fuse_lora", "unfuse_lora"):
                    # The user takes LoRA fusion into their own hands.
                    state.settings.fuse_lora = False
                state.dirty = True

    return method


class FastInferenceMixin(FastInferenceConstants, FastInferenceModules):
    """``enable_fast_inference()`` / ``disable_fast_inference()`` for :class:`LCMPipeline` (see the module
    docstring). Off by default."""

    _fast_state: FastState | None = None
    _fast_in_change: bool = False

    # LoRA / textual-inversion / IP-Adapter changes invalidate the fused weights and the prompt cache.
    load_lora_weights = _state_changing("load_lora_weights")
    fuse_lora = _state_changing("fuse_lora")
    unfuse_lora = _state_changing("unfuse_lora")
    set_adapters = _state_changing("set_adapters")
    disable_lora = _state_changing("disable_lora")
    enable_lora = _state_changing("enable_lora")
    delete_adapters = _state_changing("delete_adapters")
    unload_lora_weights = _state_changing("unload_lora_weights")
    set_lora_device = _state_changing("set_lora_device")
    load_textual_inversion = _state_changing("load_textual_inversion")
    unload_textual_inversion = _state_changing("unload_textual_inversion")
    load_ip_adapter = _state_changing("load_ip_adapter")
    unload_ip_adapter = _state_changing("unload_ip_adapter")

    # ------------------------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------------------------

    def enable_fast_inference(
        self,
        dtype: torch.dtype | None = None,
        compile: bool | None = None,
        compile_mode: str | None = None,
        backend: str | Callable = "inductor",
        fullgraph: bool = False,
        channels_last: bool | None = None,
        fuse_qkv: bool | None = None,
        fuse_lora: bool = True,
        lora_scale: float = 1.0,
        vae: AutoencoderTiny | AutoencoderKL | None = None,
        prompt_cache_size: int = 16,
    ):
        r"""Switch on the fast inference path (see the module docstring). Calling it again replaces the settings.

        Args:
            dtype (`torch.dtype`, *optional*):
                Cast every component to this dtype (``float16``, ``bfloat16`` or ``float32``). Default: ``float16``
                on CUDA when the pipeline is in float32, otherwise unchanged (CPU half precision only when asked).
                :meth:`disable_fast_inference` casts back; the rounding stays.
            compile (`bool`, *optional*):
                ``torch.compile`` the UNet and the VAE decode. Default: on for CUDA, off elsewhere (compiles take
                minutes on a CPU). The first call of each (batch, height, width) compiles; the number of steps
                never does. The fast path's compiled modules are its own: the normal path stays eager.
            compile_mode (`str`, *optional*):
                torch.compile's ``mode``, one of ``"default"``, ``"reduce-overhead"`` (CUDA graphs),
                ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``. Default: ``"reduce-overhead"`` on CUDA,
                ``"default"`` elsewhere (only for the inductor backend).
            backend (`str` or callable, defaults to `"inductor"`):
                torch.compile's ``backend``.
            fullgraph (`bool`, defaults to `False`):
                torch.compile's ``fullgraph`` (an error instead of a graph break).
            channels_last (`bool`, *optional*):
                ``channels_last`` memory format for the UNet and VAE. Default: on for CUDA, off elsewhere.
            fuse_qkv (`bool`, *optional*):
                diffusers' ``fuse_qkv_projections`` on the UNet and VAE (one projection GEMM instead of three) after
                the LoRA is fused, undone before any LoRA change and on the way out. Skipped for a module with
                custom attention processors (IP-Adapter, ...) or an unfused LoRA on q/k/v. Default: on for CUDA, off
                elsewhere.
            fuse_lora (`bool`, defaults to `True`):
                Fuse the active LoRA adapters of the UNet and text encoder into their base weights (diffusers'
                ``fuse_lora``). The weights are restored bit for bit by :meth:`disable_fast_inference` and before
                any LoRA change (``load_lora_weights``, ``set_adapters``, ...), and fused again on the next call.
                An explicit ``pipe.fuse_lora()`` / ``pipe.unfuse_lora()`` hands fusion back to the user. Keeps a
                CPU copy of the fused layers' base weights.
            lora_scale (`float`, defaults to 1.0):
                The LoRA scale fused in. A per-call ``cross_attention_kwargs={"scale": s}`` cannot apply to fused
                weights and is an error while fused.
            vae (`AutoencoderTiny` or `AutoencoderKL`, *optional*):
                A decoder for the fast path's final decode instead of ``pipe.vae`` (e.g. TAESD,
                ``AutoencoderTiny.from_pretrained("madebyollin/taesd")``); latents are divided by its
                ``config.scaling_factor``, as when it replaces ``pipe.vae``. The normal path keeps ``pipe.vae``.
            prompt_cache_size (`int`, defaults to 16):
                Prompt embeddings kept, keyed by prompt, negative prompt, images per prompt, guidance on/off,
                ``clip_skip``, LoRA scale, device and dtype; dropped when the text encoder, tokenizer or LoRA
                adapters change. 0 disables the cache.

        Supported calls: text-to-image with ``prompt`` or ``prompt_embeds``, any ``guidance_scale``,
        ``num_inference_steps`` or custom ``timesteps``, ``num_images_per_prompt``, generators, ``latents``,
        every ``output_type``. Everything else (``image``, IP-Adapter, ``callback_on_step_end``,
        ``cross_attention_kwargs``, ``gamma < 1``, a scheduler other than ``ConsistencyScheduler`` /
        ``LCMScheduler`` or one with clipping / thresholding, accelerate offloading) runs the normal path; see
        :attr:`fast_inference_stats`.
        """
        settings = self._check_fast_settings(
            dtype, compile, compile_mode, backend, fullgraph, channels_last, fuse_qkv, fuse_lora, lora_scale, vae,
            prompt_cache_size,
        )
        if any(has_offload_hooks(getattr(self, name, None), recurse=True) for name in ("unet", "vae", "text_encoder")):
            raise ValueError(
                "enable_fast_inference does not work with offloading hooks (enable_model_cpu_offload, "
                "enable_sequential_cpu_offload, enable_group_offload); remove them (`pipe.remove_all_hooks()`) and "
                "move the pipeline to its device first."
            )
        if self._fast_state is not None:
            self.disable_fast_inference()
        self._fast_state = FastState(settings=settings)
        self._fast_sync()

    def disable_fast_inference(self, unfuse_lora: bool = True):
        """Switch the fast path off: LoRA weights unfused bit for bit (``unfuse_lora=False`` keeps them fused, as
        after ``pipe.fuse_lora()``), attention processors, memory format and dtype restored, compiled modules and
        caches dropped. A no-op when it is off."""
        state = self._fast_state
        if state is None:
            return
        self._fast_unfuse_qkv()
        if unfuse_lora:
            self._fast_restore_lora()
        state.fused = None
        self._fast_restore_modules()
        self._fast_state = None

    @property
    def fast_inference_enabled(self) -> bool:
        return self._fast_state is not None

    @property
    def fast_inference_stats(self) -> dict | None:
        """Counters of the fast path (``fast_calls``, ``fallbacks`` by reason, prompt cache hits / misses) and
        whether LoRA is fused by it; ``None`` when it is off."""
        state = self._fast_state
        if state is None:
            return None
        return {**state.stats, "fallbacks": dict(state.stats["fallbacks"]), "lora_fused": state.fused is not None}

    def clear_fast_inference_cache(self):
        """Drop cached prompt embeddings, schedules and guidance embeddings. Needed only after changing the text
        encoder in ways the pipeline cannot see (editing its weights in place, peft calls on the module itself)."""
        if self._fast_state is not None:
            self._fast_state.dirty = True

    # ------------------------------------------------------------------------------------------------------------
    # Settings and module state
    # ------------------------------------------------------------------------------------------------------------

    def _check_fast_settings(self, dtype, compile, compile_mode, backend, fullgraph, channels_last, fuse_qkv,
                             fuse_lora, lora_scale, vae, prompt_cache_size) -> FastSettings:
        if dtype is not None and dtype not in FAST_DTYPES:
            raise ValueError(f"`dtype` must be one of {list(FAST_DTYPES)} or None, got {dtype!r}.")
        for name, value in (("compile", compile), ("channels_last", channels_last), ("fuse_qkv", fuse_qkv)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"`{name}` must be True, False or None, got {value!r}.")
        for name, value in (("fullgraph", fullgraph), ("fuse_lora", fuse_lora)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be True or False, got {value!r}.")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise ValueError(f"`compile_mode` must be one of {list(COMPILE_MODES)} or None, got {compile_mode!r}.")
        if not (isinstance(backend, str) and backend) and not callable(backend):
            raise TypeError(f"`backend` must be a torch.compile backend name or callable, got {backend!r}.")
        if compile_mode is not None and backend != "inductor":
            raise ValueError(f"`compile_mode`={compile_mode!r} only applies to backend='inductor', got {backend!r}.")
        if (
            isinstance(lora_scale, bool)
            or not isinstance(lora_scale, numbers.Real)
            or not math.isfinite(lora_scale)
        ):
            raise ValueError(f"`lora_scale` must be a finite number, got {lora_scale!r}.")
        if vae is not None:
            if not isinstance(vae, (AutoencoderTiny, AutoencoderKL)):
                raise TypeError(
                    f"`vae` must be a diffusers AutoencoderTiny or AutoencoderKL, got {type(vae).__name__}."
                )
            channels = self.unet.config.out_channels
            if vae.config.latent_channels != channels:
                raise ValueError(
                    f"`vae` has latent_channels={vae.config.latent_channels} but the UNet makes {channels}-channel "
                    "latents; pass a decoder for this model's latent space."
                )
        if isinstance(prompt_cache_size, bool) or not isinstance(prompt_cache_size, int) or prompt_cache_size < 0:
            raise ValueError(f"`prompt_cache_size` must be an int >= 0, got {prompt_cache_size!r}.")
        return FastSettings(dtype, compile, compile_mode, backend, fullgraph, channels_last, fuse_qkv, fuse_lora,
                         float(lora_scale), vae, prompt_cache_size)


    # ------------------------------------------------------------------------------------------------------------
    # Routing
    # ------------------------------------------------------------------------------------------------------------

    def _fast_route(self, call_args: dict) -> bool:
        """True when the call runs the fast loop; else the reason is counted and the normal path runs."""
        state = self._fast_state
        if any(has_offload_hooks(getattr(self, name, None)) for name in ("unet", "vae", "text_encoder")):
            return self._fast_fallback("offloading hooks")
        self._fast_sync()
        if state.hooked:
            return self._fast_fallback("offloading hooks")
        scale = (call_args["cross_attention_kwargs"] or {}).get("scale", 1.0)
        if state.fused is not None and scale != 1.0:
            raise ValueError(
                f"cross_attention_kwargs={{'scale': {scale!r}}} cannot scale a LoRA that enable_fast_inference fused "
                f"into the weights (at lora_scale={state.settings.lora_scale}); use "
                "`pipe.enable_fast_inference(lora_scale=...)` or `pipe.enable_fast_inference(fuse_lora=False)`."
            )
        reason = self._fast_unsupported(call_args)
        return True if reason is None else self._fast_fallback(reason)

    def _fast_fallback(self, reason: str) -> bool:
        fallbacks = self._fast_state.stats["fallbacks"]
        if reason not in fallbacks:
            logger.info(f"enable_fast_inference: this call runs the normal path ({reason}).")
        fallbacks[reason] = fallbacks.get(reason, 0) + 1
        return False

    def _fast_unsupported(self, call_args: dict) -> str | None:
        scheduler = self.scheduler
        if call_args["image"] is not None or call_args["strength"] is not None:
            return "image-to-image"
        if call_args["ip_adapter_image"] is not None or call_args["ip_adapter_image_embeds"] is not None:
            return "IP-Adapter"
        if call_args["callback_on_step_end"] is not None:
            return "callback_on_step_end"
        if call_args["cross_attention_kwargs"] is not None:
            return "cross_attention_kwargs"
        if not isinstance(scheduler, (ConsistencyScheduler, LCMScheduler)):
            return f"scheduler {type(scheduler).__name__}"
        if scheduler.config.thresholding or scheduler.config.clip_sample:
            return "scheduler clipping / thresholding"
        gamma = call_args["gamma"]
        if gamma is None and isinstance(scheduler, ConsistencyScheduler):
            gamma = scheduler.config.gamma
        if gamma is not None and gamma != 1.0:
            return "gamma < 1"
        return None

    # ------------------------------------------------------------------------------------------------------------
    # The fast loop
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _fast_call(self, args: dict):
        """LCMPipeline's text-to-image call for the supported subset, with the same inputs checks, the same
        generator order and the same arithmetic, minus the per-call and per-step overhead."""
        state = self._fast_state
        resolved = state.resolved
        guidance_scale = args["guidance_scale"]
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        self._guidance_scale = guidance_scale
        self._clip_skip = args["clip_skip"]
        self._cross_attention_kwargs = None
        self._interrupt = False
        prompt, prompt_embeds, latents = args["prompt"], args["prompt_embeds"], args["latents"]
        num_images_per_prompt, generator, output_type = (
            args["num_images_per_prompt"], args["generator"], args["output_type"]
        )
        height, width = args["height"], args["width"]
        self.check_inputs(
            prompt,
            height,
            width,
            prompt_embeds,
            args["negative_prompt"],
            args["negative_prompt_embeds"],
            num_images_per_prompt,
            generator,
            None,
            None,
            args["gamma"],
            output_type,
            args["callback_on_step_end_tensor_inputs"],
            num_inference_steps=args["num_inference_steps"] if args["timesteps"] is None else None,
            guidance_scale=guidance_scale,
            latents=latents,
        )
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        num_images = batch_size * num_images_per_prompt
        device = state.device
        do_cfg = self.do_classifier_free_guidance
        state.stats["fast_calls"] += 1

        # 1. Text conditioning, cached for a repeated prompt.
        encoder_hidden_states, embeds_dtype = self._fast_prompt_embeds(args, device, do_cfg, None)

        # 2. The schedule's constants (cached) and the guidance embedding of a distilled LCM (cached).
        schedule = self._fast_schedule(args, device)
        num_steps = len(schedule.alphas)
        self._num_timesteps = num_steps

        # 3. Initial latents, then every step's noise drawn up front in the order the scheduler would draw it.
        latents = self.prepare_latents(
            num_images, self.unet.config.in_channels, height, width, embeds_dtype, device, generator, latents
        )
        noises = self._fast_noises(latents, generator, num_steps - 1)
        w_embedding = self._fast_w_embedding(guidance_scale, num_images, device, latents.dtype) if (
            self.is_distilled
        ) else None

        # 4. LCM multistep sampling: the scheduler's step with its constants precomputed (no host-device sync).
        prediction_type = self.scheduler.config.prediction_type
        cudagraphs = resolved["cudagraphs"]
        denoised = latents
        with self.progress_bar(total=num_steps) as progress_bar:
            for i in range(num_steps):
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                model_pred = state.unet_fn(
                    model_input,
                    schedule.timesteps[i],
                    timestep_cond=w_embedding,
                    encoder_hidden_states=encoder_hidden_states,
                    return_dict=False,
                )[0]
                if do_cfg:
                    pred_uncond, pred_cond = model_pred.chunk(2)
                    model_pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
                pred_x0 = predicted_original_sample(model_pred, latents, schedule.alphas[i], prediction_type)
                denoised = schedule.c_out[i] * pred_x0 + schedule.c_skip[i] * latents
                latents = denoised if i == num_steps - 1 else vp_noise(denoised, noises[i], schedule.alphas_prev[i])
                progress_bar.update()

        # 5. Decode (the fast decoder when one was given).
        denoised = denoised.to(embeds_dtype)
        if output_type == "latent":
            images, has_nsfw_concept = denoised, None
        else:
            decoder = state.decoder
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            decoded = state.decode_fn(denoised.to(param_dtype(decoder)) / decoder.config.scaling_factor)
            if cudagraphs:
                decoded = decoded.clone()
            decoded = decoded.to(embeds_dtype)
            decoded, has_nsfw_concept = self.run_safety_checker(decoded, device, embeds_dtype)
            flagged = has_nsfw_concept if has_nsfw_concept is not None else [False] * decoded.shape[0]
            images = self.image_processor.postprocess(
                decoded, output_type=output_type, do_denormalize=[not nsfw for nsfw in flagged]
            )

        self.maybe_free_model_hooks()
        if not args["return_dict"]:
            return images, has_nsfw_concept
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=has_nsfw_concept)
