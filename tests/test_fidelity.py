"""Fidelity to the guided teacher (lcm_kit.eval.fidelity): the latent distance, the ODE-solution latents against a
direct stock DDIM call from the same noise, and FD to the teacher's own samples (0 for the same samples)."""

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from lcm_kit import digits
from lcm_kit.eval import evaluate_images, load_classifier
from lcm_kit.eval.fidelity import image_feature_statistics, mean_latent_distance, ode_solution_latents


def test_mean_latent_distance_is_the_mean_per_sample_rms():
    a = torch.zeros(2, 4, 2, 2)
    b = torch.stack([torch.full((4, 2, 2), 1.0), torch.full((4, 2, 2), 3.0)])
    assert mean_latent_distance(a, b) == pytest.approx(2.0)
    assert mean_latent_distance(b, b) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        mean_latent_distance(a, b[:1])
    with pytest.raises(ValueError, match="not finite"):
        mean_latent_distance(a, torch.full_like(a, float("nan")))


def test_ode_solution_latents_are_stock_trailing_ddim_from_the_harness_noise():
    pipe = StableDiffusionPipeline.from_pretrained(str(digits.teacher_path()))
    pipe.set_progress_bar_config(disable=True)
    latents = ode_solution_latents(pipe, 3.0, num_per_digit=1, steps=3)
    assert type(pipe.scheduler) is not DDIMScheduler or pipe.scheduler.config.timestep_spacing != "trailing"
    reference = StableDiffusionPipeline.from_pretrained(str(digits.teacher_path()))
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config, timestep_spacing="trailing")
    reference.set_progress_bar_config(disable=True)
    expected = reference([digits.eval_prompt(d) for d in range(10)], num_inference_steps=3, guidance_scale=3.0,
                         generator=[torch.Generator("cpu").manual_seed(i) for i in range(10)],
                         output_type="latent").images
    torch.testing.assert_close(latents, expected, atol=1e-6, rtol=0)


def test_fd_to_the_teachers_samples_is_zero_for_the_same_samples_and_not_for_others():
    images, labels = digits.load_split("heldout", 32)
    classifier = load_classifier()
    first, other = (images[:200] + 1) / 2, (images[200:400] + 1) / 2
    stats = image_feature_statistics(first, classifier)
    same = evaluate_images(first, labels[:200], classifier=classifier, reference=stats, value_range=(0.0, 1.0))
    different = evaluate_images(other, labels[200:400], classifier=classifier, reference=stats, value_range=(0.0, 1.0))
    assert same["fd"] == pytest.approx(0.0, abs=1e-6) and different["fd"] > 0.1
