"""Per-sample transforms: image decoding and RGB conversion, resize / crop / flip, caption choice, collation."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for every random choice about sample ``index`` in ``epoch`` (independent of workers)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


def check_resolution(resolution: Any) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution <= 0:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    return int(resolution)


#: The most an image is upscaled: its shorter side must be at least ``resolution / MAX_UPSCALE``. Beyond that an
#: image holds less than one pixel per 8x8 output block (nothing to learn from), and a thin strip, scaled on both
#: sides, would take gigabytes.
MAX_UPSCALE = 8


def check_image_size(image: Image.Image, resolution: int) -> None:
    """Refuse an image too small to train at ``resolution`` (shorter side below ``resolution / MAX_UPSCALE``)."""
    width, height = image.size
    if min(width, height) * MAX_UPSCALE < resolution:
        raise ValueError(
            f"the image is {width}x{height} pixels, too small for resolution {resolution}: its shorter side must be "
            f"at least {-(-resolution // MAX_UPSCALE)} (resolution / {MAX_UPSCALE}); remove it, or lower the resolution"
        )


def open_image(value: Any, base_dir: Path | None = None) -> Image.Image:
    """Decode a dataset image value (PIL image, ``{"bytes", "path"}`` dict, path string or raw bytes) to RGB.

    The pixels are decoded here (not lazily later), so a corrupt or truncated file fails in this call."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, Mapping) and (value.get("bytes") is not None or value.get("path") is not None):
        if value.get("bytes") is None:
            return open_image(value["path"], base_dir)
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ValueError(f"image file {str(path)!r} (from the image column value {str(value)!r}) does not exist")
        image = Image.open(path)
    elif isinstance(value, (bytes, bytearray)):
        if not value:
            raise ValueError("the image member is empty (0 bytes)")
        image = Image.open(io.BytesIO(value))
    else:
        raise TypeError(
            f"image value of type {type(value).__name__} is not supported: expected a PIL image, a "
            "{'bytes','path'} dict, a path string or encoded image bytes"
        )
    image.load()
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited over white (instead of whatever colour hides under alpha=0)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def choose_caption(value: Any, rng: np.random.Generator, where: str | None = None) -> str:
    """A caption string; a list of captions yields one picked with ``rng``. ``where`` names the sample in the
    error."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return value[int(rng.integers(len(value)))]
    raise ValueError(
        f"{'the caption' if where is None else f'caption of {where}'} is {value!r}: expected a string or a "
        "non-empty list of strings (fill missing captions in the dataset, or choose another caption_column)"
    )


def preprocess_image(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    random_flip: bool,
    rng: np.random.Generator | None = None,
    flip: bool | None = None,
) -> torch.Tensor:
    """:func:`preprocess_image_and_geometry` without the geometry."""
    return preprocess_image_and_geometry(image, resolution, center_crop, random_flip, rng, flip)[0]


def flipped_crop_top_left(original_size, crop_top_left, resolution: int) -> tuple[int, int]:
    """The crop corner in the mirrored resized image of a crop taken at ``crop_top_left`` (``original_size`` is
    (height, width) before the resize)."""
    height, width = original_size
    new_w = max(resolution, round(width * resolution / min(width, height)))
    top, left = crop_top_left
    return top, new_w - left - resolution


def preprocess_image_and_geometry(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    random_flip: bool,
    rng: np.random.Generator | None = None,
    flip: bool | None = None,
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to ``resolution`` (bilinear), crop a square, maybe flip, scale to [-1, 1].

    Args:
        image: a PIL image (converted to RGB first if needed).
        resolution: output side length.
        center_crop: crop the centre; otherwise a random window drawn from ``rng``.
        random_flip: mirror horizontally with probability 0.5 (drawn from ``rng`` after the crop).
        rng: the sample's generator (required for a random crop or flip).
        flip: force the flip decision (used by the encoded cache), overriding ``random_flip``.

    Raises:
        ValueError: the image's shorter side is below ``resolution / MAX_UPSCALE``.

    Returns:
        float32 pixel values ``(3, resolution, resolution)`` in [-1, 1]; the image's ``(height, width)`` before the
        resize and the crop's ``(top, left)`` corner in the resized image, mirrored with the image when flipped
        (SDXL's micro-conditioning; diffusers' SDXL scripts write ``resolution - left`` there, which is not the
        flipped crop's corner).
    """
    resolution = check_resolution(resolution)
    check_image_size(image, resolution)
    if image.mode != "RGB":
        image = to_rgb(image)
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if center_crop:
        top, left = round((new_h - resolution) / 2.0), round((new_w - resolution) / 2.0)
    else:
        if rng is None:
            raise ValueError("rng is required for a random crop (center_crop=False)")
        top = int(rng.integers(0, new_h - resolution + 1))
        left = int(rng.integers(0, new_w - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip is None:
        if random_flip and rng is None:
            raise ValueError("rng is required for random_flip=True")
        flip = bool(random_flip and rng.random() < 0.5)
    crop_top_left = (top, left)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        crop_top_left = flipped_crop_top_left((height, width), crop_top_left, resolution)
    array = np.asarray(image, dtype=np.float32)
    pixels = torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    return pixels, (height, width), crop_top_left


def collate_text_image(examples: list[dict]) -> dict:
    """Stack tensors, keep captions as a list of strings (the batch layout of every lcm-kit loader)."""
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        batch[key] = values if key == "captions" else torch.stack(values)
    return batch
