"""Command-line flags of the lcm-kit trainers, as reusable argparse groups.

Flag names follow diffusers' example scripts wherever the concept is the same (``--pretrained_teacher_model``,
``--train_batch_size``, ``--checkpointing_steps`` ...), so a diffusers user can reuse their launch commands.
Every flag defined here is read somewhere in :mod:`lcm_kit.training` (``tests/test_train_args.py`` checks it):
a trainer that adds a group promises to honour every flag of that group.

Groups:

* :func:`add_model_args`       teacher / base model location (``--pretrained_teacher_model``, revision, variant)
* :func:`add_training_args`    the generic Accelerate loop (:mod:`lcm_kit.training.loop`): optimiser, lr schedule,
                               precision, checkpoints, resume, logging, validation cadence
* :func:`add_data_args`        dataset / webdataset input and image preprocessing
* :func:`add_hub_args`         ``--push_to_hub`` and friends
* :func:`add_lcm_args`         latent consistency distillation (solver, guidance range, loss, caches)
* :func:`add_lora_args`        LCM-LoRA adapter shape and export
* :func:`add_full_args`        fully distilled LCM (guidance embedding, EMA target)
* :func:`add_consistency_args` consistency distillation / training (CD, CT, iCT) of a ``UNet2DModel``

A trainer builds its parser from the groups it honours (``build_*_parser``) and calls :func:`validate_training_args`
(and :func:`validate_data_args` when it reads a dataset) and its own group's validation.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from ..argtypes import CommandParser, float_range, int_range
from ..consistency import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, SOLVERS, TARGET_RULES, phase_edge_timesteps
from ..lora.adapter import LCM_LORA_TARGET_MODULES
from .losses import CM_MODES, SCM_MODES
from .losses.cm import CONSISTENCY_LOSS_TYPES
from .losses.lcm import LCMDistillationConfig
from .losses.scm import SCM_P_MEAN, SCM_P_STD, TANGENT_NORMALIZATION_C, TANGENT_WARMUP_STEPS
from .redaction import is_secret_name, redact_text, remember_secret

LCM_LOSS_TYPES = ("l2", "huber")
ADVERSARIAL_LEARNING_RATE = 1e-5  # PCM's SD 1.5 script (its discriminator heads' AdamW)
# The latent trainers' --method: a target-time rule of the LCM step, or sCD.
LATENT_METHODS = (*TARGET_RULES, "scd")
SCD_FLAGS = ("tangent_warmup_steps", "tangent_normalization_c", "scd_p_mean", "scd_p_std")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
#: ``--report_to`` values and the package each needs.
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",)}


class TrainingArgumentParser(CommandParser):
    """The trainers' parser: no prefix abbreviations (``--hub_tok`` is an error, not ``--hub_token``), defaults
    shown in ``--help``, and the value of any flag that names or abbreviates a secret remembered as a secret, so no
    error message, log, file or card shows it (:mod:`lcm_kit.training.redaction`)."""

    def parse_known_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        secret_flags = [f for action in self._actions for f in action.option_strings if is_secret_name(f)]
        for index, token in enumerate(argv):
            if not token.startswith("--") or len(token) < 4:
                continue
            flag, has_value, value = token.partition("=")
            if is_secret_name(flag) or any(secret.startswith(flag) for secret in secret_flags):
                if has_value:
                    remember_secret(value)
                elif index + 1 < len(argv):
                    remember_secret(argv[index + 1])
        return super().parse_known_args(argv, namespace)

    def error(self, message):
        super().error(redact_text(message))


_positive_int = int_range(1)
_non_negative_int = int_range(0)
_at_least_two = int_range(2)
_finite = float_range()
_positive = float_range(0, low_inclusive=False)
_non_negative = float_range(0)
_unit_interval = float_range(0, 1)
_decay = float_range(0, 1, high_inclusive=False)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--pretrained_teacher_model",
        type=str,
        required=True,
        help="Diffusers folder or Hub id of the Stable Diffusion 1.x/2.x teacher (unet, vae, text_encoder, tokenizer, "
             "scheduler).",
    )
    group.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                       help="A VAE to use instead of the teacher's (a folder / Hub id with an AutoencoderKL, or a "
                            "pipeline folder with vae/), e.g. an fp16-safe VAE.")
    group.add_argument("--revision", type=str, default=None, help="Hub revision of the teacher.")
    group.add_argument("--variant", type=str, default=None, help="Weight variant of the teacher files, e.g. 'fp16'.")
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the shared Accelerate loop (:func:`lcm_kit.training.loop.run_training`)."""
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", type=str, default="lcm-output", help="Where checkpoints and outputs are written.")
    group.add_argument("--seed", type=int, default=0, help="Seed for noise, timesteps, guidance scales and data order.")
    group.add_argument("--train_batch_size", type=_positive_int, default=16, help="Batch size per device.")
    group.add_argument("--num_train_epochs", type=_positive_int, default=1,
                       help="Epochs when --max_train_steps is not given (diffusers' LCM scripts: 100).")
    group.add_argument("--max_train_steps", type=_positive_int, default=None,
                       help="Total optimiser steps; overrides --num_train_epochs when given.")
    group.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1,
                       help="Micro-batches per optimiser step.")
    group.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for UNet activation memory.")
    group.add_argument("--learning_rate", type=_positive, default=1e-6, help="Initial learning rate (after warm-up).")
    group.add_argument("--scale_lr", action="store_true",
                       help="Multiply the learning rate by gradient_accumulation_steps * train_batch_size * num_processes.")
    group.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS, help="Learning-rate schedule.")
    group.add_argument("--lr_warmup_steps", type=_non_negative_int, default=500, help="Linear warm-up steps.")
    group.add_argument("--lr_num_cycles", type=_positive_int, default=1, help="Hard restarts of cosine_with_restarts.")
    group.add_argument("--lr_power", type=_positive, default=1.0, help="Power of the polynomial schedule.")
    group.add_argument("--use_8bit_adam", action="store_true",
                       help="bitsandbytes' 8-bit AdamW (pip install 'lcm-kit[8bit]'; CUDA only).")
    group.add_argument("--adam_beta1", type=_decay, default=0.9, help="AdamW beta1.")
    group.add_argument("--adam_beta2", type=_decay, default=0.999, help="AdamW beta2.")
    group.add_argument("--adam_weight_decay", type=_non_negative, default=0.0,
                       help="AdamW weight decay (diffusers' LCM scripts: 1e-2).")
    group.add_argument("--adam_epsilon", type=_positive, default=1e-8, help="AdamW epsilon.")
    group.add_argument("--max_grad_norm", type=_finite, default=1.0, help="Gradient clipping norm (<= 0 disables it).")
    group.add_argument("--mixed_precision", type=str, default=None, choices=MIXED_PRECISION,
                       help="Defaults to the accelerate config. Frozen modules are cast to it; trainable weights stay "
                            "fp32. fp16 needs a CUDA GPU.")
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    group.add_argument("--checkpointing_steps", type=_positive_int, default=500,
                       help="Save a resumable checkpoint every N steps.")
    group.add_argument("--checkpoints_total_limit", type=_positive_int, default=None,
                       help="Keep at most N checkpoints (the oldest is removed once a new one is complete).")
    group.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help="'latest' (the newest complete checkpoint-<step> in --output_dir; a fresh start if none) or "
                            "a checkpoint folder. --learning_rate given on resume replaces the checkpoint's.")
    group.add_argument("--validation_steps", type=_positive_int, default=200, help="Validation grid every N steps.")
    group.add_argument("--validation_prompts", type=str, nargs="*", default=None,
                       help="Prompts of the validation grid (default: a few generic prompts). Pass no value to disable "
                            "validation.")
    group.add_argument("--report_to", type=str, default="tensorboard",
                       help="Accelerate trackers: tensorboard, wandb, comet_ml, all, or none.")
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    group.add_argument("--tracker_project_name", type=str, default=None,
                       help="Tracker project (default: the trainer's name).")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", type=str, default=None,
                       help="Hub dataset id or anything datasets.load_dataset reads locally (imagefolder, csv/json, "
                            "saved dataset).")
    group.add_argument("--dataset_config_name", type=str, default=None,
                       help="The configuration of a --dataset_name that has several.")
    group.add_argument("--train_shards_path_or_url", type=str, default=None,
                       help="Webdataset tar shards (brace patterns allowed), instead of --dataset_name.")
    group.add_argument("--image_column", type=str, default=None, help="Default: detected from the dataset features.")
    group.add_argument("--caption_column", type=str, default=None, help="Default: detected from the dataset features.")
    group.add_argument("--max_train_samples", type=_positive_int, default=None,
                       help="Train on the first N samples only (in dataset order).")
    group.add_argument("--resolution", type=_positive_int, default=512,
                       help="Training image side in pixels, a multiple of 8; images are resized (shorter side) and "
                            "cropped to it, and one smaller than resolution / 8 is a bad sample. LCM distillation of "
                            "an SDXL teacher: 1024.")
    group.add_argument("--center_crop", action="store_true", help="Center crop (default: random crop) to --resolution.")
    group.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    group.add_argument("--dataloader_num_workers", type=_non_negative_int, default=0,
                       help="DataLoader worker processes (0: load in the main process).")
    group.add_argument("--skip_bad_samples", action="store_true",
                       help="Skip samples that cannot be read (corrupt, truncated or missing image, unusable "
                            "caption, image too small) instead of stopping: each is logged by name with a running "
                            "count. A skipped sample is replaced by the next readable one (the next index; datasets "
                            "and local shards) or dropped (streamed shards), so runs stay deterministic and resume "
                            "exactly. Missing, non-tar or damaged shards are left out. Default: the first bad sample "
                            "stops the run with an error naming it.")


