"""`lcm-kit tune-steps` and its library, lcm_kit.eval.tune: the coarse-to-fine timestep search on synthetic scores with
known optima (precision, strictly decreasing lists, the cache, K = 1, NaN), the digits FD score (silent about custom
timesteps), the command end to end on the shipped teacher, and bad command lines."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest

from lcm_kit import digits
from lcm_kit.cli import main
from lcm_kit.eval.tune import (
    CUSTOM_TIMESTEP_LOGGERS,
    digits_fd_score,
    evenly_spaced_timesteps,
    quiet_custom_timestep_warnings,
    refinement_strides,
    search_timesteps,
)


def counting_bowl(optimum):
    """A separable quadratic bowl around ``optimum`` that records every list it scores."""
    calls = []

    def score(timesteps):
        calls.append(tuple(timesteps))
        return float(sum((t - o) ** 2 for t, o in zip(timesteps, optimum)))

    return score, calls


def strictly_decreasing(timesteps):
    return all(a > b for a, b in zip(timesteps, timesteps[1:]))


def test_evenly_spaced_start_and_strides():
    assert evenly_spaced_timesteps(1) == [999]
    assert evenly_spaced_timesteps(2) == [999, 499]
    assert evenly_spaced_timesteps(3) == [999, 666, 332]
    assert evenly_spaced_timesteps(4) == [999, 749, 499, 249]  # DMD2's list
    assert evenly_spaced_timesteps(1000) == list(range(999, -1, -1))
    assert evenly_spaced_timesteps(2, first=499) == [499, 249]
    assert refinement_strides(50, 3) == [50, 25, 12, 6]
    assert refinement_strides(3, 5) == [3, 1]
    with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, 1000\], got 1001"):
        evenly_spaced_timesteps(1001)


def test_search_finds_a_known_optimum_within_the_finest_stride():
    optimum = [999, 613, 287]
    score, calls = counting_bowl(optimum)
    result = search_timesteps(score, 3, coarse_stride=50, rounds=3, progress=False)
    bowl = counting_bowl(optimum)[0]  # a second copy, for expected values
    assert result.start == [999, 666, 332] and result.start_score == bowl(result.start)
    assert result.strides == [50, 25, 12, 6]
    assert result.best[0] == 999 and strictly_decreasing(result.best)
    finest = result.strides[-1]
    # Precision finer than the coarse grid: the nearest coarse points (599 and 299, grid 999 - 50 m) are 14 and 12
    # away, so this fails if the refinement stage does nothing.
    assert all(abs(b - o) <= finest for b, o in zip(result.best, optimum)), result.best
    assert result.best_score == bowl(result.best) == min(s for _, s in result.history)
    # The cache: every list scored exactly once, in the order the history records.
    assert len(calls) == len(set(calls)) == len(result.history)
    assert [tuple(ts) for ts, _ in result.history] == calls
    assert result.history[0] == (result.start, result.start_score)
    assert all(strictly_decreasing(ts) and ts[0] == 999 and 0 <= ts[-1] for ts, _ in result.history)
    # Deterministic: the same search scores the same lists in the same order.
    again = search_timesteps(counting_bowl(optimum)[0], 3, coarse_stride=50, rounds=3, progress=False)
    assert again.history == result.history
    # Without refinement the search stops on the coarse grid, farther than the finest stride.
    coarse_only = search_timesteps(counting_bowl(optimum)[0], 3, coarse_stride=50, rounds=0, progress=False)
    assert coarse_only.best == [999, 599, 299]
    assert max(abs(b - o) for b, o in zip(coarse_only.best, optimum)) > finest


def test_search_keeps_lists_strictly_decreasing_and_in_range():
    # The optimum is not a legal list (repeated and negative values): the search must stay strictly decreasing
    # and inside [0, 999], pushing against the neighbours.
    score, calls = counting_bowl([999, 400, 400, -50])
    result = search_timesteps(score, 4, coarse_stride=50, progress=False)
    assert strictly_decreasing(result.best) and result.best[0] == 999 and result.best[-1] >= 0
    assert result.best[-1] <= 6 and abs(result.best[1] - 400) <= 25 and abs(result.best[2] - 400) <= 25
    assert all(strictly_decreasing(ts) and 0 <= ts[-1] and ts[0] <= 999 for ts in calls)
    assert len(calls) == len(set(calls))
    assert result.best_score < result.start_score


def test_one_step_is_one_evaluation_unless_the_first_timestep_is_searched():
    score, calls = counting_bowl([420])
    result = search_timesteps(score, 1, progress=False)
    assert result.best == result.start == [999] and len(result.history) == 1 and calls == [(999,)]
    result = search_timesteps(counting_bowl([420])[0], 1, search_first=True, progress=False)
    assert abs(result.best[0] - 420) <= result.strides[-1]
    result = search_timesteps(counting_bowl([999, 613])[0], 2, first=799, progress=False)
    assert result.start == [799, 399] and result.best[0] == 799


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_score_raises_naming_the_list(bad):
    def score(timesteps):
        return bad if timesteps == [999, 749] else float(abs(timesteps[1] - 600))

    with pytest.raises(ValueError, match=re.escape("score([999, 749]) returned")):
        search_timesteps(score, 2, coarse_stride=250, progress=False)


def test_search_arguments_are_checked():
    score = counting_bowl([999, 500])[0]
    with pytest.raises(ValueError, match="num_steps"):
        search_timesteps(score, 0, progress=False)
    with pytest.raises(ValueError, match="coarse_stride"):
        search_timesteps(score, 2, coarse_stride=0, progress=False)
    with pytest.raises(ValueError, match="sweeps"):
        search_timesteps(score, 2, sweeps=0, progress=False)
    with pytest.raises(TypeError, match="score"):
        search_timesteps("not callable", 2, progress=False)
    with pytest.raises(TypeError, match=re.escape("score([999, 499]) must return a number")):
        search_timesteps(lambda ts: "low", 2, progress=False)


def test_quiet_custom_timestep_warnings_restores_the_levels():
    levels = [logger.level for logger in CUSTOM_TIMESTEP_LOGGERS]
    with quiet_custom_timestep_warnings():
        assert all(not logger.isEnabledFor(logging.WARNING) for logger in CUSTOM_TIMESTEP_LOGGERS)
    assert [logger.level for logger in CUSTOM_TIMESTEP_LOGGERS] == levels


@pytest.fixture(scope="module")
def teacher():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(digits.teacher_path(), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_digits_fd_score_is_seeded_and_silent_about_off_grid_timesteps(teacher):
    with pytest.raises(ValueError, match="'ddim'.*no custom timesteps"):
        digits_fd_score(teacher, "ddim", num_per_digit=2, seed=100, guidance_scale=3.0)
    score = digits_fd_score(teacher, "consistency", num_per_digit=2, seed=100, guidance_scale=3.0,
                            scheduler_config={"original_inference_steps": 10})
    handler = Records()
    for logger in CUSTOM_TIMESTEP_LOGGERS:
        logger.addHandler(handler)
    try:
        fd = score([999, 733])  # off the 10-step grid [99, 199, ..., 999]: ConsistencyScheduler would warn
    finally:
        for logger in CUSTOM_TIMESTEP_LOGGERS:
            logger.removeHandler(handler)
    assert handler.records == []
    row = score.rows[(999, 733)]
    assert fd == row["fd"] and row["timesteps"] == [999, 733] and row["steps"] == 2 and row["n"] == 20
    assert teacher.scheduler.__class__.__name__ == "DDIMScheduler"  # restored by evaluate_pipeline
    assert score([999, 733]) == pytest.approx(fd, rel=1e-6)  # same seeds, same images


def test_tune_steps_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "out.json"
    # DDIMScheduler takes no custom timesteps list, so the teacher is tuned under DPM-Solver (with its CFG).
    code = main(["tune-steps", "--scheduler", "dpmsolver", "--guidance_scale", "3", "--steps", "2",
                 "--num_per_digit", "2", "--coarse_stride", "250", "--device", "cpu", "--json", str(out)])
    assert code == 0
    payload = json.loads(out.read_text())
    best, start = payload["best"], payload["start"]
    assert start == [999, 499] and best[0] == 999 and len(best) == 2 and strictly_decreasing(best)
    assert payload["best_fd"] <= payload["start_fd"]
    assert payload["best_fd"] == min(h["fd"] for h in payload["history"])
    assert payload["history"][0]["timesteps"] == start and payload["history"][0]["fd"] == payload["start_fd"]
    assert len({tuple(h["timesteps"]) for h in payload["history"]}) == len(payload["history"])
    assert payload["strides"] == [250, 125, 62, 31]
    settings = payload["settings"]
    assert settings["scheduler"] == "dpmsolver" and settings["seed"] == 100 and settings["num_per_digit"] == 2
    printed = capsys.readouterr().out
    assert f"\n{best}\n" in printed  # the list, ready to paste into timesteps=
    assert f"| evenly spaced | 2 | {start} |" in printed and f"| tuned | 2 | {best} |" in printed
    assert f"{payload['best_fd']:.3f}" in printed and f"{payload['start_fd']:.3f}" in printed


def test_tune_steps_loads_the_lora(tmp_path, capsys, teacher):
    import torch
    from diffusers import UNet2DConditionModel

    from lcm_kit.lora import add_lcm_lora, save_lora_weights

    unet = UNet2DConditionModel.from_pretrained(digits.teacher_path(), subfolder="unet")
    add_lcm_lora(unet, rank=4, alpha=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    save_lora_weights(unet, tmp_path / "lora")
    out = tmp_path / "one.json"
    assert main(["tune-steps", "--lora", str(tmp_path / "lora"), "--steps", "1", "--guidance_scale", "3",
                 "--num_per_digit", "2", "--device", "cpu", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["best"] == payload["start"] == [999] and len(payload["history"]) == 1
    assert "for consistency + LoRA" in capsys.readouterr().out
    bare = digits_fd_score(teacher, "consistency", num_per_digit=2, seed=100, guidance_scale=3.0)([999])
    assert payload["best_fd"] != pytest.approx(bare, rel=1e-4)  # the LoRA changed the samples


@pytest.mark.parametrize(
    "extra, problem",
    [
        (["--lora", "{tmp}/missing-lora"], r"argument --lora: '.*missing-lora': no such file or folder"),
        (["--eta", "0.3"], r"argument --eta: only with --scheduler tcd .*got --scheduler consistency"),
        (["--scheduler", "ddim"], r"argument --scheduler: ddim cannot be tuned: DDIMScheduler\.set_timesteps"),
        (["--scheduler", "dpmsolver", "--original_inference_steps", "10"],
         r"argument --original_inference_steps: only with --scheduler lcm, consistency, tcd"),
        (["--steps", "1001"], r"argument --steps: at most 1000 \(the model's num_train_timesteps"),
        (["--eta", "1.5", "--scheduler", "tcd"], r"argument --eta: must be a finite number >= 0 and <= 1"),
    ],
    ids=["missing lora", "eta without tcd", "ddim", "grid size without a grid", "too many steps", "eta above 1"],
)
def test_bad_command_lines_are_usage_errors_naming_the_flag(tmp_path, capsys, extra, problem):
    argv = ["tune-steps", "--steps", "2", "--num_per_digit", "2", "--device", "cpu", "--json", str(tmp_path / "x.json")]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    message = capsys.readouterr().err
    assert re.search(problem, message), message
    assert "lcm-kit tune-steps: error:" in message
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_every_flag_has_help_and_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["tune-steps", "--help"])
    assert excinfo.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--seed", "100"), ("--guidance_scale", "1.0"), ("--num_per_digit", "20"),
                          ("--coarse_stride", "50"), ("--scheduler", "consistency")]:
        assert re.search(re.escape(flag) + r" .*?\(default: " + re.escape(default) + r"\)", text), flag


def test_a_missing_model_folder_is_reported_like_lcm_kit_eval(tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        main(["tune-steps", "--steps", "2", "--model", str(tmp_path / "nothing")])
    assert str(excinfo.value.code).startswith("lcm-kit tune-steps: error: --model ")
    assert "not a diffusers folder" in str(excinfo.value.code)
