#!/usr/bin/env python
"""Train the small digits teacher shipped in ``lcm_kit/assets/digits_teacher`` (thin CLI over
``lcm_kit.training.teacher``), then measure its quality with ``lcm_kit.eval`` and record both in the
folder's README.

    python train_scripts/train_teacher.py --output_dir lcm_kit/assets/digits_teacher --seed 0
    python train_scripts/train_teacher.py --output_dir lcm_kit/assets/digits_teacher --evaluate_only
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lcm_kit.training.teacher import TeacherConfig, evaluate_and_write_readme, train_teacher  # noqa: E402


def parse_args(argv=None):
    defaults = TeacherConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="where the diffusers folder is written")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--resolution", type=int, default=defaults.resolution)
    parser.add_argument("--vae_steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--unet_steps", type=int, default=defaults.unet_steps)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--caption_dropout", type=float, default=defaults.caption_dropout)
    parser.add_argument("--kl_weight", type=float, default=defaults.kl_weight)
    parser.add_argument("--ema_decay", type=float, default=defaults.ema_decay)
    parser.add_argument("--snr_gamma", type=float, default=defaults.snr_gamma,
                        help="min-SNR loss weighting gamma; <= 0 disables it")
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="torch intra-op threads (1 is fastest when the CPU is shared)")
    parser.add_argument("--num_per_digit", type=int, default=20,
                        help="samples per digit for the quality rows written to the README")
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.5],
                        help="guidances of the 25-step DPM-Solver rows in the README")
    parser.add_argument("--protocol_guidance", type=float, default=None,
                        help="guidance of the DDIM (trailing) 1/2/4-step rows (default: the best 25-step one)")
    parser.add_argument("--skip_eval", action="store_true", help="train and save only")
    parser.add_argument("--evaluate_only", action="store_true",
                        help="measure an already trained folder and rewrite its README")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.num_threads is not None:
        import torch

        torch.set_num_threads(args.num_threads)
    command = "python train_scripts/train_teacher.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if not args.evaluate_only:
        config = TeacherConfig(
            seed=args.seed, resolution=args.resolution, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
            batch_size=args.batch_size, lr=args.lr, caption_dropout=args.caption_dropout,
            kl_weight=args.kl_weight, ema_decay=args.ema_decay,
            snr_gamma=args.snr_gamma if args.snr_gamma > 0 else None, device=args.device, num_threads=args.num_threads,
        )
        train_teacher(config, args.output_dir, command=command)
    if not args.skip_eval:
        evaluate_and_write_readme(
            args.output_dir, num_per_digit=args.num_per_digit, guidance_scales=args.guidance_scales,
            protocol_guidance=args.protocol_guidance, device=args.device, seed=args.seed, command=command,
        )


if __name__ == "__main__":
    main()
