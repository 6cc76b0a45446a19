"""Quality harness: Fréchet distance maths, the shipped classifier, metrics on known inputs, sampler rows, CLI."""

import json

import numpy as np
import pytest
import torch

from lcm_kit import digits
from lcm_kit.digits.classifier import accuracy
from lcm_kit.eval import (
    evaluate_images,
    evaluate_pipeline,
    format_table,
    frechet_distance,
    load_classifier,
    make_scheduler,
)
from lcm_kit.eval.classifier import DigitClassifier


def _scipy_frechet(mu1, s1, mu2, s2):
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_closed_forms():
    # 1-D: (m1 - m2)^2 + (std1 - std2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + np.eye(6), b @ b.T + 0.5 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    # singular (rank-deficient) covariances stay finite and real
    low_rank = np.outer(mu1, mu1)
    assert np.isfinite(frechet_distance(mu1, low_rank, mu2, low_rank))
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_shipped_classifier_heldout_accuracy_at_least_97_percent():
    classifier = load_classifier()
    images, labels = digits.load_split("heldout", classifier.resolution)
    measured = accuracy(classifier, images, labels)
    assert measured >= 0.97
    assert classifier.metadata["heldout_accuracy"] == pytest.approx(measured, abs=1e-6)
    assert classifier.resolution == 32  # full generation resolution, never 8x8


def test_metrics_on_known_inputs():
    images, labels = digits.load_split("heldout")
    real = evaluate_images(images, labels)
    assert real["accuracy"] >= 0.97 and real["fd"] < 1e-6 and real["n"] == 360
    # another real split (360 train images) vs the held-out reference: the real-vs-real floor
    train_images, train_labels = digits.load_split("train")
    other = evaluate_images(train_images[:360], train_labels[:360])
    assert other["accuracy"] >= 0.97
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=generator).clamp(-1, 1)
    noisy = evaluate_images(noise, labels)
    assert noisy["accuracy"] < 0.3
    assert noisy["fd"] > 20 * other["fd"] > 0
    # blurred digits (8x8 -> 4x4 -> 32x32) are worse than real ones but better than noise
    blurred = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images, 8), size=32, mode="bilinear")
    blur = evaluate_images(blurred, labels)
    assert other["fd"] < blur["fd"] < noisy["fd"]
    # value ranges: [0, 1] images scored with value_range=(0, 1) give the same numbers
    same = evaluate_images((images + 1) / 2, labels, value_range=(0.0, 1.0))
    assert same["fd"] == pytest.approx(real["fd"], abs=1e-6) and same["accuracy"] == real["accuracy"]
    with pytest.raises(ValueError, match="32x32"):
        evaluate_images(images[:, :, :16, :16], labels)
    with pytest.raises(ValueError, match="same length"):
        evaluate_images(images, labels[:5])


def test_classifier_save_load_round_trip(tmp_path):
    model = DigitClassifier(32)
    model.save_pretrained(tmp_path, {"note": 1})
    loaded = DigitClassifier.from_pretrained(tmp_path)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    model.eval()
    assert torch.equal(model(x), loaded(x)) and loaded.metadata["note"] == 1
    with pytest.raises(ValueError, match="model.safetensors"):
        DigitClassifier.from_pretrained(tmp_path / "nothing")


def test_make_scheduler_choices():
    from lcm_kit.testing import tiny_scheduler

    config = tiny_scheduler("sd1").config
    ddim = make_scheduler("ddim", config)
    assert ddim.config.timestep_spacing == "trailing"
    ddim.set_timesteps(1)
    assert ddim.timesteps.tolist() == [999]  # trailing: one step starts from pure noise, not t = 1
    assert type(make_scheduler("dpmsolver", config)).__name__ == "DPMSolverMultistepScheduler"
    assert type(make_scheduler("lcm", config)).__name__ == "LCMScheduler"
    assert type(make_scheduler("consistency", config)).__name__ == "ConsistencyScheduler"
    assert make_scheduler("default", config) is None
    with pytest.raises(ValueError, match="scheduler"):
        make_scheduler("euler", config)


@pytest.fixture(scope="module")
def teacher():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(digits.teacher_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_evaluate_pipeline_is_seeded_batch_independent_and_restores_scheduler(teacher):
    pipe = teacher
    original = pipe.scheduler
    a = evaluate_pipeline(pipe, "ddim", 2, 2.0, num_per_digit=2, seed=7, batch_size=20)
    b = evaluate_pipeline(pipe, "ddim", 2, 2.0, num_per_digit=2, seed=7, batch_size=7)
    assert pipe.scheduler is original
    assert a["n"] == 20 and a["steps"] == 2 and a["scheduler"] == "ddim"
    assert a["fd"] == pytest.approx(b["fd"], rel=1e-4) and a["accuracy"] == b["accuracy"]
    c = evaluate_pipeline(pipe, "ddim", 2, 2.0, num_per_digit=2, seed=8)
    assert c["fd"] != pytest.approx(a["fd"], rel=1e-6)
    table = format_table([a, c])
    assert table.count("\n") == 3 and "ddim 2 steps" in table and f"{a['fd']:.3f}" in table


def test_format_table_ratio_to_25_step_teacher():
    rows = [
        {"name": "teacher", "scheduler": "dpmsolver", "steps": 25, "guidance_scale": 3.0, "accuracy": 1.0, "fd": 2.0},
        {"name": "ddim", "scheduler": "ddim", "steps": 4, "guidance_scale": 3.0, "accuracy": 0.9, "fd": 3.0},
    ]
    table = format_table(rows)
    assert "1.50x" in table and "1.00x" in table and "90.0" in table
    with pytest.raises(ValueError, match="rows"):
        format_table([])


def test_eval_cli_writes_json(tmp_path, capsys):
    from lcm_kit.commands.eval import eval_main

    out = tmp_path / "metrics.json"
    assert eval_main(["--scheduler", "ddim", "lcm", "--steps", "1", "--guidance_scale", "3", "--num_per_digit", "2",
                      "--device", "cpu", "--json", str(out), "--standard_metrics"]) == 0
    payload = json.loads(out.read_text())
    assert [r["scheduler"] for r in payload["rows"]] == ["ddim", "lcm"]
    assert payload["rows"][0]["n"] == 20 and payload["rows"][0]["steps"] == 1
    printed = capsys.readouterr().out
    assert "| ddim" in printed and "| lcm" in printed
    # FID / CLIP: computed when torchmetrics and its weights are available, otherwise skipped with a reason
    standard = payload["rows"][0]["standard_metrics"]
    for metric in ("fid", "clip_score"):
        assert metric in standard or (metric in standard["skipped"] and f"{metric} skipped" in printed)
    with pytest.raises(SystemExit):
        eval_main(["--model", str(tmp_path / "missing")])
