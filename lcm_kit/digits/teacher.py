"""Build the shipped digits teacher: a genuine Stable-Diffusion-shaped latent diffusion model, trained from scratch.

Three stages, all on the train split of :mod:`lcm_kit.digits` (nothing downloaded):

1. a small CLIP byte-level BPE tokenizer: CLIP's 512 byte symbols, the CLIP merges that the caption words
   use (kept in CLIP's rank order, so captions tokenize into exactly the pieces full CLIP produces) and the
   two special tokens; unknown words still tokenize, byte by byte;
2. an ``AutoencoderKL`` trained for reconstruction with a small KL term; ``scaling_factor`` is set from the
   standard deviation of the training latents (the SD convention: scaled latents have unit variance);
3. a ``UNet2DConditionModel`` and a ``CLIPTextModel`` trained jointly on the latents with the epsilon
   objective over SD's scaled-linear schedule, with caption dropout so classifier-free guidance works, an EMA
   of both (diffusers' ``EMAModel``) and min-SNR loss weighting (diffusers' ``compute_snr``; faster convergence
   on a small budget).

The result is saved as a standard diffusers folder (``StableDiffusionPipeline.from_pretrained`` loads it).
UNet and VAE weights are stored in float16 to keep the shipped folder small; they load as float32. Then its quality
is measured into its README (:mod:`.teacher_report`)::

    python -m lcm_kit.digits.teacher --output_dir lcm_kit/assets/digits_teacher --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from ..utils import sample_latents
from . import data as digits
from .teacher_report import evaluate_and_write_readme
from .tokenizer import BOS_TOKEN, EOS_TOKEN, build_caption_tokenizer


@dataclass
class TeacherConfig:
    """Every knob of teacher training (recorded in the saved folder's README and ``training_config.json``)."""

    seed: int = 0
    resolution: int = 32
    # VAE: 3 blocks -> 2 downsamplings -> 8x8x4 latents for 32x32 images.
    vae_block_out_channels: tuple = (16, 32, 32)
    vae_steps: int = 500
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-3
    # Text encoder (a real CLIPTextModel, tiny).
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 256
    # UNet.
    unet_block_out_channels: tuple = (32, 64)
    unet_layers_per_block: int = 1
    unet_attention_head_dim: int = 8
    unet_steps: int = 1600
    batch_size: int = 64
    lr: float = 1e-3
    lr_warmup_steps: int = 100
    weight_decay: float = 1e-2
    caption_dropout: float = 0.1
    snr_gamma: float | None = 5.0
    ema_decay: float = 0.998
    device: str = "cpu"
    num_threads: int | None = None  # torch intra-op threads; 1 is fastest on an oversubscribed CPU
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.resolution % 4 != 0 or self.resolution < 16:
            raise ValueError(f"resolution must be a multiple of 4 and >= 16, got {self.resolution!r}.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout!r}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}.")
        for name in ("vae_steps", "unet_steps", "batch_size", "vae_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}.")


# ----------------------------------------------------------------------------------------------------------
# Models


def build_text_encoder(tokenizer, config: TeacherConfig):
    vocab = tokenizer.get_vocab()
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=config.text_hidden_size,
        hidden_act="quick_gelu",
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )
    return CLIPTextModel(text_config)


