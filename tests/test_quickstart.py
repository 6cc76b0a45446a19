"""``lcm-kit quickstart``: a short real run (two ``accelerate launch -m lcm_kit.training.train_lcm_lora`` side by side
on the shipped digits teacher, a TCD-LoRA and an LCM-LoRA, reduced steps) producing every output with sane values,
each LoRA's rows sampled in a pipeline of its own, the recipe helpers, and (slow) the full run against its quality
targets."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

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
    """The CLI end to end with a reduced recipe (40 steps of batch 8 on 96 images, 2 samples per digit), both LoRAs
    (the default ``--methods``)."""
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


GRID = quickstart.LORA_RECIPE["num_ddim_timesteps"]


def test_quickstart_writes_every_output_with_sane_values(short_run):
    out, metrics = short_run
    def key(r):
        return r["name"], r["model"], r["scheduler"], r["steps"], r["guidance_scale"]

    expected = protocol.protocol_rows(protocol.DEFAULT_GUIDANCE, tcd_original_inference_steps=GRID)
    assert [key(r) for r in metrics["rows"]] == [key(r) for r in expected]
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
    # the TCD-LoRA first, then the LCM-LoRA, each at 1/2/4 steps without CFG, each row saying how it was sampled
    models = [r["model"] for r in metrics["rows"] if r["model"] != "teacher"]
    assert models == ["tcd-lora"] * 3 + ["lcm-lora"] * 3
    samplers = {"tcd-lora": ("tcd", 0.3, GRID), "lcm-lora": ("consistency", None, 50)}  # LCM: the teacher's config
    for row in metrics["rows"]:
        if row["model"] == "teacher":
            continue
        assert (row["scheduler"], row["eta"], row["original_inference_steps"]) == samplers[row["model"]], row
        assert row["guidance_scale"] == 1.0 and row["distilled_for_guidance"] == 3.0
    assert [r["steps"] for r in metrics["rows"] if r["model"] == "tcd-lora"] == [1, 2, 4]
    ddim = next(r for r in metrics["rows"] if r["scheduler"] == "ddim")
    assert (ddim["eta"], ddim["original_inference_steps"]) == (0.0, None)  # the pipeline's default DDIM eta
    assert 0.0 <= metrics["real_floor"]["accuracy"] <= 1.0 and math.isfinite(metrics["real_floor"]["fd"])
    assert len(quality_targets(metrics["rows"])) == 12  # every target of both LoRAs can be checked on the rows
    # both real train scripts ran with the recipe, their --method, the seed and the reduced overrides
    assert metrics["methods"] == ["tcd", "lcm"]
    for method in ("tcd", "lcm"):
        argv = metrics[f"train_{method}_lora_argv"]
        assert argv[argv.index("--method") + 1] == method
        assert argv[argv.index("--seed") + 1] == "3" and argv[argv.index("--max_train_steps") + 1] == "40"
        assert argv[argv.index("--w_min") + 1] == argv[argv.index("--w_max") + 1] == "2.0"
        assert argv[argv.index("--output_dir") + 1] == str(out / f"{method}-lora")
        # written by the trainer's loop: the flag reached the trainer
        trained = json.loads((out / f"{method}-lora" / "training_args.json").read_text())
        assert trained["method"] == method and trained["max_train_steps"] == 40
        assert metrics["timings"][f"{method}_lora_distillation_s"] > 0
    assert metrics["timings"]["lora_distillation_wall_s"] == max(
        metrics["timings"]["tcd_lora_distillation_s"], metrics["timings"]["lcm_lora_distillation_s"])
    assert "Steps:" in (out / "logs" / "lcm-lora.log").read_text()  # the second trainer's output, progress included

    with Image.open(out / "grid.png") as grid:
        assert grid.size == (protocol.GRID_LABEL_WIDTH + 10 * 32, len(metrics["rows"]) * 32)
        assert grid.mode == "RGB"
        tiles = torch.from_numpy(np.array(grid)).float()
    assert metrics["grid"]["rows"][7:] == [f"{m}-LoRA {s} step{'s' if s > 1 else ''}" for m in ("TCD", "LCM")
                                           for s in (1, 2, 4)]
    # the label strip holds text and every tile holds an image (not a blank paste)
    assert tiles[:, : protocol.GRID_LABEL_WIDTH].std() > 0
    for r in range(len(metrics["rows"])):
        assert tiles[r * 32 : (r + 1) * 32, protocol.GRID_LABEL_WIDTH :].std() > 1.0
    # digits as the data has them: white ink on a black background (the teacher's 25-step row)
    reference_tiles = tiles[:32, protocol.GRID_LABEL_WIDTH :]
    assert reference_tiles.mean() < 100 and reference_tiles.amax() > 200


@pytest.mark.parametrize("method", ["tcd", "lcm"])
def test_quickstart_loras_load_completely_in_stock_diffusers(short_run, method):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from lcm_kit.digits import teacher_path
    from lcm_kit.lora import check_lora_applied

    out, metrics = short_run
    folder = out / f"{method}-lora"
    file = folder / "pytorch_lora_weights.safetensors"
    tensors = load_file(file)
    assert tensors and all(k.startswith("unet.") for k in tensors)
    # trained: the zero-initialised B matrices moved
    assert max(float(v.abs().max()) for k, v in tensors.items() if "lora_B" in k) > 0
    pipe = StableDiffusionPipeline.from_pretrained(teacher_path())
    pipe.load_lora_weights(str(folder), adapter_name=method)
    check_lora_applied(pipe, str(folder), adapter_name=method)  # every tensor, at the file's alpha / rank
    assert metrics["loras"][f"{method}-lora"] == str(file)
    assert metrics["lora"] == str(out / "tcd-lora" / "pytorch_lora_weights.safetensors")  # the main model


def test_each_lora_row_is_sampled_with_only_its_own_adapter(short_run):
    """Every TCD-LoRA and LCM-LoRA row equals the same sampler on a fresh teacher pipeline holding only that LoRA;
    with the other LoRA active as well (what a shared pipeline could score) the 1-step figures differ."""
    from diffusers import StableDiffusionPipeline

    from lcm_kit.digits import teacher_path
    from lcm_kit.eval import evaluate_pipeline, load_classifier
    from lcm_kit.lora import load_lora_weights_strict

    out, metrics = short_run
    classifier = load_classifier()
    rows = {(r["model"], r["steps"]): r for r in metrics["rows"]}
    other = {"tcd-lora": "lcm-lora", "lcm-lora": "tcd-lora"}
    # as each LoRA's users sample it: TCD with TCDScheduler on its distillation grid at eta 0.3, LCM with LCM's sampler
    samplers = {"tcd-lora": ("tcd", {"original_inference_steps": GRID}, {"eta": 0.3}),
                "lcm-lora": ("consistency", {}, {})}
    for model in ("tcd-lora", "lcm-lora"):
        pipe = StableDiffusionPipeline.from_pretrained(teacher_path())
        pipe.set_progress_bar_config(disable=True)
        load_lora_weights_strict(pipe, out / model, adapter_name=model)
        both = StableDiffusionPipeline.from_pretrained(teacher_path())
        both.set_progress_bar_config(disable=True)
        load_lora_weights_strict(both, out / other[model], adapter_name=other[model])
        load_lora_weights_strict(both, out / model, adapter_name=model)
        both.set_adapters([other[model], model])
        scheduler, config, call = samplers[model]
        for steps in (1, 2, 4):
            row = rows[(model, steps)]
            fresh = evaluate_pipeline(pipe, scheduler, steps, 1.0, 2, 3, classifier=classifier,
                                      scheduler_config=config, **call)
            assert (fresh["fd"], fresh["accuracy"]) == pytest.approx((row["fd"], row["accuracy"]), rel=1e-9, abs=1e-12)
        mixed = evaluate_pipeline(both, scheduler, 1, 1.0, 2, 3, classifier=classifier, scheduler_config=config,
                                  **call)
        assert mixed["fd"] != pytest.approx(rows[(model, 1)]["fd"], rel=1e-6)
    for steps in (1, 2, 4):  # two models, two samplers: never the same figures
        assert rows[("tcd-lora", steps)]["fd"] != pytest.approx(rows[("lcm-lora", steps)]["fd"], rel=1e-6)


def test_methods_and_train_args_are_checked_before_anything_runs(tmp_path):
    for methods in (("pcm",), ("tcd", "tcd"), ()):
        with pytest.raises(ValueError, match="methods must be one or more of tcd lcm"):
            quickstart.run_quickstart(tmp_path / "out", methods=methods)
    with pytest.raises(ValueError, match="must not set --method"):
        quickstart.run_quickstart(tmp_path / "out", train_overrides={"method": "pcm"})
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="tcd_original_inference_steps"):
        protocol.protocol_rows(3.0)
    lcm_only = protocol.protocol_rows(3.0, loras=("lcm-lora",))
    assert [r["model"] for r in lcm_only if r["model"] != "teacher"] == ["lcm-lora"] * 3
    with pytest.raises(ValueError, match="loras must be among"):
        protocol.protocol_rows(3.0, loras=("pcm-lora",))


def test_a_failing_trainer_is_named_and_the_other_stopped(tmp_path):
    """Two trainers side by side (the accelerate launcher): one refuses its flags, the other (a long run) is stopped;
    the error names the failed trainer, its exit code, its log and its command."""
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("needs /proc to see which processes are left")
    from lcm_kit.digits import teacher_path

    data = quickstart.write_digits_dataset(tmp_path / "data", seed=0)
    long = quickstart.distillation_argv(teacher_path(), data, tmp_path / "long", max_train_steps=100000,
                                        train_batch_size=4, max_train_samples=16)
    broken = quickstart.distillation_argv(teacher_path(), data, tmp_path / "broken", num_phases=3)  # pcm-only flag
    with pytest.raises(RuntimeError) as caught:
        quickstart.run_lora_distillations({"long-lora": long, "broken-lora": broken}, log_dir=tmp_path / "logs",
                                          print_fn=lambda *a: None)
    message = str(caught.value)
    assert message.startswith("the broken-lora trainer failed with exit code ")
    assert str(tmp_path / "logs" / "broken-lora.log") in message and "--num_phases 3" in message
    assert "long-lora" not in message
    assert "num_phases" in (tmp_path / "logs" / "broken-lora.log").read_text()  # the trainer's own error, logged
    # stopped, launcher and trainer process both: no process is left training into tmp_path/long
    marker = f"--output_dir\0{tmp_path / 'long'}\0".encode()
    deadline = time.time() + 15
    while (left := _processes_with(marker)) and time.time() < deadline:
        time.sleep(0.2)
    assert not left
    assert not (tmp_path / "long" / "pytorch_lora_weights.safetensors").exists()


def _processes_with(marker: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # exited meanwhile
                pass
    return found


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
    """The quickstart's quality targets for every distilled model in ``rows`` (all at matched guidance; the TCD-LoRA,
    the LCM-LoRA and the full LCM, each on its own sampler, the same bounds for each): 4 steps FD
    <= 1.1x the teacher's DPM-Solver 25 and accuracy within 2 points of it; 2 steps <= 1.2x and better than teacher
    DDIM 4; 1 step <= 1.4x and better than teacher DDIM 2. Each entry: what, measured, bound, met."""
    def find(model, scheduler, steps):
        return next((r for r in rows if r["model"] == model and r["scheduler"] == scheduler and r["steps"] == steps),
                    None)

    reference = find("teacher", "dpmsolver", 25)
    checks = []
    for model, scheduler, label in (("tcd-lora", "tcd", "TCD-LoRA"), ("lcm-lora", "consistency", "LCM-LoRA"),
                                    ("full", "consistency", "full LCM")):
        for steps, ratio, ddim_steps in ((4, 1.1, None), (2, 1.2, 4), (1, 1.4, 2)):
            row = find(model, scheduler, steps)
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
    """The default recipe (both LoRAs side by side; times in the README), seed 0: every target of the README's table
    is met by the TCD-LoRA and the LCM-LoRA."""
    from lcm_kit.cli import main

    assert main(["quickstart", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "metrics.json").read_text())["rows"]
    checks = quality_targets(rows)
    assert len(checks) == 12
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


def test_inprocess_trainers_run_one_after_the_other_and_a_failure_is_named(tmp_path):
    from safetensors.torch import load_file

    from lcm_kit.digits import teacher_path

    data = quickstart.write_digits_dataset(tmp_path / "data", seed=0)
    tiny = dict(max_train_steps=3, train_batch_size=4, max_train_samples=16)
    jobs = {name: quickstart.distillation_argv(teacher_path(), data, tmp_path / name, method=method, **tiny)
            for name, method in (("tcd-lora", "tcd"), ("lcm-lora", "lcm"))}
    timings = quickstart.run_lora_distillations(jobs, launcher="inprocess")
    assert list(timings) == ["tcd-lora", "lcm-lora"] and 0 < timings["tcd-lora"] <= timings["lcm-lora"]
    for name in jobs:
        assert load_file(tmp_path / name / "pytorch_lora_weights.safetensors")
        assert json.loads((tmp_path / name / "training_args.json").read_text())["method"] == name[:3]
    broken = quickstart.distillation_argv(teacher_path(), data, tmp_path / "broken", num_phases=3, **tiny)
    named = r"^the broken-lora trainer: --num_phases only applies .*argv: .*--num_phases 3"
    with pytest.raises(ValueError, match=named):
        quickstart.run_lora_distillations({"broken-lora": broken}, launcher="inprocess")
    with pytest.raises(ValueError, match="jobs must name at least one"):
        quickstart.run_lora_distillations({})
