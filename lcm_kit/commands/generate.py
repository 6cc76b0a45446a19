"""``lcm-kit generate``: few-step text-to-image with an LCM or an LCM-LoRA, saved as a PNG (a grid if several);
see :data:`DESCRIPTION`. ``--lora`` is loaded by :func:`lcm_kit.lora.load_lora_weights_strict`.

"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from diffusers.utils import make_image_grid

from .. import digits
from ..argtypes import MAX_SEED, device_name, float_range, int_range
from ..lora import load_lora_weights_strict
from ..pipelines import LCMPipeline, LCMXLPipeline
from ..pipelines.families import detect_family, pipeline_class_for
from ..schedulers import ConsistencyScheduler, TrajectoryConsistencyScheduler
from ..testing import tiny_sd_components
from ..utils import DTYPES, dtype_kwarg, resolve_device, resolve_dtype

TINY_MODELS = ("tiny-sd1", "tiny-sdxl")  # built offline from lcm_kit.testing; run anywhere, produce noise-like images
MAX_SIDE = 8192  # pixels; far beyond any SD 1.x / 2.x model, small enough that a typo fails here, not in malloc

DESCRIPTION = """\
Generate images in a few steps with LCMPipeline and save them as a PNG (a grid if several).

    lcm-kit generate --prompt "a handwritten 7" --output seven.png              # the shipped digits teacher
    lcm-kit generate --lora lcm-quickstart/lcm-lora --prompt "a handwritten 7"  # ... with a distilled LCM-LoRA
    lcm-kit generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --lora latent-consistency/lcm-lora-sdv1-5 --prompt "a photo of a cat" --output cat.png
    lcm-kit generate --model stabilityai/stable-diffusion-xl-base-1.0 \\
        --lora latent-consistency/lcm-lora-sdxl --prompt "a photo of a cat" --output cat-xl.png
    lcm-kit generate --lora pcm-lora --scheduler tcd --gamma 0 --original_inference_steps 10 \\
        --num_inference_steps 2 --prompt "a handwritten 7"                    # a PCM-LoRA (2 phases, 10-point grid)

--lora is loaded strictly: safetensors files only (a pickled .bin / .pt / .ckpt is refused, never unpickled), and
every tensor is applied, or the command stops with an error naming the file and what is wrong with it.
"""


# ----------------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------------


def load_pipeline(model: str | None = None, lora: str | None = None, device: str | None = None, dtype=None):
    """An ``LCMPipeline`` (SD 1.x / 2.x) or ``LCMXLPipeline`` (SDXL, told apart by ``model_index.json``) from
    ``model`` (a local diffusers folder, a Hub id, ``None`` for the shipped digits teacher, or ``"tiny-sd1"`` /
    ``"tiny-sdxl"`` for the offline tiny kit), with the LoRA ``lora`` (a file, folder or Hub id) loaded by
    :func:`lcm_kit.lora.load_lora_weights_strict` (safetensors only; every tensor applied or a ValueError).

    Raises ``FileNotFoundError`` for a missing local path, ``OSError`` naming the model when it cannot be loaded
    (e.g. a Hub id while offline) and ``ValueError`` naming the LoRA file and what is wrong with it."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if model in TINY_MODELS:
        kind = model.removeprefix("tiny-")
        if kind == "sdxl":
            pipe = LCMXLPipeline(**tiny_sd_components(kind))
        else:
            pipe = LCMPipeline(**tiny_sd_components(kind), requires_safety_checker=False)
        if dtype != torch.float32:  # the kit builds float32
            pipe.to(dtype=dtype)
    else:
        model = str(digits.teacher_path()) if model is None else model
        _check_local_path("model", model)
        try:
            pipeline_class = pipeline_class_for(detect_family(model))
        except OSError as err:
            raise OSError(model_load_error("model", model, err)) from err
        except ValueError as err:
            raise ValueError(f"--model: {err}") from err
        try:
            # use_safetensors=True: diffusers would otherwise fall back to unpickling *.bin weights.
            pipe = pipeline_class.from_pretrained(model, use_safetensors=True, **{dtype_kwarg(): dtype})
        except (OSError, ValueError) as err:
            raise OSError(model_load_error("model", model, err)) from err
    if lora is not None:
        _check_local_path("lora", lora)
        try:
            load_lora_weights_strict(pipe, lora)
        except ValueError as err:
            raise ValueError(f"--lora {lora!r}: {err}") from err
    return pipe.to(device)


