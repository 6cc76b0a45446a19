"""Latent consistency distillation (LCM paper, Algorithm 1) of a Stable Diffusion 1.x / 2.x teacher.

Two layers:

* **The step, as functions** (:func:`sample_skip_timesteps`, :func:`consistency_function`,
  :func:`guided_teacher_denoiser`, :func:`lcm_distillation_loss`): networks enter as plain callables
  ``(x, t) -> model output``, so the closed-form Gaussian tests drive exactly the code training runs. All math
  comes from :mod:`lcm_kit.consistency` (the scheduler's code): boundary scalings, x0 conversions for epsilon and
  v-prediction teachers, the DDIM / Euler / Heun teacher step, LCM's CFG convention, the distance.
* **The objective** (:class:`LCMDistillation`) that :func:`lcm_kit.training.loop.run_training` drives:

  - ``mode="lora"``: one UNet. The student is the teacher plus an LCM-LoRA; the teacher is the *same* module with
    the adapter disabled (no second copy) and the target is the student under ``no_grad``. Frozen weights are cast
    to the mixed-precision dtype, the adapter stays fp32.
  - ``mode="full"``: the student is a copy of the teacher with a guidance embedding input
    (``time_cond_proj_dim``), the target is its EMA (``--ema_decay``) and is what gets saved.

  The teacher's conditional and unconditional predictions come from ONE batched forward. In LoRA mode the student
  and target forwards run each LoRA layer as one op with ``W + s·B·A`` (:func:`lcm_kit.lora.fused_lora_forward`,
  exact; off with ``--lora_dropout > 0``); ``--torch_compile`` compiles the UNet(s) (opt-in).

Entry points used by ``train_scripts/``: :func:`train_lcm_lora` and :func:`train_lcm` (``main`` functions that
parse ``argv``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..consistency import (
    LOSS_TYPES,
    PREDICTION_TYPES,
    SOLVERS,
    append_dims,
    consistency_distance,
    ddim_timestep_grid,
    guidance_scale_embedding,
    lcm_boundary_scalings,
    lcm_cfg,
    predicted_original_sample,
    sample_uniform,
    vp_noise,
    vp_solver_step,
)
from .loop import TrainingObjective, create_accelerator, run_training, weight_dtype_for

logger = logging.getLogger(__name__)

MODES = ("lora", "full")
DEFAULT_VALIDATION_PROMPTS = (
    "a photo of an astronaut riding a horse",
    "a cozy cabin in a snowy forest, warm light",
    "a bowl of ramen, studio photograph",
    "a watercolor painting of a lighthouse at dawn",
)
CACHE_FORMAT_VERSION = "lcm-kit-cache-v1:vae-posterior-parameters"

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# The distillation step as functions
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LCMDistillationConfig:
    """Hyper-parameters of one distillation step (defaults: diffusers' LCM scripts for SD 1.x)."""

    num_train_timesteps: int = 1000
    num_ddim_timesteps: int = 50
    solver: str = "ddim"
    w_min: float = 5.0
    w_max: float = 15.0
    timestep_scaling_factor: float = 10.0
    loss_type: str = "huber"
    huber_c: float = 0.001
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}.")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}.")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type of the teacher must be 'epsilon' or 'v_prediction', got {self.prediction_type!r} "
                f"(allowed in general: {PREDICTION_TYPES})."
            )
        if self.w_min > self.w_max:
            raise ValueError(f"w_min must be <= w_max, got w_min={self.w_min}, w_max={self.w_max}.")
        ddim_timestep_grid(self.num_train_timesteps, self.num_ddim_timesteps)  # validates the grid size

    @property
    def skip(self) -> int:
        """k: how many training timesteps one teacher step spans."""
        return self.num_train_timesteps // self.num_ddim_timesteps


