"""``lcm-kit quickstart``: distill the shipped digits teacher into an LCM-LoRA and show what it buys.

    lcm-kit quickstart --out lcm-quickstart          # 7-12 minutes on 2 CPU cores

1. writes the digits train split as a ``datasets`` folder (``save_to_disk``) and distills an LCM-LoRA from the
   shipped teacher with the installed package's trainer, ``accelerate launch -m lcm_kit.training.train_lcm_lora``
   (or its entry point in this process with ``--launcher inprocess``);
2. loads it with ``pipe.load_lora_weights`` into a stock ``StableDiffusionPipeline`` and scores the rows of the
   evaluation protocol (:mod:`lcm_kit.eval.protocol`) at the guidance the LoRA is distilled for; with ``--full``
   also a full-weight LCM (``lcm_kit.training.train_lcm``);
3. writes ``OUT/lcm-lora/pytorch_lora_weights.safetensors``, ``OUT/grid.png`` (one row per sampler, one column per
   digit 0-9, row labels on the left) and ``OUT/metrics.json``, and prints the table.

Everything is seeded by ``--seed`` (training noise, timesteps and data order; evaluation noise), so two runs on
the same machine and library versions give the same files. Library use::

    from lcm_kit.commands.quickstart import run_quickstart
    summary = run_quickstart("lcm-quickstart", seed=0)      # dict, also written to lcm-quickstart/metrics.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import diffusers
import torch
import transformers
from accelerate.state import AcceleratorState, GradientState

from .. import __version__, digits
from ..argtypes import MAX_SEED, device_name, float_range, int_range
from ..eval import format_table, load_classifier, real_floor
from ..eval.protocol import DEFAULT_GUIDANCE, GRID_COLUMNS, GRID_LABEL_WIDTH, evaluate_protocol, row_label
from ..training import train_lcm, train_lcm_lora
from ..utils import resolve_device

# The distillation recipe (flags of train_lcm_lora / train_lcm) for the digits teacher; how it was chosen is in
# benchmarks/RESULTS.md.
LORA_RECIPE = {
    "max_train_steps": 2000,
    "train_batch_size": 32,
    "learning_rate": 3e-4,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "lora_rank": 16,  # the UNet is only 32/64 channels wide
    "lora_alpha": 16,
    "num_ddim_timesteps": 10,  # skip k = 100: fewer links from t = 0 to t = 999 to propagate within the budget
    "solver": "heun",  # a long skip needs the second-order teacher step
    "loss_type": "huber",
    "huber_c": 0.001,
}
FULL_RECIPE = {
    "max_train_steps": 1000,
    "train_batch_size": 32,
    "learning_rate": 1e-4,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 0,
    "num_ddim_timesteps": 10,
    "solver": "heun",
    "loss_type": "huber",
    "huber_c": 0.001,
    "ema_decay": 0.95,
}
LAUNCHERS = ("accelerate", "inprocess")
TRAINER_MODULES = {False: "lcm_kit.training.train_lcm_lora", True: "lcm_kit.training.train_lcm"}


def write_digits_dataset(path: str | os.PathLike, seed: int = 0, split: str = "train") -> Path:
    """Save a digits split (``image``/``text``/``label`` columns, one caption per image drawn with ``seed``) as a
    ``datasets`` folder that ``--dataset_name`` of the trainers reads."""
    path = Path(path)
    digits.to_hf_dataset(split, seed=seed).save_to_disk(str(path))
    return path


def distillation_argv(
    teacher: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    seed: int = 0,
    guidance: float = DEFAULT_GUIDANCE,
    full: bool = False,
    **overrides,
) -> list[str]:
    """Flags of ``train_lcm_lora.py`` (``full=False``) or ``train_lcm.py`` for the quickstart: the tuned recipe
    (:data:`LORA_RECIPE` / :data:`FULL_RECIPE`), distilled for teacher CFG ``guidance`` (w = guidance - 1),
    with ``overrides`` (flag name without dashes -> value; ``None`` drops a flag) applied last."""
    if not guidance >= 1.0:
        raise ValueError(f"guidance must be >= 1 (CFG scale; LCM w = guidance - 1), got {guidance!r}.")
    w = guidance - 1.0
    flags = dict(FULL_RECIPE if full else LORA_RECIPE)
    flags.update(w_min=w, w_max=w)  # the fixed guidance the LoRA is compared at
    flags.update(overrides)
    argv = [
        "--pretrained_teacher_model", str(teacher),
        "--dataset_name", str(dataset_dir),
        "--output_dir", str(output_dir),
        "--resolution", "32",
        "--seed", str(seed),
        "--cache_latents",
        "--cache_text_embeddings",
        "--mixed_precision", "no",
        "--report_to", "none",
        "--checkpointing_steps", "1000000",  # a 10-minute run needs no resumable checkpoints
        "--validation_steps", "1000000",
        "--validation_prompts",  # no per-step validation grid: the quickstart evaluates afterwards
    ]
    for key, value in flags.items():
        if value is None:
            continue
        if value is True:
            argv.append(f"--{key}")
        elif value is not False:
            argv += [f"--{key}", str(value)]
    return argv


def run_distillation(
    argv: list[str],
    full: bool = False,
    launcher: str = "accelerate",
    num_threads: int | None = 1,
    device: str = "auto",
) -> float:
    """Run the LCM-LoRA trainer (or the full-LCM one with ``full``) with ``argv``; returns the wall time (s).

    ``launcher="accelerate"``: ``accelerate launch -m <trainer module>`` (one process; ``--cpu`` unless CUDA is
    used) with this interpreter, as a user would run it; its progress bar is shown. ``launcher="inprocess"``: the
    same entry point in this process. ``num_threads``: CPU threads of the training process (``None``: library
    default)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}.")
    module = TRAINER_MODULES[full]
    start = time.time()
    if launcher == "accelerate":
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        ]
        if resolve_device(device) == "cpu":
            command.append("--cpu")
        if num_threads is not None:
            command += ["--num_cpu_threads_per_process", str(num_threads)]
        command += ["-m", module, *argv]
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        print("$ accelerate launch " + " ".join(shlex.quote(c) for c in command[command.index("-m", 3):]))
        sys.stdout.flush()
        completed = subprocess.run(command, env=env)
        if completed.returncode != 0:
            raise RuntimeError(
                f"{module} failed with exit code {completed.returncode} (its output is above); command: "
                + " ".join(shlex.quote(c) for c in command)
            )
    else:
        previous = torch.get_num_threads()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            _reset_accelerate_state()
            (train_lcm if full else train_lcm_lora).main(list(argv))
        finally:
            _reset_accelerate_state()
            torch.set_num_threads(previous)
    return time.time() - start


