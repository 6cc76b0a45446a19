"""The shipped digits data: real handwritten digits for the teacher, its classifier and every offline demo.

The data is scikit-learn's ``load_digits`` (1,797 real 8x8 scans, shipped with scikit-learn: no download).
A fixed, seeded 80/20 split gives a train set (teacher, VAE, classifier, distillation) and a held-out set
used for evaluation only. Images are upscaled to the generation resolution (32x32 by default, bicubic) as
white ink on a black background, replicated to RGB so they go through a stock Stable-Diffusion VAE.

    train = DigitsDataset("train", caption_dropout=0.1)      # torch Dataset: pixel_values, label, caption
    images, labels = load_split("heldout")                  # float32 (N, 3, 32, 32) in [-1, 1], int64 (N,)
    pipe = StableDiffusionPipeline.from_pretrained(teacher_path())
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SPLITS = ("train", "heldout")
DEFAULT_RESOLUTION = 32
DEFAULT_SPLIT_SEED = 0
HELDOUT_FRACTION = 0.2
UPSCALE_MODES = ("bicubic", "bilinear", "nearest")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Caption templates; ``{n}`` is the numeral, ``{word}`` the English word. Variety makes the text encoder
# learn that "7", "seven" and "number 7" mean the same digit.
CAPTION_TEMPLATES = (
    "a handwritten {n}",
    "a handwritten {word}",
    "the digit {word}",
    "the digit {n}",
    "number {n}",
    "the number {word}",
    "a handwritten digit {n}",
    "a scan of a handwritten {word}",
    "{n}",
    "{word}",
    "digit {n}",
    "a drawing of the number {n}",
)

# The one prompt per digit used by the evaluation harness (fixed so every sampler sees the same text).
EVAL_PROMPT_TEMPLATE = "a handwritten {n}"


def teacher_path() -> Path:
    """Folder of the shipped digits teacher (a standard diffusers Stable-Diffusion folder)."""
    return ASSETS / "digits_teacher"


def classifier_path() -> Path:
    """Folder of the shipped digits classifier (safetensors + config.json) used by :mod:`lcm_kit.eval`."""
    return ASSETS / "digits_classifier"


def eval_prompt(digit: int) -> str:
    """The fixed evaluation prompt for ``digit`` (e.g. ``"a handwritten 7"``)."""
    _check_digit(digit)
    return EVAL_PROMPT_TEMPLATE.format(n=digit, word=DIGIT_WORDS[digit])


def caption_for(digit: int, rng: random.Random, caption_dropout: float = 0.0) -> str:
    """A caption for ``digit`` drawn from :data:`CAPTION_TEMPLATES` with ``rng``; the empty string (the
    unconditional prompt the pipelines use for classifier-free guidance) with probability ``caption_dropout``."""
    _check_digit(digit)
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout!r}.")
    if caption_dropout > 0 and rng.random() < caption_dropout:
        return ""
    template = CAPTION_TEMPLATES[rng.randrange(len(CAPTION_TEMPLATES))]
    return template.format(n=digit, word=DIGIT_WORDS[digit])


def caption_vocabulary() -> list[str]:
    """Every word that can appear in a caption or an evaluation prompt (used to build the small tokenizer)."""
    words = set()
    for digit in range(10):
        for template in CAPTION_TEMPLATES + (EVAL_PROMPT_TEMPLATE,):
            words.update(template.format(n=digit, word=DIGIT_WORDS[digit]).split())
    return sorted(words)


def split_indices(seed: int = DEFAULT_SPLIT_SEED, heldout_fraction: float = HELDOUT_FRACTION):
    """Indices of the train and held-out sets: a stratified, seeded split of the 1,797 digits (80/20)."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}.")
    _, labels = _raw_digits()
    indices = np.arange(len(labels))
    train, heldout = train_test_split(
        indices, test_size=heldout_fraction, random_state=seed, shuffle=True, stratify=labels
    )
    return np.sort(train), np.sort(heldout)


def upscale(images_8x8, resolution: int = DEFAULT_RESOLUTION, mode: str = "bicubic") -> torch.Tensor:
    """8x8 digit scans (values 0..16, shape (N, 8, 8)) -> float32 RGB images (N, 3, R, R) in [-1, 1].

    Ink is white on black. Bicubic overshoot is clipped so the range stays exactly [-1, 1]."""
    if mode not in UPSCALE_MODES:
        raise ValueError(f"mode must be one of {UPSCALE_MODES}, got {mode!r}.")
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an int >= 8, got {resolution!r}.")
    x = torch.as_tensor(np.asarray(images_8x8), dtype=torch.float32)
    if x.ndim != 3 or x.shape[1:] != (8, 8):
        raise ValueError(f"images_8x8 must have shape (N, 8, 8), got {tuple(x.shape)}.")
    x = (x / 16.0).unsqueeze(1)
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    x = F.interpolate(x, size=(resolution, resolution), mode=mode, **kwargs).clamp(0.0, 1.0)
    return (x * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()


def load_split(
    split: str = "train",
    resolution: int = DEFAULT_RESOLUTION,
    seed: int = DEFAULT_SPLIT_SEED,
    mode: str = "bicubic",
):
    """``(images, labels)`` of a split: float32 (N, 3, R, R) in [-1, 1] and int64 (N,)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    raw, labels = _raw_digits()
    train, heldout = split_indices(seed)
    idx = train if split == "train" else heldout
    return upscale(raw[idx], resolution, mode), torch.as_tensor(labels[idx], dtype=torch.long)


class DigitsDataset(torch.utils.data.Dataset):
    """Captioned digits as a torch Dataset: ``{"pixel_values": (3, R, R) in [-1, 1], "label", "caption"}``.

    Captions are drawn afresh on every access from a per-item RNG seeded by ``(seed, epoch, index)``, so
    a run is reproducible but each epoch sees different wordings; call :meth:`set_epoch` between epochs.
    """

    def __init__(
        self,
        split: str = "train",
        resolution: int = DEFAULT_RESOLUTION,
        caption_dropout: float = 0.0,
        seed: int = 0,
        split_seed: int = DEFAULT_SPLIT_SEED,
    ):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout!r}.")
        self.images, self.labels = load_split(split, resolution, split_seed)
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        label = int(self.labels[index])
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")  # str seeds are hashed stably (sha512)
        return {
            "pixel_values": self.images[index],
            "label": label,
            "caption": caption_for(label, rng, self.caption_dropout),
        }


def to_hf_dataset(split: str = "train", resolution: int = DEFAULT_RESOLUTION, seed: int = 0):
    """The split as a ``datasets.Dataset`` with an ``image`` (PIL RGB) and a ``text`` column (one caption
    per image drawn with ``seed``), the layout diffusers' text-to-image scripts expect."""
    import datasets
    from PIL import Image

    images, labels = load_split(split, resolution)
    rng = random.Random(seed)
    pixels = ((images.permute(0, 2, 3, 1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(p) for p in pixels],
            "text": [caption_for(int(label), rng) for label in labels],
            "label": [int(label) for label in labels],
        },
        features=datasets.Features(
            {"image": datasets.Image(), "text": datasets.Value("string"), "label": datasets.Value("int64")}
        ),
    )


_RAW_CACHE: tuple[np.ndarray, np.ndarray] | None = None


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    global _RAW_CACHE
    if _RAW_CACHE is None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        _RAW_CACHE = (bunch.images.astype(np.float32), bunch.target.astype(np.int64))
    return _RAW_CACHE


def _check_digit(digit) -> None:
    if not isinstance(digit, (int, np.integer)) or not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be an int in 0..9, got {digit!r}.")
