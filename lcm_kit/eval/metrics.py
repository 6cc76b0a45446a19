"""Quality metrics for any sampler on the digits domain.

- prompt accuracy: how often the shipped classifier reads the prompted digit in a generated image;
- Fréchet distance (FD): between Gaussians fitted to the classifier's penultimate features of generated
  images and of the held-out real digits (an FID-style score for this domain; lower is better).

Both are computed on full-resolution images (the classifier works at the generation resolution).
:func:`evaluate_pipeline` generates every digit with fixed prompts and per-image seeds, so rows for different
samplers, step counts and guidances are directly comparable; :func:`format_table` prints them.
"""

from __future__ import annotations

import math
import time
from typing import Iterable, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler, TCDScheduler
from tqdm.auto import tqdm

from .. import digits
from ..schedulers.scheduling_lcm import ConsistencyScheduler
from .classifier import DigitClassifier

SCHEDULERS = ("dpmsolver", "ddim", "lcm", "consistency", "tcd", "default")

_CLASSIFIER_CACHE: dict = {}
_REFERENCE_CACHE: dict = {}


def load_classifier(folder=None, device="cpu") -> DigitClassifier:
    """The shipped digits classifier (cached per folder and device)."""
    key = (str(folder), str(device))
    if key not in _CLASSIFIER_CACHE:
        _CLASSIFIER_CACHE[key] = DigitClassifier.from_pretrained(folder, device=device)
    return _CLASSIFIER_CACHE[key]


@torch.no_grad()
def classifier_outputs(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 256):
    """``(predicted digits, penultimate features as float64 numpy)`` of images in [-1, 1]."""
    device = next(classifier.parameters()).device
    predictions, features = [], []
    for start in range(0, len(images), batch_size):
        logits, feats = classifier.forward_with_features(images[start : start + batch_size].to(device))
        predictions.append(logits.argmax(1).cpu())
        features.append(feats.double().cpu())
    return torch.cat(predictions), torch.cat(features).numpy()


def feature_statistics(features: np.ndarray):
    """Mean and (unbiased) covariance of an ``(N, D)`` feature matrix, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape (N >= 2, D), got {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^1/2)``.

    The trace of the matrix square root is computed from a symmetric eigen-decomposition,
    ``tr((s1 s2)^1/2) = sum sqrt(eig(s1^1/2 s2 s1^1/2))``, which is real and stable for the singular,
    rank-deficient covariances that few samples and ReLU features give (no complex parts to discard, unlike
    a general ``sqrtm``); tiny negative eigenvalues from round-off are clipped to zero."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shapes must agree: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, sigma2 {sigma2.shape}."
        )
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    eigvals, eigvecs = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(distance, 0.0)


def reference_statistics(classifier: DigitClassifier | None = None, split: str = "heldout"):
    """Feature mean/covariance of a real split (default: the held-out digits), cached."""
    classifier = classifier or load_classifier()
    key = (id(classifier), split)
    if key not in _REFERENCE_CACHE:
        images, _ = digits.load_split(split, classifier.resolution)
        _, features = classifier_outputs(classifier, images)
        _REFERENCE_CACHE[key] = feature_statistics(features)
    return _REFERENCE_CACHE[key]


def to_classifier_range(images, value_range: tuple = (-1.0, 1.0)) -> torch.Tensor:
    """``images`` in ``value_range`` mapped to the classifier's [-1, 1], as float32."""
    low, high = value_range
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range!r}.")
    return (torch.as_tensor(images, dtype=torch.float32) - low) / (high - low) * 2.0 - 1.0


def evaluate_images(
    images: torch.Tensor,
    labels,
    classifier: DigitClassifier | None = None,
    reference: tuple | None = None,
    value_range: tuple = (-1.0, 1.0),
) -> dict:
    """Prompt accuracy and FD of ``images`` (``(N, 3 or 1, R, R)``) that were meant to show ``labels``.

    ``value_range`` is the range the images are in (pipelines' ``output_type="pt"`` gives (0, 1)).
    ``reference``: ``(mu, sigma)`` of real features; default the held-out split."""
    classifier = classifier or load_classifier()
    images = torch.as_tensor(images, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    if len(images) != len(labels):
        raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) must have the same length.")
    predictions, features = classifier_outputs(classifier, to_classifier_range(images, value_range))
    mu_ref, sigma_ref = reference if reference is not None else reference_statistics(classifier)
    mu, sigma = feature_statistics(features)
    correct = predictions == labels
    per_digit = {int(d): float(correct[labels == d].float().mean()) for d in labels.unique()}
    return {
        "accuracy": float(correct.float().mean()),
        "fd": frechet_distance(mu, sigma, mu_ref, sigma_ref),
        "n": int(len(labels)),
        "per_digit_accuracy": per_digit,
    }