def _reset_accelerate_state() -> None:
    # Accelerate keeps process-wide singletons; an in-process run must not inherit or leak them.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_quickstart(
    out: str | os.PathLike = "lcm-quickstart",
    seed: int = 0,
    guidance: float = DEFAULT_GUIDANCE,
    num_per_digit: int = 20,
    max_train_steps: int | None = None,
    full: bool = False,
    full_max_train_steps: int | None = None,
    train_overrides: dict | None = None,
    launcher: str = "accelerate",
    num_threads: int | None = 1,
    device: str = "auto",
    print_fn=print,
) -> dict:
    """Distill, generate, evaluate and write ``OUT/lcm-lora/pytorch_lora_weights.safetensors``, ``OUT/grid.png`` and
    ``OUT/metrics.json`` (the returned summary). ``train_overrides``: extra train-script flags (name -> value)."""
    if num_per_digit < 2:
        raise ValueError(f"num_per_digit must be >= 2 (the Fréchet distance needs a covariance), got {num_per_digit!r}.")
    if max_train_steps is not None and max_train_steps < 1:
        raise ValueError(f"max_train_steps must be >= 1, got {max_train_steps!r}.")
    start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = digits.teacher_path()
    overrides = dict(train_overrides or {})
    if max_train_steps is not None:
        overrides["max_train_steps"] = max_train_steps

    print_fn(f"[1/4] writing the digits train split to {out / 'data'}")
    dataset_dir = write_digits_dataset(out / "data", seed=seed)

    print_fn(f"[2/4] distilling an LCM-LoRA for teacher CFG {guidance:g} (LCM w = {guidance - 1:g})")
    lora_dir = out / "lcm-lora"
    lora_argv = distillation_argv(teacher, dataset_dir, lora_dir, seed=seed, guidance=guidance, **overrides)
    timings = {"lora_distillation_s": run_distillation(lora_argv, False, launcher, num_threads, device)}
    lora_file = lora_dir / "pytorch_lora_weights.safetensors"
    if not lora_file.is_file():
        raise RuntimeError(f"the distillation finished without writing {lora_file}.")
    full_dir, full_argv = None, None
    if full:
        full_dir = out / "lcm-full"
        full_overrides = {} if full_max_train_steps is None else {"max_train_steps": full_max_train_steps}
        print_fn(f"[2b/4] distilling a full-weight LCM (w-embedding) for teacher CFG {guidance:g}")
        full_argv = distillation_argv(teacher, dataset_dir, full_dir, seed=seed, guidance=guidance, full=True,
                                      **full_overrides)
        timings["full_distillation_s"] = run_distillation(full_argv, True, launcher, num_threads, device)

    print_fn(f"[3/4] generating every digit ({num_per_digit} per digit) for each sampler and scoring it")
    eval_start = time.time()
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        rows, grid = evaluate_protocol(teacher, lora_dir, guidance, num_per_digit, seed, full_dir, device)
        floor = real_floor(load_classifier(device=resolve_device(device)), num_per_digit=num_per_digit, seed=seed)
    finally:
        torch.set_num_threads(previous)
    timings["evaluation_s"] = time.time() - eval_start

    print_fn("[4/4] writing grid.png and metrics.json")
    grid.save(out / "grid.png")
    timings["total_s"] = time.time() - start
    timings = {k: round(v, 1) for k, v in timings.items()}
    summary = {
        "lcm_kit_version": __version__,
        "seed": seed,
        "guidance": guidance,
        "lcm_w": guidance - 1.0,
        "num_per_digit": num_per_digit,
        "teacher": str(teacher),
        "lora": str(lora_file),
        "full_lcm": None if full_dir is None else str(full_dir),
        "train_lcm_lora_argv": lora_argv,
        "train_lcm_argv": full_argv,
        "rows": rows,
        "real_floor": {k: floor[k] for k in ("accuracy", "fd", "n")},
        "grid": {"file": "grid.png", "rows": [row_label(r) for r in rows], "columns": list(range(GRID_COLUMNS)),
                 "label_width": GRID_LABEL_WIDTH, "tile_size": grid.height // max(1, len(rows))},
        "timings": timings,
        "versions": _versions(),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")

    print_fn("")
    print_fn(format_table(rows))
    print_fn(f"real train digits at the same count (the floor): accuracy {100 * floor['accuracy']:.1f}%, "
             f"FD {floor['fd']:.3f}")
    print_fn(f"wrote {lora_file}, {out / 'grid.png'}, {out / 'metrics.json'} in {timings['total_s']:.0f} s")
    return summary


def _versions() -> dict:
    import accelerate

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "python": sys.version.split()[0]}


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def add_quickstart_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``lcm-kit quickstart`` (sets ``func``)."""
    p = subparsers.add_parser(
        "quickstart",
        help="distill the shipped digits teacher into an LCM-LoRA and evaluate it (~10 min on 2 CPU cores)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="lcm-quickstart", help="output folder (created)")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=0, help="seeds training and evaluation")
    p.add_argument("--guidance", type=float_range(1.0), default=DEFAULT_GUIDANCE,
                   help="teacher CFG the LoRA is distilled for and every row is compared at (LCM w = guidance - 1)")
    p.add_argument("--max_train_steps", type=int_range(1), default=None,
                   help=f"distillation steps (default {LORA_RECIPE['max_train_steps']}, the tuned recipe)")
    p.add_argument("--num_per_digit", type=int_range(2), default=20, help="samples per digit in every evaluated row")
    p.add_argument("--full", action="store_true", help="also distill and evaluate a full-weight LCM (train_lcm.py)")
    p.add_argument("--full_max_train_steps", type=int_range(1), default=None,
                   help=f"steps of the full LCM (default {FULL_RECIPE['max_train_steps']})")
    p.add_argument("--train_args", default="",
                   help="extra train_lcm_lora.py flags, e.g. \"--learning_rate 1e-4 --solver heun\" (override the recipe)")
    p.add_argument("--launcher", default="accelerate", choices=LAUNCHERS,
                   help="accelerate: `accelerate launch -m lcm_kit.training.train_lcm_lora` (default); inprocess: "
                        "the same entry point in this process")
    p.add_argument("--num_threads", type=int_range(1), default=1,
                   help="CPU threads (default 1: this model is tiny, and more threads only contend on small CPUs)")
    p.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available, else cpu), cpu, cuda, ...")
    p.set_defaults(func=run_quickstart_command, parser=p)
    return p


def parse_train_args(text: str) -> dict:
    """``"--flag value --switch"`` -> ``{"flag": "value", "switch": True}`` (for :func:`distillation_argv`)."""
    tokens = shlex.split(text or "")
    flags: dict = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) < 3:
            raise ValueError(f"--train_args must be '--flag value' pairs or '--switch'es, got {token!r} in {text!r}.")
        if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            flags[token[2:]] = tokens[i + 1]
            i += 2
        else:
            flags[token[2:]] = True
            i += 1
    return flags


def run_quickstart_command(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.num_threads is not None and args.num_threads < 1:
            raise ValueError(f"--num_threads must be >= 1, got {args.num_threads}.")
        run_quickstart(
            out=args.out,
            seed=args.seed,
            guidance=args.guidance,
            num_per_digit=args.num_per_digit,
            max_train_steps=args.max_train_steps,
            full=args.full,
            full_max_train_steps=args.full_max_train_steps,
            train_overrides=parse_train_args(args.train_args),
            launcher=args.launcher,
            num_threads=args.num_threads,
            device=args.device,
        )
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"lcm-kit quickstart: error: {error}") from error
    return 0
