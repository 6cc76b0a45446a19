"""``lcm-kit quickstart``: distill the shipped digits teacher into a TCD-LoRA and an LCM-LoRA and show what they buy.

    lcm-kit quickstart --out lcm-quickstart                  # two distillations side by side, then the evaluation
    lcm-kit quickstart --out lcm-quickstart --methods tcd    # only the TCD-LoRA

1. writes the digits train split as a ``datasets`` folder (``save_to_disk``) and distills, with the same recipe, a
   TCD-LoRA (``--method tcd``, the main model: the closest to the teacher at 1 step) and an LCM-LoRA from the shipped
   teacher with the installed package's trainer, ``accelerate launch -m lcm_kit.training.train_lcm_lora``: two
   one-thread processes side by side, the TCD one showing its progress bar, the LCM one's output in
   ``OUT/logs/lcm-lora.log`` (its lines also printed with a ``[lcm-lora]`` prefix). ``--launcher inprocess`` runs the
   same entry point in this process, one after the other. ``--methods`` picks the LoRAs (default ``tcd lcm``);
2. loads each with ``pipe.load_lora_weights`` into a stock ``StableDiffusionPipeline`` of its own and scores the rows
   of the evaluation protocol (:mod:`lcm_kit.eval.protocol`) at the guidance the LoRAs are distilled for: the
   TCD-LoRA with diffusers' ``TCDScheduler`` (``eta=0.3``, ``original_inference_steps`` = the distillation grid), the
   LCM-LoRA with ``ConsistencyScheduler``; with ``--full`` also a full-weight LCM (``lcm_kit.training.train_lcm``);
3. writes ``OUT/tcd-lora/pytorch_lora_weights.safetensors``, ``OUT/lcm-lora/pytorch_lora_weights.safetensors``,
   ``OUT/grid.png`` (one row per sampler, one column per digit 0-9, row labels on the left) and ``OUT/metrics.json``
   (every row with how it was sampled, both trainers' argv and timings), and prints the table.

Sample the TCD-LoRA as it was scored::

    lcm-kit generate --lora lcm-quickstart/tcd-lora --scheduler tcd --gamma 0.3 --original_inference_steps 10 \\
        --num_inference_steps 1 --prompt "a handwritten 7"

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
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import diffusers
import torch
import transformers
from accelerate.state import AcceleratorState, GradientState

from .. import __version__, digits
from ..argtypes import MAX_SEED, device_name, float_range, int_range
from ..eval import format_table, load_classifier, real_floor
from ..eval.protocol import DEFAULT_GUIDANCE, GRID_COLUMNS, GRID_LABEL_WIDTH, TCD_ETA, evaluate_protocol, row_label
from ..training import train_lcm, train_lcm_lora
from ..training.args import build_lcm_lora_parser
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
# The LoRAs the quickstart can distil (``--methods``), main model first: ``--method`` of the trainer -> output folder
# (also the protocol's model key). TCD is first: it is the closest to the teacher at 1 step (benchmarks/RESULTS.md).
LORA_METHODS = {"tcd": "tcd-lora", "lcm": "lcm-lora"}


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


def _launch_command(module: str, argv: list[str], num_threads: int | None, device: str) -> list[str]:
    """``accelerate launch`` (one process; ``--cpu`` unless CUDA is used) of ``-m module argv`` with this
    interpreter."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]
    if resolve_device(device) == "cpu":
        command.append("--cpu")
    if num_threads is not None:
        command += ["--num_cpu_threads_per_process", str(num_threads)]
    return command + ["-m", module, *argv]


def _shown(command: list[str]) -> str:
    return "accelerate launch " + " ".join(shlex.quote(c) for c in command[command.index("-m", 3):])


def _train_env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


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
        command = _launch_command(module, argv, num_threads, device)
        print("$ " + _shown(command))
        sys.stdout.flush()
        completed = subprocess.run(command, env=_train_env())
        if completed.returncode != 0:
            raise RuntimeError(
                f"{module} failed with exit code {completed.returncode} (its output is above); command: "
                + " ".join(shlex.quote(c) for c in command)
            )
    else:
        _run_inprocess(train_lcm if full else train_lcm_lora, argv, num_threads)
    return time.time() - start