def real_floor(classifier: DigitClassifier | None = None, num_per_digit: int = 20, seed: int = 0) -> dict:
    """Scores of ``num_per_digit`` real *train* images per digit against the held-out reference: the best a
    sampler can hope for at that sample count (FD has a small-sample bias, so compare at equal counts)."""
    classifier = classifier or load_classifier()
    images, labels = digits.load_split("train", classifier.resolution)
    generator = torch.Generator().manual_seed(seed)
    picks = [torch.nonzero(labels == d).flatten() for d in range(10)]
    picks = torch.cat([p[torch.randperm(len(p), generator=generator)[:num_per_digit]] for p in picks])
    return evaluate_images(images[picks], labels[picks], classifier=classifier)


def make_scheduler(name: str, config, **overrides):
    """A scheduler for ``name`` built from a pipeline's scheduler ``config`` (``overrides``: config keys set on top,
    e.g. ``original_inference_steps``):

    - ``"dpmsolver"``: ``DPMSolverMultistepScheduler.from_config(config)`` (diffusers' defaults);
    - ``"ddim"``: ``DDIMScheduler`` with ``timestep_spacing="trailing"`` (the few-step-correct grid: with SD's
      "leading" spacing a 1-step DDIM runs at t = 1 and says nothing);
    - ``"lcm"``: diffusers' ``LCMScheduler``; ``"consistency"``: lcm-kit's ``ConsistencyScheduler``;
    - ``"tcd"``: diffusers' ``TCDScheduler`` (PCM and TCD models; its ``eta`` is a pipeline call argument);
    - ``"default"``: the pipeline's own scheduler, unchanged (returns ``None``)."""
    if name == "dpmsolver":
        return DPMSolverMultistepScheduler.from_config(config, **overrides)
    if name == "ddim":
        return DDIMScheduler.from_config(config, **{"timestep_spacing": "trailing", **overrides})
    if name == "lcm":
        return LCMScheduler.from_config(config, **overrides)
    if name == "consistency":
        return ConsistencyScheduler.from_config(config, **overrides)
    if name == "tcd":
        return TCDScheduler.from_config(config, **overrides)
    if name == "default":
        if overrides:
            raise ValueError(f"scheduler 'default' is the pipeline's own and takes no overrides, got {overrides}.")
        return None
    raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}.")


def generate_digits(
    pipe,
    num_inference_steps: int,
    guidance_scale: float,
    num_per_digit: int = 10,
    seed: int = 0,
    batch_size: int = 100,
    digits_to_generate: Sequence[int] = tuple(range(10)),
    progress: bool = False,
    output_type: str = "pt",
    **call_kwargs,
):
    """Images ``(N, 3, R, R)`` in [0, 1] and labels, ``num_per_digit`` per digit with the fixed prompt
    :func:`lcm_kit.digits.eval_prompt`. Image ``i`` (digit-major order) starts from the noise of
    ``torch.Generator("cpu").manual_seed(seed + i)``, so results do not depend on ``batch_size`` or device, and two
    pipelines with the same latent shape start from the same latents. ``output_type="latent"`` returns the final
    latents instead of images."""
    if num_per_digit < 1:
        raise ValueError(f"num_per_digit must be >= 1, got {num_per_digit!r}.")
    labels = [d for d in digits_to_generate for _ in range(num_per_digit)]
    prompts = [digits.eval_prompt(d) for d in labels]
    images = []
    starts = range(0, len(labels), batch_size)
    for start in tqdm(starts, desc="generating", disable=not progress, dynamic_ncols=True):
        stop = min(start + batch_size, len(labels))
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(start, stop)]
        output = pipe(
            prompt=prompts[start:stop],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type=output_type,
            **call_kwargs,
        )
        images.append(output.images.float().cpu())
    return torch.cat(images), torch.tensor(labels)


