"""Which Stable Diffusion family a diffusers folder or Hub id holds, read from its ``model_index.json``: SD 1.x / 2.x
(one text encoder) or SDXL (two), and the lcm-kit pipeline for it. Anything else gets one error naming what was
found, instead of a failure deep inside a UNet."""

from __future__ import annotations

import json
import os
from pathlib import Path

FAMILIES = ("sd", "sdxl")
SUPPORTED = "Stable Diffusion 1.x / 2.x (StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline) folders"


def read_model_index(source: str | os.PathLike, **hub_kwargs) -> dict:
    """``model_index.json`` of a local folder or (through diffusers' config loader) a Hub id."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            raise ValueError(f"{str(source)!r} has no model_index.json: not a diffusers pipeline folder ({SUPPORTED} "
                             "are).")
        return json.loads(index_file.read_text(encoding="utf-8"))
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(str(source), **hub_kwargs))


def family_from_index(index: dict, source: str = "the model") -> str:
    """``"sd"`` or ``"sdxl"`` from a ``model_index.json`` dict; ``ValueError`` naming the pipeline class and
    components found otherwise (an SDXL refiner, SD3, Flux, PixArt, a folder without a UNet, ...)."""
    components = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, (list, tuple))
                        and v[0] is not None)
    has = set(components)
    if {"unet", "vae", "text_encoder", "tokenizer"} <= has:
        return "sdxl" if {"text_encoder_2", "tokenizer_2"} <= has else "sd"
    raise ValueError(
        f"{source!r} is a {index.get('_class_name', 'pipeline of unknown class')} with components {components}; "
        f"lcm-kit runs {SUPPORTED} (a UNet, a VAE and one or two CLIP text encoders)."
    )


def detect_family(source: str | os.PathLike, **hub_kwargs) -> str:
    """``"sd"`` or ``"sdxl"`` for a diffusers folder or Hub id (see :func:`family_from_index`)."""
    return family_from_index(read_model_index(source, **hub_kwargs), str(source))


def pipeline_class_for(family: str):
    """LCMPipeline for ``"sd"``, LCMXLPipeline for ``"sdxl"``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
    from .pipeline_lcm import LCMPipeline
    from .pipeline_lcm_xl import LCMXLPipeline

    return LCMXLPipeline if family == "sdxl" else LCMPipeline
