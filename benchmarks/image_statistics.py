"""What a bad FD looks like: blur or leftover noise. Simple statistics of few-step digits from LCM-LoRA-style adapters
on the shipped digits teacher, beside the teacher's own 25-step samples.

For each adapter folder and step count, 100 images (10 per digit, noise seed 0, sampled as the adapters are scored:
``LCMScheduler``, guidance baked in) and the teacher's (DPM-Solver, 25 steps, CFG 3). Printed per set:

* Laplacian energy: the mean square of the grey image's discrete Laplacian (blurred images fall below the teacher's,
  images with noise left in them rise above it);
* spread: the per-pixel standard deviation across the images, averaged over pixels;
* mean: the mean pixel value in [0, 1].

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/image_statistics.py /tmp/cmp/scd-seed0 /tmp/cmp/lcm-seed0
"""

from __future__ import annotations

import argparse
import os

import torch


def image_statistics(images: torch.Tensor) -> dict:
    """``images``: (N, 3, H, W) in [0, 1]."""
    grey = images.mean(1)
    laplacian = (4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2]
                 - grey[:, 1:-1, 2:])
    return {"laplacian_energy": laplacian.pow(2).mean().item(), "spread": images.std(0).mean().item(),
            "mean": images.mean().item()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="+", help="folders with pytorch_lora_weights.safetensors")
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--per_digit", type=int, default=10)
    parser.add_argument("--teacher_as_lcm", action="store_true",
                        help="also the teacher without an adapter, sampled as the adapters are but with CFG 3 (its "
                             "own x0 prediction at each step): what the adapters start from")
    args = parser.parse_args(argv)
    if min(args.steps) < 1 or args.per_digit < 1:
        parser.error(f"--steps must be >= 1 and --per_digit >= 1, got {args.steps} and {args.per_digit}.")
    missing = [folder for folder in args.adapters if not os.path.isdir(folder)]
    if missing:
        parser.error(f"adapter folders not found: {missing}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from diffusers import DPMSolverMultistepScheduler, LCMScheduler, StableDiffusionPipeline

    from lcm_kit import digits
    from lcm_kit.digits.data import eval_prompt
    from lcm_kit.lora import load_lora_weights_strict

    prompts = [eval_prompt(d) for d in range(10) for _ in range(args.per_digit)]

    # one load of the teacher; each variant is a pipeline over the same modules with its own scheduler
    teacher = StableDiffusionPipeline.from_pretrained(str(digits.teacher_path()), safety_checker=None,
                                                      requires_safety_checker=False)
    teacher.scheduler = DPMSolverMultistepScheduler.from_config(teacher.scheduler.config)
    lcm = StableDiffusionPipeline(**{**teacher.components, "scheduler": LCMScheduler.from_config(
        teacher.scheduler.config)})
    for pipe in (teacher, lcm):
        pipe.set_progress_bar_config(disable=True)

    def sample(pipe, steps, guidance):
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    rows = [("teacher, DPM-Solver CFG 3", 25, image_statistics(sample(teacher, 25, 3.0)))]
    if args.teacher_as_lcm:
        rows += [("teacher, LCMScheduler CFG 3", steps, image_statistics(sample(lcm, steps, 3.0)))
                 for steps in args.steps]
    for folder in args.adapters:
        load_lora_weights_strict(lcm, folder)
        rows += [(folder, steps, image_statistics(sample(lcm, steps, 1.0))) for steps in args.steps]
        lcm.unload_lora_weights()
    print("| images | steps | Laplacian energy | spread | mean |\n|---|---|---|---|---|")
    for name, steps, stats in rows:
        print(f"| {name} | {steps} | {stats['laplacian_energy']:.4f} | {stats['spread']:.3f} | {stats['mean']:.3f} |")


if __name__ == "__main__":
    main()
