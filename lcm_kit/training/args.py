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
import os

from ..consistency import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, SOLVERS
from ..lora.adapter import LCM_LORA_TARGET_MODULES
from .losses.cm import CONSISTENCY_LOSS_TYPES
from .losses.cm import MODES as CM_MODES

LCM_LOSS_TYPES = ("l2", "huber")
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


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value!r}")
    return number


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--pretrained_teacher_model",
        type=str,
        required=True,
        help="Diffusers folder or Hub id of the Stable Diffusion 1.x/2.x teacher (unet, vae, text_encoder, tokenizer, scheduler).",
    )
    group.add_argument("--revision", type=str, default=None, help="Hub revision of the teacher.")
    group.add_argument("--variant", type=str, default=None, help="Weight variant of the teacher files, e.g. 'fp16'.")
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the shared Accelerate loop (:func:`lcm_kit.training.loop.run_training`)."""
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", type=str, default="lcm-output", help="Where checkpoints and outputs are written.")
    group.add_argument("--seed", type=int, default=0, help="Seed for noise, timesteps, guidance scales and data order.")
    group.add_argument("--train_batch_size", type=_positive_int, default=16, help="Batch size per device.")
    group.add_argument("--num_train_epochs", type=_positive_int, default=1)
    group.add_argument(
        "--max_train_steps",
        type=_positive_int,
        default=None,
        help="Total optimiser steps; overrides --num_train_epochs when given.",
    )
    group.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1)
    group.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for UNet activation memory.")
    group.add_argument("--learning_rate", type=float, default=1e-6)
    group.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by gradient_accumulation_steps * train_batch_size * num_processes.",
    )
    group.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS)
    group.add_argument("--lr_warmup_steps", type=_non_negative_int, default=500)
    group.add_argument("--lr_num_cycles", type=_positive_int, default=1, help="Hard restarts of cosine_with_restarts.")
    group.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=0.0)
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (<= 0 disables it).")
    group.add_argument("--mixed_precision", type=str, default=None, choices=MIXED_PRECISION,
                       help="Defaults to the accelerate config. Frozen modules are cast to it; trainable weights stay fp32.")
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    group.add_argument("--checkpointing_steps", type=_positive_int, default=500, help="Save a resumable checkpoint every N steps.")
    group.add_argument("--checkpoints_total_limit", type=_positive_int, default=None, help="Keep at most N checkpoints.")
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="'latest' (the newest checkpoint-<step> in --output_dir; a fresh start if none) or a checkpoint folder.",
    )
    group.add_argument("--validation_steps", type=_positive_int, default=200, help="Validation grid every N steps.")
    group.add_argument(
        "--validation_prompts",
        type=str,
        nargs="*",
        default=None,
        help="Prompts of the validation grid (default: a few generic prompts). Pass no value to disable validation.",
    )
    group.add_argument("--report_to", type=str, default="tensorboard",
                       help="Accelerate trackers: tensorboard, wandb, comet_ml, all, or none.")
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    group.add_argument("--tracker_project_name", type=str, default=None, help="Tracker project (default: the script name).")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", type=str, default=None,
                       help="Hub dataset id or anything datasets.load_dataset reads locally (imagefolder, csv/json, saved dataset).")
    group.add_argument("--dataset_config_name", type=str, default=None)
    group.add_argument("--train_shards_path_or_url", type=str, default=None,
                       help="Webdataset tar shards (brace patterns allowed), instead of --dataset_name.")
    group.add_argument("--image_column", type=str, default=None, help="Default: detected from the dataset features.")
    group.add_argument("--caption_column", type=str, default=None, help="Default: detected from the dataset features.")
    group.add_argument("--max_train_samples", type=_positive_int, default=None)
    group.add_argument("--resolution", type=_positive_int, default=512)
    group.add_argument("--center_crop", action="store_true", help="Center crop (default: random crop) to --resolution.")
    group.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    group.add_argument("--dataloader_num_workers", type=_non_negative_int, default=0)


def add_hub_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hub")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the outputs and a model card at the end.")
    group.add_argument("--hub_model_id", type=str, default=None, help="Repo id (default: the output folder's name).")
    group.add_argument("--hub_token", type=str, default=None,
                       help="Hub token (never printed, logged or saved); prefer `huggingface-cli login`.")


def add_lcm_args(parser: argparse.ArgumentParser, *, w_min: float = 5.0, w_max: float = 15.0) -> None:
    group = parser.add_argument_group("latent consistency distillation")
    group.add_argument("--num_ddim_timesteps", type=_positive_int, default=50, help="Skip-step grid size (k = T / N).")
    group.add_argument("--solver", type=str, default="ddim", choices=SOLVERS, help="Teacher ODE solver.")
    group.add_argument("--w_min", type=float, default=w_min, help="Guidance w ~ U[w_min, w_max], x0 = c + w (c - u).")
    group.add_argument("--w_max", type=float, default=w_max)
    group.add_argument("--timestep_scaling_factor", type=float, default=10.0, help="Boundary-scaling timestep factor.")
    group.add_argument("--loss_type", type=str, default="huber", choices=LCM_LOSS_TYPES)
    group.add_argument("--huber_c", type=float, default=0.001)
    group.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                       help="Fraction of captions replaced by the empty prompt.")
    group.add_argument("--cache_latents", action="store_true", help="Encode the dataset with the VAE once and train from the cache.")
    group.add_argument("--cache_text_embeddings", action="store_true", help="Encode the captions once and train from the cache.")
    group.add_argument("--validation_guidance_scale", type=float, default=None,
                       help="Guidance of the 4-step validation images (default 1.0 for LoRA, 8.0 for full).")
    group.add_argument("--validation_num_inference_steps", type=_positive_int, default=4)
    group.add_argument("--torch_compile", action="store_true",
                       help="torch.compile the UNet(s) (opt-in: minutes of compile before the faster steps; "
                            "see benchmarks/RESULTS.md).")


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora_rank", type=_positive_int, default=64)
    group.add_argument("--lora_alpha", type=float, default=64.0)
    group.add_argument("--lora_dropout", type=float, default=0.0)
    group.add_argument("--lora_target_modules", type=str, default=",".join(LCM_LORA_TARGET_MODULES),
                       help="Comma-separated module names (peft suffix match).")
    group.add_argument("--export_kohya", action="store_true",
                       help="Also write pytorch_lora_weights_kohya.safetensors (lora_unet_* + .alpha, A1111/ComfyUI).")


def add_full_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("full distillation")
    group.add_argument("--unet_time_cond_proj_dim", type=_positive_int, default=256,
                       help="Width of the guidance-scale embedding input of the student UNet.")
    group.add_argument("--ema_decay", type=float, default=0.95, help="EMA decay of the target network (saved at the end).")


def add_consistency_args(parser) -> None:
    """Flags of consistency distillation / training (the loop, data and hub groups come from ``args.py``)."""
    group = parser.add_argument_group("consistency models")
    group.add_argument("--mode", type=str, required=True, choices=CM_MODES,
                       help="cd: distil a diffusion teacher's ODE; ct: consistency training; ict: improved CT.")
    group.add_argument("--teacher", type=str, default=None,
                       help="cd only: a diffusers folder with unet/ (UNet2DModel) and scheduler/ (DDPM-family: epsilon, "
                            "v_prediction or sample; or EDM: EDMEulerScheduler / EDMDPMSolverMultistepScheduler).")
    group.add_argument("--teacher_solver", type=str, default=None, choices=("euler", "heun"),
                       help="cd only: the teacher's ODE step (default heun).")
    group.add_argument("--loss_type", type=str, default=None, choices=CONSISTENCY_LOSS_TYPES,
                       help="Default: l2 (cd, ct), pseudo_huber (ict). lpips needs the lpips package and its weights.")
    group.add_argument("--huber_c", type=float, default=None, help="pseudo-Huber c (default 0.00054 * sqrt(d)).")
    group.add_argument("--num_scales", type=int, default=None, help="cd only: N of the Karras grid (default 18).")
    group.add_argument("--target_ema_decay", type=float, default=None, help="cd only: target EMA (default 0.95).")
    group.add_argument("--s0", type=int, default=None, help="ct / ict: first N of the curriculum (2 / 10).")
    group.add_argument("--s1", type=int, default=None, help="ct / ict: last N of the curriculum (150 / 1280).")
    group.add_argument("--mu0", type=float, default=None, help="ct only: mu0 of the target EMA schedule (0.9).")
    group.add_argument("--p_mean", type=float, default=-1.1, help="Lognormal index sampling mean (ict).")
    group.add_argument("--p_std", type=float, default=2.0, help="Lognormal index sampling std (ict).")
    group.add_argument("--sigma_min", type=float, default=SIGMA_MIN)
    group.add_argument("--sigma_max", type=float, default=SIGMA_MAX)
    group.add_argument("--sigma_data", type=float, default=SIGMA_DATA)
    group.add_argument("--rho", type=float, default=RHO)
    group.add_argument("--ema_decay", type=float, default=0.9999,
                       help="EMA of the online weights kept for sampling (saved as the model), separate from the target.")
    group.add_argument("--pretrained_unet", type=str, default=None,
                       help="Initialise from this UNet2DModel (folder with config.json, or a pipeline folder with unet/), "
                            "e.g. the teacher's. Default: a new UNet2DModel from the flags below.")
    group.add_argument("--block_out_channels", type=str, default=None,
                       help="New UNet: comma-separated channels per level (default 64,128,128).")
    group.add_argument("--layers_per_block", type=int, default=None, help="New UNet: resnets per level (default 2).")
    group.add_argument("--dropout", type=float, default=None,
                       help="New UNet: dropout (default 0; iCT used 0.3 on CIFAR-10).")
    group.add_argument("--num_class_embeds", type=int, default=None,
                       help="Class-conditional: number of classes. Labels come from --caption_column (an integer "
                            "string, or one of --class_names).")
    group.add_argument("--class_names", type=str, default=None,
                       help="Comma-separated class names; caption i-th name -> label i.")
    group.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                       help="Train in this AutoencoderKL's latent space (latents scaled by its scaling_factor).")
    group.add_argument("--scheduler_num_train_timesteps", type=int, default=40,
                       help="Grid of the saved CMStochasticIterativeScheduler (num_inference_steps index into it).")
    group.add_argument("--validation_num_inference_steps", type=int, default=1)
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")


def build_lcm_lora_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Distill a Stable Diffusion teacher into an LCM-LoRA.")
    for add in (add_model_args, add_training_args, add_data_args, add_hub_args, add_lcm_args, add_lora_args):
        add(parser)
    parser.set_defaults(learning_rate=1e-4)  # diffusers LCM-LoRA script default
    return parser


def build_lcm_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Distill a Stable Diffusion teacher into a full LCM UNet.")
    for add in (add_model_args, add_training_args, add_data_args, add_hub_args, add_lcm_args, add_full_args):
        add(parser)
    parser.set_defaults(learning_rate=1e-6)  # diffusers full LCM script default
    return parser


def build_consistency_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Consistency distillation (cd), consistency training (ct) and iCT.")
    for add in (add_training_args, add_data_args, add_hub_args, add_consistency_args):
        add(parser)
    parser.set_defaults(learning_rate=1e-4, lr_warmup_steps=0, resolution=32)
    return parser


def validate_training_args(args: argparse.Namespace) -> None:
    """Checks of the generic loop's flags (raises ValueError naming the flag)."""
    if args.resume_from_checkpoint is not None and args.resume_from_checkpoint != "latest":

        if not os.path.isdir(args.resume_from_checkpoint):
            raise ValueError(
                f"--resume_from_checkpoint must be 'latest' or an existing checkpoint folder, got {args.resume_from_checkpoint!r}."
            )
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if args.push_to_hub and args.hub_model_id is None and not args.output_dir:
        raise ValueError("--push_to_hub needs --hub_model_id or a named --output_dir.")


