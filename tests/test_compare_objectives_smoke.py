"""benchmarks/compare_objectives.py at smoke size (2 training steps, 2 images per digit): every method trains, is tuned,
scored and summarised with finite figures, and the fidelity columns are filled where they apply."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_smoke_comparison_reports_every_method_with_finite_figures(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "compare_objectives.py"), "--out", str(tmp_path),
         "--methods", "lcm", "pcm2", "tcd", "--train_seeds", "0", "--sample_seeds", "0", "--steps", "1", "2",
         "--tuned_steps", "2", "--num_per_digit", "2", "--max_train_steps", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "compare.json").read_text())
    tuned = json.loads((tmp_path / "tuned_timesteps.json").read_text())
    assert set(tuned) == {"lcm", "pcm2", "tcd"} and all(len(t["2"]) == 2 and t["2"][0] == 999 for t in tuned.values())
    lines = {(line["method"], line["steps"], line["timesteps"]): line for line in report["summary"]}
    for method in ("lcm", "pcm2", "tcd"):
        for key in ((method, 1, "default"), (method, 2, "default"), (method, 2, "tuned")):
            line = lines[key]
            assert all(math.isfinite(line[name][0]) for name in ("accuracy", "fd", "fd_ratio", "fd_to_teacher"))
        assert math.isfinite(lines[method, 1, "default"]["ode_distance"][0])
        assert lines[method, 2, "default"]["ode_distance"][0] is None
    assert lines["teacher", 25, "default"]["fd_ratio"][0] == 1.0
    assert "| PCM, 2 phases | 2 | [999," in (tmp_path / "compare.md").read_text()
