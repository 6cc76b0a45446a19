"""Train the shipped digits classifier of the quality harness (:class:`lcm_kit.eval.classifier.DigitClassifier`).

Trained on the train split of :mod:`lcm_kit.digits` (upscaled exactly as the teacher's training images) with light
geometric augmentation::

    python -m lcm_kit.digits.classifier --output_dir lcm_kit/assets/digits_classifier --seed 0
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..eval.classifier import DigitClassifier
from ..eval.metrics import real_floor
from ..training.hub import render_card
from . import data as digits


def _augment(images: torch.Tensor, generator: torch.Generator, max_shift: float, max_rotate_deg: float):
    """Random small rotation, scale and translation (affine grid sample), so the classifier does not rely on
    the exact placement of the training scans."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_rotate_deg)
    scale = 1.0 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images + 1.0, grid, align_corners=False, padding_mode="zeros") - 1.0


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size])
        correct += (logits.argmax(1) == labels[start : start + batch_size]).sum().item()
    return correct / len(images)


def train_classifier(
    resolution: int = 32, epochs: int = 30, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
    max_shift: float = 0.1, max_rotate_deg: float = 10.0,
):
    """Train on the train split; returns ``(model, heldout_accuracy, seconds)``."""
    start = time.time()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = digits.load_split("train", resolution)
    heldout_images, heldout_labels = digits.load_split("heldout", resolution)
    model = DigitClassifier(resolution)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
    progress = tqdm(range(epochs), desc="classifier", dynamic_ncols=True)
    for _ in progress:
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for start_index in range(0, len(images), batch_size):
            idx = order[start_index : start_index + batch_size]
            x = _augment(images[idx], generator, max_shift, max_rotate_deg)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    heldout_accuracy = accuracy(model, heldout_images, heldout_labels)
    return model.eval(), heldout_accuracy, time.time() - start


def write_readme(folder, model: DigitClassifier, extra: dict, argv=None) -> Path:
    """README of a classifier folder: accuracy, how it was made, and the real-vs-real FD floors."""
    argv = sys.argv[1:] if argv is None else argv
    floors = {n: real_floor(model, num_per_digit=n) for n in (10, 20, 36)}
    lines = [
        f"A small CNN ({sum(p.numel() for p in model.parameters()):,} parameters) that reads "
        f"{model.resolution}x{model.resolution} digits (the generation resolution), trained on the train split",
        "of `lcm_kit.digits` with light affine augmentation. Its penultimate layer "
        f"({model.config['feature_dim']} ReLU units) gives the features of the harness's Fréchet distance (FD).",
        "",
        f"- held-out accuracy (360 images never seen in training): **{100 * extra['heldout_accuracy']:.2f}%**",
        f"- command: `HF_HUB_OFFLINE=1 python -m lcm_kit.digits.classifier {' '.join(shlex.quote(a) for a in argv)}`",
        f"- seed {extra['seed']}, {extra['epochs']} epochs, {extra['train_seconds']:.0f} s on 2 shared CPU cores, "
        f"torch {extra['torch_version']}",
        "",
        "Real-vs-real floor (real *train* digits, N per digit, scored against the held-out reference exactly as",
        "generated images are; FD is biased upward at small N, so compare samplers at equal N):",
        "",
        "| real images per digit | accuracy % | FD |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {n} | {100 * r['accuracy']:.1f} | {r['fd']:.3f} |" for n, r in floors.items()]
    path = Path(folder) / "README.md"
    path.write_text(render_card("digits classifier (lcm-kit quality harness)", ["\n".join(lines)]))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the digits classifier of the quality harness (lcm_kit.eval).")
    parser.add_argument("--output_dir", default=str(digits.classifier_path()))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=digits.DEFAULT_RESOLUTION)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--num_threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    model, heldout_accuracy, seconds = train_classifier(args.resolution, args.epochs, seed=args.seed)
    extra = {
        "heldout_accuracy": heldout_accuracy,
        "seed": args.seed,
        "epochs": args.epochs,
        "train_seconds": round(seconds, 1),
        "torch_version": torch.__version__,
    }
    model.save_pretrained(args.output_dir, extra)
    write_readme(args.output_dir, model, extra, argv)
    print(f"held-out accuracy {heldout_accuracy:.4f} ({seconds:.0f} s) -> {args.output_dir}")
    return model, heldout_accuracy


if __name__ == "__main__":
    main()