def sample_skip_timesteps(batch_size: int, config: LCMDistillationConfig, generator=None, device=None):
    """Start timesteps ``t_{n+k}`` drawn uniformly from the DDIM grid, and targets ``t_n = t_{n+k} - k`` (>= 0)."""
    grid = torch.from_numpy(ddim_timestep_grid(config.num_train_timesteps, config.num_ddim_timesteps)).to(device)
    index = torch.randint(0, config.num_ddim_timesteps, (batch_size,), generator=generator, device=device)
    start = grid[index]
    return start, (start - config.skip).clamp(min=0)


def consistency_function(model_output, sample, timesteps, alphas_cumprod, prediction_type, timestep_scaling=10.0):
    """LCM's parameterised consistency function ``f(x, t) = c_skip(t) x + c_out(t) x0(model_output)``
    (the same boundary scalings :class:`~lcm_kit.schedulers.ConsistencyScheduler` applies at sampling)."""
    alpha_t = append_dims(alphas_cumprod[timesteps], sample.ndim)
    pred_x0 = predicted_original_sample(model_output.float(), sample, alpha_t, prediction_type)
    c_skip, c_out = lcm_boundary_scalings(timesteps.to(torch.float32), timestep_scaling)
    return append_dims(c_skip, sample.ndim) * sample + append_dims(c_out, sample.ndim) * pred_x0


def guided_teacher_denoiser(teacher: Callable, w: torch.Tensor, alphas_cumprod, prediction_type: str) -> ModelFn:
    """``denoise(x, t) -> x0`` of the teacher under LCM's guidance ``x0 = c + w (c - u)``.

    ``teacher(x, t) -> (cond_output, uncond_output)`` (one batched forward in the trainer).
    """

    def denoise(x, t):
        cond_output, uncond_output = teacher(x, t)
        alpha_t = append_dims(alphas_cumprod[t], x.ndim)
        cond_x0 = predicted_original_sample(cond_output.float(), x, alpha_t, prediction_type)
        uncond_x0 = predicted_original_sample(uncond_output.float(), x, alpha_t, prediction_type)
        return lcm_cfg(cond_x0, uncond_x0, append_dims(w, x.ndim))

    return denoise


@dataclass
class LCMDistillationOutput:
    loss: torch.Tensor
    prediction: torch.Tensor  # f_theta(x_{t_{n+k}}, t_{n+k}) (with grad)
    target: torch.Tensor  # f_target(x_hat_{t_n}, t_n)
    noisy_latents: torch.Tensor
    solver_latents: torch.Tensor  # x_hat_{t_n}: the teacher's ODE step


def lcm_distillation_loss(
    latents: torch.Tensor,
    noise: torch.Tensor,
    start_timesteps: torch.Tensor,
    prev_timesteps: torch.Tensor,
    w: torch.Tensor,
    student: ModelFn,
    teacher: Callable,
    target: ModelFn,
    alphas_cumprod: torch.Tensor,
    config: LCMDistillationConfig,
) -> LCMDistillationOutput:
    """One LCD step: noise the latents to ``t_{n+k}``, take the guided teacher ODE step to ``t_n``, and compare the
    student's consistency function at ``t_{n+k}`` with the target network's at ``t_n``.

    ``student(x, t)`` and ``target(x, t)`` return raw UNet outputs (under the teacher's ``prediction_type``);
    ``teacher(x, t)`` returns ``(cond_output, uncond_output)``. The teacher and target run under ``no_grad``.
    """
    latents = latents.float()
    noisy = vp_noise(latents, noise.float(), append_dims(alphas_cumprod[start_timesteps], latents.ndim))
    prediction = consistency_function(
        student(noisy, start_timesteps),
        noisy,
        start_timesteps,
        alphas_cumprod,
        config.prediction_type,
        config.timestep_scaling_factor,
    )
    with torch.no_grad():
        denoise = guided_teacher_denoiser(teacher, w, alphas_cumprod, config.prediction_type)
        x_prev = vp_solver_step(denoise, noisy, start_timesteps, prev_timesteps, alphas_cumprod, config.solver).float()
        target_value = consistency_function(
            target(x_prev, prev_timesteps),
            x_prev,
            prev_timesteps,
            alphas_cumprod,
            config.prediction_type,
            config.timestep_scaling_factor,
        )
    loss = consistency_distance(prediction, target_value, config.loss_type, config.huber_c)
    return LCMDistillationOutput(loss, prediction, target_value, noisy, x_prev)


