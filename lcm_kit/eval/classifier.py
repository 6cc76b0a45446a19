"""A small CNN digit classifier at the generation resolution: the feature extractor of the quality harness.

Trained on the train split of :mod:`lcm_kit.digits` (upscaled exactly as the teacher's training images) with
light geometric augmentation, so it judges generated images at full resolution (never downsampled to 8x8,
where blur would become invisible). Its penultimate layer (``feature_dim`` ReLU units) plays the role of
Inception's pool features in FID. Shipped in ``lcm_kit/assets/digits_classifier`` (safetensors +
``config.json``); retrain with::

    python -m lcm_kit.eval.classifier --output_dir lcm_kit/assets/digits_classifier --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from lcm_kit import digits

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class DigitClassifier(nn.Module):
    """conv-conv-pool, conv-conv-pool, conv-pool, linear (features), linear (logits).

    Input: images in [-1, 1], ``(B, 1 or 3, R, R)`` (RGB is averaged to gray, as the digits are gray)."""

    def __init__(self, resolution: int = 32, channels=(32, 64, 64), feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        if resolution % 8 != 0:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution!r}.")
        c1, c2, c3 = channels
        self.config = {
            "resolution": resolution,
            "channels": list(channels),
            "feature_dim": feature_dim,
            "num_classes": num_classes,
        }
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(c3 * (resolution // 8) ** 2, feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def resolution(self) -> int:
        return self.config["resolution"]

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (B, 1 or 3, H, W), got {tuple(images.shape)}.")
        if images.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(
                f"images must be {self.resolution}x{self.resolution} (the classifier's resolution; resize "
                f"explicitly if you mean to), got {tuple(images.shape[-2:])}."
            )
        return images.mean(dim=1, keepdim=True).to(next(self.parameters()).dtype)

    def forward_with_features(self, images: torch.Tensor):
        """``(logits, penultimate features)`` of images in [-1, 1]."""
        features = self.features(self.conv(self._prepare(images)))
        return self.head(self.dropout(features)), features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(images)[0]

    def save_pretrained(self, folder, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS_NAME)
        (folder / CONFIG_NAME).write_text(json.dumps({**self.config, **(extra or {})}, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder=None, device="cpu") -> "DigitClassifier":
        """Load from a folder (default: the shipped classifier), in eval mode."""
        from safetensors.torch import load_file

        folder = Path(folder) if folder is not None else digits.classifier_path()
        if not (folder / WEIGHTS_NAME).is_file():
            raise ValueError(f"folder has no {WEIGHTS_NAME}: {str(folder)!r}.")
        config = json.loads((folder / CONFIG_NAME).read_text())
        model = cls(config["resolution"], tuple(config["channels"]), config["feature_dim"], config["num_classes"])
        model.load_state_dict(load_file(folder / WEIGHTS_NAME))  # strict: every key must match
        model.metadata = config
        return model.to(device).eval()


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
    import shlex
    import sys

    from lcm_kit.eval.metrics import real_floor

    argv = sys.argv[1:] if argv is None else argv
    floors = {n: real_floor(model, num_per_digit=n) for n in (10, 20, 36)}
    lines = [
        "# digits classifier (lcm-kit quality harness)",
        "",
        f"A small CNN ({sum(p.numel() for p in model.parameters()):,} parameters) that reads "
        f"{model.resolution}x{model.resolution} digits (the generation resolution), trained on the train split",
        "of `lcm_kit.digits` with light affine augmentation. Its penultimate layer "
        f"({model.config['feature_dim']} ReLU units) gives the features of the harness's Fréchet distance (FD).",
        "",
        f"- held-out accuracy (360 images never seen in training): **{100 * extra['heldout_accuracy']:.2f}%**",
        f"- command: `HF_HUB_OFFLINE=1 python -m lcm_kit.eval.classifier {' '.join(shlex.quote(a) for a in argv)}`",
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
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the digits classifier of lcm_kit.eval.")
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
