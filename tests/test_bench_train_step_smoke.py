"""benchmarks/bench_train_step.py at smoke size: both formulations run, every figure is finite and positive."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_smoke_benchmark_reports_finite_figures(tmp_path):
    report_file = tmp_path / "report.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_train_step.py"), "--warmup", "1", "--steps", "2",
         "--threads", "1", "--no_peak_memory", "--json", str(report_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(report_file.read_text())
    assert set(report["results"]) == {"lcm-kit", "reference"}
    for figures in report["results"].values():
        assert all(math.isfinite(figures[k]) and figures[k] > 0 for k in ("ms_median", "ms_mean", "first_step_s"))
    assert math.isfinite(report["time_ratio"]) and report["time_ratio"] > 0
    assert "ratio lcm-kit / reference: time" in result.stdout


def test_smoke_sdxl_config_reports_lcm_kit_alone(tmp_path):
    """--config cpu-sdxl: the SDXL objective's step (tiny SDXL kit, gradient checkpointing), no reference row."""
    report_file = tmp_path / "report.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_train_step.py"), "--config", "cpu-sdxl", "--warmup", "1",
         "--steps", "2", "--threads", "1", "--no_peak_memory", "--json", str(report_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(report_file.read_text())
    assert set(report["results"]) == {"lcm-kit"} and report["time_ratio"] is None
    assert report["gradient_checkpointing"] is True and report["kind"] == "tiny-sdxl"
    assert math.isfinite(report["results"]["lcm-kit"]["ms_median"]) and report["results"]["lcm-kit"]["ms_median"] > 0


def test_smoke_digits_config_with_every_fusion_variant(tmp_path):
    """--config cpu-digits --compare_fusion: the shipped teacher at the end-to-end benchmark's flags, and every
    variant that says what one piece of lcm-kit's step is worth."""
    report_file = tmp_path / "report.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_train_step.py"), "--config", "cpu-digits", "--warmup", "1",
         "--steps", "1", "--threads", "1", "--no_peak_memory", "--compare_fusion", "--json", str(report_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(report_file.read_text())
    assert report["kind"] == "digits" and report["batch_size"] == 32 and report["rank"] == 16
    assert set(report["results"]) == {"lcm-kit", "reference", "lcm-kit peft-unfused", "lcm-kit fused-target-only",
                                      "lcm-kit per-forward setup"}
    assert all(math.isfinite(ratio) and ratio > 0 for ratio in report["time_ratios"].values())
