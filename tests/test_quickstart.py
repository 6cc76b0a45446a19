"""``lcm-kit quickstart``: a short real run (``accelerate launch -m lcm_kit.training.train_lcm_lora`` on the shipped
digits teacher, reduced steps) producing every output with sane values, the recipe helpers, and (slow) the full run
against its quality targets."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lcm_kit.commands import quickstart
from lcm_kit.eval import protocol
from lcm_kit.training.args import build_lcm_lora_parser, build_lcm_parser

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """The CLI end to end with a reduced recipe (40 steps of batch 8 on 96 images, 2 samples per digit)."""
    from lcm_kit.cli import main

    out = tmp_path_factory.mktemp("quickstart")
    previous = torch.get_num_threads()
    try:
        code = main([
            "quickstart", "--out", str(out), "--seed", "3", "--max_train_steps", "40", "--num_per_digit", "2",
            "--train_args", "--train_batch_size 8 --max_train_samples 96",
        ])
    finally:
        torch.set_num_threads(previous)
    assert code == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_quickstart_writes_every_output_with_sane_values(short_run):
    out, metrics = short_run
    expected = [(r["name"], r["scheduler"], r["steps"], r["guidance_scale"])
                for r in protocol.protocol_rows(protocol.DEFAULT_GUIDANCE)]
    assert [(r["name"], r["scheduler"], r["steps"], r["guidance_scale"]) for r in metrics["rows"]] == expected
    reference = metrics["rows"][0]
    assert (reference["scheduler"], reference["steps"], reference["guidance_scale"]) == ("dpmsolver", 25, 3.0)
    for row in metrics["rows"]:
        assert math.isfinite(row["fd"]) and row["fd"] >= 0, row
        assert 0.0 <= row["accuracy"] <= 1.0, row
        assert row["n"] == 20
        assert set(row["per_digit_accuracy"]) == {str(d) for d in range(10)}
        assert row["fd_ratio"] == pytest.approx(row["fd"] / reference["fd"])
    # The 25-step teacher at CFG 3 draws the prompted digit (shipped teacher: 99.5% at 20 per digit).
    assert reference["accuracy"] >= 0.8
    lora_rows = [r for r in metrics["rows"] if r["model"] == "lora"]
    assert [r["steps"] for r in lora_rows] == [1, 2, 4]
    assert all(r["guidance_scale"] == 1.0 and r["distilled_for_guidance"] == 3.0 for r in lora_rows)
    assert 0.0 <= metrics["real_floor"]["accuracy"] <= 1.0 and math.isfinite(metrics["real_floor"]["fd"])
    assert len(quality_targets(metrics["rows"])) == 6  # every target can be checked on the written rows
    # the real train script ran with the recipe, the seed and the reduced overrides
    argv = metrics["train_lcm_lora_argv"]
    assert argv[argv.index("--seed") + 1] == "3" and argv[argv.index("--max_train_steps") + 1] == "40"
    assert argv[argv.index("--w_min") + 1] == argv[argv.index("--w_max") + 1] == "2.0"
    assert (out / "lcm-lora" / "training_args.json").is_file()  # written by the trainer's loop

    with Image.open(out / "grid.png") as grid:
        assert grid.size == (protocol.GRID_LABEL_WIDTH + 10 * 32, len(metrics["rows"]) * 32)
        assert grid.mode == "RGB"
        tiles = torch.from_numpy(np.array(grid)).float()
    # the label strip holds text and every tile holds an image (not a blank paste)
    assert tiles[:, : protocol.GRID_LABEL_WIDTH].std() > 0
    for r in range(len(metrics["rows"])):
        assert tiles[r * 32 : (r + 1) * 32, protocol.GRID_LABEL_WIDTH :].std() > 1.0
    # digits as the data has them: white ink on a black background (the teacher's 25-step row)
    reference_tiles = tiles[:32, protocol.GRID_LABEL_WIDTH :]
    assert reference_tiles.mean() < 100 and reference_tiles.amax() > 200


def test_quickstart_lora_loads_completely_in_stock_diffusers(short_run):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from lcm_kit.digits import teacher_path
    from lcm_kit.lora import check_lora_applied

    out, metrics = short_run
    file = out / "lcm-lora" / "pytorch_lora_weights.safetensors"
    tensors = load_file(file)
    assert tensors and all(k.startswith("unet.") for k in tensors)
    # trained: the zero-initialised B matrices moved
    assert max(float(v.abs().max()) for k, v in tensors.items() if "lora_B" in k) > 0
    pipe = StableDiffusionPipeline.from_pretrained(teacher_path())
    pipe.load_lora_weights(str(out / "lcm-lora"), adapter_name="lcm")
    check_lora_applied(pipe, str(out / "lcm-lora"), adapter_name="lcm")  # every tensor, at the file's alpha / rank
    assert metrics["lora"] == str(file)


def test_distillation_argv_is_accepted_by_the_train_scripts(tmp_path):
    argv = quickstart.distillation_argv("teacher", tmp_path / "data", tmp_path / "out", seed=5, guidance=4.0,
                                        learning_rate=1e-3, lora_rank=None, export_kohya=True)
    args = build_lcm_lora_parser().parse_args(argv)
    assert (args.w_min, args.w_max) == (3.0, 3.0)  # LCM w = CFG - 1, fixed
    assert args.seed == 5 and args.learning_rate == 1e-3 and args.export_kohya
    assert args.lora_rank == 64  # None dropped the flag: the script's own default
    assert args.max_train_steps == quickstart.LORA_RECIPE["max_train_steps"]
    assert args.cache_latents and args.cache_text_embeddings and args.validation_prompts == []
    full = build_lcm_parser().parse_args(quickstart.distillation_argv("t", "d", "o", guidance=3.0, full=True))
    assert full.max_train_steps == quickstart.FULL_RECIPE["max_train_steps"] and full.w_max >= 2.0
    with pytest.raises(ValueError, match="guidance"):
        quickstart.distillation_argv("t", "d", "o", guidance=0.5)


def test_parse_train_args():
    assert quickstart.parse_train_args("--solver heun --huber_c 0.01 --export_kohya") == {
        "solver": "heun", "huber_c": "0.01", "export_kohya": True}
    assert quickstart.parse_train_args("") == {}
    with pytest.raises(ValueError, match="train_args"):
        quickstart.parse_train_args("heun")


def quality_targets(rows) -> list[dict]:
    """The quickstart's quality targets for every distilled model in ``rows`` (all at matched guidance): 4 steps FD
    <= 1.1x the teacher's DPM-Solver 25 and accuracy within 2 points of it; 2 steps <= 1.2x and better than teacher
    DDIM 4; 1 step <= 1.4x and better than teacher DDIM 2. Each entry: what, measured, bound, met."""
    def find(model, scheduler, steps):
        return next((r for r in rows if r["model"] == model and r["scheduler"] == scheduler and r["steps"] == steps),
                    None)

    reference = find("teacher", "dpmsolver", 25)
    checks = []
    for model, label in (("lora", "LCM-LoRA"), ("full", "full LCM")):
        for steps, ratio, ddim_steps in ((4, 1.1, None), (2, 1.2, 4), (1, 1.4, 2)):
            row = find(model, "consistency", steps)
            if row is None:
                continue
            checks.append(dict(what=f"{label} {steps}-step FD <= {ratio}x teacher DPM-Solver 25", measured=row["fd"],
                               bound=ratio * reference["fd"], met=row["fd"] <= ratio * reference["fd"]))
            if ddim_steps is not None:
                ddim = find("teacher", "ddim", ddim_steps)
                checks.append(dict(what=f"{label} {steps}-step FD < teacher DDIM {ddim_steps}-step FD",
                                   measured=row["fd"], bound=ddim["fd"], met=row["fd"] < ddim["fd"]))
            else:
                checks.append(dict(what=f"{label} {steps}-step accuracy within 2 points of teacher DPM-Solver 25",
                                   measured=100 * row["accuracy"], bound=100 * reference["accuracy"] - 2.0,
                                   met=100 * (reference["accuracy"] - row["accuracy"]) <= 2.0))
    return checks


@pytest.mark.slow
def test_the_full_quickstart_meets_its_quality_targets(tmp_path):
    """The default recipe (about 7 minutes on 2 CPU cores), seed 0: every target of the README's table is met."""
    from lcm_kit.cli import main

    assert main(["quickstart", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "metrics.json").read_text())["rows"]
    checks = quality_targets(rows)
    assert len(checks) == 6
    missed = [c for c in checks if not c["met"]]
    assert not missed, missed


