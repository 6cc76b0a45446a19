"""``lcm-kit generate``: few-step text-to-image with an LCM or an LCM-LoRA, saved as a PNG (a grid if several).

    lcm-kit generate --model tiny-sd1 --prompt "a red cube" --output cube.png
    lcm-kit generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --lora latent-consistency/lcm-lora-sdv1-5 --prompt "a photo of a cat" --output cat.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from diffusers.utils import make_image_grid

from ..pipelines import LCMPipeline
from ..testing import tiny_sd_components
from ..utils import DTYPES, dtype_kwarg, resolve_device, resolve_dtype

TINY_MODELS = ("tiny-sd1",)  # built offline from lcm_kit.testing; run anywhere, produce noise-like images


def load_pipeline(model: str, lora: str | None = None, device: str | None = None, dtype=None):
    """An ``LCMPipeline`` from ``model`` (a local diffusers folder, a Hub id, or ``"tiny-sd1"`` for the offline
    tiny kit), with the LoRA ``lora`` (a file, folder or Hub id) loaded by ``pipe.load_lora_weights``.

    Raises ``FileNotFoundError`` for a missing local path and ``OSError`` naming the model/LoRA when it cannot be
    loaded (e.g. a Hub id while offline)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if model in TINY_MODELS:
        pipe = LCMPipeline(**tiny_sd_components(model.removeprefix("tiny-")), requires_safety_checker=False)
        if dtype != torch.float32:  # the kit builds float32
            pipe.to(dtype=dtype)
    else:
        _check_local_path("model", model)
        try:
            pipe = LCMPipeline.from_pretrained(model, **{dtype_kwarg(): dtype})
        except (OSError, ValueError) as err:
            raise OSError(
                f"Cannot load model {model!r}: not a diffusers folder here and not reachable on the Hugging Face "
                f"Hub ({type(err).__name__}: {err}). Offline? Use a local folder or --model tiny-sd1."
            ) from err
    if lora is not None:
        _check_local_path("lora", lora)
        try:
            pipe.load_lora_weights(lora)
        except (OSError, ValueError) as err:
            raise OSError(f"Cannot load LoRA {lora!r} ({type(err).__name__}: {err}).") from err
    return pipe.to(device)


def image_grid(images):
    """One PIL image: a single image as is, several as a near-square grid (rows x cols == len(images))."""
    if len(images) == 1:
        return images[0]
    rows = max(r for r in range(1, math.isqrt(len(images)) + 1) if len(images) % r == 0)
    return make_image_grid(images, rows=rows, cols=len(images) // rows)


def _check_local_path(what: str, value: str) -> None:
    # A value that looks like a path (not an "owner/name" Hub id) must exist: say so instead of asking the Hub.
    path = Path(value).expanduser()
    looks_like_path = value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1
    if looks_like_path and not path.exists():
        raise FileNotFoundError(f"--{what} {value!r}: no such file or folder.")


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="few-step text-to-image with an LCM or an LCM-LoRA",
        description="Generate images in a few steps with LCMPipeline and save them as a PNG (a grid if several).",
    )
    p.add_argument("--model", default="tiny-sd1", help="diffusers folder, Hub id, or 'tiny-sd1' (offline tiny kit)")
    p.add_argument("--lora", default=None, help="LoRA file, folder or Hub id (e.g. latent-consistency/lcm-lora-sdv1-5)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", default=None, help="only used with --guidance_scale > 1 on an LCM-LoRA")
    p.add_argument("--num_inference_steps", type=int, default=4)
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="LCM-LoRA: 1.0 (default, no CFG) to 2.0; distilled LCM: its distillation w + 1 (default 8.5)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--num_images", type=int, default=1, help="images per prompt; several are saved as a grid")
    p.add_argument("--output", default="lcm.png", help="PNG path; its folder must exist")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: float16 on CUDA, float32 otherwise")
    p.set_defaults(func=run_generate, parser=p)


def run_generate(args: argparse.Namespace) -> int:
    output = Path(args.output).expanduser()
    if output.suffix.lower() != ".png":
        args.parser.error(f"--output must be a .png file, got {args.output!r}.")
    if not output.parent.is_dir():
        args.parser.error(f"--output {args.output!r}: folder {str(output.parent)!r} does not exist.")
    if args.num_images < 1:
        args.parser.error(f"--num_images must be >= 1, got {args.num_images}.")

    try:
        pipe = load_pipeline(args.model, args.lora, args.device, args.dtype)
    except (OSError, ValueError) as err:
        raise SystemExit(f"lcm-kit generate: error: {err}") from err
    # A CPU generator gives the same image for a seed on every device (diffusers draws on CPU, then moves).
    generator = torch.Generator("cpu").manual_seed(args.seed)
    try:
        images = pipe(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            height=args.height,
            width=args.width,
            num_images_per_prompt=args.num_images,
            generator=generator,
        ).images
    except ValueError as err:
        raise SystemExit(f"lcm-kit generate: error: {err}") from err
    image_grid(images).save(output)
    print(f"saved {len(images)} image(s) to {output}")
    return 0
