"""benchmarks/bench_inference.py --smoke runs end to end and prints every row with finite figures."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("stock", "stock+compile", "lcm eager", "lcm fast", "lcm fast+compile", "lcm fast new-prompt",
            "lcm eager diffusers-device")
RATIOS = ("fast/stock", "fast/naive-compile", "eager/stock", "fast+compile/stock", "fast+compile/naive-compile",
          "eager-diffusers-device/stock")
NUMBER = r"([0-9.eE+-]+|nan|inf)"


def test_smoke_benchmark_prints_every_row_with_finite_figures(tmp_path):
    report_file = tmp_path / "report.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_inference.py"), "--smoke", "--diffusers_device", "--json",
         str(report_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    for variant in VARIANTS:
        for output in ("pil", "latent"):
            pattern = (rf"^tiny b1\s+{re.escape(variant)}\s+{output}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}x\s+{NUMBER}$")
            matches = [re.match(pattern, line) for line in lines]
            found = [m for m in matches if m]
            assert len(found) == 1, f"row {variant!r} {output} missing or repeated in:\n{result.stdout}"
            figures = [float(x) for x in found[0].groups()]
            assert all(math.isfinite(x) for x in figures) and min(figures[:3]) > 0, found[0].group(0)
    for ratio in RATIOS:
        for output in ("pil", "latent"):
            pattern = (rf"^ratio tiny b1\s+{re.escape(ratio)}\|{output}\s+{NUMBER}x  \(per repeat: median "
                       rf"{NUMBER}x, quartiles {NUMBER}-{NUMBER}\)$")
            found = [m for m in (re.match(pattern, line) for line in lines) if m]
            assert len(found) == 1, f"ratio {ratio}|{output} missing"
            ratio_of_medians, median, q25, q75 = (float(x) for x in found[0].groups())
            assert all(math.isfinite(x) and x > 0 for x in (ratio_of_medians, median, q25, q75))
            assert q25 <= median <= q75, found[0].group(0)
    report = json.loads(report_file.read_text())
    (case,) = report["cases"]
    assert {row["variant"] for row in case["rows"].values()} == set(VARIANTS)
    # same weights, same seed: the fast path's latents are the eager pipeline's
    assert case["max_abs_diff_vs_eager"]["lcm fast"] < 1e-4
    assert case["max_abs_diff_vs_eager"]["stock"] < 1e-4
    assert case["max_abs_diff_vs_eager"]["lcm eager diffusers-device"] == 0
    # the per-repeat ratios pair the variants' timings of the same repeat
    rows = case["rows"]
    eager, stock = rows["lcm eager|latent"]["ms_samples"], rows["stock|latent"]["ms_samples"]
    assert len(eager) == len(stock) == report["repeats"]
    per_repeat = sorted(a / b for a, b in zip(eager, stock))
    assert case["paired_ratios"]["eager/stock|latent"]["median"] == per_repeat[len(per_repeat) // 2]