def validate_data_args(args: argparse.Namespace) -> None:
    if (args.dataset_name is None) == (args.train_shards_path_or_url is None):
        raise ValueError(
            "Exactly one of --dataset_name and --train_shards_path_or_url must be given, got "
            f"dataset_name={args.dataset_name!r}, train_shards_path_or_url={args.train_shards_path_or_url!r}."
        )


def validate_lcm_args(args: argparse.Namespace) -> None:
    if args.w_min > args.w_max:
        raise ValueError(f"--w_min must be <= --w_max, got w_min={args.w_min}, w_max={args.w_max}.")
    if args.w_min < 0:
        raise ValueError(f"--w_min must be >= 0 (w = 0 is no guidance), got {args.w_min}.")
    if args.huber_c <= 0:
        raise ValueError(f"--huber_c must be > 0, got {args.huber_c}.")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise ValueError(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}.")
    if hasattr(args, "ema_decay") and not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1), got {args.ema_decay}.")
    if hasattr(args, "lora_dropout") and not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}.")
    if args.resolution % 8 != 0:
        raise ValueError(f"--resolution must be a multiple of 8, got {args.resolution}.")


def validate_consistency_args(args: argparse.Namespace) -> None:
    if args.max_train_steps is None:
        raise ValueError("--max_train_steps is required: the CT / iCT curricula are defined over the total step count.")
    if args.mode == "cd" and args.teacher is None:
        raise ValueError("--mode cd needs --teacher (a diffusers folder with unet/ and scheduler/).")
    if args.mode != "cd":
        for flag in ("teacher", "teacher_solver", "num_scales", "target_ema_decay"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag} only applies to --mode cd, got --mode {args.mode}.")
    if args.mode != "ct" and args.mu0 is not None:
        raise ValueError(f"--mu0 only applies to --mode ct, got --mode {args.mode}.")
    if args.mode == "cd" and (args.s0 is not None or args.s1 is not None):
        raise ValueError("--s0 / --s1 only apply to --mode ct and ict.")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1), got {args.ema_decay}.")
    if args.pretrained_unet is not None:
        for flag in ("block_out_channels", "layers_per_block", "dropout"):
            if getattr(args, flag) is not None:
                raise ValueError(
                    f"--{flag} shapes a new UNet; it cannot apply to --pretrained_unet {args.pretrained_unet!r}."
                )
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}.")
    if args.validation_num_inference_steps < 1:
        raise ValueError(f"--validation_num_inference_steps must be >= 1, got {args.validation_num_inference_steps}.")
    if not 0 < args.sigma_min < args.sigma_max:
        raise ValueError(f"need 0 < --sigma_min < --sigma_max, got {args.sigma_min}, {args.sigma_max}.")
    if args.class_names is not None and args.num_class_embeds is None:
        raise ValueError("--class_names needs --num_class_embeds.")
    if args.class_names is not None and len(args.class_names.split(",")) != args.num_class_embeds:
        raise ValueError(f"--class_names has {len(args.class_names.split(','))} names but --num_class_embeds is "
                         f"{args.num_class_embeds}.")
    if args.num_class_embeds is None and args.validation_prompts:
        raise ValueError("--validation_prompts are class labels of a class-conditional model (--num_class_embeds); "
                         "an unconditional model takes none.")