def add_hub_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hub")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the outputs and a model card at the end.")
    group.add_argument("--hub_model_id", type=str, default=None, help="Repo id (default: the output folder's name).")
    group.add_argument("--hub_token", type=str, default=None,
                       help="Hub token (never printed, logged or saved); prefer `hf auth login`.")


def add_tangent_args(group, applies_to: str) -> None:
    """sCM's tangent flags (warm-up, normalisation), shared by the pixel and the latent trainers."""
    group.add_argument("--tangent_warmup_steps", type=int_range(0), default=None,
                       help=f"{applies_to}: steps of the tangent warm-up (default {TANGENT_WARMUP_STEPS:,}, at most "
                            "a tenth of --max_train_steps so a short run finishes it).")
    group.add_argument("--tangent_normalization_c", type=_positive, default=None,
                       help=f"{applies_to}: c of the tangent normalisation g / (||g|| + c) (default "
                            f"{TANGENT_NORMALIZATION_C}).")


def add_lcm_args(parser: argparse.ArgumentParser, *, w_min: float = 5.0, w_max: float = 15.0) -> None:
    group = parser.add_argument_group("latent consistency distillation")
    group.add_argument("--method", type=str, default="lcm", choices=LATENT_METHODS,
                       help="Where the student maps each point of the teacher's trajectory: lcm (to the origin), pcm "
                            "(Phased Consistency Models: to the lower edge of its phase, see --num_phases), tcd "
                            "(Trajectory Consistency Distillation: to a random earlier time). pcm and tcd models "
                            "sample with TCDScheduler (pcm: eta=0, num_inference_steps = --num_phases). scd: sCM's "
                            "continuous-time consistency distillation in TrigFlow time (to the origin, through a JVP "
                            "tangent instead of a teacher step; --solver and --loss_type do not apply); it samples "
                            "as an LCM does.")
    group.add_argument("--num_phases", type=_positive_int, default=None,
                       help="PCM's number of phases (= its sampling steps), at most --num_ddim_timesteps; --method "
                            "pcm only (default 4).")
    group.add_argument("--adversarial_weight", type=_non_negative, default=0.0,
                       help="PCM's adversarial consistency loss in latent space: weight of its generator term (the "
                            "PCM scripts: 0.1; 0 = off). Light heads on the frozen teacher UNet's block features "
                            "judge the student's phase-edge prediction against the target's, both noised within the "
                            "phase; they train beside the student and are checkpointed, never saved with the model. "
                            "--method pcm only.")
    group.add_argument("--adversarial_learning_rate", type=_positive, default=None,
                       help="Learning rate of the discriminator heads (AdamW, betas (0, 0.999)); only with "
                            "--adversarial_weight > 0 (default 1e-5, the PCM SD 1.5 script's).")
    add_tangent_args(group, "--method scd only")
    group.add_argument("--scd_p_mean", type=_finite, default=None,
                       help=f"--method scd only: mean of the lognormal noise level tan t (default {SCM_P_MEAN}); the "
                            "drawn time moves to the teacher's nearest timestep.")
    group.add_argument("--scd_p_std", type=_positive, default=None,
                       help=f"--method scd only: std of that lognormal (default {SCM_P_STD}).")
    group.add_argument("--num_ddim_timesteps", type=_positive_int, default=50, help="Skip-step grid size (k = T / N).")
    group.add_argument("--solver", type=str, default="ddim", choices=SOLVERS, help="Teacher ODE solver.")
    group.add_argument("--w_min", type=_non_negative, default=w_min,
                       help="Guidance w ~ U[w_min, w_max], x0 = c + w (c - u) (CFG scale w + 1). SDXL teacher: 3.")
    group.add_argument("--w_max", type=_non_negative, default=w_max,
                       help="Upper end of the guidance range. SDXL teacher: 15.")
    group.add_argument("--use_fix_crop_and_size", action="store_true",
                       help="SDXL: condition on original size = target size = resolution and crop (0, 0) instead of "
                            "each sample's own original size and crop corner.")
    group.add_argument("--timestep_scaling_factor", type=_positive, default=10.0,
                       help="Boundary-scaling timestep factor (saved with the model's scheduler).")
    group.add_argument("--loss_type", type=str, default="huber", choices=LCM_LOSS_TYPES,
                       help="Distance of student and target (diffusers' LCM scripts default to l2).")
    group.add_argument("--huber_c", type=_positive, default=0.001, help="Huber c of --loss_type huber.")
    group.add_argument("--proportion_empty_prompts", type=_unit_interval, default=0.0,
                       help="Fraction of captions replaced by the empty prompt.")
    group.add_argument("--cache_latents", action="store_true",
                       help="Encode the dataset with the VAE once and train from the cache.")
    group.add_argument("--cache_text_embeddings", action="store_true",
                       help="Encode the captions once and train from the cache.")
    group.add_argument("--vae_encode_batch_size", type=_positive_int, default=32,
                       help="Images per VAE encode (the cache build, or each step's batch in chunks). SDXL "
                            "teacher: 8.")
    group.add_argument("--validation_guidance_scale", type=_non_negative, default=None,
                       help="Guidance of the validation images (default 1.0 for LoRA, 8.0 for full).")
    group.add_argument("--validation_num_inference_steps", type=_positive_int, default=None,
                       help="Steps of the validation images (at most --num_ddim_timesteps; default 4, PCM: "
                            "--num_phases).")
    group.add_argument("--torch_compile", action="store_true",
                       help="torch.compile the UNet(s) (opt-in: minutes of compile before the faster steps; "
                            "see benchmarks/RESULTS.md).")


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora_rank", type=_positive_int, default=64, help="LoRA rank r.")
    group.add_argument("--lora_alpha", type=_positive, default=64.0, help="LoRA alpha (scale alpha / r).")
    group.add_argument("--lora_dropout", type=_decay, default=0.0,
                       help="LoRA dropout (> 0 turns off the fused LoRA forward).")
    group.add_argument("--lora_target_modules", type=str, default=",".join(LCM_LORA_TARGET_MODULES),
                       help="Comma-separated module names (peft suffix match).")
    group.add_argument("--export_kohya", action="store_true",
                       help="Also write pytorch_lora_weights_kohya.safetensors (lora_unet_* + .alpha, A1111/ComfyUI).")


