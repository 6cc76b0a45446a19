"""End-to-end LCM-LoRA distillation wall time: lcm-kit's ``train_lcm_lora`` against diffusers' own script.

Both trainers distill the shipped digits teacher from the same webdataset shards (the digits train split at 32², one
caption per image) with the same flags, one after the other in this one script, each in its own process; the table
gives each run's wall time, its time to the first optimizer step and the ratio. diffusers' script is not part of
lcm-kit: give the path of ``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py`` from a diffusers
checkout (it needs torchvision, and webdataset 0.2.86 for local shards, in the same environment as lcm-kit).

    python benchmarks/bench_train_script.py --reference_script /tmp/diffusers/examples/consistency_distillation/\\
        train_lcm_distill_lora_sd_wds.py                                     # 960 steps, batch 32, rank 16
    python benchmarks/bench_train_script.py --reference_script ... --max_train_steps 20   # a quick try
    python benchmarks/bench_train_script.py --reference_script ... --lcm_kit_args "--cache_latents"
    python benchmarks/bench_train_script.py --reference_script ... --reference_cpu_autocast_off \\
        --lcm_kit_args "" --lcm_kit_args "--cache_latents --cache_text_embeddings"     # four runs in one script
    python benchmarks/bench_train_script.py --reference_script ... --reference_cpu_autocast_off \\
        --skip_reference_script --repeats 3             # lcm-kit against the diagnostic, three alternating rounds

diffusers' script runs its teacher and target forwards under ``torch.autocast(device_type)`` whatever
``--mixed_precision`` says, which on a CPU means bf16: on a CPU without native bf16 (no AVX-512 bf16 or AMX; the
summary line says which) those forwards run emulated kernels and dominate its time. ``--reference_cpu_autocast_off``
adds a diagnostic run of the script with that autocast switched off, so the arithmetic is the fp32 both were asked for.

``--repeats N`` runs every trainer N times in alternating order (A B, B A, A B, ...), so that a machine that slows
down or speeds up during the benchmark weighs on both; each round gives its own ratios, and the summary their median
and range. ``--skip_reference_script`` leaves the script's own (slow) run out of such rounds, keeping the diagnostic.

Validation and checkpoints are off in both (steps beyond the run), so the figures are the distillation itself
(lcm-kit still renders its final validation grid after saving, a few seconds). Run it twice and keep the second:
the first run of a fresh environment also pays for reading every library from disk.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
# A tqdm bar line of either trainer ("Steps:  12%|...| 115/960 [...]").
STEP_PATTERN = re.compile(r"(\d+)/(\d+) \[")
REFERENCE_FP32 = "diffusers script, CPU autocast off (diagnostic)"
# Runs the reference script (argv[1]) with torch.autocast("cpu") disabled: its teacher and target forwards then run in
# the fp32 of --mixed_precision no instead of CPU autocast's bf16.
CPU_AUTOCAST_OFF = """
import runpy, sys, torch

class CpuAutocastOff(torch.autocast):
    def __init__(self, device_type, *args, **kwargs):
        if device_type == "cpu":
            kwargs["enabled"] = False
        super().__init__(device_type, *args, **kwargs)

