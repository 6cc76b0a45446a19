"""The LCM / LCM-LoRA training objective: a Stable Diffusion 1.x / 2.x teacher, its student, the distillation loss.

:class:`LCMObjective` is what :func:`lcm_kit.training.loop.run_training` drives with
:class:`~lcm_kit.training.losses.LCMDistillationLoss`:

* ``mode="lora"``: one UNet. The student is the teacher plus an LCM-LoRA; the teacher is the *same* module with the
  adapter disabled (no second copy) and the target is the student under ``no_grad``. Frozen weights are cast to the
  mixed-precision dtype, the adapter stays fp32. Student and target run each LoRA layer as one op with ``W + s·B·A``,
  which the target takes from the student's forward (:class:`~lcm_kit.training.fused_lora.FusedLoRA`, exact; off
  with ``--lora_dropout > 0``).
* ``mode="full"``: the student is a copy of the teacher with a guidance embedding input (``time_cond_proj_dim``),
  the target is its EMA (``--ema_decay``, kept by the loop) and is what gets saved.

The teacher's conditional and unconditional predictions come from ONE batched forward; ``--torch_compile`` compiles
the UNet(s) (opt-in). :func:`train_lcm_distillation` runs the whole job from parsed flags.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import cast_training_params
from safetensors.torch import load_file, save_file

from ..consistency import guidance_scale_embedding, sample_uniform
from ..lora import add_lcm_lora, export_kohya, save_lora_weights
from ..pipelines import LCMPipeline, LCMXLPipeline
from ..precond import VPTrigFlowConsistencyModel
from ..schedulers import ConsistencyScheduler, TrajectoryConsistencyScheduler
from ..utils import sample_latents, unwrap_model
from . import hub
from .args import (ADVERSARIAL_LEARNING_RATE, apply_family_defaults, build_lcm_lora_parser, build_lcm_parser,
                   validate_data_args, validate_lcm_args, validate_training_args)
from .data import build_dataloader_from_args, build_encoded_cache, load_train_dataset_from_args
from .discriminator import DiscriminatorHeads, TrainableDiscriminator, unet_block_features, unet_feature_channels
from .fused_lora import FusedLoRA, adapter_disabled, lora_fusion_blockers
from .loop import TrainingObjective, create_accelerator, run_training, weight_dtype_for
from .losses import LCMDistillationConfig, LCMDistillationLoss
from .losses.lcm import guided_teacher_denoiser
from .losses.scm import SCMLoss, scm_options_from_flags, vp_teacher_at_levels
from .losses.adversarial import AdversarialConsistencyLoss
from .teachers import load_teacher_components, teacher_family
from .text_conditioning import prompt_conditioning

logger = logging.getLogger(__name__)

MODES = ("lora", "full")
DEFAULT_VALIDATION_PROMPTS = (
    "a photo of an astronaut riding a horse",
    "a cozy cabin in a snowy forest, warm light",
    "a bowl of ramen, studio photograph",
    "a watercolor painting of a lighthouse at dawn",
)
CACHE_FORMAT_VERSION = "lcm-kit-cache-v1:vae-posterior-parameters"


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
        target_rule="lcm" if args.method == "scd" else args.method,  # sCD maps to the origin too: LCM's sampler
        **({} if args.num_phases is None else {"num_phases": args.num_phases}),
    )


@contextlib.contextmanager
def _no_gradient_checkpointing(unet):
    """A forward with its graph kept whole: a checkpointed block would be recomputed in backward, outside the
    context that switched the LoRA teacher's adapter off."""
    if not getattr(unet, "is_gradient_checkpointing", False):
        yield unet
        return
    unet.disable_gradient_checkpointing()
    try:
        yield unet
    finally:
        unet.enable_gradient_checkpointing()


