"""Train the small digits teacher: a genuine Stable-Diffusion-shaped latent diffusion model, from scratch.

Three stages, all on the train split of :mod:`lcm_kit.digits` (nothing downloaded):

1. a small CLIP byte-level BPE tokenizer: CLIP's 512 byte symbols, the CLIP merges that the caption words
   use (kept in CLIP's rank order, so captions tokenize into exactly the pieces full CLIP produces) and the
   two special tokens; unknown words still tokenize, byte by byte;
2. an ``AutoencoderKL`` trained for reconstruction with a small KL term; ``scaling_factor`` is set from the
   standard deviation of the training latents (the SD convention: scaled latents have unit variance);
3. a ``UNet2DConditionModel`` and a ``CLIPTextModel`` trained jointly on the latents with the epsilon
   objective over SD's scaled-linear schedule, with caption dropout so classifier-free guidance works, an EMA
   of both and min-SNR loss weighting (faster convergence on a small budget).

The result is saved as a standard diffusers folder (``StableDiffusionPipeline.from_pretrained`` loads it).
UNet and VAE weights are stored in float16 to keep the shipped folder small; they load as float32.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lcm_kit import digits

CLIP_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "clip_tokenizer"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP's pre-tokenizer keeps runs of letters together and splits every digit on its own.
_CLIP_WORD_PATTERN = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


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
# Tokenizer


def _bpe_merges_used(word: str, ranks: dict) -> list[tuple[str, str]]:
    """Run CLIP's BPE on one pre-tokenized word and return the merges it applies, in order."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    applied = []
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
        best = min(pairs, key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        applied.append(best)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return applied


def build_caption_tokenizer(words, save_dir, model_max_length: int = 77):
    """A real CLIP byte-level BPE tokenizer whose vocabulary covers ``words`` with CLIP's own merges.

    The vocabulary is CLIP's 256 byte symbols, the same 256 with the ``</w>`` end-of-word marker, one token
    per CLIP merge needed by ``words`` (kept in CLIP's rank order) and the two special tokens. Because BPE
    with a subset of merges that contains every merge a word uses reproduces that word's segmentation, the
    caption words tokenize into exactly the pieces full CLIP gives them. The files are written to
    ``save_dir`` and the loaded ``CLIPTokenizer`` is returned.
    """
    from transformers import CLIPTokenizer

    full_vocab = json.loads((CLIP_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    merge_lines = (CLIP_TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(line.split()): rank for rank, line in enumerate(merge_lines) if line.strip()}

    used: set[tuple[str, str]] = set()
    for text in words:
        for piece in _CLIP_WORD_PATTERN.findall(str(text).lower()):
            used.update(_bpe_merges_used(piece, ranks))
    kept = sorted(used, key=ranks.__getitem__)

    by_id = sorted(full_vocab.items(), key=lambda item: item[1])
    vocab = {token: index for index, (token, _) in enumerate(by_id[:512])}  # bytes, then bytes + </w>
    for a, b in kept:
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (save_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept), encoding="utf-8"
    )
    return CLIPTokenizer(
        str(save_dir / "vocab.json"),
        str(save_dir / "merges.txt"),
        model_max_length=model_max_length,
        pad_token=EOS_TOKEN,
    )


# ----------------------------------------------------------------------------------------------------------
# Models


def build_text_encoder(tokenizer, config: TeacherConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

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
    from diffusers import AutoencoderKL

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
    from diffusers import UNet2DConditionModel

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
    from diffusers import DDIMScheduler

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


class EMA:
    """Exponential moving average of a module's parameters (warm-started decay, as diffusers' EMAModel)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in module.parameters()]
        self.num_updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        params = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for shadow, p in zip(self.shadow, module.parameters()):
            p.copy_(shadow)


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
        z = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=generator
        ).to(device)
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
    ema_unet, ema_text = EMA(unet, config.ema_decay), EMA(text_encoder, config.ema_decay)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
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
        eps_latent = torch.randn(latent_mean[idx].shape, generator=generator)
        latents = ((latent_mean[idx] + latent_std[idx] * eps_latent) * scaling_factor).to(device)
        captions = [digits.caption_for(int(label), caption_rng, config.caption_dropout) for label in labels[idx]]
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
        timesteps = timesteps.to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)

        encoder_hidden_states = text_encoder(tokenize(captions))[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states).sample
        per_sample = F.mse_loss(prediction.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        if config.snr_gamma is not None:
            alpha = alphas_cumprod[timesteps]
            snr = alpha / (1.0 - alpha)
            per_sample = per_sample * torch.clamp(snr, max=config.snr_gamma) / snr
        loss = per_sample.mean()

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 10 == 0:
            progress.set_postfix(loss=f"{running:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    ema_unet.copy_to(unet)
    ema_text.copy_to(text_encoder)
    unet.eval()
    text_encoder.eval()
    return {"unet_final_loss_ema": float(running)}


def train_teacher(config: TeacherConfig, output_dir, command: str | None = None):
    """Run all three stages and save a ``StableDiffusionPipeline`` folder at ``output_dir``.

    Returns ``(pipeline, stats)``; ``stats`` (timings, losses, VAE held-out reconstruction error, latent
    std, sizes) is also written to ``output_dir/training_config.json``."""
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

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
    sampled = latent_mean + latent_std * torch.randn(latent_mean.shape, generator=generator)
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
# Measured quality + README


def evaluate_and_write_readme(
    output_dir,
    num_per_digit: int = 20,
    guidance_scales=(1.0, 2.0, 3.0, 5.0, 7.5),
    protocol_guidance: float | None = None,
    device: str = "cpu",
    seed: int = 0,
    command: str | None = None,
) -> list[dict]:
    """Measure the saved teacher (DPM-Solver 25 steps at each of ``guidance_scales``; DDIM with trailing
    spacing and the undistilled teacher under lcm-kit's ``ConsistencyScheduler`` (real CFG) at 1/2/4 steps at
    ``protocol_guidance``, by default the 25-step guidance with the lowest
    Fréchet distance among those with >= 90% prompt accuracy) and (re)write ``output_dir/README.md``."""
    from diffusers import StableDiffusionPipeline

    from lcm_kit.eval import evaluate_pipeline, real_floor

    output_dir = Path(output_dir)
    record = json.loads((output_dir / "training_config.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(output_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for guidance in tqdm(list(guidance_scales), desc="teacher DPM-Solver 25 steps", dynamic_ncols=True):
        rows.append(
            evaluate_pipeline(pipe, "dpmsolver", 25, guidance, num_per_digit=num_per_digit, seed=seed,
                              name="teacher DPM-Solver")
        )
    if protocol_guidance is None:
        good = [r for r in rows if r["accuracy"] >= 0.9] or rows
        protocol_guidance = min(good, key=lambda r: r["fd"])["guidance_scale"]
    few_step = [(s, n) for s in ("ddim", "consistency") for n in (1, 2, 4)]
    for scheduler, steps in tqdm(few_step, desc="teacher few-step rows", dynamic_ncols=True):
        name = {"ddim": "teacher DDIM (trailing)", "consistency": "teacher + ConsistencyScheduler, no LoRA"}
        rows.append(
            evaluate_pipeline(pipe, scheduler, steps, protocol_guidance, num_per_digit=num_per_digit, seed=seed,
                              name=name[scheduler])
        )
    floor = real_floor(num_per_digit=num_per_digit)
    record["quality"] = {
        "rows": rows,
        "protocol_guidance": protocol_guidance,
        "num_per_digit": num_per_digit,
        "real_floor": {"accuracy": floor["accuracy"], "fd": floor["fd"]},
        "command": command,
    }
    (output_dir / "training_config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    write_teacher_readme(output_dir, record)
    return rows


def write_teacher_readme(output_dir, record: dict) -> Path:
    """Write ``README.md``: what the model is, the exact command, seed, versions, wall time, quality."""
    from lcm_kit.eval.metrics import format_table

    output_dir = Path(output_dir)
    config, stats, versions = record["config"], record["stats"], record["versions"]
    params = stats["parameters"]
    lines = [
        "# digits teacher (lcm-kit)",
        "",
        "A small but genuine Stable-Diffusion-style text-to-image latent diffusion model trained from scratch on",
        "the train split (80%, seeded) of scikit-learn's handwritten digits, upscaled (bicubic) to "
        f"{config['resolution']}x{config['resolution']}.",
        "Standard diffusers folder: `AutoencoderKL` + `UNet2DConditionModel` + `CLIPTextModel` + `CLIPTokenizer`",
        "(a real CLIP byte-level BPE with a small vocabulary: CLIP's 512 byte symbols, the CLIP merges the caption",
        f"words use, the two special tokens; {stats['vocab_size']} tokens) + `DDIMScheduler` (SD 1.x config: epsilon",
        "prediction, scaled-linear betas 0.00085-0.012, 1,000 steps). UNet and VAE weights are stored in float16",
        "and load as float32 by default.",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline, DPMSolverMultistepScheduler",
        "from lcm_kit.digits import teacher_path",
        "pipe = StableDiffusionPipeline.from_pretrained(teacher_path())",
        "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)",
        'image = pipe("a handwritten 7", num_inference_steps=25, guidance_scale=3.0).images[0]',
        "```",
        "",
        "## How it was made",
        "",
        "```bash",
        f"HF_HUB_OFFLINE=1 {record.get('command') or 'python train_scripts/train_teacher.py'}",
        "```",
        "",
        f"- seed: {config['seed']} (data split seed {digits.DEFAULT_SPLIT_SEED}); device: {config['device']}",
        f"- versions: torch {versions['torch']}, diffusers {versions['diffusers']}, "
        f"transformers {versions['transformers']}",
        f"- wall time: {stats['total_seconds'] / 60:.1f} min in total (VAE {stats['vae_seconds'] / 60:.1f} min, "
        f"UNet + text encoder {stats['unet_seconds'] / 60:.1f} min) on 2 shared CPU cores",
        f"- parameters: UNet {params['unet']:,}, VAE {params['vae']:,}, text encoder {params['text_encoder']:,}",
        f"- VAE: {config['vae_steps']} steps, latents 4x{config['resolution'] // 4}x{config['resolution'] // 4}, "
        f"held-out reconstruction MSE {stats['vae_heldout_mse']:.4f} (images in [-1, 1]), "
        f"scaling_factor {stats['vae_scaling_factor']:.4f}",
        f"- UNet + text encoder: {config['unet_steps']} steps x batch {config['batch_size']}, lr {config['lr']}, "
        f"caption dropout {config['caption_dropout']}, min-SNR gamma {config['snr_gamma']}, "
        f"EMA {config['ema_decay']}",
        "- every hyperparameter: `training_config.json`",
    ]
    quality = record.get("quality")
    if quality:
        lines += [
            "",
            "## Measured quality",
            "",
            f"`lcm_kit.eval.evaluate_pipeline`, {quality['num_per_digit']} samples per digit (prompt "
            f"`{digits.eval_prompt(7).replace('7', '<d>')}`), fixed seeds. Accuracy: the shipped classifier's",
            "agreement with the prompted digit. FD: Fréchet distance between the classifier's penultimate",
            "features of the samples and of the held-out real digits (lower is better; real-vs-real floor in",
            "`lcm_kit/assets/digits_classifier/README.md`). Few-step rows (DDIM with `timestep_spacing=\"trailing\"`, "
            "and the un-distilled teacher under lcm-kit's `ConsistencyScheduler` with real CFG: what distillation "
            f"must improve on) use guidance {quality['protocol_guidance']}. Real train digits at the same count "
            f"score {100 * quality['real_floor']['accuracy']:.1f}% / FD {quality['real_floor']['fd']:.3f} "
            "(the floor).",
            "",
            format_table(quality["rows"]),
            "",
            f"Measured with `HF_HUB_OFFLINE=1 {quality.get('command') or 'python train_scripts/train_teacher.py --evaluate_only'}`.",
        ]
    path = output_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
