"""Fidelity to the guided teacher: what distillation is for, beside closeness to the data.

FD to real digits alone can mislead: an undistilled model sampled without guidance is close to the data because it
is unguided, and can score better than a good student of the *guided* teacher. Two measures compare a student with
the teacher it was distilled from, at the guidance it was distilled for:

* :func:`teacher_reference` + ``evaluate_images(..., reference=stats)``: the Fréchet distance of the student's
  samples to the teacher's own many-step samples (classifier features, as the data FD);
* :func:`ode_solution_latents` + :func:`mean_latent_distance`: the distance of a one-step sample to the teacher's
  deterministic ODE solution from the *same* initial latents (DDIM, many steps), which is what a consistency function
  is defined to return.
"""

from __future__ import annotations

import numpy as np
import torch

from .classifier import DigitClassifier
from .metrics import (
    classifier_outputs,
    evaluate_pipeline,
    feature_statistics,
    generate_digits,
    load_classifier,
    make_scheduler,
    to_classifier_range,
)

ODE_SOLUTION_STEPS = 100
TEACHER_REFERENCE_STEPS = 25


def image_feature_statistics(images: torch.Tensor, classifier: DigitClassifier | None = None,
                             value_range: tuple = (0.0, 1.0)):
    """``(mu, sigma)`` of the classifier features of ``images`` (for ``evaluate_images(reference=...)``)."""
    classifier = classifier or load_classifier()
    _, features = classifier_outputs(classifier, to_classifier_range(images, value_range))
    return feature_statistics(features)


def teacher_reference(pipe, guidance_scale: float, num_per_digit: int = 20, seed: int = 0,
                      classifier: DigitClassifier | None = None, steps: int = TEACHER_REFERENCE_STEPS,
                      scheduler: str = "dpmsolver") -> dict:
    """The teacher's own samples at ``guidance_scale`` (DPM-Solver, ``steps``): ``{"row", "images", "stats"}`` —
    its harness row (accuracy, FD to the data), the images in [0, 1] and their feature statistics."""
    row, images = evaluate_pipeline(pipe, scheduler, steps, guidance_scale, num_per_digit, seed,
                                    name=f"teacher {scheduler} {steps} steps", classifier=classifier,
                                    return_images=True)
    return {"row": row, "images": images, "stats": image_feature_statistics(images, classifier)}


@torch.no_grad()
def generate_latents(pipe, scheduler: str, steps: int, guidance_scale: float, num_per_digit: int = 20, seed: int = 0,
                     scheduler_config: dict | None = None, **call_kwargs) -> torch.Tensor:
    """The final latents of the harness' samples (image ``i`` from seed ``seed + i``, as
    :func:`~lcm_kit.eval.metrics.generate_digits`) with ``scheduler`` (:func:`~lcm_kit.eval.metrics.make_scheduler`,
    ``scheduler_config`` its overrides), swapped in for the call and restored."""
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(scheduler, original.config, **(scheduler_config or {})) or original
    try:
        latents, _ = generate_digits(pipe, steps, guidance_scale, num_per_digit, seed, output_type="latent",
                                     **call_kwargs)
    finally:
        pipe.scheduler = original
    return latents


def ode_solution_latents(pipe, guidance_scale: float, num_per_digit: int = 20, seed: int = 0,
                         steps: int = ODE_SOLUTION_STEPS) -> torch.Tensor:
    """The teacher's deterministic probability-flow ODE solution (DDIM, eta 0, ``timestep_spacing="trailing"`` so
    it starts at the last training timestep, ``steps`` steps) from the harness' initial latents: image ``i`` starts
    from seed ``seed + i`` as in :func:`~lcm_kit.eval.metrics.generate_digits`. Returns the final latents."""
    return generate_latents(pipe, "ddim", steps, guidance_scale, num_per_digit, seed)


def mean_latent_distance(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of the root-mean-square difference of two latent batches of the same shape."""
    latents, reference = torch.as_tensor(latents).double(), torch.as_tensor(reference).double()
    if latents.shape != reference.shape:
        raise ValueError(f"latents {tuple(latents.shape)} and reference {tuple(reference.shape)} must have the same "
                         "shape (the same samples, in the same order).")
    per_sample = (latents - reference).flatten(1).pow(2).mean(1).sqrt()
    value = float(per_sample.mean())
    if not np.isfinite(value):
        raise ValueError("the latent distance is not finite: a sampler produced NaN or inf latents.")
    return value
