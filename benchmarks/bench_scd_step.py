"""Seconds per distillation step of the quickstart's LoRA recipe on the shipped digits teacher, LCM vs sCD, and the
sCD step count that fits the quickstart LCM-LoRA's budget (its 2,000 steps).

Both objectives are built from the same flags (``lcm_kit.commands.quickstart.distillation_argv``: batch 32, rank 16,
Heun teacher step for LCM) and run in ONE process, interleaved step by step (LCM, sCD, LCM, ...), each step a
``compute_loss`` on a cached batch plus its backward, so machine noise hits both alike. sCD's step has a teacher call
(cond + uncond), the student's forward and backward, and one forward-mode JVP through the UNet; LCM's has a Heun
teacher step (two teacher calls), the student and the target.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_scd_step.py --steps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from machine import cpu_name


def build_objective(method: str, workdir: str):
    from accelerate import Accelerator

    from lcm_kit import digits
    from lcm_kit.commands.quickstart import LORA_RECIPE, distillation_argv
    from lcm_kit.training.args import build_lcm_lora_parser, validate_lcm_args
    from lcm_kit.training.lcm_objective import LCMObjective

    argv = distillation_argv(digits.teacher_path(), workdir, os.path.join(workdir, method), method=method)
    args = build_lcm_lora_parser().parse_args(argv)
    validate_lcm_args(args)
    torch.manual_seed(0)
    return LCMObjective(args, Accelerator(cpu=True), mode="lora"), LORA_RECIPE


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (after 2 warm-up steps)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as workdir:
        objectives = {}
        for method in ("lcm", "scd"):
            objectives[method], recipe = build_objective(method, workdir)
        batch_size = recipe["train_batch_size"]
        g = torch.Generator().manual_seed(0)
        pixels = torch.rand(batch_size, 3, 32, 32, generator=g) * 2 - 1
        lcm = objectives["lcm"]
        batch = {"latents": lcm.encode_images(pixels), **lcm.encode_prompts(["a handwritten digit 3"] * batch_size)}
        times = {method: [] for method in objectives}
        for step in range(2 + args.steps):
            for method, objective in objectives.items():
                model = objective.trainable_model()
                start = time.perf_counter()
                loss, _ = objective.compute_loss(model, batch, step, torch.Generator().manual_seed(step))
                loss.backward()
                elapsed = time.perf_counter() - start
                model.zero_grad(set_to_none=True)
                if step >= 2:
                    times[method].append(elapsed)
    median = {method: statistics.median(values) for method, values in times.items()}
    ratio = median["scd"] / median["lcm"]
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {batch_size}, "
          f"{args.steps} interleaved steps each")
    print("| method | s / step (median) | min | max |\n|---|---|---|---|")
    for method, values in times.items():
        print(f"| {method} | {median[method]:.3f} | {min(values):.3f} | {max(values):.3f} |")
    budget = recipe["max_train_steps"]
    print(f"sCD / LCM step time: {ratio:.2f}x; the LCM-LoRA's {budget} steps buy {round(budget / ratio)} sCD steps")


if __name__ == "__main__":
    main()