torch.autocast = CpuAutocastOff
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_digits_shards(out_dir: Path, seed: int = 0, per_shard: int = 256) -> tuple[str, int]:
    """The digits train split as ``png`` + ``txt`` tar shards; returns (brace pattern, number of samples)."""
    from lcm_kit.digits.data import to_hf_dataset

    dataset = to_hf_dataset("train", resolution=32, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = (len(dataset) + per_shard - 1) // per_shard
    for shard in range(shards):
        with tarfile.open(out_dir / f"digits-{shard:04d}.tar", "w") as tar:
            for index in range(shard * per_shard, min(len(dataset), (shard + 1) * per_shard)):
                row = dataset[index]
                buffer = io.BytesIO()
                row["image"].save(buffer, format="PNG")
                for suffix, payload in (("png", buffer.getvalue()), ("txt", row["text"].encode())):
                    info = tarfile.TarInfo(f"{index:06d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(out_dir / f"digits-{{0000..{shards - 1:04d}}}.tar"), len(dataset)


def common_flags(args, shards: str, samples: int, output_dir: Path) -> list[str]:
    from lcm_kit.digits.data import teacher_path

    never = str(args.max_train_steps + 1)
    return [
        "--pretrained_teacher_model", str(teacher_path()),
        "--train_shards_path_or_url", shards,
        "--max_train_samples", str(samples),
        "--output_dir", str(output_dir),
        "--resolution", "32",
        "--train_batch_size", str(args.train_batch_size),
        "--max_train_steps", str(args.max_train_steps),
        "--lora_rank", str(args.lora_rank),
        "--lora_alpha", str(args.lora_rank),
        "--learning_rate", "1e-4",
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        # Flags whose defaults differ between the two trainers (diffusers: l2 loss and weight decay 1e-2).
        "--loss_type", "huber",
        "--huber_c", "0.001",
        "--adam_weight_decay", "1e-2",
        "--mixed_precision", "no",
        "--dataloader_num_workers", str(args.dataloader_num_workers),
        "--validation_steps", never,
        "--checkpointing_steps", never,
        "--report_to", "tensorboard",
        "--seed", "0",
    ]


def run(name: str, argv: list[str], log_file: Path) -> dict:
    """Run one trainer to the end; wall time, and the time its progress bar first showed a finished step."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    print(f"[{name}] {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    first_step = None
    with open(log_file, "w") as log:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1)
        buffer = ""
        while True:
            chunk = process.stdout.read(256)
            if not chunk:
                break
            log.write(chunk)
            buffer = (buffer + chunk)[-4096:]
            if first_step is None and any(int(m.group(1)) >= 1 for m in STEP_PATTERN.finditer(buffer)):
                first_step = time.perf_counter() - start
        returncode = process.wait()
    wall = time.perf_counter() - start
    if returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise SystemExit(f"[{name}] exited with {returncode}; last output:\n{tail}")
    return dict(name=name, wall_s=wall, first_step_s=first_step)


def round_orders(names: list[str], repeats: int) -> list[list[str]]:
    """The run order of each round: ``names`` as given, then reversed, alternately (A B C, C B A, A B C...)."""
    return [list(names) if index % 2 == 0 else list(reversed(names)) for index in range(repeats)]


def ratio_summary(results: dict[str, list[dict]], ours: list[str], references: list[str]) -> dict[str, dict]:
    """Per lcm-kit run and reference: the wall ratio of each round, their median, lowest and highest."""
    summary = {}
    for name in ours:
        for reference in references:
            per_round = [mine["wall_s"] / theirs["wall_s"] for mine, theirs in zip(results[name], results[reference],
                                                                                   strict=True)]
            summary[f"{name} / {reference}"] = {"per_round": per_round, "median": statistics.median(per_round),
                                                 "low": min(per_round), "high": max(per_round)}
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--reference_script", type=Path, required=True,
                        help="diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py")
    parser.add_argument("--max_train_steps", type=int, default=960, help="steps of each run (default 960)")
    parser.add_argument("--train_batch_size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--lora_rank", type=int, default=16, help="LoRA rank and alpha (default 16)")
    parser.add_argument("--dataloader_num_workers", type=int, default=1,
                        help="DataLoader workers of both (default 1; diffusers' script needs at least 1)")
    parser.add_argument("--lcm_kit_args", action="append", default=None,
                        help="extra flags for an lcm-kit run only, e.g. '--cache_latents'; give it several times for "
                             "several lcm-kit runs in this one script ('' is the plain run; default: one plain run)")
    parser.add_argument("--reference_cpu_autocast_off", action="store_true",
                        help="also run diffusers' script with its CPU autocast switched off (a diagnostic: the same "
                             "fp32 arithmetic as lcm-kit, as on a CPU where its bf16 costs nothing extra; not the "
                             "script's own behaviour)")
    parser.add_argument("--skip_reference_script", action="store_true",
                        help="leave out the script's own run, keeping the diagnostic (needs "
                             "--reference_cpu_autocast_off)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of all runs, in alternating order (default 1)")
    parser.add_argument("--order", choices=["lcm-kit-first", "reference-first"], default="reference-first",
                        help="which trainer runs first (default: diffusers' script)")
    parser.add_argument("--work_dir", type=Path, default=None, help="shards, outputs and logs (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if not args.reference_script.is_file():
        parser.error(f"--reference_script {str(args.reference_script)!r} is not a file")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.skip_reference_script and not args.reference_cpu_autocast_off:
        parser.error("--skip_reference_script leaves no reference run: add --reference_cpu_autocast_off")
    lcm_kit_args = args.lcm_kit_args if args.lcm_kit_args is not None else [""]
    for extra in lcm_kit_args:
        try:
            shlex.split(extra)
        except ValueError as error:
            parser.error(f"--lcm_kit_args {extra!r} is not a shell-quoted list of flags: {error}")
    repeated = sorted({extra for extra in lcm_kit_args if lcm_kit_args.count(extra) > 1})
    if repeated:
        parser.error(f"--lcm_kit_args {repeated} given more than once: each lcm-kit run needs different flags")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lcm-bench-train-script-"))
    work.mkdir(parents=True, exist_ok=True)
    shards, samples = write_digits_shards(work / "shards")
    print(f"{samples} samples in {shards}", flush=True)

    def output(name: str, round_index: int) -> Path:
        return work / (f"out-{name}" if args.repeats == 1 else f"out-{name}-round-{round_index}")

    references = {}
    if not args.skip_reference_script:
        references["diffusers script"] = lambda r: [sys.executable, str(args.reference_script),
                                                    *common_flags(args, shards, samples, output("reference", r))]
    if args.reference_cpu_autocast_off:
        references[REFERENCE_FP32] = lambda r: [sys.executable, "-c", CPU_AUTOCAST_OFF, str(args.reference_script),
                                                *common_flags(args, shards, samples, output("reference-fp32", r))]
    ours = {}
    for index, extra in enumerate(lcm_kit_args):
        def lcm_kit_argv(r, index=index, extra=extra):
            return [sys.executable, "-m", "lcm_kit.training.train_lcm_lora",
                    *common_flags(args, shards, samples, output(f"lcm-kit-{index}", r)), *shlex.split(extra)]
        ours[f"lcm-kit train_lcm_lora {extra}".strip()] = lcm_kit_argv
    runs = {**references, **ours} if args.order == "reference-first" else {**ours, **references}
    results: dict[str, list[dict]] = {name: [] for name in runs}
    orders = round_orders(list(runs), args.repeats)
    count = 0
    for round_index, order in enumerate(orders):
        for name in order:
            log = work / f"run-{count}.log"
            results[name].append(dict(run(name, runs[name](round_index), log), round=round_index))
            count += 1

    print()
    print("| round | trainer | wall s | to the first step s | after the first step s |")
    print("|---|---|---|---|---|")
    for round_index, order in enumerate(orders):
        for name in order:
            result = results[name][round_index]
            rest = result["wall_s"] - (result["first_step_s"] or 0.0)
            first = f"{result['first_step_s']:.1f}" if result["first_step_s"] is not None else "n/a"
            print(f"| {round_index} | {result['name']} | {result['wall_s']:.1f} | {first} | {rest:.1f} |")
    from lcm_kit.utils import cpu_has_native_bf16

    native_bf16 = cpu_has_native_bf16()
    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} CPUs, native bf16: {native_bf16}; load average after "
          f"{os.getloadavg()}")
    ratios = ratio_summary(results, list(ours), list(references))
    for pair, ratio in ratios.items():
        rounds = ", ".join(f"{value:.3f}" for value in ratio["per_round"])
        print(f"wall ratio {pair}: median {ratio['median']:.3f}x (lowest {ratio['low']:.3f}x, highest "
              f"{ratio['high']:.3f}x; per round {rounds})")
    if args.json:
        args.json.write_text(json.dumps(dict(
            runs=results, ratios=ratios, machine=cpu_name(), native_bf16=native_bf16, flags=vars(args) | {
            "reference_script": str(args.reference_script), "work_dir": str(work), "json": str(args.json)}),
            indent=2, default=str))


if __name__ == "__main__":
    main()