def build_vae(config: TeacherConfig):
    n = len(config.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(config.vae_block_out_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=config.resolution,
    )


def build_unet(config: TeacherConfig, vae_scale_factor: int):
    """SD-1.x-shaped UNet: cross-attention where the latent is coarse (self-attention over 64 tokens at full
    latent resolution costs a lot on CPU and adds little for 8x8 latents)."""

    return UNet2DConditionModel(
        sample_size=config.resolution // vae_scale_factor,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(config.unet_block_out_channels),
        layers_per_block=config.unet_layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=config.unet_attention_head_dim,
        norm_num_groups=16,
    )


def build_scheduler():
    """SD 1.x's scheduler configuration: epsilon prediction over scaled-linear betas, 1,000 steps."""

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


# ----------------------------------------------------------------------------------------------------------
# Training stages


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_vae(vae, images: torch.Tensor, config: TeacherConfig, generator: torch.Generator) -> dict:
    """Reconstruction (MSE) + ``kl_weight`` x KL (per latent element) on ``images`` in [-1, 1]."""
    device = torch.device(config.device)
    vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _cosine_lr(s, config.vae_steps, min(50, config.vae_steps // 10 + 1))
    )
    progress = tqdm(range(config.vae_steps), desc="VAE", dynamic_ncols=True)
    for step in progress:
        idx = torch.randint(0, len(images), (config.vae_batch_size,), generator=generator)
        x = images[idx].to(device)
        posterior = vae.encode(x).latent_dist
        z = sample_latents(posterior.mean, posterior.std, generator, scaling_factor=1.0)
        reconstruction = vae.decode(z).sample
        mse = F.mse_loss(reconstruction, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 10 == 0:
            progress.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.3f}")
    vae.eval()
    return {"vae_final_mse": float(mse.item()), "vae_final_kl": float(kl.item())}


@torch.no_grad()
def encode_latent_distribution(vae, images: torch.Tensor, batch_size: int = 256, device="cpu"):
    """Posterior mean and std of every image (unscaled latents)."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size].to(device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_mse(vae, images: torch.Tensor, batch_size: int = 256, device="cpu") -> float:
    """Mean squared error of decode(posterior mean) on ``images`` (in [-1, 1] units)."""
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        reconstruction = vae.decode(vae.encode(x).latent_dist.mean).sample
        total += F.mse_loss(reconstruction, x, reduction="sum").item()
        count += x.numel()
    return total / count


def train_unet_and_text_encoder(
    unet,
    text_encoder,
    tokenizer,
    noise_scheduler,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    labels: torch.Tensor,
    scaling_factor: float,
    config: TeacherConfig,
    generator: torch.Generator,
) -> dict:
    """Joint epsilon-prediction training of the UNet and the text encoder on pre-encoded latents.

    Each step samples fresh latents from the stored posteriors, fresh captions (dropped to ``""`` with
    probability ``caption_dropout``), timesteps uniformly over the 1,000 training steps, and applies min-SNR
    weighting when ``snr_gamma`` is set. The EMA weights are copied into the modules at the end."""
    device = torch.device(config.device)
    unet.to(device).train()
    text_encoder.to(device).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _cosine_lr(s, config.unet_steps, config.lr_warmup_steps)
    )
    # update_after_step=-1: the warm-started decay min(decay, (1 + k) / (10 + k)) from the first update k = 1.
    ema_unet = EMAModel(unet.parameters(), decay=config.ema_decay, update_after_step=-1)
    ema_text = EMAModel(text_encoder.parameters(), decay=config.ema_decay, update_after_step=-1)
    caption_rng = random.Random(config.seed)
    token_cache: dict[str, torch.Tensor] = {}

    def tokenize(captions):
        missing = [c for c in set(captions) if c not in token_cache]
        if missing:
            ids = tokenizer(
                missing, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids
            token_cache.update(zip(missing, ids))
        return torch.stack([token_cache[c] for c in captions]).to(device)

    progress = tqdm(range(config.unet_steps), desc="UNet + text encoder", dynamic_ncols=True)
    running = None
    for step in progress:
        idx = torch.randint(0, len(labels), (config.batch_size,), generator=generator)
        latents = sample_latents(latent_mean[idx], latent_std[idx], generator, scaling_factor).to(device)
        captions = [digits.caption_for(int(label), caption_rng, config.caption_dropout) for label in labels[idx]]
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
        timesteps = timesteps.to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)

        encoder_hidden_states = text_encoder(tokenize(captions))[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states).sample
        per_sample = F.mse_loss(prediction.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        if config.snr_gamma is not None:
            snr = compute_snr(noise_scheduler, timesteps)
            per_sample = per_sample * torch.clamp(snr, max=config.snr_gamma) / snr
        loss = per_sample.mean()

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 10 == 0:
            progress.set_postfix(loss=f"{running:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    unet.eval()
    text_encoder.eval()
    return {"unet_final_loss_ema": float(running)}


def train_teacher(config: TeacherConfig, output_dir, command: str | None = None):
    """Run all three stages and save a ``StableDiffusionPipeline`` folder at ``output_dir``.

    Returns ``(pipeline, stats)``; ``stats`` (timings, losses, VAE held-out reconstruction error, latent
    std, sizes) is also written to ``output_dir/training_config.json``."""

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = torch.device(config.device)

    images, labels = digits.load_split("train", config.resolution)
    heldout_images, _ = digits.load_split("heldout", config.resolution)

    tokenizer = build_caption_tokenizer(
        digits.caption_vocabulary(), output_dir / "tokenizer", model_max_length=77
    )

    vae = build_vae(config)
    vae_scale_factor = 2 ** (len(config.vae_block_out_channels) - 1)
    stats: dict = {}
    t0 = time.time()
    stats.update(train_vae(vae, images, config, generator))
    stats["vae_seconds"] = time.time() - t0
    latent_mean, latent_std = encode_latent_distribution(vae, images, device=device)
    sampled = sample_latents(latent_mean, latent_std, generator, scaling_factor=1.0)
    scaling_factor = float(1.0 / sampled.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    stats["vae_scaling_factor"] = scaling_factor
    stats["vae_heldout_mse"] = reconstruction_mse(vae, heldout_images, device=device)

    torch.manual_seed(config.seed + 1)
    text_encoder = build_text_encoder(tokenizer, config)
    unet = build_unet(config, vae_scale_factor)
    noise_scheduler = build_scheduler()
    t0 = time.time()
    stats.update(
        train_unet_and_text_encoder(
            unet, text_encoder, tokenizer, noise_scheduler, latent_mean, latent_std, labels,
            scaling_factor, config, generator,
        )
    )
    stats["unet_seconds"] = time.time() - t0
    stats["total_seconds"] = time.time() - start
    stats["parameters"] = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
    }
    stats["vocab_size"] = len(tokenizer)

    pipe = StableDiffusionPipeline(
        vae=vae.to("cpu"),
        text_encoder=text_encoder.to("cpu"),
        tokenizer=tokenizer,
        unet=unet.to("cpu"),
        scheduler=noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Float16 storage for the two big modules (diffusers loads them as float32 unless asked otherwise); the
    # text encoder stays float32 because transformers would otherwise load it as float16.
    unet.to(torch.float16)
    vae.to(torch.float16)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    unet.to(torch.float32)
    vae.to(torch.float32)

    record = {
        "command": command,
        "config": asdict(config),
        "stats": stats,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }
    (output_dir / "training_config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return pipe, record


def safetensors_megabytes(folder) -> float:
    """Total size of every ``*.safetensors`` file under ``folder`` in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors")) / 1e6


# ----------------------------------------------------------------------------------------------------------
# Command line: python -m lcm_kit.digits.teacher --output_dir lcm_kit/assets/digits_teacher --seed 0


def parse_args(argv=None):
    defaults = TeacherConfig()
    parser = argparse.ArgumentParser(description="Train the shipped digits teacher and measure it.",
                                     allow_abbrev=False)
    parser.add_argument("--output_dir", required=True, help="where the diffusers folder is written")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--resolution", type=int, default=defaults.resolution)
    parser.add_argument("--vae_steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--unet_steps", type=int, default=defaults.unet_steps)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--caption_dropout", type=float, default=defaults.caption_dropout)
    parser.add_argument("--kl_weight", type=float, default=defaults.kl_weight)
    parser.add_argument("--ema_decay", type=float, default=defaults.ema_decay)
    parser.add_argument("--snr_gamma", type=float, default=defaults.snr_gamma,
                        help="min-SNR loss weighting gamma; <= 0 disables it")
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="torch intra-op threads (1 is fastest when the CPU is shared)")
    parser.add_argument("--num_per_digit", type=int, default=20,
                        help="samples per digit for the quality rows written to the README")
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.5],
                        help="guidances of the 25-step DPM-Solver rows in the README")
    parser.add_argument("--protocol_guidance", type=float, default=None,
                        help="guidance of the DDIM (trailing) 1/2/4-step rows (default: the best 25-step one)")
    parser.add_argument("--skip_eval", action="store_true", help="train and save only")
    parser.add_argument("--evaluate_only", action="store_true",
                        help="measure an already trained folder and rewrite its README")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    command = "python -m lcm_kit.digits.teacher " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if not args.evaluate_only:
        config = TeacherConfig(
            seed=args.seed, resolution=args.resolution, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
            batch_size=args.batch_size, lr=args.lr, caption_dropout=args.caption_dropout,
            kl_weight=args.kl_weight, ema_decay=args.ema_decay,
            snr_gamma=args.snr_gamma if args.snr_gamma > 0 else None, device=args.device, num_threads=args.num_threads,
        )
        train_teacher(config, args.output_dir, command=command)
    if not args.skip_eval:
        evaluate_and_write_readme(
            args.output_dir, num_per_digit=args.num_per_digit, guidance_scales=args.guidance_scales,
            protocol_guidance=args.protocol_guidance, device=args.device, seed=args.seed, command=command,
        )


if __name__ == "__main__":
    main()
