"""The digits classifier model: a small CNN at the generation resolution, the feature extractor of the harness.

It judges generated images at full resolution (never downsampled to 8x8, where blur would become invisible); its
penultimate layer (``feature_dim`` ReLU units) plays the role of Inception's pool features in FID. Shipped in
``lcm_kit/assets/digits_classifier`` (safetensors + ``config.json``); trained by :mod:`lcm_kit.digits.classifier`::

    python -m lcm_kit.digits.classifier --output_dir lcm_kit/assets/digits_classifier --seed 0
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .. import digits

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
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS_NAME)
        (folder / CONFIG_NAME).write_text(json.dumps({**self.config, **(extra or {})}, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder=None, device="cpu") -> "DigitClassifier":
        """Load from a folder (default: the shipped classifier), in eval mode."""

        folder = Path(folder) if folder is not None else digits.classifier_path()
        if not (folder / WEIGHTS_NAME).is_file():
            raise ValueError(f"folder has no {WEIGHTS_NAME}: {str(folder)!r}.")
        config = json.loads((folder / CONFIG_NAME).read_text())
        model = cls(config["resolution"], tuple(config["channels"]), config["feature_dim"], config["num_classes"])
        model.load_state_dict(load_file(folder / WEIGHTS_NAME))  # strict: every key must match
        model.metadata = config
        return model.to(device).eval()
