"""End to end: train_lcm_lora / train_lcm on the tiny kit, outputs loaded by stock diffusers and LCMPipeline,
checkpoints, bit-exact resume after SIGKILL, non-finite loss, bad input, Hub upload through a fake client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
def _images(pipe, prompts=("a red square", "a blue circle"), guidance_scale=1.0):
    return pipe(list(prompts), num_inference_steps=4, guidance_scale=guidance_scale, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_lora_run_end_to_end(kit, tmp_path, capfd, train_argv, reset_accelerate, hub_token, hub_client):
    """A short LCM-LoRA run: the adapter file loads completely in stock diffusers and in LCMPipeline (same images),
    holds exactly the trained weights (= the last checkpoint), the kohya export gives the same images, the
    checkpoint limit holds, the validation grid and tensorboard logs exist, and the Hub upload (fake client) gets a
    card while the token appears nowhere."""
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lcm_kit.pipelines import LCMPipeline
    from lcm_kit.training.train_lcm_lora import main as train_lcm_lora

    out = tmp_path / "lora"
    client = hub_client
    argv = train_argv(out, steps=4)[:-1] + [
        "--validation_prompts", "a red square", "a blue circle", "--validation_steps", "2",
        "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--learning_rate", "1e-3",
        "--lora_rank", "4", "--lora_alpha", "8", "--export_kohya", "--report_to", "tensorboard",
        "--push_to_hub", "--hub_model_id", "tiny-lcm-lora", "--hub_token", hub_token,
    ]
    reset_accelerate()
    result = train_lcm_lora(argv, hub_client=client)
    assert result.global_step == 4 and np.isfinite(result.last_loss)

    # checkpoints: limit 2, atomic names only
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3", "checkpoint-4"]
    # the saved adapter holds exactly the trained (last checkpoint) weights, with alpha metadata
    lora_file = out / "pytorch_lora_weights.safetensors"
    saved = load_file(lora_file)
    trained = load_file(out / "checkpoint-4" / "objective_state.safetensors")
    assert len(saved) == len(trained) > 0
    for key, value in trained.items():
        module = key[len("student."):].replace(".default.weight", ".weight")
        torch.testing.assert_close(saved[f"unet.{module}"], value, atol=0, rtol=0)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # training moved the adapter

    # stock diffusers and LCMPipeline load it and agree; the adapter changes the images
    stock = StableDiffusionPipeline.from_pretrained(kit["sd1"], safety_checker=None, requires_safety_checker=False)
    stock.scheduler = LCMScheduler.from_config(stock.scheduler.config)
    stock.set_progress_bar_config(disable=True)
    without = _images(stock)
    stock.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    assert stock.get_active_adapters()
    stock_images = _images(stock)
    lcm = LCMPipeline.from_pretrained(kit["sd1"], safety_checker=None, requires_safety_checker=False)
    lcm.set_progress_bar_config(disable=True)
    lcm.load_lora_weights(lora_file)
    np.testing.assert_allclose(_images(lcm), stock_images, atol=1e-5)
    assert np.abs(stock_images - without).max() > 1e-3
    # the in-memory trained unet gives the same images as the file loaded in stock diffusers
    trained_pipe = result.objective.validation_pipeline(result.model)
    trained_pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_images(trained_pipe), stock_images, atol=1e-5)

    # kohya export loads in stock diffusers to the same images
    kohya = StableDiffusionPipeline.from_pretrained(kit["sd1"], safety_checker=None, requires_safety_checker=False)
    kohya.scheduler = LCMScheduler.from_config(kohya.scheduler.config)
    kohya.set_progress_bar_config(disable=True)
    kohya_keys = load_file(out / "pytorch_lora_weights_kohya.safetensors").keys()
    assert all(k.startswith("lora_unet_") for k in kohya_keys) and any(k.endswith(".alpha") for k in kohya_keys)
    kohya.load_lora_weights(out, weight_name="pytorch_lora_weights_kohya.safetensors")
    np.testing.assert_allclose(_images(kohya), stock_images, atol=1e-4)

    # validation grids: one row of the two 32px images, at steps 2 and 4, each with its prompt in a strip below
    grids = sorted((out / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step-000002.png", "step-000004.png"]
    assert Image.open(grids[-1]).size == (64, 32 + 14)
    np.testing.assert_allclose(np.asarray(Image.open(grids[-1]))[:32] / 255.0,
                               np.concatenate(list(trained_pipe_images(result)), axis=1), atol=1.5 / 255)
    assert np.asarray(Image.open(grids[-1]).convert("L"))[32:].min() < 128  # the prompts' text
    # tensorboard got the loss and lr at every step and the validation images
    events = [p for p in (out / "logs").rglob("events.out.tfevents.*")]
    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    assert [e.step for e in accumulator.Scalars("loss")] == [1, 2, 3, 4]
    assert "lr" in accumulator.Tags()["scalars"] and accumulator.Tags()["images"]

    # hub: repo created, folder uploaded with card + weights, no checkpoints; the token is nowhere
    (_, repo_id, _), (_, upload, files) = client.calls
    assert repo_id == "tiny-lcm-lora" and upload["repo_id"] == "someone/tiny-lcm-lora"
    assert {"README.md", "pytorch_lora_weights.safetensors"} <= files
    assert "checkpoint-*" in upload["ignore_patterns"]
    card = (out / "README.md").read_text()
    for needle in ("lcm", "lora", "diffusers", "text-to-image", "load_lora_weights", "validation/step-000004.png"):
        assert needle in card
    captured = capfd.readouterr()
    for text in [captured.out, captured.err] + [p.read_bytes().decode("latin-1") for p in out.rglob("*")
                                                if p.is_file()]:
        assert hub_token not in text
    assert "hub_token" not in json.loads((out / "training_args.json").read_text())


def trained_pipe_images(result):
    """The validation images the loop rendered at the last step, regenerated from the trained objective."""
    images = result.objective.validate(result.model, result.global_step)
    return [np.asarray(img, dtype=np.float64) / 255.0 for img in images]


def test_full_run_saves_the_ema_target_loadable_by_stock_and_lcm_pipelines(kit, tmp_path, train_argv, reset_accelerate):
    """Full distillation of a v-prediction (SD2-shaped) teacher: <output_dir>/unet is the EMA target (not the
    student), has the guidance embedding, and diffusers' LatentConsistencyModelPipeline and LCMPipeline produce
    the same images from it."""
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from lcm_kit.pipelines import LCMPipeline
    from lcm_kit.training.train_lcm import main as train_lcm

    out = tmp_path / "full"
    argv = train_argv(out, kind="sd2", steps=2)[:-1] + [
        "--learning_rate", "1e-4", "--ema_decay", "0.5", "--unet_time_cond_proj_dim", "32",
        "--checkpointing_steps", "2", "--solver", "heun", "--loss_type", "l2", "--gradient_checkpointing",
        "--validation_prompts",
    ]
    reset_accelerate()
    result = train_lcm(argv)
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert unet.config.time_cond_proj_dim == 32
    state = load_file(out / "checkpoint-2" / "objective_state.safetensors")
    saved = unet.state_dict()
    for key, value in saved.items():
        torch.testing.assert_close(value, state[f"target.{key}"], atol=0, rtol=0)
    assert any(not torch.equal(state[f"student.{k}"], v) for k, v in saved.items())  # EMA != student
    teacher = UNet2DConditionModel.from_pretrained(kit["sd2"], subfolder="unet")
    assert any(not torch.equal(teacher.state_dict()[k], v) for k, v in saved.items() if k in teacher.state_dict())

    scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    parts = dict(
        vae=AutoencoderKL.from_pretrained(kit["sd2"], subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(kit["sd2"], subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(kit["sd2"], subfolder="tokenizer"),
        unet=unet,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    stock = LatentConsistencyModelPipeline(scheduler=scheduler, **parts)
    ours = LCMPipeline(scheduler=scheduler, **parts)
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    stock_images = _images(stock, guidance_scale=8.0)
    np.testing.assert_allclose(_images(ours, guidance_scale=8.0), stock_images, atol=1e-5)
    assert np.isfinite(stock_images).all()
    assert result.objective.inference_unet(result.model) is result.objective.target_unet


def _run_script(script, argv, env_extra=None, **kwargs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, str(REPO / "train_scripts" / script), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_sigkill_and_resume_is_bit_exact(kit, tmp_path, train_argv):
    """A run killed with SIGKILL right after checkpoint-2 and resumed with --resume_from_checkpoint latest ends with
    the same adapter, bit for bit, as an uninterrupted run (dropout, random flips, shuffling and an epoch boundary
    included: 8 images, batch 2 -> 4 steps per epoch)."""
    common = ["--max_train_steps", "7", "--checkpointing_steps", "2", "--lora_rank", "4", "--lora_dropout", "0.1",
              "--random_flip", "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2"]

    def argv(out):
        return train_argv(out, steps=7) + common

    reference = _run_script("train_lcm_lora.py", argv(tmp_path / "ref"))
    killed_dir = tmp_path / "killed"
    victim = _run_script("train_lcm_lora.py", argv(killed_dir))
    deadline = time.monotonic() + 240
    while not (killed_dir / "checkpoint-2").is_dir():
        assert victim.poll() is None, victim.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed_dir / "pytorch_lora_weights.safetensors").exists()
    assert not (killed_dir / "checkpoint-6").exists()
    resumed = _run_script("train_lcm_lora.py", argv(killed_dir) + ["--resume_from_checkpoint", "latest"])
    resumed_log = resumed.communicate(timeout=300)[0]
    reference_log = reference.communicate(timeout=300)[0]
    assert resumed.returncode == 0, resumed_log
    assert reference.returncode == 0, reference_log
    assert "Resuming from" in resumed_log and "checkpoint-" in resumed_log
    ref = load_file(tmp_path / "ref" / "pytorch_lora_weights.safetensors")
    res = load_file(killed_dir / "pytorch_lora_weights.safetensors")
    assert ref.keys() == res.keys()
    for key in ref:
        assert torch.equal(ref[key], res[key]), key


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(kit, tmp_path, train_argv, reset_accelerate):
    from lcm_kit.training.loop import NonFiniteLossError
    from lcm_kit.training.train_lcm_lora import main as train_lcm_lora

    out = tmp_path / "nan"
    argv = train_argv(out, steps=6) + ["--learning_rate", "1e30", "--checkpointing_steps", "1",
                                          "--max_grad_norm", "0", "--lora_rank", "4"]
    reset_accelerate()
    with pytest.raises(NonFiniteLossError, match=r"Non-finite loss .* at step \d+.*checkpoint-\d+"):
        train_lcm_lora(argv)
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints and not (out / "pytorch_lora_weights.safetensors").exists()
    last = load_file(out / checkpoints[-1] / "objective_state.safetensors")
    assert all(torch.isfinite(v).all() for v in last.values())


def test_bad_input_fails_early_with_clear_errors(kit, tmp_path, train_argv, reset_accelerate):
    from lcm_kit.training.train_lcm_lora import main as train_lcm_lora

    # a missing column is reported (with the available ones) before the teacher is even looked at
    argv = train_argv(tmp_path / "x")
    argv[argv.index("--pretrained_teacher_model") + 1] = str(tmp_path / "no-such-teacher")
    reset_accelerate()
    with pytest.raises(ValueError, match=r"(?s)caption_column.*'nope'.*text"):
        train_lcm_lora(argv + ["--caption_column", "nope"])
    with pytest.raises(ValueError, match="w_min"):
        train_lcm_lora(train_argv(tmp_path / "x") + ["--w_min", "9", "--w_max", "3"])
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        train_lcm_lora(train_argv(tmp_path / "x") + ["--resume_from_checkpoint", str(tmp_path / "nothing")])
    with pytest.raises(ValueError, match="pretrained_teacher_model"):
        train_lcm_lora(argv)
    with pytest.raises(ValueError, match="lora_target_modules|target_modules"):
        train_lcm_lora(train_argv(tmp_path / "x") + ["--lora_target_modules", "to_q,not_a_module"])
    with pytest.raises(SystemExit):
        train_lcm_lora(train_argv(tmp_path / "x") + ["--solver", "rk4"])


def test_cached_run_matches_uncached_and_reuses_its_cache(kit, tmp_path, train_argv, reset_accelerate):
    """--cache_latents --cache_text_embeddings: the first step's loss equals the uncached run's (the cache stores
    the VAE posterior, sampled with the same step generator); a second run reuses the cache; a different teacher
    (another fingerprint) gets its own cache."""
    from lcm_kit.training.train_lcm_lora import main as train_lcm_lora

    def run(name, *extra, kind="sd1"):
        reset_accelerate()
        argv = train_argv(tmp_path / name, kind=kind, steps=1) + ["--center_crop", "--lora_rank", "4", *extra]
        return train_lcm_lora(argv)

    cache = ["--cache_latents", "--cache_text_embeddings", "--cache_dir", str(tmp_path / "cache")]
    plain = run("plain")
    cached = run("cached", *cache)
    assert cached.last_loss == pytest.approx(plain.last_loss, rel=1e-5)
    encoded = tmp_path / "cache" / "encoded"
    first = sorted(p for p in encoded.iterdir() if not p.name.startswith("."))
    assert len(first) == 1
    stamp = (first[0] / "meta.json").stat().st_mtime_ns
    again = run("again", *cache)
    assert again.last_loss == cached.last_loss
    assert sorted(p for p in encoded.iterdir() if not p.name.startswith(".")) == first
    assert (first[0] / "meta.json").stat().st_mtime_ns == stamp
    run("other-teacher", *cache, kind="sd2")
    assert len([p for p in encoded.iterdir() if not p.name.startswith(".")]) == 2


def test_webdataset_shards_with_worker_processes(kit, tmp_path, train_argv, reset_accelerate):
    """--train_shards_path_or_url with a brace pattern over real tar shards, 2 DataLoader workers and gradient
    accumulation."""
    import tarfile

    from lcm_kit.training.train_lcm_lora import main as train_lcm_lora

    images = sorted(kit["data"].glob("*.png"))
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard:02d}.tar", "w") as tar:
            for image in images[shard * 4:(shard + 1) * 4]:
                tar.add(image, arcname=f"{image.stem}.png")
                caption = tmp_path / f"{image.stem}.txt"
                caption.write_text(f"caption {image.stem}")
                tar.add(caption, arcname=f"{image.stem}.txt")
    argv = train_argv(tmp_path / "out", steps=2)
    argv[argv.index("--dataset_name"):argv.index("--dataset_name") + 2] = [
        "--train_shards_path_or_url", str(tmp_path / "shard-{00..01}.tar")]
    reset_accelerate()
    result = train_lcm_lora(argv + ["--dataloader_num_workers", "2", "--lora_rank", "4", "--random_flip",
                                    "--gradient_accumulation_steps", "2"])
    # 2 optimiser steps of 2 accumulated batches of 2 = the 8 samples once
    assert result.global_step == 2 and np.isfinite(result.last_loss)
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
