"""``lcm-kit tune-steps``: measure the best K-step timestep list of a few-step sampler on the digits domain.

    lcm-kit tune-steps --lora out/lcm-lora --steps 4                     # ConsistencyScheduler, guidance 1
    lcm-kit tune-steps --lora out/pcm-lora --steps 2 --scheduler tcd --original_inference_steps 10
    lcm-kit tune-steps --scheduler dpmsolver --guidance_scale 3 --steps 2 --json tuned.json   # the bare teacher

Few-step samplers take an explicit list (``pipe(..., timesteps=[999, 499])``); DMD2 / SDXL-Lightning ship
hand-picked ones such as [999, 749, 499, 249]. This command searches the K-step list (strictly decreasing, first
timestep 999 unless --search_first) that minimises the digits harness' Fréchet distance (FD, lower is better): it
starts from the evenly spaced list, tries each position on a coarse grid (--coarse_stride) inside the interval its
neighbours allow, refines around the best with halved strides (--rounds) and repeats the sweep (--sweeps). It prints
the best list, ready to paste into ``timesteps=``, and a table comparing it with the evenly spaced list.

Every list is scored on the same images: image i starts from noise seed --seed + i. The default seed, 100, is
deliberately not one ``lcm-kit eval`` uses (0, 1, ...), so the tuned list is not fitted to the noise it is later
evaluated on. FD from few images is noisy: tune with --num_per_digit 20 or more and check the result on other seeds.

--lora is loaded strictly: safetensors files only (never unpickled), every tensor applied or an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import digits
from ..argtypes import MAX_SEED, CommandParser, float_range, int_range
from ..eval.metrics import SCHEDULERS
from ..eval.tune import digits_fd_score, search_timesteps
from .eval import add_model_arguments, add_runtime_arguments, load_digits_pipeline

# Schedulers with a distillation grid (their `original_inference_steps` config key).
GRID_SCHEDULERS = ("lcm", "consistency", "tcd")
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000  # diffusers' default when the scheduler config does not say


def add_tune_steps_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``tune-steps`` subcommand to an ``argparse`` subparsers object; its ``func`` returns an exit code."""
    p = subparsers.add_parser(
        "tune-steps",
        help="search the K-step timestep list with the lowest digits FD",
        description=__doc__,
    )
    _add_arguments(p)
    p.set_defaults(func=run_tune_steps, parser=p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, lora_note="; without it the bare model is tuned")
    p.add_argument("--steps", type=int_range(1), required=True,
                   help="K, the length of the timestep list (at most the model's num_train_timesteps)")
    p.add_argument("--scheduler", default="consistency", choices=SCHEDULERS,
                   help="consistency (lcm-kit ConsistencyScheduler) or lcm (diffusers LCMScheduler) for LCM models "
                        "and LoRAs; tcd (diffusers TCDScheduler) for PCM / TCD LoRAs; dpmsolver for a teacher; "
                        "default (the folder's own, if it takes a timesteps list). Not ddim: DDIMScheduler takes no "
                        "custom timesteps list")
    p.add_argument("--eta", type=float_range(0.0, 1.0), default=None,
                   help="TCD's stochasticity gamma, passed to the pipeline call; only with --scheduler tcd (without "
                        "it the pipeline's default, 0: PCM's value)")
    p.add_argument("--original_inference_steps", type=int_range(1), default=None,
                   help="the distillation grid size N, set in the scheduler config; only with --scheduler lcm, "
                        "consistency or tcd (without it the scheduler's default, 50)")
    p.add_argument("--guidance_scale", type=float_range(0.0, low_inclusive=False), default=1.0,
                   help="1.0 for distilled LoRAs (the guidance is baked in); a teacher needs its CFG, e.g. 3")
    p.add_argument("--num_per_digit", type=int_range(2), default=20,
                   help="samples per digit for each list scored (10 digits; FD needs at least 2)")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=100,
                   help="image i uses noise seed seed + i; not an eval seed (0, 1, ...), so tuning does not fit the "
                        "evaluation noise")
    p.add_argument("--coarse_stride", type=int_range(1), default=50,
                   help="stride of the coarse grid 999, 999 - stride, ... each position is tried on")
    p.add_argument("--rounds", type=int_range(0), default=3,
                   help="refinements with halved strides after the coarse grid (50 -> 25 -> 12 -> 6)")
    p.add_argument("--sweeps", type=int_range(1), default=2,
                   help="passes over the positions (fewer when a pass changes nothing)")
    p.add_argument("--search_first", action="store_true",
                   help="also search the first timestep (default: fixed at num_train_timesteps - 1, where sampling "
                        "starts from pure noise)")
    add_runtime_arguments(p)
    p.add_argument("--json", default=None,
                   help="also write the result (best and evenly spaced lists with their scores, every list scored, "
                        "all settings) to this JSON file (its folder must exist)")