# ----------------------------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------------------------


def _unwrap(model):
    """The module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def _place(module, device, dtype):
    """Move a module, casting only when its dtype differs (diffusers warns on every dtype cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)
    return module


def config_from_args(args, prediction_type: str, num_train_timesteps: int) -> LCMDistillationConfig:
    return LCMDistillationConfig(
        num_train_timesteps=num_train_timesteps,
        num_ddim_timesteps=args.num_ddim_timesteps,
        solver=args.solver,
        w_min=args.w_min,
        w_max=args.w_max,
        timestep_scaling_factor=args.timestep_scaling_factor,
        loss_type=args.loss_type,
        huber_c=args.huber_c,
        prediction_type=prediction_type,
    )


class LCMDistillation(TrainingObjective):
    """Latent consistency distillation of an SD 1.x / 2.x teacher (``mode`` "lora" or "full")."""

    name = "lcm-distill"

    def __init__(self, args, accelerator, mode: str = "lora", components: dict | None = None):
        """Load the teacher from ``args.pretrained_teacher_model`` (or take ``components``: a dict with ``unet``,
        ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` as in a diffusers pipeline) and build the student."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        self.args, self.accelerator, self.mode = args, accelerator, mode
        self.device = accelerator.device
        self.weight_dtype = weight_dtype_for(accelerator)
        self.name = "lcm-lora-distill" if mode == "lora" else "lcm-distill"
        components = components or load_teacher_components(args)
        self.tokenizer = components["tokenizer"]
        self.teacher_scheduler_config = dict(components["scheduler"].config)
        self.config = config_from_args(
            args,
            prediction_type=components["scheduler"].config.prediction_type,
            num_train_timesteps=components["scheduler"].config.num_train_timesteps,
        )
        self.alphas_cumprod = components["scheduler"].alphas_cumprod.to(self.device, torch.float32)

        self.vae = components["vae"].requires_grad_(False).eval()
        # The VAE stays fp32 (SD VAEs overflow in fp16; with --cache_latents it runs once anyway).
        _place(self.vae, self.device, torch.float32)
        self.text_encoder = components["text_encoder"].requires_grad_(False).eval()
        _place(self.text_encoder, self.device, self.weight_dtype)

        teacher_unet = components["unet"].requires_grad_(False)
        if teacher_unet.config.time_cond_proj_dim is not None:
            raise ValueError(
                "pretrained_teacher_model must be an ordinary SD UNet, got one with time_cond_proj_dim="
                f"{teacher_unet.config.time_cond_proj_dim} (already a distilled LCM)."
            )
        self.guidance_embedding_dim = None
        self.target_unet = None
        self.teacher_unet = None
        if mode == "lora":
            from ..lora import add_lcm_lora

            targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
            # Frozen base in the mixed-precision dtype; the adapter's parameters are created (then kept) in fp32.
            _place(teacher_unet, self.device, self.weight_dtype)
            self.unet = add_lcm_lora(teacher_unet, args.lora_rank, args.lora_alpha, args.lora_dropout, targets)
            for parameter in self.unet.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
        else:
            from diffusers import UNet2DConditionModel

            self.guidance_embedding_dim = args.unet_time_cond_proj_dim
            student = UNet2DConditionModel.from_config(
                teacher_unet.config, time_cond_proj_dim=self.guidance_embedding_dim
            )
            missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
            if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
                raise RuntimeError(f"Student/teacher mismatch: missing {missing}, unexpected {unexpected}.")
            # Zero-initialised guidance projection: the student starts as exactly the teacher.
            torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
            self.unet = _place(student, self.device, torch.float32).train().requires_grad_(True)
            self.teacher_unet = _place(teacher_unet, self.device, self.weight_dtype).eval()
            self.target_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self.unet.train()
        if args.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if args.torch_compile:
            # In place (nn.Module.compile): same module objects, so peft, saving and _unwrap see no wrapper. Opt-in:
            # on the CPU tiny config the first step compiles for 2.5-7 min, later steps are 8-13 % faster (RESULTS.md).
            for module in (self.unet, self.teacher_unet, self.target_unet):
                if module is not None:
                    module.compile()
        self.student = self.unet  # replaced by the prepared (DDP-wrapped) module
        self.fuse_student_lora = self.fuse_target_lora = False
        if mode == "lora":
            self._choose_lora_fusion()
        with torch.no_grad():
            self.uncond_embeds = self.encode_prompts([""])["prompt_embeds"]

    def _choose_lora_fusion(self):
        """Run the adapter fused (one op per LoRA layer) wherever that is exactly peft's function."""
        from ..lora import lora_fusion_blockers

        blockers = lora_fusion_blockers(self.unet)
        if blockers:
            name, why = next(iter(blockers.items()))
            logger.info("LoRA runs unfused (peft's forward): %d layer(s) cannot be fused, e.g. %s: %s.",
                        len(blockers), name, why)
            return
        self.fuse_target_lora = True
        # Gradient checkpointing recomputes blocks during backward, outside the step's fused context: the
        # recomputation would run peft's forward and save different tensors, so the student stays unfused then.
        self.fuse_student_lora = not self.args.gradient_checkpointing

    # ---- encoders (also used to build the caches) ---------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return {"prompt_embeds": self.text_encoder(ids)[0].float()}

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters (mean and log-variance channels). The latent is *sampled* from them at
        each training step, so a cached run trains on the same distribution as an uncached one."""
        return self.vae.encode(pixel_values.to(self.device, torch.float32)).latent_dist.parameters.float()

    def latents_from_posterior(self, parameters: torch.Tensor, generator) -> torch.Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        sample = DiagonalGaussianDistribution(parameters.to(self.device, torch.float32)).sample(generator=generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (sample - shift) * self.vae.config.scaling_factor

    def cache_fingerprint(self) -> str:
        """Identity of the encoders that produce cached tensors (a changed model or dtype never reuses a cache)."""
        digest = hashlib.sha256(CACHE_FORMAT_VERSION.encode())
        digest.update(json.dumps([str(self.args.pretrained_teacher_model), self.args.revision, self.args.variant]).encode())
        for module in (self.vae, self.text_encoder):
            digest.update(json.dumps(dict(module.config) if isinstance(module.config, dict) else module.config.to_dict(),
                                     sort_keys=True, default=str).encode())
            digest.update(str(next(module.parameters()).dtype).encode())
            with torch.no_grad():  # a cheap weight checksum: catches re-trained weights at the same path
                sums = torch.stack([p.detach().double().sum() for p in module.parameters()])
            digest.update(sums.cpu().numpy().tobytes())
        digest.update(str(self.tokenizer.model_max_length).encode())
        return digest.hexdigest()[:32]

    # ---- TrainingObjective ----------------------------------------------------------------------------------
    def trainable_modules(self):
        return [self.unet]

    def set_prepared_modules(self, modules):
        (self.student,) = modules

    def trainable_parameters(self):
        return [p for p in self.unet.parameters() if p.requires_grad]

    def _batch_latents_and_embeds(self, batch, generator):
        if "latents" in batch:
            latents = self.latents_from_posterior(batch["latents"], generator)
        elif "pixel_values" in batch:
            with torch.no_grad():
                latents = self.latents_from_posterior(self.encode_images(batch["pixel_values"]), generator)
        else:
            raise ValueError(f"batch must hold 'pixel_values' or 'latents', got keys {sorted(batch)}.")
        if "prompt_embeds" in batch:
            prompt_embeds = batch["prompt_embeds"].to(self.device, torch.float32)
        elif "captions" in batch:
            prompt_embeds = self.encode_prompts(batch["captions"])["prompt_embeds"]
        else:
            raise ValueError(f"batch must hold 'captions' or 'prompt_embeds', got keys {sorted(batch)}.")
        return latents, prompt_embeds

    def compute_loss(self, batch, step, generator):
        args, device = self.args, self.device
        latents, prompt_embeds = self._batch_latents_and_embeds(batch, generator)
        batch_size = latents.shape[0]
        start_t, prev_t = sample_skip_timesteps(batch_size, self.config, generator, device)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        w = sample_uniform(self.config.w_min, self.config.w_max, batch_size, generator=generator, device=device)
        uncond = self.uncond_embeds.expand(batch_size, -1, -1)
        if args.proportion_empty_prompts > 0:
            empty = torch.rand(batch_size, generator=generator, device=device) < args.proportion_empty_prompts
            prompt_embeds = torch.where(append_dims(empty, prompt_embeds.ndim), uncond, prompt_embeds)

        w_embedding = None
        if self.mode == "full":
            w_embedding = guidance_scale_embedding(w, self.guidance_embedding_dim).to(device)

        def student(x, t):
            # (the prepared module already autocasts; this also covers an objective used without prepare)
            with self.accelerator.autocast(), self._lora_forward(self.fuse_student_lora):
                return self.student(x, t, encoder_hidden_states=prompt_embeds, timestep_cond=w_embedding).sample

        def teacher(x, t):
            # cond and uncond in ONE batched forward
            with self.accelerator.autocast(), self._teacher_weights() as unet:
                out = unet(
                    torch.cat([x, x]).to(self.weight_dtype),
                    torch.cat([t, t]),
                    encoder_hidden_states=torch.cat([prompt_embeds, uncond]).to(self.weight_dtype),
                ).sample
            return out.float().chunk(2)

        def target(x, t):
            unet = self.target_unet if self.mode == "full" else _unwrap(self.student)
            with self.accelerator.autocast(), self._lora_forward(self.fuse_target_lora):
                return unet(x, t, encoder_hidden_states=prompt_embeds, timestep_cond=w_embedding).sample.float()

        output = lcm_distillation_loss(
            latents, noise, start_t, prev_t, w, student, teacher, target, self.alphas_cumprod, self.config
        )
        return output.loss, {}

    def _lora_forward(self, fused: bool):
        """The LoRA layers as ONE op each (``W + s·B·A``, :func:`lcm_kit.lora.fused_lora_forward`) or peft's own."""
        import contextlib

        if not fused:
            return contextlib.nullcontext()
        from ..lora import fused_lora_forward

        return fused_lora_forward(_unwrap(self.student))

    class _AdapterDisabled:
        def __init__(self, unet):
            self.unet = unet

        def __enter__(self):
            self.unet.disable_adapters()
            return self.unet

        def __exit__(self, *exc):
            self.unet.enable_adapters()
            return False

    def _teacher_weights(self):
        """The teacher: for LoRA the student's own base with the adapter switched off (no second copy)."""
        if self.mode == "lora":
            return self._AdapterDisabled(_unwrap(self.student))
        import contextlib

        return contextlib.nullcontext(self.teacher_unet)

    @torch.no_grad()
    def after_optimizer_step(self, step):
        if self.mode != "full":
            return
        student = [p.detach() for p in _unwrap(self.student).parameters()]
        target = [p.detach() for p in self.target_unet.parameters()]
        torch._foreach_lerp_(target, student, 1.0 - self.args.ema_decay)

    def checkpoint_state(self):
        unet = _unwrap(self.student)
        if self.mode == "lora":
            return {f"student.{k}": p for k, p in unet.named_parameters() if p.requires_grad}
        state = {f"student.{k}": v for k, v in unet.state_dict().items()}
        state.update({f"target.{k}": v for k, v in self.target_unet.state_dict().items()})
        return state

    def load_checkpoint_state(self, state):
        unet = _unwrap(self.student)
        student_state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
        expected = set(self.checkpoint_state())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"checkpoint does not match this run ({self.mode}): missing {missing[:5]}, unexpected {unexpected[:5]}."
            )
        with torch.no_grad():
            named = dict(unet.named_parameters()) | dict(unet.named_buffers())
            for key, value in student_state.items():
                named[key].copy_(value)
            if self.mode == "full":
                self.target_unet.load_state_dict(
                    {k[len("target."):]: v for k, v in state.items() if k.startswith("target.")}
                )

    def inference_unet(self):
        """The network users get: the EMA target (full) or the student with its adapter (LoRA)."""
        return self.target_unet if self.mode == "full" else _unwrap(self.student)

    def validation_pipeline(self):
        from ..pipelines import LCMPipeline
        from ..schedulers import ConsistencyScheduler

        return LCMPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.inference_unet(),
            scheduler=ConsistencyScheduler.from_config(self.teacher_scheduler_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    @torch.no_grad()
    def validate(self, step):
        prompts = self.args.validation_prompts
        if prompts is None:
            prompts = list(DEFAULT_VALIDATION_PROMPTS)
        if not prompts:
            return None
        guidance = self.args.validation_guidance_scale
        if guidance is None:
            guidance = 1.0 if self.mode == "lora" else 8.0
        unet = self.inference_unet()
        was_training = unet.training
        unet.eval()  # no dropout: validation must not consume the global RNG
        try:
            pipe = self.validation_pipeline()
            pipe.set_progress_bar_config(disable=True)
            generator = torch.Generator(device=self.device).manual_seed(self.args.seed)
            with self.accelerator.autocast():
                images = pipe(
                    prompt=list(prompts),
                    num_inference_steps=self.args.validation_num_inference_steps,
                    guidance_scale=guidance,
                    height=self.args.resolution,
                    width=self.args.resolution,
                    generator=generator,
                ).images
        finally:
            unet.train(was_training)
        return images

    def save_final(self, output_dir):
        output_dir = Path(output_dir)
        written = []
        if self.mode == "lora":
            from ..lora import export_kohya, save_lora_weights

            unet = _unwrap(self.student)
            path = save_lora_weights(unet, output_dir, metadata={"base_model": str(self.args.pretrained_teacher_model)})
            written.append(str(path))
            if self.args.export_kohya:
                written.append(str(export_kohya(unet, output_dir / "pytorch_lora_weights_kohya.safetensors")))
        else:
            from diffusers import LCMScheduler

            self.target_unet.save_pretrained(output_dir / "unet", safe_serialization=True)
            LCMScheduler.from_config(self.teacher_scheduler_config).save_pretrained(output_dir / "scheduler")
            written += [str(output_dir / "unet"), str(output_dir / "scheduler")]
        return written


# ----------------------------------------------------------------------------------------------------------------
# Loading, data, entry points
# ----------------------------------------------------------------------------------------------------------------


def load_teacher_components(args) -> dict:
    """Tokenizer, text encoder, VAE, UNet and noise schedule of the teacher folder / Hub id."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = args.pretrained_teacher_model
    common = dict(revision=args.revision, cache_dir=args.cache_dir)
    try:
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--pretrained_teacher_model={source!r} is not a diffusers Stable Diffusion folder or Hub id "
            f"(no scheduler/ found): {error}"
        ) from error
    return dict(
        scheduler=scheduler,
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=args.variant, **common),
        vae=AutoencoderKL.from_pretrained(source, subfolder="vae", variant=args.variant, **common),
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=args.variant, **common),
    )


def build_train_dataloader(args, source, objective: LCMDistillation, accelerator):
    """The training DataLoader: images + captions, or the encoded cache with ``--cache_latents`` /
    ``--cache_text_embeddings``."""
    from .data import build_dataloader_from_args, build_encoded_cache

    if not (args.cache_latents or args.cache_text_embeddings):
        return build_dataloader_from_args(args, source)
    cache_dir = os.path.join(args.cache_dir or os.path.join(args.output_dir, "cache"), "encoded")
    with accelerator.main_process_first():
        cache = build_encoded_cache(
            source,
            encode_images=objective.encode_images if args.cache_latents else None,
            encode_prompts=objective.encode_prompts if args.cache_text_embeddings else None,
            resolution=args.resolution,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
            cache_dir=cache_dir,
            fingerprint=objective.cache_fingerprint(),
            batch_size=args.train_batch_size,
            seed=args.seed,
        )
    return build_dataloader_from_args(args, cache)


def train(args, mode: str, hub_client=None, command: Sequence[str] | None = None):
    """Run LCM distillation from parsed flags; returns the loop's :class:`~lcm_kit.training.loop.TrainingResult`.

    ``hub_client``: an ``HfApi``-like client for ``--push_to_hub`` (default: ``HfApi``); ``command``: the argv shown
    in the model card (secrets redacted).
    """
    from .args import validate_data_args, validate_lcm_args, validate_training_args
    from .data import load_train_dataset_from_args

    validate_training_args(args)
    validate_data_args(args)
    validate_lcm_args(args)
    # The data source first: a wrong column fails before any model is loaded.
    source = load_train_dataset_from_args(args)
    accelerator = create_accelerator(args)
    objective = LCMDistillation(args, accelerator, mode=mode)
    dataloader = build_train_dataloader(args, source, objective, accelerator)
    result = run_training(args, accelerator, objective, dataloader)
    if args.push_to_hub and accelerator.is_main_process:
        push_outputs(args, mode, result, client=hub_client, command=command)
    return result


def push_outputs(args, mode: str, result, client=None, command: Sequence[str] | None = None) -> str:
    """Write the model card (base model, license, tags, command, 4-step snippet, validation grid) and upload
    ``--output_dir`` (checkpoints and caches excluded) through :func:`lcm_kit.training.hub.push_to_hub`."""
    from . import hub

    repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
    grid = None
    if result.validation_grids:
        grid = os.path.relpath(result.validation_grids[-1], args.output_dir)
    dataset = args.dataset_name if args.dataset_name and not os.path.exists(args.dataset_name) else None
    card = hub.render_model_card(
        base_model=str(args.pretrained_teacher_model),
        hub_model_id=repo_id,
        lora=mode == "lora",
        training_command=hub.training_command(command),
        license=hub.license_from_model_folder_or_card(args.pretrained_teacher_model),
        validation_image=grid,
        metrics={"final loss": result.last_loss, "steps": result.global_step},
        datasets=dataset,
    )
    return hub.push_to_hub(args.output_dir, repo_id, token=args.hub_token, client=client, model_card=card)


def _command(script: str, argv: Sequence[str] | None) -> list[str]:
    import sys

    return [script, *(sys.argv[1:] if argv is None else argv)]


def train_lcm_lora(argv: Sequence[str] | None = None, hub_client=None):
    """``train_scripts/train_lcm_lora.py``: distill a teacher into an LCM-LoRA."""
    from .args import build_lcm_lora_parser

    args = build_lcm_lora_parser().parse_args(argv)
    return train(args, "lora", hub_client=hub_client, command=_command("train_scripts/train_lcm_lora.py", argv))


def train_lcm(argv: Sequence[str] | None = None, hub_client=None):
    """``train_scripts/train_lcm.py``: distill a teacher into a full LCM UNet (guidance embedding, EMA target)."""
    from .args import build_lcm_parser

    args = build_lcm_parser().parse_args(argv)
    return train(args, "full", hub_client=hub_client, command=_command("train_scripts/train_lcm.py", argv))
