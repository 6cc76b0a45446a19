"""The ``lcm-kit`` command.

    lcm-kit generate --model tiny-sd1 --prompt "a red cube" --output cube.png
    lcm-kit generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --lora latent-consistency/lcm-lora-sdv1-5 --prompt "a photo of a cat" --output cat.png

Adding a subcommand is one function and one registration: write ``add_<name>_parser(subparsers)`` that builds its
parser and sets ``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code) with
``set_defaults``, then append it to ``SUBCOMMANDS``. Heavy imports (torch, diffusers) stay inside the ``func``s so
``lcm-kit --help`` is instant.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

TINY_MODELS = ("tiny-sd1",)  # built offline from lcm_kit.testing; run anywhere, produce noise-like images
DTYPES = ("auto", "float32", "float16", "bfloat16")


# --------------------------------------------------------------------------------------------------------------
# shared helpers (also used by examples and later subcommands)
# --------------------------------------------------------------------------------------------------------------


def resolve_device(device: str | None = None) -> str:
    """``None``/``"auto"`` -> ``"cuda"`` if available, else ``"mps"`` if available, else ``"cpu"``."""
    import torch

    if device not in (None, "auto"):
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str | None, device: str):
    """``"auto"`` -> float16 on CUDA (the usual inference precision), float32 elsewhere."""
    import torch

    if dtype in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    return getattr(torch, dtype)


def load_pipeline(model: str, lora: str | None = None, device: str | None = None, dtype=None):
    """An ``LCMPipeline`` from ``model`` (a local diffusers folder, a Hub id, or ``"tiny-sd1"`` for the offline
    tiny kit), with the LoRA ``lora`` (a file, folder or Hub id) loaded by ``pipe.load_lora_weights``.

    Raises ``FileNotFoundError`` for a missing local path and ``OSError`` naming the model/LoRA when it cannot be
    loaded (e.g. a Hub id while offline)."""
    import torch

    from lcm_kit.pipelines import LCMPipeline

    device = resolve_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    if model in TINY_MODELS:
        from lcm_kit.testing import tiny_sd_components

        pipe = LCMPipeline(**tiny_sd_components(model.removeprefix("tiny-")), requires_safety_checker=False)
        if dtype != torch.float32:  # the kit builds float32
            pipe.to(dtype=dtype)
    else:
        _check_local_path("model", model)
        try:
            pipe = LCMPipeline.from_pretrained(model, **{_dtype_kwarg(): dtype})
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
    from diffusers.utils import make_image_grid

    if len(images) == 1:
        return images[0]
    rows = max(r for r in range(1, math.isqrt(len(images)) + 1) if len(images) % r == 0)
    return make_image_grid(images, rows=rows, cols=len(images) // rows)


def _dtype_kwarg() -> str:
    # diffusers renamed from_pretrained's `torch_dtype` to `dtype` (the old name now warns); older releases only
    # know `torch_dtype`.
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


def _check_local_path(what: str, value: str) -> None:
    # A value that looks like a path (not an "owner/name" Hub id) must exist: say so instead of asking the Hub.
    path = Path(value).expanduser()
    looks_like_path = value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1
    if looks_like_path and not path.exists():
        raise FileNotFoundError(f"--{what} {value!r}: no such file or folder.")


# --------------------------------------------------------------------------------------------------------------
# lcm-kit generate
# --------------------------------------------------------------------------------------------------------------


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

    import torch

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


# --------------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------------

def _add_eval_parser(subparsers) -> None:
    from lcm_kit.eval.cli import add_eval_parser  # argparse only at import time; torch stays lazy

    add_eval_parser(subparsers)


def _add_quickstart_parser(subparsers) -> None:
    from lcm_kit.quickstart import add_quickstart_parser  # argparse only at import time; torch stays lazy

    add_quickstart_parser(subparsers)


SUBCOMMANDS = [add_generate_parser, _add_eval_parser, _add_quickstart_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcm-kit", description="Latent consistency models for diffusers.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``lcm-kit`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