class LCMObjective(TrainingObjective):
    """Latent consistency distillation of an SD 1.x / 2.x teacher (``mode`` "lora" or "full")."""

    def __init__(self, args, accelerator, mode: str = "lora", components: dict | None = None):
        """Load the teacher from ``args.pretrained_teacher_model`` (or take ``components``: a dict with ``unet``,
        ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` as in a diffusers pipeline) and build the student."""

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        self.args, self.accelerator, self.mode = args, accelerator, mode
        self.device = accelerator.device
        self.weight_dtype = weight_dtype_for(accelerator)
        self.method = args.method
        self.name = f"{self.method}-lora-distill" if mode == "lora" else f"{self.method}-distill"
        components = components or load_teacher_components(args)
        self.family = "sdxl" if components.get("text_encoder_2") is not None else "sd"
        self.components = components
        self.tokenizer, self.text_encoder = components["tokenizer"], components["text_encoder"]
        self.tokenizer_2, self.text_encoder_2 = components.get("tokenizer_2"), components.get("text_encoder_2")
        self.teacher_scheduler_config = dict(components["scheduler"].config)
        config = config_from_args(
            args,
            prediction_type=components["scheduler"].config.prediction_type,
            num_train_timesteps=components["scheduler"].config.num_train_timesteps,
        )
        self.loss = LCMDistillationLoss(components["scheduler"].alphas_cumprod.to(self.device, torch.float32), config)
        self.scd_loss = self._build_scd_loss() if self.method == "scd" else None

        self.vae = components["vae"].requires_grad_(False).eval()
        # The VAE stays fp32 (SD VAEs overflow in fp16; with --cache_latents it runs once anyway).
        _place(self.vae, self.device, torch.float32)
        for name in ("text_encoder", "text_encoder_2"):
            if components.get(name) is not None:
                _place(components[name].requires_grad_(False).eval(), self.device, self.weight_dtype)
        self.prompts = prompt_conditioning(components, self.device, args.resolution,
                                           args.use_fix_crop_and_size)

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
            targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
            # Frozen base in the mixed-precision dtype; the adapter's parameters are created (then kept) in fp32.
            _place(teacher_unet, self.device, self.weight_dtype)
            self.unet = add_lcm_lora(teacher_unet, args.lora_rank, args.lora_alpha, args.lora_dropout, targets)
            cast_training_params(self.unet, dtype=torch.float32)
        else:
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
            # In place (nn.Module.compile): same module objects, so peft, saving and unwrapping see no wrapper.
            for module in (self.unet, self.teacher_unet, self.target_unet):
                if module is not None:
                    module.compile()
        self.fuse_student_lora = self.fuse_target_lora = False
        self.lora_fusion = None
        if mode == "lora":
            self._choose_lora_fusion()
        self.adversarial = self.discriminator = None
        if args.adversarial_weight > 0:
            self._build_discriminator()
        self._register_discriminator_checkpoints()

    @property
    def config(self) -> LCMDistillationConfig:
        return self.loss.config

    @property
    def uncond_embeds(self) -> torch.Tensor:
        """(1, sequence, hidden) prompt embeddings of the teacher's unconditional branch."""
        return self.prompts.uncond(1)["prompt_embeds"]

    def _build_scd_loss(self) -> SCMLoss:
        """sCM's distillation loss in the teacher's own TrigFlow time (VP: sigma_data = 1), times snapped to the
        teacher's timesteps; plain mean square (the learned weighting would be a trained module outside the UNet
        and its adapter). The JVP runs in float32 unless the frozen weights are half precision."""
        args = self.args
        options = scm_options_from_flags(args.tangent_warmup_steps, args.tangent_normalization_c, args.scd_p_mean,
                                         args.scd_p_std, args.max_train_steps)
        return SCMLoss("scd", sigma_data=1.0, alphas_cumprod=self.loss.alphas_cumprod, adaptive_weighting=False,
                       jvp_autocast=self.weight_dtype != torch.float32, **options)

    def _build_discriminator(self):
        """PCM's latent discriminator: light heads over the frozen teacher UNet's block features (the LoRA run's
        teacher is its own base with the adapter off), trained with their own AdamW."""
        if self.method != "pcm":
            raise ValueError(f"--adversarial_weight only applies to --method pcm, got --method {self.method}.")
        args = self.args
        backbone = self.unet if self.mode == "lora" else self.teacher_unet
        with torch.random.fork_rng(devices=[]):  # the heads' initialisation leaves the global RNG where it was
            torch.manual_seed(args.seed)
            heads = DiscriminatorHeads(unet_feature_channels(backbone))
        heads.to(self.device).train()
        self.discriminator = TrainableDiscriminator(
            heads, args.adversarial_learning_rate or ADVERSARIAL_LEARNING_RATE, weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon, max_grad_norm=args.max_grad_norm)
        self.adversarial = AdversarialConsistencyLoss(args.adversarial_weight)
        logger.info("PCM adversarial consistency loss: weight %g, %d discriminator heads (%d parameters), lr %g.",
                    args.adversarial_weight, len(heads.heads), sum(p.numel() for p in heads.parameters()),
                    self.discriminator.optimizer.param_groups[0]["lr"])

    def _register_discriminator_checkpoints(self):
        """Checkpoints carry the discriminator's heads and AdamW state as ``discriminator_state.safetensors`` (beside
        the loop's files, in its manifest); a checkpoint and a run that disagree on having one are an error."""
        accelerator = self.accelerator
        name = TrainableDiscriminator.CHECKPOINT_FILE

        def save_hook(models, weights, output_dir):
            if self.discriminator is not None and accelerator.is_main_process:
                state = {k: v.detach().contiguous().cpu() for k, v in self.discriminator.state_tensors().items()}
                save_file(state, os.path.join(output_dir, name))

        def load_hook(models, input_dir):
            path = os.path.join(input_dir, name)
            if self.discriminator is None:
                if os.path.exists(path):
                    raise ValueError(f"{input_dir} holds a discriminator ({name}: it was trained with "
                                     "--adversarial_weight > 0); resume it with the same --adversarial_weight.")
                return
            if not os.path.exists(path):
                raise ValueError(f"{input_dir} has no {name} (it was trained without the adversarial loss); resume "
                                 "it with --adversarial_weight 0, or start a new run.")
            self.discriminator.load_state_tensors(load_file(path))

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    def _choose_lora_fusion(self):
        """Run the adapter fused (one op per LoRA layer) wherever that is exactly peft's function."""
        blockers = lora_fusion_blockers(self.unet)
        if blockers:
            name, why = next(iter(blockers.items()))
            logger.info("LoRA runs unfused (peft's forward): %d layer(s) cannot be fused, e.g. %s: %s.",
                        len(blockers), name, why)
            return
        self.lora_fusion = FusedLoRA(self.unet)
        self.fuse_target_lora = True
        # Gradient checkpointing recomputes blocks during backward, outside the step's fused context: the
        # recomputation would run peft's forward and save different tensors, so the student stays unfused then.
        self.fuse_student_lora = not self.args.gradient_checkpointing

    # ---- encoders (also used to build the caches) ---------------------------------------------------------
    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """The conditioning tensors of ``captions`` (``prompt_embeds``; SDXL adds ``pooled_prompt_embeds``)."""
        return self.prompts.encode(captions)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters (mean and log-variance channels), ``--vae_encode_batch_size`` images at a
        time. The latent is *sampled* from them at each training step, so a cached run trains on the same
        distribution as an uncached one."""
        pixel_values = pixel_values.to(self.device, torch.float32)
        chunks = pixel_values.split(self.args.vae_encode_batch_size)
        return torch.cat([self.vae.encode(chunk).latent_dist.parameters.float() for chunk in chunks])

    def latents_from_posterior(self, parameters: torch.Tensor, generator) -> torch.Tensor:
        posterior = DiagonalGaussianDistribution(parameters.to(self.device, torch.float32))
        return sample_latents(posterior.mean, posterior.std, generator, self.vae.config.scaling_factor,
                              getattr(self.vae.config, "shift_factor", None))

    def cache_fingerprint(self) -> str:
        """Identity of the encoders that produce cached tensors (a changed model or dtype never reuses a cache)."""
        digest = hashlib.sha256(CACHE_FORMAT_VERSION.encode())
        digest.update(json.dumps([str(self.args.pretrained_teacher_model), self.args.revision, self.args.variant]).encode())
        for module in (self.vae, *self.prompts.modules()):
            digest.update(json.dumps(dict(module.config) if isinstance(module.config, dict) else module.config.to_dict(),
                                     sort_keys=True, default=str).encode())
            digest.update(str(next(module.parameters()).dtype).encode())
            with torch.no_grad():  # a cheap weight checksum: catches re-trained weights at the same path
                sums = torch.stack([p.detach().double().sum() for p in module.parameters()])
            digest.update(sums.cpu().numpy().tobytes())
        digest.update(str([tokenizer.model_max_length for tokenizer in self.prompts.tokenizers]).encode())
        return digest.hexdigest()[:32]

    # ---- TrainingObjective ----------------------------------------------------------------------------------
    def trainable_model(self):
        return self.unet

    def averaged_models(self):
        if self.mode != "full":
            return {}
        return {"target": (self.target_unet, lambda step: self.args.ema_decay)}

    def _batch_latents_and_embeds(self, batch, generator):
        if "latents" in batch:
            latents = self.latents_from_posterior(batch["latents"], generator)
        elif "pixel_values" in batch:
            with torch.no_grad():
                latents = self.latents_from_posterior(self.encode_images(batch["pixel_values"]), generator)
        else:
            raise ValueError(f"batch must hold 'pixel_values' or 'latents', got keys {sorted(batch)}.")
        if "prompt_embeds" in batch:
            names = [name for name in self.prompts.uncond(1)]
            missing = [name for name in names if name not in batch]
            if missing:
                raise ValueError(f"the cached text embeddings lack {missing} (a cache of another model family?); "
                                 f"got keys {sorted(batch)}.")
            cond = {name: batch[name].to(self.device, torch.float32) for name in names}
        elif "captions" in batch:
            cond = self.encode_prompts(batch["captions"])
        else:
            raise ValueError(f"batch must hold 'captions' or 'prompt_embeds', got keys {sorted(batch)}.")
        return latents, cond

    def compute_loss(self, model, batch, step, generator):
        args, device = self.args, self.device
        latents, cond = self._batch_latents_and_embeds(batch, generator)
        batch_size = latents.shape[0]
        uncond = self.prompts.uncond(batch_size)
        if args.proportion_empty_prompts > 0:
            empty = torch.rand(batch_size, generator=generator, device=device) < args.proportion_empty_prompts
            cond = self.prompts.with_empty_prompts(cond, empty)
        if self.family == "sdxl":  # one micro-conditioning for both branches, as diffusers' SDXL scripts
            time_ids = self.prompts.time_ids(batch, batch_size)
            cond, uncond = dict(cond, time_ids=time_ids), dict(uncond, time_ids=time_ids)
        both = {name: torch.cat([cond[name], uncond[name]]) for name in cond}
        plain = unwrap_model(model)
        lora_weights = {}  # this step's W + s·B·A: built by the student, reused by the no-grad target

        def w_embedding(w):
            if self.mode != "full":
                return None
            return guidance_scale_embedding(w, self.guidance_embedding_dim)

        def student(x, t, w):
            # (the prepared module already autocasts; this also covers an objective used without prepare)
            with self.accelerator.autocast(), self._lora_forward(self.fuse_student_lora, lora_weights):
                return model(x, t, timestep_cond=w_embedding(w), **self.prompts.unet_kwargs(cond)).sample

        def teacher(x, t):
            # cond and uncond in ONE batched forward
            with self.accelerator.autocast(), self._teacher_weights(plain) as unet:
                out = unet(
                    torch.cat([x, x]).to(self.weight_dtype),
                    torch.cat([t, t]),
                    **self.prompts.unet_kwargs(both, dtype=self.weight_dtype),
                ).sample
            return out.float().chunk(2)

        if self.scd_loss is not None:
            return self._scd_terms(model, plain, latents, cond, teacher, w_embedding, step, generator)

        def target(x, t, w):
            unet = self.target_unet if self.mode == "full" else plain
            with self.accelerator.autocast(), self._lora_forward(self.fuse_target_lora, lora_weights):
                return unet(x, t, timestep_cond=w_embedding(w), **self.prompts.unet_kwargs(cond)).sample.float()

        output = self.loss(student, teacher, target, latents, generator)
        if self.discriminator is None:
            return output.loss.mean(), {}
        generator_loss, logs = self._adversarial_terms(output, plain, cond, generator)
        return output.loss.mean() + self.adversarial.weight * generator_loss, logs

    def _scd_terms(self, model, plain, latents, cond, teacher, w_embedding, step, generator):
        """sCD of one batch (:class:`~lcm_kit.training.losses.SCMLoss`): the student is the UNet as a TrigFlow
        consistency model (:class:`~lcm_kit.precond.VPTrigFlowConsistencyModel`), the JVP runs through the unwrapped
        UNet, and the velocity is the guided teacher's at ``w ~ U[w_min, w_max]`` (drawn first, then the loss's time
        and noise)."""
        config, alphas = self.config, self.loss.alphas_cumprod
        w = sample_uniform(config.w_min, config.w_max, latents.shape[0], generator=generator, device=latents.device)
        kwargs = dict(self.prompts.unet_kwargs(cond))
        if self.mode == "full":
            kwargs["timestep_cond"] = w_embedding(w)
        guided_teacher = vp_teacher_at_levels(guided_teacher_denoiser(teacher, w, alphas, config.prediction_type),
                                              alphas)
        online = VPTrigFlowConsistencyModel(model, alphas, config.prediction_type)
        tangent = VPTrigFlowConsistencyModel(plain, alphas, config.prediction_type)
        with self.accelerator.autocast():
            output = self.scd_loss(online, latents.float(), step, class_labels=kwargs, generator=generator,
                                   tangent_model=tangent, teacher=guided_teacher)
        return output.loss.mean(), {"tangent_norm": output.tangent_norm.mean(), **self.scd_loss.logs(step)}

    def _adversarial_terms(self, output, plain, cond, generator):
        """PCM's adversarial consistency loss of one batch: the discriminator's hinge step on (target = real,
        student's prediction detached = fake), both noised within the phase, then the student's hinge term through
        the updated, frozen heads (its gradient reaches the student only). Draws after the consistency loss."""
        fake, real, t = self.adversarial.noisy_pair(output.prediction, output.target, output.timesteps[2],
                                                    self.loss.alphas_cumprod, self.loss.phase_edges, generator)

        def features(x):
            with (self.accelerator.autocast(), self._teacher_weights(plain) as unet, _no_gradient_checkpointing(unet),
                  unet_block_features(unet) as found):
                unet(x.to(self.weight_dtype), t, **self.prompts.unet_kwargs(cond, dtype=self.weight_dtype))
            return list(found)

        fake_features = features(fake)  # one forward serves both players: detached for the discriminator
        with torch.no_grad():
            real_features = features(real)
        discriminator_loss = self.adversarial.discriminator_loss(
            self.discriminator(real_features), self.discriminator([f.detach() for f in fake_features])).mean()
        reduce = None
        if self.accelerator.num_processes > 1:
            reduce = lambda grad: self.accelerator.reduce(grad, reduction="mean")  # noqa: E731
        self.discriminator.backward_and_step(discriminator_loss, sync=self.accelerator.sync_gradients,
                                             scale=1.0 / self.args.gradient_accumulation_steps, reduce=reduce)
        with self.discriminator.frozen():
            generator_loss = self.adversarial.generator_loss(self.discriminator(fake_features)).mean()
        return generator_loss, {"adversarial_d_loss": discriminator_loss.detach(),
                                "adversarial_g_loss": generator_loss.detach()}

    def _lora_forward(self, fused: bool, weights: dict):
        """The LoRA layers as ONE op each (``W + s·B·A``, shared through ``weights``) or peft's own forward."""
        return self.lora_fusion.fused(weights) if fused else contextlib.nullcontext()

    def _teacher_weights(self, unet):
        """The teacher: for LoRA the student's own base with the adapter switched off (no second copy)."""
        if self.mode == "lora":
            return self.lora_fusion.base() if self.lora_fusion is not None else adapter_disabled(unet)
        return contextlib.nullcontext(self.teacher_unet)

    def inference_unet(self, model):
        """The network users get: the EMA target (full) or the student with its adapter (LoRA)."""
        return self.target_unet if self.mode == "full" else model

    def inference_scheduler(self) -> ConsistencyScheduler:
        """The scheduler the distilled model samples with: the teacher's noise schedule on the distillation grid
        (``--num_ddim_timesteps``). LCM: :class:`ConsistencyScheduler` with the boundary scalings it was trained with
        (``--timestep_scaling_factor``). PCM / TCD: :class:`TrajectoryConsistencyScheduler` (exactly diffusers'
        ``TCDScheduler``) with ``gamma`` 0 (PCM: deterministic over the phase edges) or 0.3 (TCD's default)."""
        common = dict(original_inference_steps=self.config.num_ddim_timesteps,
                      timestep_scaling=self.config.timestep_scaling_factor)
        if self.method in ("lcm", "scd"):
            return ConsistencyScheduler.from_config(self.teacher_scheduler_config, **common)
        gamma = 0.0 if self.method == "pcm" else 0.3
        return TrajectoryConsistencyScheduler.from_config(self.teacher_scheduler_config, gamma=gamma, **common)

    def validation_pipeline(self, model):
        """LCMPipeline (SD 1.x / 2.x) or LCMXLPipeline (SDXL) over the teacher's encoders and the distilled UNet."""
        encoders = {name: self.components[name] for name in ("text_encoder", "tokenizer", "text_encoder_2",
                                                             "tokenizer_2") if self.components.get(name) is not None}
        common = dict(vae=self.vae, unet=self.inference_unet(model), scheduler=self.inference_scheduler(), **encoders)
        if self.family == "sdxl":
            return LCMXLPipeline(**common, add_watermarker=False)
        return LCMPipeline(**common, safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    @torch.no_grad()
    def validate(self, model, step):
        prompts = self.args.validation_prompts
        if prompts is None:
            prompts = list(DEFAULT_VALIDATION_PROMPTS)
        if not prompts:
            return None
        guidance = self.args.validation_guidance_scale
        if guidance is None:
            guidance = 1.0 if self.mode == "lora" else 8.0
        unet = self.inference_unet(model)
        was_training = unet.training
        unet.eval()  # no dropout: validation must not consume the global RNG
        try:
            pipe = self.validation_pipeline(model)
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
        for image, prompt in zip(images, prompts):
            image.info["caption"] = prompt  # the grid's label
        return images

    def save_final(self, model, output_dir):
        output_dir = Path(output_dir)
        written = []
        if self.mode == "lora":
            written.append(str(save_lora_weights(model, output_dir)))
            if self.args.export_kohya:
                written.append(str(export_kohya(model, output_dir / "pytorch_lora_weights_kohya.safetensors")))
        else:
            # A complete pipeline folder (the teacher's VAE, text encoder and tokenizer, the EMA target UNet, its
            # scheduler), loadable by lcm-kit and stock LatentConsistencyModelPipeline; the text encoder is saved
            # in float32 whatever precision it trained in.
            text_encoders = self.prompts.modules()
            trained_dtype = next(text_encoders[0].parameters()).dtype
            for module in text_encoders:
                module.to(torch.float32)
            try:
                self.validation_pipeline(model).save_pretrained(output_dir, safe_serialization=True)
            finally:
                for module in text_encoders:
                    module.to(trained_dtype)
            written += [str(output_dir / name) for name in ("model_index.json", "unet", "scheduler", "vae",
                                                            "text_encoder", "tokenizer")]
            if self.family == "sdxl":
                written += [str(output_dir / name) for name in ("text_encoder_2", "tokenizer_2")]
        return written


# ----------------------------------------------------------------------------------------------------------------
# Loading, data, the whole run
# ----------------------------------------------------------------------------------------------------------------


def build_train_dataloader(args, source, objective: LCMObjective, accelerator):
    """The training DataLoader: images + captions, or the encoded cache with ``--cache_latents`` /
    ``--cache_text_embeddings``."""
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
            batch_size=args.vae_encode_batch_size,
            seed=args.seed,
        )
    return build_dataloader_from_args(args, cache)


def train_lcm_distillation(args, mode: str, hub_client=None, command: Sequence[str] | None = None):
    """Validate the flags, open the data, distill, push: the whole ``train_lcm_lora`` (``mode="lora"``) or
    ``train_lcm`` (``mode="full"``) run. Returns the loop's :class:`~lcm_kit.training.loop.TrainingResult`.

    ``hub_client``: an ``HfApi``-like client for ``--push_to_hub`` (default: ``HfApi``); ``command``: the argv shown
    in the model card (secrets redacted).
    """
    validate_training_args(args)
    validate_data_args(args)
    validate_lcm_args(args)
    # The data source first: a wrong column fails before any model is loaded.
    source = load_train_dataset_from_args(args)
    accelerator = create_accelerator(args)
    objective = LCMObjective(args, accelerator, mode=mode)
    dataloader = build_train_dataloader(args, source, objective, accelerator)
    result = run_training(args, accelerator, objective, dataloader)
    if args.push_to_hub and accelerator.is_main_process:
        card = hub.render_lcm_model_card(args, mode == "lora", result, command, family=objective.family)
        hub.push_training_outputs(args, card, client=hub_client)
    return result


def main_for_mode(mode: str, argv: Sequence[str] | None = None, hub_client=None):
    """The entry point of ``train_lcm_lora`` (``mode="lora"``) or ``train_lcm`` (``"full"``): parse ``argv``
    (default ``sys.argv[1:]``) and run :func:`train_lcm_distillation`."""
    parser = build_lcm_lora_parser() if mode == "lora" else build_lcm_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    # SDXL teachers take diffusers' SDXL script defaults for the flags not given (the family is read from the folder).
    try:
        family = teacher_family(args)
    except ValueError:
        family = None  # reported when the teacher is loaded, after the data checks
    apply_family_defaults(args, family, given=argv)
    script = "train_lcm_lora.py" if mode == "lora" else "train_lcm.py"
    command = [script, *argv]
    return train_lcm_distillation(args, mode, hub_client=hub_client, command=command)