def add_full_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("full distillation")
    group.add_argument("--unet_time_cond_proj_dim", type=_positive_int, default=256,
                       help="Width of the guidance-scale embedding input of the student UNet.")
    group.add_argument("--ema_decay", type=_decay, default=0.95,
                       help="EMA decay of the target network (saved at the end).")


def add_consistency_args(parser) -> None:
    """Flags of consistency distillation / training (the loop, data and hub groups come from the other groups)."""
    group = parser.add_argument_group("consistency models")
    group.add_argument("--mode", type=str, required=True, choices=CM_MODES,
                       help="cd: distil a diffusion teacher's ODE; ct: consistency training; ict: improved CT; "
                            "ect: Easy Consistency Tuning from --pretrained_unet (a diffusion model's UNet); "
                            "sct / scd: continuous-time consistency training / distillation in TrigFlow time (sCM).")
    group.add_argument("--teacher", type=str, default=None,
                       help="cd and scd: a diffusers folder with unet/ (UNet2DModel) and scheduler/ (DDPM-family: "
                            "epsilon, "
                            "v_prediction or sample; or EDM: EDMEulerScheduler / EDMDPMSolverMultistepScheduler).")
    group.add_argument("--teacher_solver", type=str, default=None, choices=("euler", "heun"),
                       help="cd only: the teacher's ODE step (default heun).")
    group.add_argument("--loss_type", type=str, default=None, choices=CONSISTENCY_LOSS_TYPES,
                       help="Default: l2 (cd, ct), pseudo_huber (ict). lpips needs the lpips package and its weights.")
    group.add_argument("--huber_c", type=_positive, default=None, help="pseudo-Huber c (default 0.00054 * sqrt(d)).")
    group.add_argument("--num_scales", type=_at_least_two, default=None,
                       help="cd only: N of the Karras grid (default 18).")
    group.add_argument("--target_ema_decay", type=_decay, default=None, help="cd only: target EMA (default 0.95).")
    group.add_argument("--s0", type=_positive_int, default=None, help="ct / ict: first N of the curriculum (2 / 10).")
    group.add_argument("--s1", type=_positive_int, default=None, help="ct / ict: last N of the curriculum (150 / 1280).")
    group.add_argument("--mu0", type=_decay, default=None, help="ct only: mu0 of the target EMA schedule (0.9).")
    group.add_argument("--p_mean", type=_finite, default=None,
                       help="Lognormal noise-level mean: ict / ect index or sigma sampling (default -1.1); sct / scd "
                            "sigma_data tan t (default -1.0).")
    group.add_argument("--p_std", type=_positive, default=None,
                       help="Lognormal noise-level std (default 2.0 for ict / ect, 1.4 for sct / scd).")
    group.add_argument("--ect_stages", type=_positive_int, default=None,
                       help="ect only: stages over which the pair gap t - r halves (by --ect_q) (default 8).")
    group.add_argument("--ect_q", type=float_range(1.0, low_inclusive=False), default=None,
                       help="ect only: the factor the gap shrinks by at each stage (default 2).")
    add_tangent_args(group, "sct / scd")
    group.add_argument("--adaptive_weighting", action=argparse.BooleanOptionalAction, default=None,
                       help="sct / scd: learn sCM's adaptive loss weighting w(t) (default on).")
    group.add_argument("--sigma_min", type=_positive, default=SIGMA_MIN,
                       help="Smallest noise level; also the boundary offset, except for sct / "
                            "scd (TrigFlow: f(x, 0) = x).")
    group.add_argument("--sigma_max", type=_positive, default=SIGMA_MAX, help="Largest noise level.")
    group.add_argument("--sigma_data", type=_positive, default=SIGMA_DATA, help="Data standard deviation.")
    group.add_argument("--rho", type=_positive, default=RHO, help="Karras schedule exponent.")
    group.add_argument("--ema_decay", type=_decay, default=0.9999,
                       help="EMA of the online weights kept for sampling (saved as the model), separate from the target.")
    group.add_argument("--pretrained_unet", type=str, default=None,
                       help="Initialise from this UNet2DModel (folder with config.json, or a pipeline folder with unet/), "
                            "e.g. the teacher's. Default: a new UNet2DModel from the flags below.")
    group.add_argument("--block_out_channels", type=str, default=None,
                       help="New UNet: comma-separated channels per level (default 64,128,128).")
    group.add_argument("--layers_per_block", type=_positive_int, default=None,
                       help="New UNet: resnets per level (default 2).")
    group.add_argument("--dropout", type=_decay, default=None, help="New UNet: dropout (default 0; iCT used 0.3 on CIFAR-10).")
    group.add_argument("--num_class_embeds", type=_positive_int, default=None,
                       help="Class-conditional: number of classes. Labels come from --caption_column (an integer "
                            "string, or one of --class_names).")
    group.add_argument("--class_names", type=str, default=None,
                       help="Comma-separated class names; caption i-th name -> label i.")
    group.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                       help="Train in this AutoencoderKL's latent space (latents scaled by its scaling_factor).")
    group.add_argument("--scheduler_num_train_timesteps", type=_at_least_two, default=40,
                       help="Grid of the saved CMStochasticIterativeScheduler (num_inference_steps index into it).")
    group.add_argument("--validation_num_inference_steps", type=_positive_int, default=1,
                       help="Steps of the validation samples.")
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")


