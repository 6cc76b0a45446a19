"""train_scripts/train_consistency.py end to end on real digits (sklearn), offline, tiny UNet2DModels: CD / CT / iCT,
class-conditional and latent space, resume, stock-pipeline loading, Hub upload through an injected client."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image
from safetensors.torch import load_file

from lcm_kit.training.args import build_consistency_parser, validate_consistency_args
from lcm_kit.training.cm_objective import build_consistency_loss, load_teacher_denoiser
from lcm_kit.training.train_consistency import main as train_consistency

TINY_UNET = ["--block_out_channels", "16,32", "--layers_per_block", "1"]


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """24 real handwritten digits as an imagefolder with metadata.jsonl (caption = the digit)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = tmp_path_factory.mktemp("digits")
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(24):
            pixels = (digits.images[i] / 16.0 * 255).astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").resize((16, 16), Image.BICUBIC).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": str(digits.target[i])}) + "\n")
    return folder


def common_args(data, out, steps=3, new_unet=True):
    return ["--dataset_name", str(data), "--output_dir", str(out), "--resolution", "16", "--train_batch_size", "4",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--report_to", "none", "--seed", "0",
            "--checkpointing_steps", "1000", "--validation_steps", "1000", *(TINY_UNET if new_unet else [])]


class FakeHub:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id))
        return repo_id

    def upload_folder(self, repo_id, folder_path, **kwargs):
        from pathlib import Path

        self.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        self.card = (Path(folder_path) / "README.md").read_text()


def test_ict_class_conditional_trains_saves_a_stock_pipeline_and_pushes(digits_folder, tmp_path):
    out = tmp_path / "ict"
    hub = FakeHub()
    result = train_consistency(
        common_args(digits_folder, out, steps=4)
        + ["--mode", "ict", "--num_class_embeds", "10", "--validation_prompts", "3", "7", "--dropout", "0.1",
           "--push_to_hub", "--hub_model_id", "me/ict-digits", "--hub_token", "hf_secretsecretsecretsecret"],
        hub_client=hub,
    )
    assert result.global_step == 4 and np.isfinite(result.last_loss)
    # The saved folder is a stock ConsistencyModelPipeline; the model is class-conditional.
    pipe = ConsistencyModelPipeline.from_pretrained(str(out))
    assert isinstance(pipe.scheduler, CMStochasticIterativeScheduler) and pipe.unet.config.num_class_embeds == 10
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, class_labels=[3, 7], num_inference_steps=1, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    # The online and EMA weights differ (the EMA is the saved model), and both moved from the initialisation.
    online = UNet2DModel.from_pretrained(str(out / "unet_online"))
    assert any(not torch.equal(a, b) for a, b in zip(online.state_dict().values(), pipe.unet.state_dict().values()))
    # Validation grid: 2 class-conditional images of 16 px, each labelled with its class in a strip below.
    grid = Image.open(result.validation_grids[-1]).convert("L")
    assert grid.size == (32, 16 + 14)
    assert min(grid.crop((0, 16, 32, 30)).getdata()) < 128  # the labels' text
    # Hub: repo created, folder uploaded with a card, no token anywhere.
    assert hub.calls[0] == ("create_repo", "me/ict-digits")
    assert {"unet", "scheduler", "model_index.json", "README.md"} <= set(hub.calls[1][2])
    assert "ConsistencyModelPipeline" in hub.card and "class_labels" in hub.card
    assert "hf_secret" not in hub.card and "hf_secret" not in (out / "training_args.json").read_text()


@pytest.mark.parametrize("mode_flags", [["--mode", "ct"], ["--mode", "sct", "--tangent_warmup_steps", "3"]],
                         ids=["ct", "sct"])
