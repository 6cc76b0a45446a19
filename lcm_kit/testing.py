"""The offline test kit: tiny Stable-Diffusion-shaped component sets and a 2-D toy for consistency models.

Every test (and every offline example) builds its models here; nothing touches a hub. The tokenizer is
CLIP's real byte-level BPE (vocabulary shipped in ``lcm_kit/assets/clip_tokenizer``), so prompts tokenize
exactly as with ``openai/clip-vit-large-patch14``.

    components = tiny_sd_components("sd1")            # vae, text_encoder, tokenizer, unet, scheduler, ...
    folder = save_tiny_pipeline("sd2", tmp_path / "sd2")  # a standard diffusers folder (from_pretrained works)

The 2-D toy (a Gaussian mixture, a small MLP backbone, the sliced Wasserstein distance and two plain training
loops) shows in a CPU-minute that CD / CT / iCT beat the diffusion model they start from at one step.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable

import torch
import torch.utils._python_dispatch
import torch.utils._pytree
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .training.losses import ConsistencyLoss, EDMDenoisingLoss
from .utils import ema_update_

KINDS = ("sd1", "sd2", "sdxl")
ASSETS = Path(__file__).parent / "assets"
CLIP_TOKENIZER_DIR = ASSETS / "clip_tokenizer"

TEXT_HIDDEN = 32  # tiny CLIP width (SDXL: two encoders of 32, concatenated to 64)


def clip_tokenizer(model_max_length: int = 77):
    """CLIP's byte-level BPE tokenizer, built from the vocabulary shipped with lcm-kit (no network)."""

    return CLIPTokenizer(
        str(CLIP_TOKENIZER_DIR / "vocab.json"),
        str(CLIP_TOKENIZER_DIR / "merges.txt"),
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )


def _text_encoder(seed: int, with_projection: bool = False, hidden_act: str = "quick_gelu"):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=TEXT_HIDDEN,
        hidden_act=hidden_act,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _vae(seed: int):
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()


def tiny_unet(kind: str = "sd1", seed: int = 0, time_cond_proj_dim: int | None = None):
    """A tiny UNet2DConditionModel with every module type LCM-LoRA targets (attn, ff, resnet shortcuts,
    down/upsamplers, time_emb_proj). ``time_cond_proj_dim`` gives a fully distilled LCM's w-embedding input."""

    _check_kind(kind)
    torch.manual_seed(seed)
    common = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        norm_num_groups=8,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    if kind == "sd1":
        unet = UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_HIDDEN,
            attention_head_dim=8,
            **common,
        )
    elif kind == "sd2":
        unet = UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_HIDDEN,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            **common,
        )
    else:
        unet = UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2 * TEXT_HIDDEN,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN,
            **common,
        )
    return unet.eval()


def tiny_scheduler(kind: str = "sd1"):
    """The scheduler a real checkpoint of that family ships (same config values)."""

    _check_kind(kind)
    sd_betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if kind == "sdxl":
        return EulerDiscreteScheduler(
            **sd_betas, steps_offset=1, timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon"
        )
    return DDIMScheduler(
        **sd_betas,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if kind == "sd2" else "epsilon",
    )


def tiny_sd_components(kind: str = "sd1", seed: int = 0, time_cond_proj_dim: int | None = None) -> dict:
    """Components for ``StableDiffusionPipeline(**c)`` (sd1: epsilon, sd2: v-prediction) or
    ``StableDiffusionXLPipeline(**c)`` (sdxl: two text encoders, text_time conditioning)."""
    _check_kind(kind)
    components = dict(
        unet=tiny_unet(kind, seed, time_cond_proj_dim),
        scheduler=tiny_scheduler(kind),
        vae=_vae(seed + 1),
        text_encoder=_text_encoder(seed + 2, hidden_act="gelu" if kind == "sd2" else "quick_gelu"),
        tokenizer=clip_tokenizer(),
    )
    if kind == "sdxl":
        components.update(
            text_encoder_2=_text_encoder(seed + 3, with_projection=True, hidden_act="gelu"),
            tokenizer_2=clip_tokenizer(),
            image_encoder=None,
            feature_extractor=None,
        )
    else:
        components.update(safety_checker=None, feature_extractor=None, image_encoder=None)
    return components


def tiny_pipeline(kind: str = "sd1", seed: int = 0, time_cond_proj_dim: int | None = None):
    """A stock diffusers pipeline (StableDiffusionPipeline / StableDiffusionXLPipeline) over the tiny components."""

    components = tiny_sd_components(kind, seed, time_cond_proj_dim)
    if kind == "sdxl":
        return StableDiffusionXLPipeline(**components)
    return StableDiffusionPipeline(**components, requires_safety_checker=False)


def save_tiny_pipeline(kind: str, path, seed: int = 0, time_cond_proj_dim: int | None = None) -> Path:
    """Save a tiny pipeline as a standard diffusers folder (model_index.json, unet/, vae/, ...)."""
    path = Path(path)
    tiny_pipeline(kind, seed, time_cond_proj_dim).save_pretrained(path, safe_serialization=True)
    return path


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")


# --------------------------------------------------------------------------------------------------------------
# 2-D toy: data, backbone, distance, training loops
# --------------------------------------------------------------------------------------------------------------