def evaluate_pipeline(
    pipe,
    scheduler: str = "dpmsolver",
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    num_per_digit: int = 10,
    seed: int = 0,
    name: str | None = None,
    classifier: DigitClassifier | None = None,
    batch_size: int = 100,
    progress: bool = False,
    standard_metrics: bool = False,
    return_images: bool = False,
    scheduler_config: dict | None = None,
    **call_kwargs,
) -> dict | tuple[dict, torch.Tensor]:
    """Generate every digit with ``scheduler`` (see :func:`make_scheduler`) and score it.

    The pipeline's scheduler is swapped for the run and restored afterwards. Returns a row:
    ``{"name", "scheduler", "steps", "guidance_scale", "accuracy", "fd", "n", "per_digit_accuracy",
    "seconds"}`` (+ ``"standard_metrics"`` from :func:`optional_standard_metrics` when ``standard_metrics``);
    ``scheduler_config``: config keys set on the scheduler (:func:`make_scheduler`'s ``overrides``);
    ``call_kwargs`` go to the pipeline call (e.g. ``height``/``width``, ``eta``, ``timesteps``). With
    ``return_images`` returns ``(row, images)``: the generated images in [0, 1], digit-major (``num_per_digit`` of
    0, then of 1, ...)."""
    if int(num_inference_steps) < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}.")
    original = pipe.scheduler
    replacement = make_scheduler(scheduler, original.config, **(scheduler_config or {}))
    start = time.time()
    try:
        if replacement is not None:
            pipe.scheduler = replacement
        images, labels = generate_digits(
            pipe, num_inference_steps, guidance_scale, num_per_digit, seed, batch_size, progress=progress,
            **call_kwargs,
        )
    finally:
        pipe.scheduler = original
    seconds = time.time() - start
    row = {
        "name": name or f"{scheduler} {num_inference_steps} steps",
        "scheduler": scheduler,
        "steps": int(num_inference_steps),
        "guidance_scale": float(guidance_scale),
    }
    row.update(evaluate_images(images, labels, classifier=classifier, value_range=(0.0, 1.0)))
    row["seconds"] = round(seconds, 2)
    if standard_metrics:
        real, _ = digits.load_split("heldout", images.shape[-1])
        prompts = [digits.eval_prompt(int(d)) for d in labels]
        row["standard_metrics"] = optional_standard_metrics(images, (real + 1) / 2, prompts)
    return (row, images) if return_images else row


def optional_standard_metrics(images: torch.Tensor, real_images: torch.Tensor, prompts: Iterable[str]) -> dict:
    """FID (Inception) and CLIP score through torchmetrics when it is installed *and* its weights are
    available locally; otherwise each is skipped with the reason in ``result["skipped"]`` (never a download
    attempt when ``HF_HUB_OFFLINE`` is set; torchmetrics is not a dependency of lcm-kit).

    Images in [0, 1], ``(N, 3, H, W)``."""
    result: dict = {"skipped": {}}
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        message = "torchmetrics is not installed (pip install torchmetrics[image,multimodal] to enable FID/CLIP)"
        result["skipped"] = {"fid": message, "clip_score": message}
        return result
    to_uint8 = lambda x: (x.clamp(0, 1) * 255).round().to(torch.uint8)  # noqa: E731
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=2048)
        fid.update(to_uint8(real_images), real=True)
        fid.update(to_uint8(images), real=False)
        result["fid"] = float(fid.compute())
    except Exception as error:  # weights missing offline, torch-fidelity absent, ...
        result["skipped"]["fid"] = f"FID unavailable: {type(error).__name__}: {error}"
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore

        clip = CLIPScore(model_name_or_path="openai/clip-vit-base-patch16")
        result["clip_score"] = float(clip(to_uint8(images), list(prompts)))
    except Exception as error:
        result["skipped"]["clip_score"] = f"CLIP score unavailable: {type(error).__name__}: {error}"
    return result


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of evaluation rows: sampler, steps, guidance, accuracy %, FD and, when the rows hold
    a 25-step DPM-Solver row (the teacher reference), each FD divided by the reference FD at the same guidance
    (or by the first reference when none matches)."""
    if not rows:
        raise ValueError("rows must contain at least one row, got an empty sequence.")
    reference = next((r for r in rows if r.get("scheduler") == "dpmsolver" and r.get("steps") == 25), None)
    header = ["sampler", "steps", "guidance", "accuracy %", "FD"]
    if reference is not None:
        header.append("FD / DPM-Solver 25")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [
            str(row.get("name", row.get("scheduler", "?"))),
            str(row.get("steps", "")),
            f"{row['guidance_scale']:g}" if "guidance_scale" in row else "",
            f"{100 * row['accuracy']:.1f}",
            f"{row['fd']:.3f}",
        ]
        if reference is not None:
            same_guidance = [
                r for r in rows if r.get("scheduler") == "dpmsolver" and r.get("steps") == 25
                and r.get("guidance_scale") == row.get("guidance_scale")
            ]
            base = same_guidance[0] if same_guidance else reference
            cells.append(f"{row['fd'] / base['fd']:.2f}x" if base["fd"] > 0 and not math.isnan(row["fd"]) else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