def _run_inprocess(trainer, argv: list[str], num_threads: int | None) -> None:
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        _reset_accelerate_state()
        trainer.main(list(argv))
    finally:
        _reset_accelerate_state()
        torch.set_num_threads(previous)


def run_lora_distillations(
    jobs: dict[str, list[str]],
    launcher: str = "accelerate",
    num_threads: int | None = 1,
    device: str = "auto",
    log_dir: str | os.PathLike | None = None,
    print_fn=print,
) -> dict[str, float]:
    """Run one ``train_lcm_lora`` per entry of ``jobs`` (name, e.g. ``"tcd-lora"`` -> its argv) and return each
    one's wall time (s), from the common start to its end.

    ``launcher="accelerate"``: every trainer at once, each ``accelerate launch -m lcm_kit.training.train_lcm_lora``
    with ``num_threads`` threads (default one each: on 2 cores each trainer has a core of its own). The
    first job shows its output and progress bar; every other job's output goes to ``log_dir/<name>.log`` (default:
    the current folder) and its lines are printed with a ``[<name>]`` prefix (progress-bar updates only in the log).
    If a trainer fails, the others are stopped and a ``RuntimeError`` names the failed one(s), the exit code, the
    log and the command. ``launcher="inprocess"``: the same entry point in this process, one job after the other (an
    error is re-raised naming the trainer and its argv)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}.")
    if not jobs:
        raise ValueError("jobs must name at least one trainer run (name -> argv), got none.")
    module = TRAINER_MODULES[False]
    start = time.time()
    timings: dict[str, float] = {}
    if launcher == "inprocess":
        for name, argv in jobs.items():
            shown = f"-m {module} " + " ".join(shlex.quote(a) for a in argv)
            try:
                _run_inprocess(train_lcm_lora, argv, num_threads)
            except SystemExit as error:  # the trainer's argparse refused a flag (its message is above)
                if error.code not in (0, None):
                    raise RuntimeError(f"the {name} trainer stopped with exit code {error.code}; argv: "
                                       f"{shown}") from error
            except ValueError as error:
                raise ValueError(f"the {name} trainer: {error} (argv: {shown})") from error
            except Exception as error:
                raise RuntimeError(f"the {name} trainer failed ({type(error).__name__}: {error}); argv: "
                                   f"{shown}") from error
            timings[name] = time.time() - start
        return timings

    log_dir = Path(log_dir or ".")
    log_dir.mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen, list[str], Path | None, threading.Thread | None]] = {}
    try:
        for i, (name, argv) in enumerate(jobs.items()):
            command = _launch_command(module, argv, num_threads, device)
            print_fn(f"$ {_shown(command)}" + ("" if i == 0 else f"   # output: {log_dir / (name + '.log')}"))
            sys.stdout.flush()
            # own session: a failure of one trainer can stop the other's whole process tree (accelerate + trainer)
            if i == 0:
                process = subprocess.Popen(command, env=_train_env(), start_new_session=True)
                running[name] = (process, command, None, None)
            else:
                log = log_dir / f"{name}.log"
                process = subprocess.Popen(command, env=_train_env(), start_new_session=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                relay = threading.Thread(target=_relay, args=(process.stdout, log, f"[{name}] "), daemon=True)
                relay.start()
                running[name] = (process, command, log, relay)
        failed = []
        while len(timings) + len(failed) < len(running):
            for name, (process, command, log, relay) in running.items():
                if name in timings or name in failed or process.poll() is None:
                    continue
                if relay is not None:
                    relay.join()
                if process.returncode != 0:
                    failed.append(name)
                    continue
                timings[name] = time.time() - start
                waiting = [n for n in running if n not in timings and n not in failed]
                if waiting:
                    print_fn(f"{name} done in {timings[name]:.0f} s; waiting for {', '.join(waiting)}")
            if failed:
                break
            time.sleep(0.5)
        if failed:
            _stop(running, keep=set(timings))
            lines = []
            for name in failed:
                process, command, log, _ = running[name]
                where = "its output is above" if log is None else f"its output is in {log}"
                lines.append(f"the {name} trainer failed with exit code {process.returncode} ({where}); command: "
                             + " ".join(shlex.quote(c) for c in command))
            raise RuntimeError("; ".join(lines))
    finally:
        _stop(running, keep=set(timings))
    return timings


def _relay(stream, log: Path, prefix: str) -> None:
    # Everything goes to the log; complete lines also to this console with the prefix. Progress-bar updates end with
    # "\r", not "\n", so they stay in the log instead of fighting the other trainer's live bar.
    line = b""
    with open(log, "wb") as file:
        for chunk in iter(lambda: stream.read1(4096), b""):
            file.write(chunk)
            file.flush()
            line += chunk
            while b"\n" in line:
                text, line = line.split(b"\n", 1)
                text = text.rsplit(b"\r", 1)[-1].decode(errors="replace").rstrip()
                if text:
                    print(prefix + text, flush=True)
        text = line.rsplit(b"\r", 1)[-1].decode(errors="replace").rstrip()
        if text:
            print(prefix + text, flush=True)


def _stop(running: dict, keep: set) -> None:
    for name, (process, *_rest) in running.items():
        if name in keep or process.poll() is not None:
            continue
        try:
            os.killpg(process.pid, signal.SIGTERM)  # the group this module started for that trainer
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


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
    methods: Sequence[str] = tuple(LORA_METHODS),
) -> dict:
    """Distill, generate, evaluate and write ``OUT/tcd-lora/`` and ``OUT/lcm-lora/pytorch_lora_weights.safetensors``
    (those of ``methods``: ``"tcd"``, ``"lcm"``; the main model, TCD, first in the summary whatever the order given),
    ``OUT/grid.png`` and ``OUT/metrics.json`` (the returned summary). ``train_overrides``: extra train-script flags
    (name -> value) for every LoRA trainer."""
    methods = _check_methods(methods)
    if num_per_digit < 2:
        raise ValueError(f"num_per_digit must be >= 2 (the Fréchet distance needs a covariance), got "
                         f"{num_per_digit!r}.")
    if max_train_steps is not None and max_train_steps < 1:
        raise ValueError(f"max_train_steps must be >= 1, got {max_train_steps!r}.")
    overrides = dict(train_overrides or {})
    if "method" in overrides:
        raise ValueError(f"train_overrides (--train_args) must not set --method (got {overrides['method']!r}): the "
                         f"quickstart sets it per LoRA; pick the LoRAs with --methods {' '.join(LORA_METHODS)}.")
    if max_train_steps is not None:
        overrides["max_train_steps"] = max_train_steps
    start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = digits.teacher_path()

    print_fn(f"[1/4] writing the digits train split to {out / 'data'}")
    dataset_dir = write_digits_dataset(out / "data", seed=seed)

    folders = {m: LORA_METHODS[m] for m in methods}
    names = " and ".join({"tcd": "a TCD-LoRA", "lcm": "an LCM-LoRA"}[m] for m in methods)
    side = "one after the other" if launcher == "inprocess" or len(folders) == 1 else "side by side"
    print_fn(f"[2/4] distilling {names} ({side}) for teacher CFG {guidance:g} (w = {guidance - 1:g})")
    argvs = {m: distillation_argv(teacher, dataset_dir, out / folder, seed=seed, guidance=guidance, method=m,
                                  **overrides) for m, folder in folders.items()}
    seconds = run_lora_distillations({folders[m]: argv for m, argv in argvs.items()}, launcher, num_threads, device,
                                     log_dir=out / "logs", print_fn=print_fn)
    timings = {f"{folders[m].replace('-', '_')}_distillation_s": seconds[folders[m]] for m in methods}
    timings["lora_distillation_wall_s"] = max(seconds.values())
    lora_files = {}
    for m, folder in folders.items():
        lora_files[m] = out / folder / "pytorch_lora_weights.safetensors"
        if not lora_files[m].is_file():
            raise RuntimeError(f"the {folder} distillation finished without writing {lora_files[m]}.")
    # TCDScheduler must pick its timesteps from the grid the TCD-LoRA was distilled on (the recipe's, or an override)
    tcd_grid = build_lcm_lora_parser().parse_args(argvs["tcd"]).num_ddim_timesteps if "tcd" in methods else None
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
        rows, grid = evaluate_protocol(
            teacher, out / folders["lcm"] if "lcm" in folders else None, guidance, num_per_digit, seed, full_dir,
            device, tcd_lora_dir=out / folders["tcd"] if "tcd" in folders else None,
            tcd_original_inference_steps=tcd_grid)
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
        "methods": list(methods),
        "lora": str(lora_files[methods[0]]),  # the main model
        "loras": {folders[m]: str(f) for m, f in lora_files.items()},
        "full_lcm": None if full_dir is None else str(full_dir),
        "train_tcd_lora_argv": argvs.get("tcd"),
        "train_lcm_lora_argv": argvs.get("lcm"),
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
    if "tcd" in methods:
        print_fn(f"TCD-LoRA rows: TCDScheduler, eta {TCD_ETA:g}, original_inference_steps {tcd_grid}")
    print_fn(f"wrote {', '.join(str(f) for f in lora_files.values())}, {out / 'grid.png'}, {out / 'metrics.json'} "
             f"in {timings['total_s']:.0f} s")
    return summary


def _check_methods(methods) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = (methods,)
    methods = list(methods)
    bad = [m for m in methods if m not in LORA_METHODS]
    if not methods or bad or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be one or more of {' '.join(LORA_METHODS)}, each once, got "
                         f"{' '.join(map(str, methods)) or 'none'}; e.g. --methods tcd lcm (the default) or "
                         f"--methods tcd.")
    return tuple(m for m in LORA_METHODS if m in methods)


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
        help="distill the shipped digits teacher into a TCD-LoRA and an LCM-LoRA side by side and evaluate them "
             "(times in the README)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="lcm-quickstart", help="output folder (created)")
    p.add_argument("--seed", type=int_range(0, MAX_SEED), default=0, help="seeds training and evaluation")
    p.add_argument("--methods", nargs="+", default=list(LORA_METHODS), choices=tuple(LORA_METHODS),
                   help="the LoRAs to distil, each once and with the same recipe (train_lcm_lora.py --method): tcd "
                        "(the main model, OUT/tcd-lora, sampled with TCDScheduler eta 0.3) and lcm (OUT/lcm-lora), "
                        "side by side")
    p.add_argument("--guidance", type=float_range(1.0), default=DEFAULT_GUIDANCE,
                   help="teacher CFG the LoRAs are distilled for and every row is compared at (w = guidance - 1)")
    p.add_argument("--max_train_steps", type=int_range(1), default=None,
                   help=f"distillation steps (default {LORA_RECIPE['max_train_steps']}, the tuned recipe)")
    p.add_argument("--num_per_digit", type=int_range(2), default=20, help="samples per digit in every evaluated row")
    p.add_argument("--full", action="store_true", help="also distill and evaluate a full-weight LCM (train_lcm.py)")
    p.add_argument("--full_max_train_steps", type=int_range(1), default=None,
                   help=f"steps of the full LCM (default {FULL_RECIPE['max_train_steps']})")
    p.add_argument("--train_args", default="",
                   help="extra train_lcm_lora.py flags for every LoRA, e.g. \"--learning_rate 1e-4 --solver heun\" "
                        "(override the recipe; not --method: use --methods)")
    p.add_argument("--launcher", default="accelerate", choices=LAUNCHERS,
                   help="accelerate: `accelerate launch -m lcm_kit.training.train_lcm_lora`, one process per LoRA "
                        "side by side (default); inprocess: the same entry point in this process, one after the other")
    p.add_argument("--num_threads", type=int_range(1), default=1,
                   help="CPU threads of each trainer and of the evaluation (default 1: this model is tiny, and more "
                        "threads only contend on small CPUs)")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (cuda if available, else cpu), cpu, cuda, ...")
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
            methods=args.methods,
        )
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"lcm-kit quickstart: error: {error}") from error
    return 0
