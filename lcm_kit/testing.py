"""Offline tiny-model kit: deterministic, seconds-to-build Stable-Diffusion-shaped component sets.

Every test (and every offline example) builds its models here; nothing touches a hub. The tokenizer is
CLIP's real byte-level BPE (vocabulary shipped in ``lcm_kit/assets/clip_tokenizer``), so prompts tokenize
exactly as with ``openai/clip-vit-large-patch14``.

    components = tiny_sd_components("sd1")            # vae, text_encoder, tokenizer, unet, scheduler, ...
    folder = save_tiny_pipeline("sd2", tmp_path / "sd2")  # a standard diffusers folder (from_pretrained works)
"""

from __future__ import annotations

from pathlib import Path

import torch

KINDS = ("sd1", "sd2", "sdxl")
ASSETS = Path(__file__).parent / "assets"
CLIP_TOKENIZER_DIR = ASSETS / "clip_tokenizer"

TEXT_HIDDEN = 32  # tiny CLIP width (SDXL: two encoders of 32, concatenated to 64)


def clip_tokenizer(model_max_length: int = 77):
    """CLIP's byte-level BPE tokenizer, built from the vocabulary shipped with lcm-kit (no network)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(CLIP_TOKENIZER_DIR / "vocab.json"),
        str(CLIP_TOKENIZER_DIR / "merges.txt"),
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )


def _text_encoder(seed: int, with_projection: bool = False, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

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
    from diffusers import AutoencoderKL

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
    from diffusers import UNet2DConditionModel

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
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

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
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

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