class ToyMLP(nn.Module):
    """A small MLP backbone ``F(sample, timestep, class_labels=None)`` for low-dimensional data.

    The timestep (250 log sigma, the UNet's input) goes through diffusers' sinusoidal embedding and a linear layer,
    like a ``UNet2DModel``'s; ``num_class_embeds`` adds a class embedding; ``dropout`` acts on hidden layers.
    """

    def __init__(
        self,
        dim: int = 2,
        hidden_dim: int = 128,
        num_layers: int = 3,
        time_embed_dim: int = 64,
        num_class_embeds: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.time_embed_dim = time_embed_dim
        self.time_proj = nn.Sequential(nn.Linear(time_embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.class_embedding = nn.Embedding(num_class_embeds, hidden_dim) if num_class_embeds else None
        self.input = nn.Linear(dim, hidden_dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim)) for _ in range(num_layers)
        )
        self.output = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, dim))

    def forward(self, sample: torch.Tensor, timestep, class_labels=None) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).float()
        timestep = timestep.expand(sample.shape[0]) if timestep.numel() == 1 else timestep
        sinusoids = get_timestep_embedding(timestep, self.time_embed_dim, flip_sin_to_cos=True,
                                           downscale_freq_shift=0).to(sample.dtype)
        emb = self.time_proj(sinusoids)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels are required: this ToyMLP was built with num_class_embeds.")
            emb = emb + self.class_embedding(class_labels)
        h = self.input(sample) + emb
        for block in self.blocks:
            h = h + block(h) + emb
        return self.output(h)


def gaussian_mixture_2d(
    num_samples: int,
    generator: torch.Generator | None = None,
    num_modes: int = 8,
    radius: float = 0.8,
    std: float = 0.08,
):
    """``num_samples`` points of ``num_modes`` isotropic Gaussians evenly spaced on a circle; returns (x, labels)."""
    labels = torch.randint(0, num_modes, (num_samples,), generator=generator)
    angles = 2 * math.pi * labels.double() / num_modes
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    points = means + std * torch.randn(num_samples, 2, generator=generator, dtype=torch.float64)
    return points.float(), labels


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, generator=None) -> float:
    """Sliced 2-Wasserstein distance between two equal-sized point clouds (random unit directions, sorted 1-D)."""
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(
            f"x and y must be (n, d) point clouds of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    directions = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    px = (x.double() @ directions).sort(dim=0).values
    py = (y.double() @ directions).sort(dim=0).values
    return (px - py).pow(2).mean().sqrt().item()


def train_toy_diffusion(
    denoiser: nn.Module,
    data_fn: Callable[[int, torch.Generator], tuple],
    num_steps: int,
    batch_size: int = 256,
    learning_rate: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Fit a small :class:`~lcm_kit.precond.EDMDenoiser` with EDM's loss on fresh batches of ``data_fn(n, gen)``."""
    generator = torch.Generator().manual_seed(seed)
    loss_fn = EDMDenoisingLoss()
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, num_steps)
    losses = []
    for _ in tqdm(range(num_steps), disable=not progress, desc="diffusion"):
        clean, labels = data_fn(batch_size, generator)
        loss = loss_fn(denoiser, clean, labels if _is_conditional(denoiser) else None, generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def _is_conditional(module: nn.Module) -> bool:
    backbone = getattr(module, "backbone", module)
    return getattr(backbone, "class_embedding", None) is not None


def train_toy_consistency(
    loss: ConsistencyLoss,
    model,
    data_fn: Callable[[int, torch.Generator], tuple],
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    sampling_ema_decay: float = 0.999,
    seed: int = 0,
    progress: bool = False,
    num_steps: int | None = None,
):
    """Train ``model`` for ``num_steps`` steps (default ``loss.total_steps``); returns ``(sampling_ema_model, losses)``.

    The bookkeeping of the papers in a few lines: a target network updated with mu(k) for CD / CT (none for iCT) and
    a separate EMA of the online weights for sampling.
    """
    generator = torch.Generator().manual_seed(seed)
    target = copy.deepcopy(model).requires_grad_(False) if loss.uses_target_network else None
    sampling_ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.RAdam(model.parameters(), lr=learning_rate)
    conditional = _is_conditional(model)
    losses = []
    for step in tqdm(range(loss.total_steps if num_steps is None else num_steps), disable=not progress, desc=loss.mode):
        clean, labels = data_fn(batch_size, generator)
        out = loss(model, clean, step, target_model=target, class_labels=labels if conditional else None,
                        generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out.loss.mean().backward()
        optimizer.step()
        if target is not None:
            ema_update_(target, model, loss.target_ema_decay(step))
        ema_update_(sampling_ema, model, sampling_ema_decay)
        losses.append(out.loss.mean().item())
    return sampling_ema, losses


class HostTraffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Records what a computation would make an accelerator wait for: reads of a tensor's value (``.item()``,
    ``int(t)``, ``bool(t)``: ``aten._local_scalar_dense``), copies from the host to the device, and host tensors with
    more than one element. 0-dim host scalars (an ``alphas_cumprod[t]`` indexed by a host int) are allowed: they reach
    a device kernel as a scalar argument, as in diffusers' schedulers. ``with HostTraffic() as traffic: ...`` then
    ``traffic.violations``."""

    def __init__(self):
        super().__init__()
        self.violations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.violations.append(f"{func}: reads a tensor value on the host")
        out = func(*args, **kwargs)
        leaves = torch.utils._pytree.tree_leaves
        inputs = [a for a in leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in leaves(out) if isinstance(o, torch.Tensor)]
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and (
            any(i.device.type == "cpu" for i in inputs) and any(o.device.type != "cpu" for o in outputs)
        ):
            self.violations.append(f"{func}: copies a host tensor to the device")
        self.violations += [f"{func}: makes a host tensor of shape {tuple(o.shape)}" for o in outputs
                            if o.device.type == "cpu" and o.numel() > 1]
        return out