def model_load_error(flag: str, model: str, err: Exception) -> str:
    """The message for a ``from_pretrained(model, use_safetensors=True)`` that failed: pickled weights, another
    local problem, or a Hub id that cannot be reached."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        pickled = sorted(str(p.relative_to(folder)) for p in folder.glob("*/*") if p.suffix in (".bin", ".pt", ".ckpt"))
        if pickled:
            return (f"--{flag} {model!r} holds pickled weights {pickled[:4]}: lcm-kit loads safetensors weights only "
                    "and never unpickles a file (unpickling can run code). If you trust the folder, convert it once: "
                    "DiffusionPipeline.from_pretrained(folder).save_pretrained(new_folder) writes safetensors.")
        return f"Cannot load model folder {model!r} ({type(err).__name__}: {err})."
    return (f"Cannot load model {model!r}: not a diffusers folder here and not reachable on the Hugging Face Hub "
            f"({type(err).__name__}: {err}). Offline? Use a local folder or leave out --{flag}.")


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
        description=DESCRIPTION,
    )
    p.add_argument("--model", default=None,
                   help="diffusers folder or Hub id (an SD 1.x / 2.x or SDXL model, or a distilled LCM); without it "
                        "the shipped digits teacher (lcm_kit.digits.teacher_path(), 32x32, prompts like 'a "
                        "handwritten 7'); 'tiny-sd1' / 'tiny-sdxl' are random offline test models that draw noise")
    p.add_argument("--lora", default=None,
                   help="LCM-LoRA .safetensors file, folder holding pytorch_lora_weights.safetensors, or Hub id "
                        "(e.g. latent-consistency/lcm-lora-sdv1-5), loaded strictly: safetensors only, every tensor "
                        "applied")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative_prompt", default=None,
                   help="only with --guidance_scale > 1 on an LCM-LoRA (real CFG); an error otherwise")
    p.add_argument("--num_inference_steps", type=int_range(1), default=4, help="denoising steps")
    p.add_argument(
        "--guidance_scale",
        type=float_range(0.0),
        default=None,
        help="without it: 1.0 for an SD model with an LCM-LoRA (no CFG; up to 2.0 is useful), 8.5 for a distilled "
             "LCM (its w + 1)",
    )
    p.add_argument("--scheduler", default=None, choices=("consistency", "tcd"),
                   help="consistency: LCM's sampler (LCMScheduler's); tcd: TCDScheduler's, for PCM and TCD models "
                        "and LoRAs; without it the model folder's own (an SD folder's: consistency)")
    p.add_argument("--gamma", type=float_range(0.0, 1.0), default=None,
                   help="trajectory stochasticity in [0, 1]: TCDScheduler's eta with --scheduler tcd (PCM: 0, "
                        "TCD: 0.3, its default); with consistency, 1 (LCM, the default) to 0 (deterministic)")
    p.add_argument("--original_inference_steps", type=int_range(1), default=None,
                   help="the skip grid the model was distilled on (--num_ddim_timesteps of the trainer; default: "
                        "the scheduler config's, 50 for SD folders)")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=0, help="seed of the CPU noise generator")
    p.add_argument("--height", type=int_range(8, MAX_SIDE, multiple_of=8), default=None,
                   help="pixels, a multiple of 8; without it the model's native size")
    p.add_argument("--width", type=int_range(8, MAX_SIDE, multiple_of=8), default=None,
                   help="pixels, a multiple of 8; without it the model's native size")
    p.add_argument("--num_images", type=int_range(1), default=1, help="images per prompt; several are saved as a grid")
    p.add_argument("--output", default="lcm.png", help="PNG path; its folder must exist")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: float16 on CUDA, float32 otherwise")
    p.set_defaults(func=run_generate, parser=p)


def run_generate(args: argparse.Namespace) -> int:
    output = Path(args.output).expanduser()
    if output.suffix.lower() != ".png":
        args.parser.error(f"--output must be a .png file, got {args.output!r}.")
    if not output.parent.is_dir():
        args.parser.error(f"--output {args.output!r}: folder {str(output.parent)!r} does not exist.")

    try:
        pipe = load_pipeline(args.model, args.lora, args.device, args.dtype)
    except (OSError, ValueError) as err:
        raise SystemExit(f"lcm-kit generate: error: {err}") from err
    scheduler_class = {"consistency": ConsistencyScheduler, "tcd": TrajectoryConsistencyScheduler}.get(args.scheduler)
    overrides = {} if args.original_inference_steps is None else {
        "original_inference_steps": args.original_inference_steps}
    if scheduler_class is not None:
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **overrides)
    elif overrides:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **overrides)
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
            gamma=args.gamma,
        ).images
    except ValueError as err:
        raise SystemExit(f"lcm-kit generate: error: {err}") from err
    image_grid(images).save(output)
    print(f"saved {len(images)} image(s) to {output}")
    return 0
