"""``lcm-kit eval``: score a pipeline folder (optionally with a LoRA) on the digits domain.

    lcm-kit eval                                              # the shipped teacher, DPM-Solver 25 steps
    lcm-kit eval --scheduler ddim --steps 1 2 4 --guidance_scale 3
    lcm-kit eval --lora out/lcm-lora --scheduler lcm --steps 1 2 4 --guidance_scale 1 --json metrics.json

--lora is loaded strictly: safetensors files only (never unpickled), every tensor applied or an error.

Every combination of ``--scheduler`` x ``--steps`` x ``--guidance_scale`` is one row of the printed table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from .. import digits
from ..argtypes import MAX_SEED, CommandParser, device_name, float_range, int_range
from ..eval.metrics import SCHEDULERS, evaluate_pipeline, format_table, load_classifier
from ..lora import load_lora_weights_strict
from ..utils import DTYPES, dtype_kwarg, resolve_device, resolve_dtype
from .generate import model_load_error


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an ``argparse`` subparsers object; its ``func`` returns an exit code."""
    p = subparsers.add_parser(
        "eval",
        help="prompt accuracy and Fréchet distance of a digits pipeline",
        description=__doc__,
    )
    _add_arguments(p)
    p.set_defaults(func=run_eval, parser=p)
    return p


def add_model_arguments(p: argparse.ArgumentParser, lora_note: str = "") -> None:
    """``--model`` and ``--lora`` of the digits commands that use :func:`load_digits_pipeline`."""
    p.add_argument("--model", default=None,
                   help="diffusers folder; without it the shipped digits teacher (lcm_kit.digits.teacher_path())")
    p.add_argument("--lora", default=None,
                   help="LoRA .safetensors file or folder, loaded strictly (lcm_kit.lora.load_lora_weights_strict: "
                        f"safetensors only, every tensor applied){lora_note}")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """``--batch_size``, ``--classifier``, ``--device`` and ``--dtype`` of the same commands."""
    p.add_argument("--batch_size", type=int_range(1), default=100, help="images per pipeline call")
    p.add_argument("--classifier", default=None, help="classifier folder; without it the shipped one")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: float16 on CUDA, float32 otherwise")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--scheduler", nargs="+", default=["dpmsolver"], choices=SCHEDULERS,
                   help="dpmsolver; ddim (timestep_spacing='trailing'); lcm (diffusers LCMScheduler); "
                        "consistency (lcm-kit ConsistencyScheduler); tcd (diffusers TCDScheduler, for PCM / TCD "
                        "LoRAs; the pipeline's eta is 0, PCM's value); default (the folder's own)")
    p.add_argument("--steps", nargs="+", type=int_range(1), default=[25], help="num_inference_steps values")
    p.add_argument("--guidance_scale", nargs="+", type=float_range(0.0, low_inclusive=False), default=[3.0],
                   help="guidance values")
    p.add_argument("--num_per_digit", type=int_range(2), default=20,
                   help="samples per digit (10 digits; FD needs at least 2)")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=0, help="image i uses noise seed seed + i")
    add_runtime_arguments(p)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file (its folder must exist)")
    p.add_argument("--standard_metrics", action="store_true",
                   help="also FID / CLIP score via torchmetrics when installed and its weights are local "
                        "(otherwise skipped with the reason)")


def run_eval(args: argparse.Namespace) -> int:
    """Load the pipeline, evaluate every row, print the table, optionally write JSON. Bad arguments and
    unloadable folders exit with ``lcm-kit eval: error: ...``."""
    try:
        return _run_eval(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise SystemExit(f"lcm-kit eval: error: {error}") from error


def load_digits_pipeline(args: argparse.Namespace):
    """The checks and loading ``lcm-kit eval`` and ``lcm-kit tune-steps`` share: ``--model`` (default the shipped
    digits teacher) as a stock ``StableDiffusionPipeline`` with ``--lora`` loaded strictly, ``--classifier``, and a
    ``--json`` path checked before any sampling. Returns ``(model folder, pipe, classifier)``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = Path(args.model).expanduser() if args.model else digits.teacher_path()
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"--model {str(model)!r}: not a diffusers folder (no model_index.json).")
    if args.classifier is not None and not Path(args.classifier).expanduser().is_dir():
        raise FileNotFoundError(f"--classifier {args.classifier!r}: no such folder.")
    if args.json is not None:  # checked before the work, not after it
        json_file = Path(args.json).expanduser()
        if json_file.is_dir() or not json_file.parent.is_dir():
            raise ValueError(f"--json {args.json!r}: must be a file in an existing folder.")

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    # The stock pipeline runs every sampler: real CFG for teacher rows, LCMScheduler/ConsistencyScheduler steps
    # for consistency rows, and the w-embedding of a fully distilled UNet (time_cond_proj_dim) when present.
    # use_safetensors=True: diffusers would otherwise fall back to unpickling *.bin weights.
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model, use_safetensors=True, **{dtype_kwarg(): dtype})
    except (OSError, ValueError) as error:
        raise OSError(model_load_error("model", str(model), error)) from error
    if args.lora is not None:
        try:
            load_lora_weights_strict(pipe, args.lora)
        except ValueError as error:
            raise ValueError(f"--lora {args.lora!r}: {error}") from error
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return model, pipe, load_classifier(args.classifier, device=device)


def _run_eval(args: argparse.Namespace) -> int:
    model, pipe, classifier = load_digits_pipeline(args)

    rows = []
    combos = list(itertools.product(args.scheduler, args.steps, args.guidance_scale))
    for scheduler, steps, guidance in tqdm(combos, desc="eval rows", dynamic_ncols=True):
        name = f"{scheduler}{' + LoRA' if args.lora is not None else ''}"
        rows.append(
            evaluate_pipeline(
                pipe, scheduler, steps, guidance, num_per_digit=args.num_per_digit, seed=args.seed, name=name,
                classifier=classifier, batch_size=args.batch_size, standard_metrics=args.standard_metrics,
            )
        )
    print(format_table(rows))
    for row in rows:
        extra = row.get("standard_metrics")
        if extra is None:
            continue
        values = {k: v for k, v in extra.items() if k != "skipped"}
        print(f"{row['name']} {row['steps']} steps, guidance {row['guidance_scale']:g}: {values or ''}")
        for metric, reason in extra["skipped"].items():
            print(f"  {metric} skipped: {reason}")
    if args.json:
        payload = {"model": str(model), "lora": args.lora, "num_per_digit": args.num_per_digit,
                   "seed": args.seed, "rows": rows}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def eval_main(argv=None) -> int:
    """``lcm-kit eval`` as a function (``argv`` without the subcommand name)."""
    parser = CommandParser(prog="lcm-kit eval", description=__doc__)
    _add_arguments(parser)
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(eval_main())
