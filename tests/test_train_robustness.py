"""Nothing lost, nothing leaked: checkpoints under SIGKILL, damaged and poisoned checkpoints, a full disk, the final
save before the final validation, secrets in every spelling, and what each trainer saves and logs."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def _popen(module: str, argv, **kwargs):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", f"lcm_kit.training.{module}", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _lora(folder: Path) -> dict:
    return load_file(folder / "pytorch_lora_weights.safetensors")


def _assert_same_lora(a: Path, b: Path) -> None:
    first, second = _lora(a), _lora(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


RESUME_FLAGS = ["--lora_rank", "4", "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2",
                "--random_flip", "--lora_dropout", "0.1"]


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_sigkill_while_writing_a_checkpoint_with_limit_1_loses_nothing(tmp_path, train_argv, kind):
    """--checkpoints_total_limit 1: the old checkpoint is removed only once the new one is complete, so a run killed
    while it writes checkpoint-4 still has checkpoint-2, resumes from it and ends bit-exact (SD and SDXL teachers)."""
    argv = lambda out: train_argv(out, kind=kind, steps=6) + ["--checkpointing_steps", "2", "--checkpoints_total_limit", "1",  # noqa: E731
                                                    *RESUME_FLAGS]
    reference = _popen("train_lcm_lora", argv(tmp_path / "ref"))
    out = tmp_path / "killed"
    victim = _popen("train_lcm_lora", argv(out))
    temp, deadline = out / ".checkpoint-4.tmp", time.monotonic() + 240
    while not temp.exists():  # busy-wait: the tiny checkpoint is written within milliseconds
        assert victim.poll() is None and time.monotonic() < deadline, victim.stdout.read()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    resumed = _popen("train_lcm_lora", argv(out) + ["--resume_from_checkpoint", "latest"])
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and reference.wait(timeout=300) == 0, log
    assert f"Resuming from {out / 'checkpoint-2'}" in log
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
    _assert_same_lora(tmp_path / "ref", out)


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, train_argv):
    """A SIGKILL after checkpoint-4, then checkpoint-4 truncated: `latest` warns about it and resumes from
    checkpoint-2 instead, ending bit-exact; naming the damaged one explicitly is an error listing the problem."""
    argv = lambda out: train_argv(out, steps=6) + ["--checkpointing_steps", "2", *RESUME_FLAGS]  # noqa: E731
    reference = _popen("train_lcm_lora", argv(tmp_path / "ref"))
    out = tmp_path / "damaged"
    victim = _popen("train_lcm_lora", argv(out))
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-4").is_dir():
        assert victim.poll() is None and time.monotonic() < deadline, victim.stdout.read()
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    state = out / "checkpoint-4" / "objective_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    explicit = _popen("train_lcm_lora", argv(out) + ["--resume_from_checkpoint", str(out / "checkpoint-4")])
    message = explicit.communicate(timeout=300)[0]
    assert explicit.returncode != 0 and "objective_state.safetensors has 100 bytes" in message
    resumed = _popen("train_lcm_lora", argv(out) + ["--resume_from_checkpoint", "latest"])
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and reference.wait(timeout=300) == 0, log
    assert "Skipping" in log and "checkpoint-4" in log and f"Resuming from {out / 'checkpoint-2'}" in log
    _assert_same_lora(tmp_path / "ref", out)


def test_a_checkpoint_interrupted_in_process_keeps_the_previous_one(tmp_path, train_argv, reset_accelerate,
                                                                   monkeypatch):
    """The same guarantee without a race: the save of checkpoint-2 dies inside accelerate's save_state."""
    from accelerate import Accelerator

    from lcm_kit.training.checkpoints import resolve_resume_checkpoint
    from lcm_kit.training.train_lcm_lora import main

    out = tmp_path / "run"
    original = Accelerator.save_state
    calls = []

    def dying_save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            original(self, output_dir, **kwargs)
            raise KeyboardInterrupt("killed while writing")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", dying_save_state)
    with pytest.raises(KeyboardInterrupt):
        main(train_argv(out, steps=4) + ["--checkpointing_steps", "1", "--checkpoints_total_limit", "1",
                                         "--lora_rank", "4"])
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    assert resolve_resume_checkpoint("latest", str(out)) == out / "checkpoint-1"


