"""Bad training flags, bad checkpoints and Hub tokens in every spelling: each one is refused with a message naming
the flag or file and what is allowed, before anything is trained; no secret is ever echoed."""

from __future__ import annotations

import json

import pytest

LORA = "train_lcm_lora"
FULL = "train_lcm"
CM = "train_consistency"

# (trainer, extra flags, what the error must name)
BAD_FLAGS = [
    (LORA, ["--learning_rate", "nan"], r"--learning_rate.*finite number > 0"),
    (LORA, ["--learning_rate=-1e-4"], r"--learning_rate.*> 0"),
    (LORA, ["--learning_rate", "inf"], r"--learning_rate"),
    (LORA, ["--adam_beta1", "1.0"], r"--adam_beta1.*>= 0 and < 1"),
    (LORA, ["--adam_beta2", "nan"], r"--adam_beta2"),
    (LORA, ["--adam_weight_decay", "-0.1"], r"--adam_weight_decay.*>= 0"),
    (LORA, ["--adam_epsilon", "0"], r"--adam_epsilon.*> 0"),
    (LORA, ["--max_grad_norm", "nan"], r"--max_grad_norm.*finite"),
    (LORA, ["--lr_power", "0"], r"--lr_power"),
    (LORA, ["--train_batch_size", "0"], r"--train_batch_size.*>= 1"),
    (LORA, ["--train_batch_size", "2.5"], r"--train_batch_size"),
    (LORA, ["--gradient_accumulation_steps", "-1"], r"--gradient_accumulation_steps"),
    (LORA, ["--checkpointing_steps", "0"], r"--checkpointing_steps"),
    (LORA, ["--checkpoints_total_limit", "0"], r"--checkpoints_total_limit"),
    (LORA, ["--lr_scheduler", "cyclic"], r"--lr_scheduler"),
    (LORA, ["--mixed_precision", "fp8"], r"--mixed_precision"),
    (LORA, ["--mixed_precision", "fp16"], r"--mixed_precision fp16 needs a GPU"),
    (LORA, ["--w_min", "-1"], r"--w_min.*>= 0"),
    (LORA, ["--w_min", "9", "--w_max", "3"], r"--w_min must be <= --w_max"),
    (LORA, ["--huber_c", "-1"], r"--huber_c.*> 0"),
    (LORA, ["--huber_c", "nan"], r"--huber_c"),
    (LORA, ["--timestep_scaling_factor", "0"], r"--timestep_scaling_factor"),
    (LORA, ["--proportion_empty_prompts", "1.5"], r"--proportion_empty_prompts.*>= 0 and <= 1"),
    (LORA, ["--num_ddim_timesteps", "0"], r"--num_ddim_timesteps"),
    (LORA, ["--num_ddim_timesteps", "2000"], r"num_ddim_timesteps"),
    (LORA, ["--validation_num_inference_steps", "100"], r"--validation_num_inference_steps 100.*--num_ddim_timesteps"),
    (LORA, ["--lora_rank", "0"], r"--lora_rank"),
    (LORA, ["--lora_alpha", "-2"], r"--lora_alpha.*> 0"),
    (LORA, ["--lora_alpha", "nan"], r"--lora_alpha"),
    (LORA, ["--lora_dropout", "1.0"], r"--lora_dropout.*>= 0 and < 1"),
    (LORA, ["--lora_target_modules", "to_q,not_a_module"], r"not_a_module"),
    (LORA, ["--solver", "rk4"], r"--solver"),
    (LORA, ["--loss_type", "l3"], r"--loss_type"),
    (LORA, ["--resolution", "30"], r"--resolution must be a multiple of 8"),
    (LORA, ["--report_to", "mlflow"], r"--report_to.*unknown tracker"),
    (LORA, ["--resume_from_checkpoint", "/no/such/checkpoint"], r"--resume_from_checkpoint"),
    (LORA, ["--vae_encode_batch_size", "0"], r"--vae_encode_batch_size"),
    (LORA, ["--learning_rat", "1e-4"], r"unrecognized arguments: --learning_rat"),
    (FULL, ["--ema_decay", "1.5"], r"--ema_decay.*>= 0 and < 1"),
    (FULL, ["--unet_time_cond_proj_dim", "0"], r"--unet_time_cond_proj_dim"),
    (CM, ["--mode", "ct", "--s0", "100", "--s1", "10"], r"--s0 must be < --s1"),
    (CM, ["--mode", "ict", "--rho", "-7"], r"--rho.*> 0"),
    (CM, ["--mode", "ict", "--p_std", "-1"], r"--p_std.*> 0"),
    (CM, ["--mode", "ict", "--huber_c", "-1"], r"--huber_c.*> 0"),
    (CM, ["--mode", "ict", "--sigma_min", "10", "--sigma_max", "1"], r"--sigma_min < --sigma_max"),
    (CM, ["--mode", "ict", "--sigma_data", "nan"], r"--sigma_data"),
    (CM, ["--mode", "ict", "--ema_decay", "1"], r"--ema_decay"),
    (CM, ["--mode", "ct", "--mu0", "1.2"], r"--mu0"),
    (CM, ["--mode", "cd"], r"--mode cd needs --teacher"),
    (CM, ["--mode", "ict", "--mu0", "0.9"], r"--mu0 only applies to --mode ct"),
    (CM, ["--mode", "ict", "--dropout", "-0.1"], r"--dropout"),
    (CM, ["--mode", "ict", "--block_out_channels", "16,x"], r"--block_out_channels"),
    (CM, ["--mode", "ict", "--num_class_embeds", "0"], r"--num_class_embeds"),
    (CM, ["--mode", "ict", "--scheduler_num_train_timesteps", "1"], r"--scheduler_num_train_timesteps"),
    (CM, ["--mode", "dm"], r"--mode"),
]


