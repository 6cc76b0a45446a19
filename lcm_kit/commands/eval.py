"""``lcm-kit eval``: score a pipeline folder (optionally with a LoRA) on the digits domain.

    lcm-kit eval                                              # the shipped teacher, DPM-Solver 25 steps
    lcm-kit eval --scheduler ddim --steps 1 2 4 --guidance_scale 3
    lcm-kit eval --lora out/lcm-lora --scheduler lcm --steps 1 2 4 --guidance_scale 1 --json metrics.json

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
from ..eval.metrics import SCHEDULERS, evaluate_pipeline, format_table, load_classifier
from ..utils import DTYPES, dtype_kwarg, resolve_device, resolve_dtype


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an ``argparse`` subparsers object; its ``func`` returns an exit code."""
    p = subparsers.add_parser(
        "eval",
        help="prompt accuracy and Fréchet distance of a digits pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=run_eval, parser=p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="diffusers folder (default: the shipped digits teacher)")
    p.add_argument("--lora", default=None, help="LoRA file or folder loaded with pipe.load_lora_weights")
    p.add_argument("--scheduler", nargs="+", default=["dpmsolver"], choices=SCHEDULERS,
                   help="dpmsolver; ddim (timestep_spacing='trailing'); lcm (diffusers LCMScheduler); "
                        "consistency (lcm-kit ConsistencyScheduler); default (the folder's own)")
    p.add_argument("--steps", nargs="+", type=int, default=[25], help="num_inference_steps values")
    p.add_argument("--guidance_scale", nargs="+", type=float, default=[3.0], help="guidance values")
    p.add_argument("--num_per_digit", type=int, default=20, help="samples per digit (10 digits)")
    p.add_argument("--seed", type=int, default=0, help="image i uses noise seed seed + i")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--classifier", default=None, help="classifier folder (default: the shipped one)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, ...")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: float16 on CUDA, float32 otherwise")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
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


def _run_eval(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("steps", "guidance_scale"):
        values = getattr(args, name)
        if any(v <= 0 for v in values):
            raise ValueError(f"--{name} values must be > 0, got {values!r}.")
    if args.num_per_digit < 2:
        raise ValueError(f"--num_per_digit must be >= 2 (FD needs a covariance), got {args.num_per_digit!r}.")
    model = Path(args.model) if args.model else digits.teacher_path()
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"--model {str(model)!r}: not a diffusers folder (no model_index.json).")

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    # The stock pipeline runs every sampler: real CFG for teacher rows, LCMScheduler/ConsistencyScheduler steps
    # for consistency rows, and the w-embedding of a fully distilled UNet (time_cond_proj_dim) when present.
    pipe = StableDiffusionPipeline.from_pretrained(model, **{dtype_kwarg(): dtype})
    if args.lora:
        pipe.load_lora_weights(args.lora)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(args.classifier, device=device)

    rows = []
    combos = list(itertools.product(args.scheduler, args.steps, args.guidance_scale))
    for scheduler, steps, guidance in tqdm(combos, desc="eval rows", dynamic_ncols=True):
        name = f"{scheduler}{' + LoRA' if args.lora else ''}"
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
    parser = argparse.ArgumentParser(prog="lcm-kit eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(eval_main())