def build_lcm_lora_parser() -> argparse.ArgumentParser:
    parser = TrainingArgumentParser(description="Distill a Stable Diffusion teacher into an LCM-LoRA.")
    for add in (add_model_args, add_training_args, add_data_args, add_hub_args, add_lcm_args, add_lora_args):
        add(parser)
    parser.set_defaults(learning_rate=1e-4)  # diffusers LCM-LoRA script default
    return parser


def build_lcm_parser() -> argparse.ArgumentParser:
    parser = TrainingArgumentParser(description="Distill a Stable Diffusion teacher into a full LCM UNet.")
    for add in (add_model_args, add_training_args, add_data_args, add_hub_args, add_lcm_args, add_full_args):
        add(parser)
    parser.set_defaults(learning_rate=1e-6)  # diffusers full LCM script default
    return parser


def build_consistency_parser() -> argparse.ArgumentParser:
    parser = TrainingArgumentParser(description="Consistency distillation (cd), consistency training (ct) and iCT.")
    for add in (add_training_args, add_data_args, add_hub_args, add_consistency_args):
        add(parser)
    parser.set_defaults(learning_rate=1e-4, lr_warmup_steps=0, resolution=32)
    return parser


def validate_training_args(args: argparse.Namespace) -> None:
    """Checks of the generic loop's flags (raises ValueError naming the flag)."""
    if args.resume_from_checkpoint is not None and args.resume_from_checkpoint != "latest":
        if not os.path.isdir(args.resume_from_checkpoint):
            raise ValueError(
                "--resume_from_checkpoint must be 'latest' or an existing checkpoint folder, got "
                f"{args.resume_from_checkpoint!r}."
            )
    if args.push_to_hub and args.hub_model_id is None and not args.output_dir:
        raise ValueError("--push_to_hub needs --hub_model_id or a named --output_dir.")
    for tracker in _trackers(args.report_to):
        if not any(importlib.util.find_spec(package) for package in TRACKER_PACKAGES[tracker]):
            raise ValueError(
                f"--report_to {tracker} needs the {TRACKER_PACKAGES[tracker][0]} package, which is not installed: "
                f"`pip install {TRACKER_PACKAGES[tracker][0]}`, or pass another --report_to (none for no tracker)."
            )
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--use_8bit_adam needs bitsandbytes: `pip install 'lcm-kit[8bit]'` (CUDA only).")


