"""Resumable checkpoints of the shared training loop: what they hold, how they are written, which one resumes.

A checkpoint is a folder ``<output_dir>/checkpoint-<step>`` holding Accelerate's optimiser, lr-scheduler and RNG
states, ``objective_state.safetensors`` (the trained parameters and the objective's averaged copies, never a frozen
base) and ``training_state.json`` (the step). It is written to ``.checkpoint-<step>.tmp`` first, then renamed, so a
run killed mid-save never leaves a half checkpoint that ``--resume_from_checkpoint latest`` would pick.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..utils import unwrap_model

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
OBJECTIVE_STATE_FILE = "objective_state.safetensors"
TRAINING_STATE_FILE = "training_state.json"
TRAINED_PREFIX = "student."


def objective_state(objective, model) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds: ``student.<name>`` for every trainable parameter of ``model`` (a LoRA run:
    the adapter only) and ``<name>.<key>`` for every tensor of each of the objective's averaged models."""
    state = {TRAINED_PREFIX + name: p for name, p in unwrap_model(model).named_parameters() if p.requires_grad}
    for name, (module, _) in objective.averaged_models().items():
        state.update({f"{name}.{key}": value for key, value in module.state_dict().items()})
    return state


@torch.no_grad()
def load_objective_state(objective, model, state: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's tensors back; ``ValueError`` unless its keys are exactly this run's."""
    expected = objective_state(objective, model)
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(
            f"the checkpoint does not match this run ({getattr(objective, 'name', type(objective).__name__)}): "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}. Resume with the flags the checkpoint was written with."
        )
    for key, tensor in expected.items():
        tensor.copy_(state[key])


def list_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary folders of interrupted saves excluded)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> Path | None:
    """The folder ``--resume_from_checkpoint`` names (``latest``: the newest in ``output_dir``, or ``None``)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not (path / TRAINING_STATE_FILE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint={resume_from_checkpoint!r} is not an lcm-kit checkpoint folder "
            f"(no {TRAINING_STATE_FILE}); pass 'latest' or a checkpoint-<step> folder."
        )
    return path


def read_checkpoint_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / TRAINING_STATE_FILE).read_text())["global_step"])


def register_checkpoint_hooks(accelerator, objective, model) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` write and read :func:`objective_state` (safetensors)
    instead of whole models."""

    def save_hook(models, weights, output_dir):
        weights.clear()  # the objective's tensors are saved instead
        if accelerator.is_main_process:
            state = {k: v.detach().contiguous().cpu() for k, v in objective_state(objective, model).items()}
            save_file(state, os.path.join(output_dir, OBJECTIVE_STATE_FILE))

    def load_hook(models, input_dir):
        models.clear()
        load_objective_state(objective, model, load_file(os.path.join(input_dir, OBJECTIVE_STATE_FILE)))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, args, global_step: int) -> Path:
    """Write ``checkpoint-<step>`` atomically and enforce ``--checkpoints_total_limit``."""
    output_dir = Path(args.output_dir)
    final = output_dir / f"checkpoint-{global_step}"
    temp = output_dir / f".checkpoint-{global_step}.tmp"
    if accelerator.is_main_process:
        if temp.exists():
            shutil.rmtree(temp)
        limit = args.checkpoints_total_limit
        if limit is not None:
            existing = [p for p in list_checkpoints(args.output_dir) if p != final]
            for old in existing[: max(0, len(existing) - limit + 1)]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temp / TRAINING_STATE_FILE).write_text(json.dumps({"global_step": global_step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
        logger.info("Saved %s", final)
    accelerator.wait_for_everyone()
    return final
