"""benchmarks/bench_train_script.py: the digits shards it gives both trainers hold the whole train split, readable by
lcm-kit's shard reader, a missing reference script and impossible run lists are refused by name, and repeated rounds
alternate their order and give per-round ratios."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_train_script import ratio_summary, round_orders, write_digits_shards  # noqa: E402

from lcm_kit.digits.data import load_split  # noqa: E402
from lcm_kit.training.data.shards import WebDatasetShards, expand_shard_pattern  # noqa: E402


def test_shards_hold_the_whole_train_split_with_captions(tmp_path):
    pattern, samples = write_digits_shards(tmp_path / "shards", per_shard=500)
    images, _ = load_split("train", 32)
    assert samples == len(images)
    shards = expand_shard_pattern(pattern)
    assert len(shards) == -(-samples // 500) and all(Path(s).is_file() for s in shards)
    dataset = WebDatasetShards(shards, None, None, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == samples
    pixels = ((images.permute(0, 2, 3, 1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    for index in (0, 1, samples - 1):  # lossless PNG: the split's own pixels
        image, caption = dataset.get_raw(index)
        assert np.array_equal(np.asarray(image.convert("RGB")), pixels[index])
        assert isinstance(caption, str) and caption.strip()


def run_bench(tmp_path, *argv, reference_script=None):
    """bench_train_script.py with ``argv``; the reference script is an empty file unless given."""
    if reference_script is None:
        reference_script = tmp_path / "reference.py"
        reference_script.write_text("")
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train_script.py"), "--reference_script",
                           str(reference_script), *argv], capture_output=True, text=True)


def test_a_missing_reference_script_is_named(tmp_path):
    result = run_bench(tmp_path, reference_script=tmp_path / "nope.py")
    assert result.returncode == 2
    assert "--reference_script" in result.stderr and "nope.py" in result.stderr and "is not a file" in result.stderr


@pytest.mark.parametrize("lcm_kit_args, message", [
    (["", ""], "given more than once"),
    (["--cache_latents 'x"], "not a shell-quoted list"),
])
def test_repeated_or_unquotable_lcm_kit_args_are_named(tmp_path, lcm_kit_args, message):
    argv = []
    for extra in lcm_kit_args:
        argv += ["--lcm_kit_args", extra]
    result = run_bench(tmp_path, *argv)
    assert result.returncode == 2, result.stderr
    assert "--lcm_kit_args" in result.stderr and message in result.stderr


def test_the_cpu_autocast_off_diagnostic_runs_the_script_with_its_arguments_and_no_cpu_autocast(tmp_path):
    from bench_train_script import CPU_AUTOCAST_OFF

    script = tmp_path / "probe.py"
    script.write_text("import sys, torch\n"
                      "with torch.autocast('cpu'):\n"
                      "    y = torch.ones(2, 2) @ torch.ones(2, 2)\n"
                      "    print(sys.argv[1:], torch.is_autocast_enabled('cpu'), y.dtype, __name__)\n")
    result = subprocess.run([sys.executable, "-c", CPU_AUTOCAST_OFF, str(script), "--flag", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['--flag', '1'] False torch.float32 __main__"
    plain = subprocess.run([sys.executable, str(script), "--flag", "1"], capture_output=True, text=True)
    assert plain.stdout.strip() == "['--flag', '1'] True torch.bfloat16 __main__"  # what the diagnostic switches off


def test_rounds_alternate_their_order():
    assert round_orders(["ref", "ours"], 1) == [["ref", "ours"]]
    assert round_orders(["ref", "ours", "cached"], 3) == [["ref", "ours", "cached"], ["cached", "ours", "ref"],
                                                         ["ref", "ours", "cached"]]


def test_ratios_are_given_per_round_with_their_median_and_range():
    results = {"ours": [{"wall_s": 30.0}, {"wall_s": 36.0}, {"wall_s": 28.0}],
               "ref": [{"wall_s": 40.0}, {"wall_s": 40.0}, {"wall_s": 35.0}]}
    summary = ratio_summary(results, ["ours"], ["ref"])
    assert list(summary) == ["ours / ref"]
    ratio = summary["ours / ref"]
    assert ratio["per_round"] == pytest.approx([0.75, 0.9, 0.8])
    assert (ratio["median"], ratio["low"], ratio["high"]) == pytest.approx((0.8, 0.75, 0.9))
    with pytest.raises(ValueError):  # a round without its partner run is no ratio
        ratio_summary({"ours": results["ours"], "ref": results["ref"][:2]}, ["ours"], ["ref"])


@pytest.mark.parametrize("extra, message", [
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--skip_reference_script"], "--skip_reference_script leaves no reference run"),
])
def test_impossible_run_lists_are_named(tmp_path, extra, message):
    result = run_bench(tmp_path, *extra)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
