"""Class-conditional consistency training (iCT or CT) on the shipped digits, scored by the digits harness.

Trains a class-conditional ``UNet2DModel`` in pixel space (32x32) with the real ``train_scripts`` path
(:func:`lcm_kit.training.consistency_models.train_consistency`: Accelerate loop, data module), then samples every
digit at 1 and 2 steps with :class:`~lcm_kit.pipelines.pipeline_consistency.CMPipeline` and reports the shipped
classifier's accuracy and the Fréchet distance to the held-out digits (lcm_kit.eval.metrics).

    HF_HUB_OFFLINE=1 python benchmarks/consistency_digits.py --max_train_steps 3000 --out /tmp/cm_digits
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="ict", choices=("ct", "ict"))
    parser.add_argument("--max_train_steps", type=int, default=3000)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--block_out_channels", default="32,64,64")
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--num_per_digit", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="consistency-digits")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lcm_kit import digits
    from lcm_kit.eval.metrics import evaluate_images
    from lcm_kit.pipelines.pipeline_consistency import CMPipeline
    from lcm_kit.training.consistency_models import train_consistency

    data_dir = os.path.join(args.out, "data")
    if not os.path.isdir(data_dir):
        dataset = digits.to_hf_dataset("train", 32).map(lambda e: {"class": str(e["label"])})
        dataset.save_to_disk(data_dir)
    model_dir = os.path.join(args.out, args.mode)
    start = time.perf_counter()
    result = train_consistency([
        "--mode", args.mode, "--dataset_name", data_dir, "--image_column", "image", "--caption_column", "class",
        "--num_class_embeds", "10", "--resolution", "32", "--block_out_channels", args.block_out_channels,
        "--layers_per_block", "1", "--train_batch_size", str(args.train_batch_size),
        "--max_train_steps", str(args.max_train_steps), "--learning_rate", str(args.learning_rate),
        "--ema_decay", str(args.ema_decay), "--output_dir", model_dir, "--report_to", "none",
        "--seed", str(args.seed), "--checkpointing_steps", str(args.max_train_steps),
        "--validation_steps", str(args.max_train_steps), "--num_train_epochs", "1000",
    ])
    train_seconds = time.perf_counter() - start

    labels = torch.arange(10).repeat_interleave(args.num_per_digit)
    rows = []
    for weights in ("unet", "unet_online"):
        from diffusers import UNet2DModel

        pipe = CMPipeline.from_pretrained(model_dir)
        if weights != "unet":
            pipe.unet = UNet2DModel.from_pretrained(os.path.join(model_dir, weights))
        pipe.set_progress_bar_config(disable=True)
        for steps, kwargs in ((1, {"num_inference_steps": 1}), (2, {"sigmas": [80.0, 0.821]})):
            images = pipe(batch_size=len(labels), class_labels=labels, output_type="pt",
                          generator=torch.Generator().manual_seed(args.seed), **kwargs).images
            scores = evaluate_images(images, labels, value_range=(0.0, 1.0))
            rows.append({"weights": "EMA" if weights == "unet" else "online", "steps": steps,
                         "accuracy": scores["accuracy"], "fd": scores["fd"]})
    table = ["| model | steps | classifier accuracy % | FD |", "|---|---|---|---|"]
    table += [f"| {args.mode.upper()} ({r['weights']}) | {r['steps']} | {100 * r['accuracy']:.1f} | {r['fd']:.2f} |"
              for r in rows]
    print("\n".join(table))
    print(f"{args.mode} {result.global_step} steps, batch {args.train_batch_size}, {train_seconds:.0f} s on "
          f"{args.threads} thread(s); {args.num_per_digit} samples per digit")
    with open(os.path.join(args.out, f"{args.mode}_results.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows, "train_seconds": train_seconds}, f, indent=1)


if __name__ == "__main__":
    main()