def _trackers(report_to: str | None) -> list[str]:
    if report_to in (None, "", "none"):
        return []
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    if names == ["all"]:
        return [t for t, packages in TRACKER_PACKAGES.items() if any(importlib.util.find_spec(p) for p in packages)]
    unknown = [name for name in names if name not in TRACKER_PACKAGES]
    if unknown:
        raise ValueError(f"--report_to {report_to!r}: unknown tracker(s) {unknown}; choose from "
                         f"{sorted(TRACKER_PACKAGES)}, all or none.")
    return names


def validate_data_args(args: argparse.Namespace) -> None:
    """Checks of the data flags (raises ValueError naming the flag); the parser types check the same ranges, this
    also covers a namespace built by hand."""
    if (args.dataset_name is None) == (args.train_shards_path_or_url is None):
        raise ValueError(
            "Exactly one of --dataset_name and --train_shards_path_or_url must be given, got "
            f"dataset_name={args.dataset_name!r}, train_shards_path_or_url={args.train_shards_path_or_url!r}."
        )
    if args.dataset_config_name is not None and args.dataset_name is None:
        raise ValueError(f"--dataset_config_name {args.dataset_config_name!r} needs --dataset_name (webdataset "
                         "shards have no configurations).")
    for flag, low, optional in (("resolution", 1, False), ("max_train_samples", 1, True),
                                ("dataloader_num_workers", 0, False)):
        value = getattr(args, flag)
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"--{flag} must be an integer >= {low}, got {value!r}.")
    if args.resolution % 8 != 0:
        raise ValueError(f"--resolution must be a multiple of 8, got {args.resolution}.")
    if not isinstance(args.skip_bad_samples, bool):
        raise ValueError(f"--skip_bad_samples is a switch (True / False), got {args.skip_bad_samples!r}.")