def test_make_grid_layout():
    tile = Image.new("RGB", (32, 32), (255, 0, 0))
    grid = protocol.make_grid([[tile] * 10, [tile] * 10], ["row a", "row b"])
    assert grid.size == (protocol.GRID_LABEL_WIDTH + 320, 64)
    assert grid.getpixel((protocol.GRID_LABEL_WIDTH + 5, 40)) == (255, 0, 0)
    with pytest.raises(ValueError, match="10 tiles"):
        protocol.make_grid([[tile] * 9], ["short"])


def test_distillation_is_deterministic_given_the_seed(tmp_path):
    """Same --seed, same LoRA bit for bit; another seed, another LoRA (the in-process launcher: the entry point
    ``accelerate launch -m lcm_kit.training.train_lcm_lora`` runs)."""
    from safetensors.torch import load_file

    from lcm_kit.digits import teacher_path

    data = quickstart.write_digits_dataset(tmp_path / "data", seed=0)
    files = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        argv = quickstart.distillation_argv(teacher_path(), data, tmp_path / name, seed=seed, max_train_steps=3,
                                            train_batch_size=4, max_train_samples=16)
        quickstart.run_distillation(argv, launcher="inprocess", num_threads=1)
        files[name] = load_file(tmp_path / name / "pytorch_lora_weights.safetensors")
    assert files["a"].keys() == files["b"].keys() == files["c"].keys()
    assert all(torch.equal(files["a"][k], files["b"][k]) for k in files["a"])
    assert any(not torch.equal(files["a"][k], files["c"][k]) for k in files["a"])