def _base(trainer, kit, out):
    if trainer == CM:
        return ["--dataset_name", str(kit["data"]), "--output_dir", str(out), "--resolution", "16",
                "--max_train_steps", "2", "--report_to", "none", "--block_out_channels", "16,32",
                "--layers_per_block", "1"]
    return ["--pretrained_teacher_model", str(kit["sd1"]), "--dataset_name", str(kit["data"]), "--output_dir",
            str(out), "--resolution", "32", "--max_train_steps", "2", "--report_to", "none",
            *(["--unet_time_cond_proj_dim", "32"] if trainer == FULL else [])]


def _run(trainer, argv):
    import importlib

    return importlib.import_module(f"lcm_kit.training.{trainer}").main(argv)


def _without_flags(argv, flags):
    """``argv`` with the given flags (and their values) removed, so a case's own value is the only one."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        if token in flags:
            skip = True
            continue
        out.append(token)
    return out


@pytest.mark.parametrize("trainer, flags, match", BAD_FLAGS, ids=[" ".join([t, *f]) for t, f, _ in BAD_FLAGS])
def test_bad_training_flags_are_named_before_training(trainer, flags, match, kit, tmp_path, reset_accelerate,
                                                      capsys):
    out = tmp_path / "out"
    base = _without_flags(_base(trainer, kit, out), {f for f in flags if f.startswith("--")})
    with pytest.raises((SystemExit, ValueError)) as caught:
        _run(trainer, base + flags)
    message = str(caught.value) if isinstance(caught.value, ValueError) else capsys.readouterr().err
    assert caught.type is ValueError or caught.value.code == 2
    import re

    assert re.search(match, message), message
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not list(out.glob("checkpoint-*"))


def _checkpoint_cases():
    """(name, damage(folder), where the error or warning must point)."""

    def empty(folder):
        for path in folder.iterdir():
            path.unlink()

    def truncate(folder):
        path = folder / "objective_state.safetensors"
        path.write_bytes(path.read_bytes()[:64])

    def remove_optimizer(folder):
        (folder / "optimizer.bin").unlink()

    def garbage_manifest(folder):
        (folder / "manifest.json").write_text("{not json")

    def no_manifest(folder):
        (folder / "manifest.json").unlink()

    def altered(folder):
        path = folder / "objective_state.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))

    def no_state(folder):
        (folder / "training_state.json").unlink()

    def extra_bytes(folder):
        with open(folder / "optimizer.bin", "ab") as handle:
            handle.write(b"\0" * 10)

    return [
        ("emptied", empty, r"no training_state.json|no manifest.json"),
        ("truncated state", truncate, r"objective_state.safetensors has 64 bytes"),
        ("missing optimizer", remove_optimizer, r"optimizer.bin is missing"),
        ("garbage manifest", garbage_manifest, r"unreadable manifest.json"),
        ("no manifest", no_manifest, r"no manifest.json"),
        ("altered bytes", altered, r"SHA-256 mismatch"),
        ("no training state", no_state, r"training_state.json"),
        ("grown file", extra_bytes, r"optimizer.bin has \d+ bytes"),
    ]


@pytest.fixture(scope="module")
def finished_run(kit, tmp_path_factory):
    """A 2-step LoRA run with checkpoint-1 and checkpoint-2."""
    from accelerate.state import AcceleratorState, GradientState

    from lcm_kit.training.train_lcm_lora import main

    out = tmp_path_factory.mktemp("run") / "out"
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    main(_base(LORA, kit, out) + ["--checkpointing_steps", "1", "--lora_rank", "4", "--train_batch_size", "2"])
    return out


@pytest.mark.parametrize("name, damage, match", _checkpoint_cases(), ids=[c[0] for c in _checkpoint_cases()])
def test_damaged_checkpoints_are_refused_by_name_and_skipped_by_latest(name, damage, match, finished_run, tmp_path):
    import shutil

    from lcm_kit.training.checkpoints import resolve_resume_checkpoint

    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    damage(out / "checkpoint-2")
    with pytest.raises(ValueError, match=match):
        resolve_resume_checkpoint(str(out / "checkpoint-2"), str(out))
    assert resolve_resume_checkpoint("latest", str(out)) == out / "checkpoint-1"


def test_a_checkpoint_of_another_run_names_the_mismatch(finished_run, kit, tmp_path, reset_accelerate):
    import shutil

    from lcm_kit.training.train_lcm_lora import main

    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    with pytest.raises(ValueError, match=r"does not match this run.*another shape.*--lora_rank"):
        main(_base(LORA, kit, out) + ["--lora_rank", "8", "--resume_from_checkpoint", "latest",
                                      "--max_train_steps", "3"])


TOKEN_SPELLINGS = [
    ["--hub_token", "s3cr3t-not-hf-shaped"],
    ["--hub_token=s3cr3t-not-hf-shaped"],
    ["--hub_tok", "s3cr3t-not-hf-shaped"],
    ["--hub_t=s3cr3t-not-hf-shaped"],
    ["--hub-token", "s3cr3t-not-hf-shaped"],
    ["--hub_token", "hf_" + "A1b2C3d4" * 4],
    ["--wandb_api_key", "s3cr3t-not-hf-shaped"],
]


@pytest.mark.parametrize("spelling", TOKEN_SPELLINGS, ids=[s[0].split("=")[0] for s in TOKEN_SPELLINGS])
def test_tokens_in_every_spelling_never_reach_an_error_message_or_a_saved_file(spelling, kit, tmp_path, capsys):
    """Misspelled or abbreviated token flags are errors (no abbreviation silently becomes --hub_token), and the
    error message masks the value; a correct flag's value never reaches training_args.json or a command line."""
    from lcm_kit.training.args import build_lcm_lora_parser
    from lcm_kit.training.redaction import args_for_saving, forget_secrets, redact_command

    secret = spelling[-1].split("=", 1)[-1]
    argv = _base(LORA, kit, tmp_path / "out") + spelling
    try:
        parser = build_lcm_lora_parser()
        if spelling[0].split("=")[0] == "--hub_token":
            args = parser.parse_args(argv)
            saved = json.dumps(args_for_saving(args))
            assert secret not in saved and secret not in redact_command(["train_lcm_lora.py", *argv])
        else:
            with pytest.raises(SystemExit):
                parser.parse_args(argv)
            error = capsys.readouterr().err
            assert "unrecognized arguments" in error and secret not in error
    finally:
        forget_secrets()