#: Where diffusers' SDXL distillation scripts default differently from the SD 1.x / 2.x ones (the parser defaults).
SDXL_DEFAULTS = {"resolution": 1024, "w_min": 3.0, "w_max": 15.0, "vae_encode_batch_size": 8}


def apply_family_defaults(args: argparse.Namespace, family: str, given) -> argparse.Namespace:
    """For an SDXL teacher (``family == "sdxl"``), set each flag of :data:`SDXL_DEFAULTS` that is not in ``given``
    (the command line's tokens) to its SDXL default; an SD 1.x / 2.x teacher keeps the parser defaults."""
    if family != "sdxl":
        return args
    flags = {token.split("=", 1)[0] for token in given if token.startswith("--")}
    for name, value in SDXL_DEFAULTS.items():
        if f"--{name}" not in flags:
            setattr(args, name, value)
    return args


def validate_lcm_args(args: argparse.Namespace) -> None:
    if args.method != "scd":
        for flag in SCD_FLAGS:
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag} only applies to --method scd, got --method {args.method}.")
    if args.method != "pcm" and args.num_phases is not None:
        raise ValueError(f"--num_phases only applies to --method pcm, got --method {args.method}.")
    if args.method == "pcm":
        if args.num_phases is None:
            args.num_phases = LCMDistillationConfig.num_phases
        try:
            phase_edge_timesteps(args.num_phases, args.num_ddim_timesteps)
        except ValueError as error:
            raise ValueError(f"--num_phases {args.num_phases}: {error} Lower --num_phases or raise "
                             f"--num_ddim_timesteps.") from None
    if args.adversarial_weight > 0 and args.method != "pcm":
        raise ValueError(f"--adversarial_weight only applies to --method pcm (its discriminator reads the phase-edge "
                         f"prediction noised within its phase), got --method {args.method}; drop it or use --method "
                         "pcm.")
    if args.adversarial_weight == 0 and args.adversarial_learning_rate is not None:
        raise ValueError(f"--adversarial_learning_rate {args.adversarial_learning_rate:g} has no effect with "
                         "--adversarial_weight 0 (no discriminator); set --adversarial_weight > 0 or drop it.")
    if args.adversarial_weight > 0 and args.adversarial_learning_rate is None:
        args.adversarial_learning_rate = ADVERSARIAL_LEARNING_RATE
    if args.validation_num_inference_steps is None:
        args.validation_num_inference_steps = args.num_phases if args.method == "pcm" else 4
    if args.w_min > args.w_max:
        raise ValueError(f"--w_min must be <= --w_max, got w_min={args.w_min}, w_max={args.w_max}.")
    if args.validation_num_inference_steps > args.num_ddim_timesteps:
        raise ValueError(
            f"--validation_num_inference_steps {args.validation_num_inference_steps} is more than the distillation "
            f"grid of --num_ddim_timesteps {args.num_ddim_timesteps} holds; use at most {args.num_ddim_timesteps}."
        )