def _fill_limited(tmp_path):
    """A folder on a small filesystem (tmpfs where this machine allows mounting), else ``None``."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True)
    return mount if done.returncode == 0 else None


def test_a_full_disk_is_named_and_the_earlier_checkpoints_survive(tmp_path, train_argv, reset_accelerate):
    """A checkpoint that does not fit: an OSError(ENOSPC) saying the disk is full, not torch's "basic_ios::clear".
    The disk is a real small tmpfs where mounting is allowed; otherwise the file-size limit (RLIMIT_FSIZE) of a
    child process makes the same writes fail."""
    from lcm_kit.training.train_lcm_lora import main

    mount = _fill_limited(tmp_path)
    if mount is not None:
        try:
            with pytest.raises(OSError) as caught:
                main(train_argv(mount / "out", steps=2) + ["--checkpointing_steps", "1", "--lora_rank", "64"])
            assert caught.value.errno == errno.ENOSPC and "No space left on the disk" in str(caught.value)
            assert not list((mount / "out").glob(".checkpoint-*.tmp"))
        finally:
            subprocess.run(["umount", str(mount)])
        return
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "from lcm_kit.training.train_lcm_lora import main\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, {resource.RLIM_INFINITY}))\n"
        "main(sys.argv[1:])\n"
    )
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", script, *train_argv(out, steps=2), "--checkpointing_steps", "1",
                           "--lora_rank", "64", "--report_to", "none"], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert done.returncode != 0
    assert "No space left on the disk" in done.stderr and "basic_ios" not in done.stderr.splitlines()[-1]


def test_divergence_sets_aside_the_poisoned_checkpoints_and_a_lower_lr_resumes(tmp_path, train_argv,
                                                                              reset_accelerate):
    """lr 1e30 after a warm-up from 0: checkpoint-1 is still good, checkpoint-2 already holds the exploded weights.
    The error names checkpoint-1 (not checkpoint-2, which is set aside as .poisoned) and advises a lower learning
    rate; resuming with one works and the new learning rate is the one used."""
    from lcm_kit.training.loop import NonFiniteLossError
    from lcm_kit.training.train_lcm_lora import main

    out = tmp_path / "nan"
    argv = train_argv(out, steps=6) + ["--learning_rate", "1e30", "--lr_scheduler", "linear", "--lr_warmup_steps", "3",
                                       "--checkpointing_steps", "1", "--max_grad_norm", "0", "--lora_rank", "4"]
    with pytest.raises(NonFiniteLossError) as caught:
        main(argv)
    message = str(caught.value)
    good = sorted(p.name for p in out.glob("checkpoint-*") if p.is_dir() and not p.name.endswith(".poisoned"))
    poisoned = sorted(p.name for p in out.glob("checkpoint-*.poisoned"))
    assert good and poisoned, (good, poisoned)
    assert f"{out / good[-1]}" in message and "lower --learning_rate" in message
    last = load_file(out / good[-1] / "objective_state.safetensors")
    assert all(torch.isfinite(v).all() and v.abs().max() < 1e3 for v in last.values())
    reset_accelerate()
    argv[argv.index("--learning_rate") + 1] = "1e-4"
    result = main(argv + ["--resume_from_checkpoint", "latest"])
    assert result.global_step == 6 and torch.isfinite(torch.tensor(result.last_loss))
    assert json.loads((out / "checkpoint-6" / "training_state.json").read_text())["learning_rate"] == 1e-4


def test_the_final_weights_are_saved_before_the_final_validation(tmp_path, train_argv, reset_accelerate,
                                                                 monkeypatch):
    from lcm_kit.training.lcm_objective import LCMObjective
    from lcm_kit.training.train_lcm_lora import main

    def failing_validation(self, model, step):
        raise RuntimeError("the validation broke")

    monkeypatch.setattr(LCMObjective, "validate", failing_validation)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="validation broke"):
        main(train_argv(out, steps=2)[:-1] + ["--validation_prompts", "a cat", "--lora_rank", "4"])
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "training_args.json").is_file()


SECRET_SPELLINGS = [
    ("--hub_token", "plain-secret-value-1"),
    ("--hub_token=", "plain-secret-value-2"),
    ("--hub_tok", "abbreviated-secret-3"),
]


@pytest.mark.parametrize("flag, secret", SECRET_SPELLINGS)
def test_a_hub_token_of_any_shape_and_spelling_is_never_written_or_logged(tmp_path, train_argv, reset_accelerate,
                                                                          hub_client, capfd, caplog, flag, secret):
    """The token's own string, whatever its shape, never appears in a file, a log, the card or the tracker; an
    abbreviated flag is an error (not a silent --hub_token), and its error message masks the value too."""
    from lcm_kit.training.redaction import forget_secrets
    from lcm_kit.training.train_lcm_lora import main

    caplog.set_level("INFO")
    out = tmp_path / "run"
    token_args = [flag + secret] if flag.endswith("=") else [flag, secret]
    argv = train_argv(out, steps=2) + ["--lora_rank", "4", "--push_to_hub", "--hub_model_id", "me/x",
                                       "--report_to", "tensorboard", *token_args]
    try:
        if flag == "--hub_tok":
            with pytest.raises(SystemExit):
                main(argv)
        else:
            main(argv, hub_client=hub_client)
            assert (out / "README.md").is_file()
        captured = capfd.readouterr()
        texts = [captured.out, captured.err, caplog.text]
        texts += [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
        assert all(secret not in text for text in texts)
    finally:
        forget_secrets()


def test_the_run_logs_its_configuration_checkpoints_and_a_summary(tmp_path, train_argv, reset_accelerate, caplog):
    from lcm_kit.training.train_lcm_lora import main

    caplog.set_level("INFO")
    main(train_argv(tmp_path / "run", steps=2) + ["--lora_rank", "4", "--checkpointing_steps", "2"])
    text = caplog.text
    assert "configuration" in text and '"lora_rank": 4' in text
    assert f"Saved {tmp_path / 'run' / 'checkpoint-2'}" in text
    assert "Finished 2 steps" in text and "pytorch_lora_weights.safetensors" in text


def test_a_missing_tracker_package_is_an_error_not_an_untracked_run(tmp_path, train_argv, reset_accelerate,
                                                                    monkeypatch):
    import importlib.util

    from lcm_kit.training.train_lcm_lora import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"--report_to wandb needs the wandb package"):
        main(train_argv(tmp_path / "run", steps=1) + ["--report_to", "wandb"])
    if real("bitsandbytes") is None:
        with pytest.raises(ValueError, match=r"--use_8bit_adam needs bitsandbytes.*lcm-kit\[8bit\]"):
            main(train_argv(tmp_path / "run", steps=1) + ["--use_8bit_adam"])


def test_the_full_lcm_folder_is_a_complete_pipeline_with_the_training_schedule(tmp_path, kit, train_argv,
                                                                              reset_accelerate):
    """train_lcm writes a whole pipeline folder that stock LatentConsistencyModelPipeline and `lcm-kit generate`
    load, and its scheduler (saved and used for validation) carries the run's --num_ddim_timesteps and
    --timestep_scaling_factor."""
    from diffusers import LatentConsistencyModelPipeline

    from lcm_kit.cli import main as cli
    from lcm_kit.training.train_lcm import main

    out = tmp_path / "full"
    result = main(train_argv(out, steps=1) + ["--unet_time_cond_proj_dim", "32", "--num_ddim_timesteps", "25",
                                              "--timestep_scaling_factor", "5", "--validation_num_inference_steps",
                                              "2"])
    assert result.objective.validation_pipeline(result.model).scheduler.config.original_inference_steps == 25
    stock = LatentConsistencyModelPipeline.from_pretrained(out)
    assert stock.scheduler.config.original_inference_steps == 25 and stock.scheduler.config.timestep_scaling == 5
    assert stock.unet.config.time_cond_proj_dim == 32
    stock.set_progress_bar_config(disable=True)
    image = stock("a red cube", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    assert cli(["generate", "--model", str(out), "--prompt", "a red cube", "--num_inference_steps", "2",
                "--output", str(tmp_path / "x.png")]) == 0


def test_cd_and_ct_targets_run_in_the_online_networks_mode(tmp_path, reset_accelerate):
    """With --dropout > 0 the target network must see the online pass's dropout masks (the RNG is replayed), so it
    has to be in training mode too."""
    from accelerate import Accelerator
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from lcm_kit.training.args import build_consistency_parser
    from lcm_kit.training.cm_objective import CMObjective

    torch.manual_seed(0)
    teacher = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                          down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                          layers_per_block=1, norm_num_groups=8)
    DDPMPipeline(unet=teacher, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "teacher")
    for mode in ("cd", "ct"):
        reset_accelerate()
        extra = ["--teacher", str(tmp_path / "teacher")] if mode == "cd" else []
        args = build_consistency_parser().parse_args(
            ["--mode", mode, "--dataset_name", "x", "--output_dir", str(tmp_path), "--max_train_steps", "10",
             "--dropout", "0.5", "--block_out_channels", "16,32", "--layers_per_block", "1", "--resolution", "8",
             *extra])
        objective = CMObjective(args, Accelerator(cpu=True))
        assert objective.target.training == objective.model.training
        masks = []
        for network in (objective.model, objective.target):
            for module in network.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.register_forward_hook(lambda m, i, o: masks.append(o == 0))
        batch = {"pixel_values": torch.rand(4, 3, 8, 8) * 2 - 1, "captions": ["a"] * 4}
        objective.compute_loss(objective.model, batch, 3, torch.Generator().manual_seed(0))
        half = len(masks) // 2
        assert half > 0 and all(torch.equal(a, b) for a, b in zip(masks[:half], masks[half:]))


def test_help_shows_every_flags_default_and_abbreviations_are_refused(capsys):
    from lcm_kit.training.args import build_consistency_parser, build_lcm_lora_parser, build_lcm_parser

    for build in (build_lcm_lora_parser, build_lcm_parser, build_consistency_parser):
        parser = build()
        undocumented = [a.dest for a in parser._actions if a.dest != "help" and not a.help]
        assert not undocumented, undocumented
        with pytest.raises(SystemExit):
            parser.parse_args(["--help"])
        text = capsys.readouterr().out
        assert "(default: " in text
    with pytest.raises(SystemExit):
        build_lcm_lora_parser().parse_args(["--pretrained_teacher", "x", "--dataset_name", "d"])
    assert "unrecognized arguments: --pretrained_teacher" in capsys.readouterr().err


def test_the_trainers_adamw_is_torchs_fused_kernel_with_the_default_update():
    """On CPU (and CUDA) the trainers' AdamW is torch's fused kernel, and it takes torch's default AdamW steps; on a
    device the kernel does not support (meta) it is the default one."""
    from types import SimpleNamespace

    from lcm_kit.training.loop import _optimizer

    args = SimpleNamespace(use_8bit_adam=False, adam_beta1=0.9, adam_beta2=0.99, adam_weight_decay=1e-2,
                           adam_epsilon=1e-8)
    g = torch.Generator().manual_seed(0)
    fused = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((5, 3), (7,), (2, 3, 3, 3))]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    starts = [p.detach().clone() for p in fused]
    optimizer = _optimizer(args, fused, 1e-2)
    reference = torch.optim.AdamW(plain, lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-8)
    assert optimizer.defaults["fused"] is True and not reference.defaults["fused"]
    for _ in range(5):
        for a, b in zip(fused, plain):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        optimizer.step()
        reference.step()
    for a, b, start in zip(fused, plain, starts):
        assert (a.detach() - start).abs().mean() > 1e-3  # five real steps of about lr each
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)  # the same steps, up to rounding
    meta = [torch.nn.Parameter(torch.empty(2, device="meta"))]
    assert not _optimizer(args, meta, 1e-2).defaults["fused"]