def test_resume_is_bit_exact(digits_folder, tmp_path, mode_flags):
    """Resuming from the step-2 checkpoint of a 4-step run ends with the same weights, bit for bit, as the
    uninterrupted run (the CT curricula depend on --max_train_steps, so the resumed run keeps it; sCT adds the JVP
    tangent, its warm-up and the learned weighting). Each run is its own process, as in real use (in one process, CPU
    kernels may round differently on differently aligned buffers)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "train_scripts" / "train_consistency.py"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    base = [*mode_flags, "--checkpointing_steps", "2"]

    def run(out, extra=()):
        proc = subprocess.run([sys.executable, str(script), *common_args(digits_folder, out, steps=4), *base, *extra],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    run(tmp_path / "full")
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    assert "Resuming from" in run(tmp_path / "resumed", ["--resume_from_checkpoint", "latest"])
    for sub in ("unet", "unet_online"):
        full = load_file(tmp_path / "full" / sub / "diffusion_pytorch_model.safetensors")
        resumed = load_file(tmp_path / "resumed" / sub / "diffusion_pytorch_model.safetensors")
        assert full.keys() == resumed.keys()
        for key in full:
            assert torch.equal(full[key], resumed[key]), (sub, key)
    if mode_flags[1] == "ct":
        state = load_file(tmp_path / "full" / "checkpoint-2" / "objective_state.safetensors")
        assert any(k.startswith("target.") for k in state) and any(k.startswith("ema.") for k in state)


@pytest.fixture(scope="module")
def ddpm_teacher(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8)
    folder = tmp_path_factory.mktemp("teacher")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(folder))
    return folder


def test_cd_from_a_ddpm_teacher_starts_from_it(digits_folder, ddpm_teacher, tmp_path):
    teacher = load_teacher_denoiser(str(ddpm_teacher))
    assert type(teacher).__name__ == "VPDenoiser" and teacher.prediction_type == "epsilon"
    out = tmp_path / "cd"
    result = train_consistency(common_args(digits_folder, out, steps=2, new_unet=False)
                               + ["--mode", "cd", "--teacher", str(ddpm_teacher), "--teacher_solver", "euler",
                                  "--pretrained_unet", str(ddpm_teacher), "--validation_prompts"])
    assert result.global_step == 2 and result.validation_grids == []  # empty --validation_prompts: no grid
    pipe = ConsistencyModelPipeline.from_pretrained(str(out))
    assert pipe.unet.config.block_out_channels == teacher.unet.config.block_out_channels


def test_latent_space_ct_decodes_with_the_saved_vae(digits_folder, tmp_path):
    from lcm_kit.testing import tiny_sd_components

    vae = tiny_sd_components("sd1", seed=0)["vae"]
    vae.save_pretrained(tmp_path / "vae_src")
    out = tmp_path / "latent"
    result = train_consistency(common_args(digits_folder, out, steps=2)
                               + ["--mode", "ict", "--pretrained_vae_model_name_or_path", str(tmp_path / "vae_src")])
    unet = UNet2DModel.from_pretrained(str(out / "unet"))
    assert unet.config.sample_size == 8 and unet.config.in_channels == vae.config.latent_channels
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    scheduler = CMStochasticIterativeScheduler.from_pretrained(str(out), subfolder="scheduler")
    assert scheduler.config.clip_denoised is False  # latents are not confined to [-1, 1]
    assert Image.open(result.validation_grids[-1]).size == (8 * 16, 16)


def test_flags_are_validated_before_training(digits_folder, tmp_path):
    parser = build_consistency_parser()
    args = parser.parse_args(["--mode", "ict", "--dataset_name", "x", "--max_train_steps", "10"])
    validate_consistency_args(args)
    loss = build_consistency_loss(args)
    assert (loss.p_mean, loss.p_std, args.sigma_min, args.sigma_max, args.ema_decay) == (-1.1, 2.0, 0.002, 80.0, 0.9999)
    with pytest.raises(ValueError, match="--teacher"):
        train_consistency(common_args(digits_folder, tmp_path / "a") + ["--mode", "cd"])
    with pytest.raises(ValueError, match="--teacher only applies to --mode cd"):
        train_consistency(common_args(digits_folder, tmp_path / "b") + ["--mode", "ct", "--teacher", "x"])
    with pytest.raises(ValueError, match="--mu0"):
        train_consistency(common_args(digits_folder, tmp_path / "c") + ["--mode", "ict", "--mu0", "0.9"])
    with pytest.raises(ValueError, match="validation_prompts"):
        train_consistency(common_args(digits_folder, tmp_path / "d") + ["--mode", "ict", "--validation_prompts", "3"])
    with pytest.raises(ValueError, match="not a class label"):
        train_consistency(common_args(digits_folder, tmp_path / "e", steps=1)
                          + ["--mode", "ict", "--num_class_embeds", "10", "--class_names", "a,b,c,d,e,f,g,h,i,j",
                             "--validation_prompts", "zero"])


def test_every_consistency_flag_is_read():
    from pathlib import Path

    sources = "".join(p.read_text() for p in (Path(__file__).resolve().parents[1] / "lcm_kit" / "training").rglob("*.py")
                      if p.name != "args.py")
    unread = [a.dest for a in build_consistency_parser()._actions if a.dest != "help" and f"args.{a.dest}" not in sources]
    assert not unread, f"flags parsed but never read: {unread}"


def test_new_unet_flags_do_not_apply_to_a_pretrained_unet(digits_folder, ddpm_teacher, tmp_path):
    with pytest.raises(ValueError, match="--dropout shapes a new UNet"):
        train_consistency(common_args(digits_folder, tmp_path / "x", new_unet=False)
                          + ["--mode", "ict", "--pretrained_unet", str(ddpm_teacher), "--dropout", "0.2"])


def test_sct_trains_with_its_weighting_and_saves_a_trigflow_folder_the_stock_pipeline_samples(digits_folder, tmp_path):
    from lcm_kit.sampling import consistency_sample
    from lcm_kit.schedulers import CMMultistepScheduler

    out = tmp_path / "sct"
    result = train_consistency(common_args(digits_folder, out, steps=3)
                               + ["--mode", "sct", "--num_class_embeds", "10", "--validation_prompts", "1"])
    assert result.global_step == 3 and np.isfinite(result.last_loss)
    # the learned weighting trained with the model (and is not part of the saved backbone)
    assert result.model.loss_weighting.linear.weight.abs().sum() > 0
    assert not any("loss_weighting" in k for k in load_file(out / "unet" / "diffusion_pytorch_model.safetensors"))
    # The folder names lcm-kit's scheduler in its TrigFlow parameterisation; the stock pipeline loads and samples it
    # exactly as lcm-kit's sampler does.
    pipe = ConsistencyModelPipeline.from_pretrained(str(out))
    assert isinstance(pipe.scheduler, CMMultistepScheduler) and pipe.scheduler.config.parameterization == "trigflow"
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(batch_size=2, class_labels=[3, 7], num_inference_steps=1, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = consistency_sample(pipe.unet, pipe.scheduler, noise, class_labels=torch.tensor([3, 7]),
                              num_inference_steps=1)
    torch.testing.assert_close(stock, (ours / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)


def test_scd_distils_a_ddpm_teacher_and_ect_starts_from_the_pretrained_unet(digits_folder, ddpm_teacher, tmp_path):
    result = train_consistency(common_args(digits_folder, tmp_path / "scd", steps=2)
                               + ["--mode", "scd", "--teacher", str(ddpm_teacher), "--tangent_warmup_steps", "0",
                                  "--no-adaptive_weighting", "--validation_prompts"])
    assert result.global_step == 2 and np.isfinite(result.last_loss) and result.model.loss_weighting is None
    result = train_consistency(common_args(digits_folder, tmp_path / "ect", steps=2, new_unet=False)
                               + ["--mode", "ect", "--pretrained_unet", str(ddpm_teacher), "--ect_stages", "2",
                                  "--validation_prompts"])
    assert result.global_step == 2 and np.isfinite(result.last_loss)
    pipe = ConsistencyModelPipeline.from_pretrained(str(tmp_path / "ect"))
    assert isinstance(pipe.scheduler, CMStochasticIterativeScheduler)  # ECT stays in the stock parameterisation


@pytest.mark.parametrize("extra, message", [
    (["--mode", "ect"], "--pretrained_unet"),
    (["--mode", "ict", "--ect_q", "2"], "--ect_q only applies to --mode ect"),
    (["--mode", "ect", "--tangent_warmup_steps", "5"], "--tangent_warmup_steps only applies to --mode sct / scd"),
    (["--mode", "sct", "--loss_type", "l1"], "--loss_type only applies"),
    (["--mode", "sct", "--teacher", "x"], "--teacher only applies to --mode cd and scd"),
    (["--mode", "scd"], "--mode scd needs --teacher"),
    (["--mode", "ct", "--p_mean", "-1"], "--p_mean only applies"),
])
def test_continuous_and_ect_flags_are_validated(digits_folder, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        train_consistency(common_args(digits_folder, tmp_path / "x") + extra)