# Which modes each mode-specific flag applies to (any other mode given it is an error, never silently ignored).
CONSISTENCY_FLAG_MODES = {
    "teacher_solver": ("cd",), "num_scales": ("cd",), "target_ema_decay": ("cd",), "mu0": ("ct",),
    "s0": ("ct", "ict"), "s1": ("ct", "ict"), "ect_stages": ("ect",), "ect_q": ("ect",),
    "tangent_warmup_steps": SCM_MODES, "tangent_normalization_c": SCM_MODES, "adaptive_weighting": SCM_MODES,
    "p_mean": ("ict", "ect", *SCM_MODES), "p_std": ("ict", "ect", *SCM_MODES), "loss_type": ("cd", "ct", "ict", "ect"),
    "huber_c": ("cd", "ct", "ict", "ect"),
}


def validate_consistency_args(args: argparse.Namespace) -> None:
    if args.max_train_steps is None:
        raise ValueError("--max_train_steps is required: the CT / iCT / ECT curricula are defined over the total step "
                         "count.")
    if args.mode in ("cd", "scd") and args.teacher is None:
        raise ValueError(f"--mode {args.mode} needs --teacher (a diffusers folder with unet/ and scheduler/).")
    if args.mode not in ("cd", "scd") and args.teacher is not None:
        raise ValueError(f"--teacher only applies to --mode cd and scd, got --mode {args.mode}.")
    for flag, modes in CONSISTENCY_FLAG_MODES.items():
        if getattr(args, flag) is not None and args.mode not in modes:
            raise ValueError(f"--{flag} only applies to --mode {' / '.join(modes)}, got --mode {args.mode}.")
    if args.mode == "ect" and args.pretrained_unet is None:
        raise ValueError("--mode ect tunes a diffusion model into a consistency model: give its UNet2DModel with "
                         "--pretrained_unet (an EDM-preconditioned denoiser's backbone with the consistency time "
                         "input 250 log sigma, e.g. one trained with lcm_kit.training.losses.EDMDenoisingLoss).")
    if args.s0 is not None and args.s1 is not None and not args.s0 < args.s1:
        raise ValueError(f"--s0 must be < --s1 (the curriculum grows from s0 to s1), got s0={args.s0}, s1={args.s1}.")
    if args.pretrained_unet is not None:
        for flag in ("block_out_channels", "layers_per_block", "dropout"):
            if getattr(args, flag) is not None:
                raise ValueError(
                    f"--{flag} shapes a new UNet; it cannot apply to --pretrained_unet {args.pretrained_unet!r}."
                )
    if args.block_out_channels is not None:
        try:
            channels = [int(c) for c in args.block_out_channels.split(",")]
        except ValueError:
            channels = []
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"--block_out_channels must be comma-separated positive ints, got {args.block_out_channels!r}.")
    if not args.sigma_min < args.sigma_max:
        raise ValueError(f"need --sigma_min < --sigma_max, got {args.sigma_min}, {args.sigma_max}.")
    if args.class_names is not None and args.num_class_embeds is None:
        raise ValueError("--class_names needs --num_class_embeds.")
    if args.class_names is not None and len(args.class_names.split(",")) != args.num_class_embeds:
        raise ValueError(f"--class_names has {len(args.class_names.split(','))} names but --num_class_embeds is "
                         f"{args.num_class_embeds}.")
    if args.num_class_embeds is None and args.validation_prompts:
        raise ValueError("--validation_prompts are class labels of a class-conditional model (--num_class_embeds); "
                         "an unconditional model takes none.")
