"""The trainers' flags: every flag parsed is read somewhere (the anchor script parses several it never reads)."""

from pathlib import Path

import pytest

from lcm_kit.training.args import build_lcm_lora_parser, build_lcm_parser

TRAINING_SOURCES = Path(__file__).resolve().parents[1] / "lcm_kit" / "training"


def test_every_parsed_flag_is_read_by_the_training_code():
    sources = "".join(p.read_text() for p in TRAINING_SOURCES.rglob("*.py") if p.name != "args.py")
    unread = set()
    for parser in (build_lcm_lora_parser(), build_lcm_parser()):
        for action in parser._actions:
            if action.dest != "help" and f"args.{action.dest}" not in sources:
                unread.add(action.dest)
    assert not unread, f"flags parsed but never read: {sorted(unread)}"


def test_diffusers_flag_names_and_defaults():
    lora = build_lcm_lora_parser().parse_args(["--pretrained_teacher_model", "x", "--dataset_name", "d"])
    assert (lora.lora_rank, lora.lora_alpha, lora.lora_dropout) == (64, 64.0, 0.0)
    assert lora.lora_target_modules.split(",")[:4] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert (lora.num_ddim_timesteps, lora.w_min, lora.w_max, lora.timestep_scaling_factor) == (50, 5.0, 15.0, 10.0)
    assert (lora.loss_type, lora.huber_c, lora.solver) == ("huber", 0.001, "ddim")
    full = build_lcm_parser().parse_args(["--pretrained_teacher_model", "x", "--dataset_name", "d"])
    assert (full.unet_time_cond_proj_dim, full.ema_decay) == (256, 0.95)
    for flag in ("pretrained_teacher_model", "output_dir", "seed", "resolution", "center_crop", "random_flip",
                 "train_batch_size", "max_train_steps", "num_train_epochs", "learning_rate", "scale_lr",
                 "lr_scheduler", "lr_warmup_steps", "gradient_accumulation_steps", "adam_beta1", "adam_beta2",
                 "adam_weight_decay", "adam_epsilon", "max_grad_norm", "mixed_precision", "allow_tf32",
                 "gradient_checkpointing", "checkpointing_steps", "checkpoints_total_limit",
                 "resume_from_checkpoint", "validation_steps", "report_to", "push_to_hub", "hub_model_id",
                 "hub_token", "dataset_name", "image_column", "caption_column", "max_train_samples",
                 "dataloader_num_workers"):
        assert hasattr(full, flag) and hasattr(lora, flag), flag


@pytest.mark.parametrize("bad", [["--train_batch_size", "0"], ["--solver", "rk4"], ["--loss_type", "l3"],
                                 ["--mixed_precision", "fp8"]])
def test_bad_values_are_rejected_by_the_parser(bad):
    with pytest.raises(SystemExit):
        build_lcm_lora_parser().parse_args(["--pretrained_teacher_model", "x", "--dataset_name", "d", *bad])
