"""The consistency-model training objective of a diffusers ``UNet2DModel``, pixel or VAE-latent: CD / CT / iCT, ECT
and the continuous-time sCT / sCD.

:class:`CMObjective` is what :func:`lcm_kit.training.loop.run_training` drives with the mode's loss
(:class:`~lcm_kit.training.losses.ConsistencyLoss`, :class:`~lcm_kit.training.losses.ECTLoss`,
:class:`~lcm_kit.training.losses.SCMLoss`): the online model (trained; a TrigFlow consistency model with its learned
loss weighting for sCT / sCD), the target network (EMA with mu(k) for CD / CT, kept by the loop; none for the
others), the sampling EMA (``--ema_decay``, the saved model), the teacher (CD, sCD) and the VAE (latent space).
:func:`train_consistency_model` runs the whole job from parsed flags; the output folder is a diffusers
``ConsistencyModelPipeline`` (with lcm-kit's ``CMMultistepScheduler`` for a TrigFlow model).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
from diffusers import (
    AutoencoderKL,
    CMStochasticIterativeScheduler,
    ConsistencyModelPipeline,
    DDPMScheduler,
    UNet2DModel,
)
from torch import nn

from ..consistency import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN
from ..pipelines.pipeline_cm import CMPipeline
from ..precond import AdaptiveLossWeighting, ConsistencyModel, EDMDenoiser, TrigFlowConsistencyModel, VPDenoiser
from ..schedulers.scheduling_cm import CMMultistepScheduler
from ..utils import sample_latents, unwrap_model
from . import hub
from .args import validate_consistency_args, validate_data_args, validate_training_args
from .data import build_dataloader_from_args, load_train_dataset_from_args
from .loop import TrainingObjective, create_accelerator, run_training, weight_dtype_for
from .losses import DISCRETE_CM_MODES, SCM_MODES, ConsistencyLoss, ECTLoss, SCMLoss
from .losses.scm import scm_options_from_flags


def consistency_scheduler_config(
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    sigma_data: float = SIGMA_DATA,
    rho: float = RHO,
    num_train_timesteps: int = 40,
    clip_denoised: bool = True,
    parameterization: str = "edm",
) -> dict:
    """Config of the scheduler saved with a consistency model: diffusers' ``CMStochasticIterativeScheduler`` keys,
    plus ``parameterization="trigflow"`` for a TrigFlow (sCT / sCD) model, which only lcm-kit's
    ``CMMultistepScheduler`` samples."""
    config = dict(
        num_train_timesteps=num_train_timesteps,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        sigma_data=sigma_data,
        s_noise=1.0,
        rho=rho,
        clip_denoised=clip_denoised,
    )
    if parameterization != "edm":
        config["parameterization"] = parameterization
    return config


def save_consistency_pipeline(unet, output_dir: str, **scheduler_kwargs):
    """Save a consistency-model backbone (``UNet2DModel``) as a stock diffusers ``ConsistencyModelPipeline`` folder.

    The folder holds ``unet/`` (safetensors) and ``scheduler/`` (``CMStochasticIterativeScheduler`` with the sigma
    range the model was trained with: ``scheduler_kwargs`` override :func:`consistency_scheduler_config`), so
    ``ConsistencyModelPipeline.from_pretrained(output_dir)`` samples it (a TrigFlow model's folder names lcm-kit's
    ``CMMultistepScheduler`` with ``parameterization="trigflow"``); class-conditional UNets
    (``num_class_embeds``) take ``class_labels``. Returns the pipeline.
    """

    if not isinstance(unet, UNet2DModel):
        raise TypeError(
            f"unet must be a diffusers UNet2DModel to save a ConsistencyModelPipeline, got {type(unet).__name__}."
        )
    config = {**consistency_scheduler_config(), **scheduler_kwargs}
    # A TrigFlow model needs lcm-kit's scheduler (its time input and scalings); the folder then names it, and the
    # stock pipeline loads it wherever lcm_kit is installed.
    scheduler_class = CMMultistepScheduler if "parameterization" in config else CMStochasticIterativeScheduler
    pipeline = ConsistencyModelPipeline(unet=unet, scheduler=scheduler_class(**config))
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    return pipeline


def _load_unet2d(path: str, cache_dir=None):
    try:
        return UNet2DModel.from_pretrained(path, subfolder="unet", cache_dir=cache_dir)
    except (OSError, EnvironmentError):
        return UNet2DModel.from_pretrained(path, cache_dir=cache_dir)


def load_teacher_denoiser(path: str, cache_dir=None) -> nn.Module:
    """A diffusers folder (``unet/`` + ``scheduler/``) as an EDM denoiser D(x, sigma, class_labels).

    DDPM-family schedulers (with ``alphas_cumprod``) give a :class:`VPDenoiser`; diffusers' EDM schedulers
    (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``: time input 0.25 log sigma, epsilon preconditioning)
    give an :class:`EDMDenoiser`.
    """

    unet = _load_unet2d(path, cache_dir).requires_grad_(False).eval()
    config = DDPMScheduler.load_config(path, subfolder="scheduler", cache_dir=cache_dir)  # any scheduler's json
    class_name = config.get("_class_name", "")
    if class_name.startswith("EDM"):
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"EDM teacher scheduler with prediction_type={config['prediction_type']!r}: only 'epsilon' "
                             "(EDM's F-prediction) is supported.")
        return EDMDenoiser(unet, sigma_data=config.get("sigma_data", SIGMA_DATA),
                           noise_conditioning=lambda sigma: 0.25 * torch.log(sigma))
    if "beta_schedule" in config or "trained_betas" in config:
        scheduler = DDPMScheduler.from_config(config)
        return VPDenoiser.from_scheduler(unet, scheduler)
    raise ValueError(f"--teacher={path!r}: scheduler {class_name!r} is neither DDPM-family nor EDM.")


class CMObjective(TrainingObjective):
    """:class:`~lcm_kit.training.loop.TrainingObjective` for CD / CT / iCT on a diffusers ``UNet2DModel``.

    Holds the online model (trained), the target network (EMA with mu(k) for CD / CT; none for iCT), the sampling
    EMA (``--ema_decay``, the saved model), the teacher (CD) and the VAE (latent space).
    """

    name = "consistency-models"

    def __init__(self, args, accelerator):
        self.args, self.accelerator, self.device = args, accelerator, accelerator.device
        self.weight_dtype = weight_dtype_for(accelerator)
        self.vae = None
        if args.pretrained_vae_model_name_or_path:
            try:
                vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, subfolder="vae",
                                                    cache_dir=args.cache_dir)
            except (OSError, EnvironmentError):
                vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)
            self.vae = vae.requires_grad_(False).eval().to(self.device)  # fp32: SD VAEs overflow in fp16
            self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        channels = self.vae.config.latent_channels if self.vae is not None else 3
        sample_size = args.resolution // (self.vae_scale_factor if self.vae is not None else 1)

        if args.pretrained_unet:
            unet = _load_unet2d(args.pretrained_unet, args.cache_dir)
            if unet.config.num_class_embeds != args.num_class_embeds:
                raise ValueError(f"--pretrained_unet has num_class_embeds={unet.config.num_class_embeds}, but "
                                 f"--num_class_embeds={args.num_class_embeds}.")
            if (unet.config.in_channels, unet.config.sample_size) != (channels, sample_size):
                raise ValueError(
                    f"--pretrained_unet takes {unet.config.in_channels} channels at {unet.config.sample_size}px; "
                    f"this run needs {channels} at {sample_size}px (--resolution / VAE)."
                )
        else:
            blocks = tuple(int(c) for c in (args.block_out_channels or "64,128,128").split(","))
            unet = UNet2DModel(
                sample_size=sample_size,
                in_channels=channels,
                out_channels=channels,
                block_out_channels=blocks,
                down_block_types=("DownBlock2D",) * len(blocks),
                up_block_types=("UpBlock2D",) * len(blocks),
                layers_per_block=args.layers_per_block or 2,
                norm_num_groups=min(32, blocks[0]),
                dropout=args.dropout or 0.0,
                num_class_embeds=args.num_class_embeds,
            )
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        # The one handle of the online network (the backbone is ``self.model.backbone``).
        if args.mode in SCM_MODES:
            weighting = AdaptiveLossWeighting() if args.adaptive_weighting is not False else None
            self.model = TrigFlowConsistencyModel(unet, sigma_data=args.sigma_data, loss_weighting=weighting)
        else:
            self.model = ConsistencyModel(unet, sigma_min=args.sigma_min, sigma_data=args.sigma_data)
        self.model.to(self.device).train()

        teacher = None
        if args.mode in ("cd", "scd"):
            teacher = load_teacher_denoiser(args.teacher, args.cache_dir)
            teacher.to(self.device)
            if self.weight_dtype != torch.float32:  # the network only: the noise schedule stays fp32
                (teacher.unet if isinstance(teacher, VPDenoiser) else teacher.backbone).to(self.weight_dtype)
        self.teacher = teacher
        self.loss = build_consistency_loss(args, teacher)
        self.target = None
        if self.loss.uses_target_network:
            self.target = _frozen_copy(self.model)
        self.ema = _frozen_copy(self.model)
        self.class_names = args.class_names.split(",") if args.class_names else None
        self.validation_labels()  # a bad --validation_prompts label fails now, not after training

    # ---- TrainingObjective ------------------------------------------------------------------------------------
    def trainable_model(self):
        return self.model

    def averaged_models(self):
        averaged = {}
        if self.target is not None:  # updated first: the order the papers' pseudo-code uses
            averaged["target"] = (self.target, self.loss.target_ema_decay)
        averaged["ema"] = (self.ema, lambda step: self.args.ema_decay)
        return averaged

    def class_labels(self, captions) -> torch.Tensor | None:
        """Class indices from captions: integer strings, or positions in ``--class_names``."""
        if self.args.num_class_embeds is None:
            return None
        labels = []
        for caption in captions:
            caption = str(caption).strip()
            if self.class_names is not None and caption in self.class_names:
                labels.append(self.class_names.index(caption))
            elif caption.lstrip("-").isdigit():
                labels.append(int(caption))
            else:
                raise ValueError(f"caption {caption!r} is not a class label: expected an integer in "
                                 f"[0, {self.args.num_class_embeds}) or one of --class_names {self.class_names}.")
            if not 0 <= labels[-1] < self.args.num_class_embeds:
                raise ValueError(f"class label {labels[-1]} (caption {caption!r}) is outside "
                                 f"[0, --num_class_embeds={self.args.num_class_embeds}).")
        return torch.tensor(labels, device=self.device, dtype=torch.long)

    @torch.no_grad()
    def encode(self, pixel_values, generator):
        if self.vae is None:
            return pixel_values
        posterior = self.vae.encode(pixel_values.float()).latent_dist
        return sample_latents(posterior.mean, posterior.std, generator, self.vae.config.scaling_factor,
                              getattr(self.vae.config, "shift_factor", None))

    def compute_loss(self, model, batch, step, generator):
        clean = self.encode(batch["pixel_values"].to(self.device), generator)
        labels = self.class_labels(batch["captions"])
        if self.target is not None:
            self.target.train(model.training)
        # sCM's JVP runs through the unwrapped network (forward-mode AD, no DDP hooks); its online pass is the
        # prepared model's, so the gradients are synchronised.
        extra = {"tangent_model": unwrap_model(model)} if self.args.mode in SCM_MODES else {}
        with self.accelerator.autocast():
            out = self.loss(model, clean, step, target_model=self.target, class_labels=labels, generator=generator,
                            **extra)
        return out.loss.mean(), self.loss.logs(step)

    def validation_labels(self):
        if self.args.num_class_embeds is None:
            return None
        names = self.args.validation_prompts
        if names is None:
            return torch.arange(min(self.args.num_class_embeds, 10), device=self.device)
        return self.class_labels(names)

    @torch.no_grad()
    def generate(self, model: ConsistencyModel, num_images: int, class_labels=None, num_inference_steps=1, seed=0):
        """PIL images from ``model`` through :class:`~lcm_kit.pipelines.pipeline_cm.CMPipeline` (decoded by the
        VAE in latent space)."""

        unet = model.backbone
        pipe = CMPipeline(unet=unet, scheduler=CMMultistepScheduler(**self.scheduler_config()), vae=self.vae)
        pipe.set_progress_bar_config(disable=True)
        was_training = unet.training
        unet.eval()  # no dropout: validation must not consume the global RNG
        try:
            return pipe(batch_size=num_images, class_labels=class_labels, num_inference_steps=num_inference_steps,
                        generator=torch.Generator().manual_seed(seed)).images
        finally:
            unet.train(was_training)

    def validate(self, model, step):
        if self.args.validation_prompts is not None and not self.args.validation_prompts:
            return None
        labels = self.validation_labels()
        num = labels.shape[0] if labels is not None else 8
        images = self.generate(self.ema, num, labels, self.args.validation_num_inference_steps, self.args.seed)
        if labels is not None:
            for image, label in zip(images, labels.tolist()):
                image.info["caption"] = self.class_names[label] if self.class_names else str(label)
        return images

    def scheduler_config(self) -> dict:
        args = self.args
        return consistency_scheduler_config(
            sigma_min=args.sigma_min, sigma_max=args.sigma_max, sigma_data=args.sigma_data, rho=args.rho,
            num_train_timesteps=args.scheduler_num_train_timesteps,
            clip_denoised=self.vae is None,  # pixels live in [-1, 1]; latents do not
            parameterization="trigflow" if args.mode in SCM_MODES else "edm",
        )

    def save_final(self, model, output_dir):
        """``output_dir`` becomes a stock ``ConsistencyModelPipeline`` folder holding the sampling EMA
        (``unet/`` + ``scheduler/``); the online weights go to ``unet_online/`` and, in latent space, the VAE to
        ``vae/`` (decode the pipeline's ``output_type="pt"`` samples with it)."""
        output_dir = Path(output_dir)
        save_consistency_pipeline(self.ema.backbone, str(output_dir), **self.scheduler_config())
        model.backbone.save_pretrained(output_dir / "unet_online", safe_serialization=True)
        written = [str(output_dir / "unet"), str(output_dir / "scheduler"), str(output_dir / "unet_online")]
        if self.vae is not None:
            self.vae.save_pretrained(output_dir / "vae", safe_serialization=True)
            written.append(str(output_dir / "vae"))
        return written


def build_consistency_loss(args, teacher=None):
    """The loss of ``--mode`` from parsed flags (mode-specific flags left ``None`` take the paper's defaults)."""
    total_steps = args.max_train_steps or 1
    if args.mode in SCM_MODES:
        options = scm_options_from_flags(args.tangent_warmup_steps, args.tangent_normalization_c, args.p_mean,
                                         args.p_std, total_steps)
        return SCMLoss(args.mode, teacher=teacher, sigma_data=args.sigma_data,
                       adaptive_weighting=args.adaptive_weighting is not False, **options)
    lognormal = {k: v for k, v in (("p_mean", args.p_mean), ("p_std", args.p_std)) if v is not None}
    if args.mode == "ect":
        stages = {k: v for k, v in (("num_stages", args.ect_stages), ("q", args.ect_q)) if v is not None}
        return ECTLoss(total_steps, **stages, **lognormal, sigma_data=args.sigma_data, sigma_min=args.sigma_min,
                       sigma_max=args.sigma_max, loss_type=args.loss_type or "pseudo_huber", huber_c=args.huber_c)
    assert args.mode in DISCRETE_CM_MODES, args.mode
    return ConsistencyLoss(
        args.mode,
        total_steps,
        teacher=teacher,
        solver=args.teacher_solver,
        loss_type=args.loss_type,
        huber_c=args.huber_c,
        num_scales=args.num_scales,
        s0=args.s0,
        s1=args.s1,
        mu0=args.mu0,
        target_ema_decay=args.target_ema_decay,
        **lognormal,
        sigma_min=args.sigma_min,
        sigma_max=args.sigma_max,
        rho=args.rho,
    )


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A copy for a target / EMA network: no gradients, in the online network's mode (the target pass replays the
    online pass's dropout masks, which needs the same mode)."""
    return copy.deepcopy(module).requires_grad_(False)


def train_consistency_model(args, hub_client=None, command: Sequence[str] | None = None):
    """Validate the flags, open the data, train, push: the whole ``train_consistency`` run. Returns the loop's
    :class:`~lcm_kit.training.loop.TrainingResult`. ``hub_client``: an ``HfApi``-like client for ``--push_to_hub``
    (tests inject a fake)."""
    validate_training_args(args)
    validate_data_args(args)
    validate_consistency_args(args)
    source = load_train_dataset_from_args(args)  # the data first: a wrong column fails before any model is loaded
    accelerator = create_accelerator(args)
    objective = CMObjective(args, accelerator)
    dataloader = build_dataloader_from_args(args, source)
    result = run_training(args, accelerator, objective, dataloader)
    if args.push_to_hub and accelerator.is_main_process:
        card = hub.render_consistency_model_card(args, result, command)
        hub.push_training_outputs(args, card, client=hub_client,
                                  commit_message="Upload a consistency model trained with lcm-kit")
    return result