def run_tune_steps(args: argparse.Namespace) -> int:
    """Check the flags, load the pipeline, search, print the list and the table, optionally write JSON. Flags that
    do not fit together exit with a usage error (code 2); unloadable folders with ``lcm-kit tune-steps: error:``."""
    _check_flags(args, args.parser)
    try:
        return _run_tune_steps(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise SystemExit(f"lcm-kit tune-steps: error: {error}") from error


def _check_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.lora is not None and not Path(args.lora).expanduser().exists():
        parser.error(f"argument --lora: {args.lora!r}: no such file or folder (a LoRA .safetensors file or a folder "
                     "holding pytorch_lora_weights.safetensors)")
    if args.scheduler == "ddim":
        parser.error("argument --scheduler: ddim cannot be tuned: DDIMScheduler.set_timesteps takes no custom "
                     "timesteps list; use dpmsolver for a teacher, consistency / lcm for LCM models and LoRAs, tcd "
                     "for PCM / TCD LoRAs")
    if args.eta is not None and args.scheduler != "tcd":
        parser.error(f"argument --eta: only with --scheduler tcd (TCDScheduler's gamma), got --scheduler "
                     f"{args.scheduler}; leave out --eta")
    if args.original_inference_steps is not None and args.scheduler not in GRID_SCHEDULERS:
        parser.error(f"argument --original_inference_steps: only with --scheduler {', '.join(GRID_SCHEDULERS)} (the "
                     f"distillation grid size), got --scheduler {args.scheduler}; leave it out")
    model = Path(args.model).expanduser() if args.model else digits.teacher_path()
    if not (model / "model_index.json").is_file():
        return  # reported by _run_tune_steps, as lcm-kit eval does
    num_train_timesteps = _num_train_timesteps(model)
    if args.steps > num_train_timesteps:
        parser.error(f"argument --steps: at most {num_train_timesteps} (the model's num_train_timesteps: a list of "
                     f"distinct timesteps in [0, {num_train_timesteps - 1}]), got {args.steps}")
    if args.original_inference_steps is not None and args.original_inference_steps > num_train_timesteps:
        parser.error(f"argument --original_inference_steps: at most {num_train_timesteps} (the model's "
                     f"num_train_timesteps), got {args.original_inference_steps}")


def _num_train_timesteps(model: Path) -> int:
    """The scheduler config's ``num_train_timesteps``, read without loading the pipeline."""
    config = model / "scheduler" / "scheduler_config.json"
    try:
        return int(json.loads(config.read_text()).get("num_train_timesteps", DEFAULT_NUM_TRAIN_TIMESTEPS))
    except (OSError, ValueError, TypeError, AttributeError):
        return DEFAULT_NUM_TRAIN_TIMESTEPS  # an unreadable config fails, with its own message, when loading


def _run_tune_steps(args: argparse.Namespace) -> int:
    model, pipe, classifier = load_digits_pipeline(args)

    scheduler_config = {}
    if args.original_inference_steps is not None:
        scheduler_config["original_inference_steps"] = args.original_inference_steps
    call_kwargs = {} if args.eta is None else {"eta": args.eta}
    try:
        score = digits_fd_score(pipe, args.scheduler, num_per_digit=args.num_per_digit, seed=args.seed,
                                guidance_scale=args.guidance_scale, classifier=classifier,
                                scheduler_config=scheduler_config, batch_size=args.batch_size, **call_kwargs)
    except ValueError as error:
        raise ValueError(f"--scheduler {args.scheduler}: {error}") from error
    result = search_timesteps(score, args.steps, num_train_timesteps=pipe.scheduler.config.num_train_timesteps,
                              search_first=args.search_first, coarse_stride=args.coarse_stride, rounds=args.rounds,
                              sweeps=args.sweeps)
    start_row, best_row = score.rows[tuple(result.start)], score.rows[tuple(result.best)]

    print(_format_lists([("evenly spaced", start_row), ("tuned", best_row)]))
    scored = f"{len(result.history)} list{'s' if len(result.history) != 1 else ''}"
    verdict = "" if result.best != result.start else "; the evenly spaced list is the best one found"
    print(f"\nbest {args.steps}-step timesteps for {args.scheduler}{' + LoRA' if args.lora else ''} "
          f"(FD {result.best_score:.3f}, evenly spaced {result.start_score:.3f}; {scored} scored on {best_row['n']} "
          f"images each, seed {args.seed}{verdict}):")
    print(result.best)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("func", "parser", "command")}
        payload = {
            "model": str(model), "lora": args.lora, "settings": settings, "strides": result.strides,
            "best": result.best, "best_fd": result.best_score, "best_accuracy": best_row["accuracy"],
            "start": result.start, "start_fd": result.start_score, "start_accuracy": start_row["accuracy"],
            "history": [{"timesteps": ts, "fd": fd, "accuracy": score.rows[tuple(ts)]["accuracy"]}
                        for ts, fd in result.history],
        }
        Path(args.json).expanduser().write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _format_lists(named_rows) -> str:
    """A Markdown table in :func:`lcm_kit.eval.metrics.format_table`'s style: list, steps, timesteps, accuracy %, FD."""
    lines = ["| list | steps | timesteps | accuracy % | FD |", "|---|---:|---|---:|---:|"]
    for name, row in named_rows:
        lines.append(f"| {name} | {row['steps']} | {row['timesteps']} | {100 * row['accuracy']:.1f} | "
                     f"{row['fd']:.3f} |")
    return "\n".join(lines)


def tune_steps_main(argv=None) -> int:
    """``lcm-kit tune-steps`` as a function (``argv`` without the subcommand name)."""
    parser = CommandParser(prog="lcm-kit tune-steps", description=__doc__)
    _add_arguments(parser)
    parser.set_defaults(parser=parser)
    return run_tune_steps(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(tune_steps_main())
