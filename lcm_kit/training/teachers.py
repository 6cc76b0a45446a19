"""Loading a distillation teacher's components from a diffusers folder or Hub id: SD 1.x / 2.x or SDXL, told apart
by its ``model_index.json`` (:func:`lcm_kit.pipelines.families.detect_family`)."""

from __future__ import annotations

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..pipelines.families import detect_family


def teacher_family(args) -> str:
    """``"sd"`` or ``"sdxl"`` of ``--pretrained_teacher_model``; ValueError naming what was found otherwise."""
    try:
        return detect_family(args.pretrained_teacher_model, revision=args.revision, cache_dir=args.cache_dir)
    except ValueError as error:
        raise ValueError(f"--pretrained_teacher_model: {error}") from error
    except OSError as error:
        raise ValueError(
            f"--pretrained_teacher_model={args.pretrained_teacher_model!r} is not a diffusers Stable Diffusion folder "
            f"or a reachable Hub id: {error}"
        ) from error


def load_teacher_components(args) -> dict:
    """Tokenizer(s), text encoder(s), VAE (``--pretrained_vae_model_name_or_path`` if given: an fp16-safe SDXL VAE,
    say), UNet and noise schedule of the teacher; SDXL adds ``text_encoder_2`` and ``tokenizer_2``."""
    source = args.pretrained_teacher_model
    family = teacher_family(args)
    common = dict(revision=args.revision, cache_dir=args.cache_dir)
    try:
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--pretrained_teacher_model={source!r} is not a diffusers Stable Diffusion folder or Hub id "
            f"(no scheduler/ found): {error}"
        ) from error
    if args.pretrained_vae_model_name_or_path:
        vae_source = args.pretrained_vae_model_name_or_path
        try:
            vae = AutoencoderKL.from_pretrained(vae_source, subfolder="vae", **common)
        except (OSError, ValueError):
            vae = AutoencoderKL.from_pretrained(vae_source, **common)
    else:
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=args.variant, **common)
    components = dict(
        scheduler=scheduler,
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=args.variant, **common),
        vae=vae,
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=args.variant, **common),
    )
    if family == "sdxl":
        components.update(
            tokenizer_2=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2",
                                                                       variant=args.variant, **common),
        )
    return components
