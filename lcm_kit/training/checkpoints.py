"""Resumable checkpoints of the shared training loop: what they hold, how they are written, which one resumes.

A checkpoint is a folder ``<output_dir>/checkpoint-<step>`` holding Accelerate's optimiser, lr-scheduler and RNG
states, ``objective_state.safetensors`` (the trained parameters and the objective's averaged copies, never a frozen
base), ``training_state.json`` (the step, the learning rate) and, written last, ``manifest.json`` (every file's size
and SHA-256). It is written to ``.checkpoint-<step>.tmp`` first, then renamed, and the oldest one beyond
``--checkpoints_total_limit`` is removed only once the new one is complete, so a run killed at any moment keeps a
complete checkpoint. ``--resume_from_checkpoint latest`` takes the newest checkpoint whose manifest verifies (a
truncated, emptied or altered one is skipped with a warning). A checkpoint is never written with non-finite weights,
and those whose weights made the loss diverge are renamed ``checkpoint-<step>.poisoned``.
"""

from __future__ import annotations

import errno
import hashlib
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

class NonFiniteLossError(RuntimeError):
    """Training diverged (a NaN / inf loss or weight): stopped before it reached a checkpoint."""


CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
OBJECTIVE_STATE_FILE = "objective_state.safetensors"
TRAINING_STATE_FILE = "training_state.json"
MANIFEST_FILE = "manifest.json"
POISONED_SUFFIX = ".poisoned"
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
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(t.shape)}" for k, t in expected.items() if state[k].shape != t.shape]
    if reshaped:
        raise ValueError(
            f"the checkpoint does not match this run ({getattr(objective, 'name', type(objective).__name__)}): "
            f"{len(reshaped)} tensor(s) of another shape, e.g. {reshaped[:3]} (checkpoint vs run). Resume with the "
            "flags the checkpoint was written with (e.g. the same --lora_rank)."
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


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """``manifest.json``: the size and SHA-256 of every file in ``folder`` (written last, so its presence means the
    rest was complete)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _file_digest(path)}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))


def checkpoint_problems(folder: Path) -> list[str]:
    """What is wrong with a checkpoint folder (empty when its manifest verifies)."""
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return [f"no {MANIFEST_FILE} (the save did not complete)"]
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        return [f"unreadable {MANIFEST_FILE}: {error}"]
    problems = []
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']}")
        elif _file_digest(path) != expected["sha256"]:
            problems.append(f"{name} differs from what was written (SHA-256 mismatch)")
    return problems


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> Path | None:
    """The folder ``--resume_from_checkpoint`` names: ``latest`` is the newest complete checkpoint in ``output_dir``
    (incomplete ones are skipped with a warning; ``None`` when there is none), a path must be complete."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        for checkpoint in reversed(list_checkpoints(output_dir)):
            problems = checkpoint_problems(checkpoint)
            if not problems:
                return checkpoint
            logger.warning("Skipping %s for --resume_from_checkpoint latest: %s.", checkpoint, "; ".join(problems))
        return None
    path = Path(resume_from_checkpoint)
    if not (path / TRAINING_STATE_FILE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint={resume_from_checkpoint!r} is not an lcm-kit checkpoint folder "
            f"(no {TRAINING_STATE_FILE}); pass 'latest' or a checkpoint-<step> folder."
        )
    problems = checkpoint_problems(path)
    if problems:
        raise ValueError(
            f"--resume_from_checkpoint={resume_from_checkpoint!r} is incomplete or damaged: {'; '.join(problems)}. "
            "Pass 'latest' to take the newest complete checkpoint."
        )
    return path


def read_checkpoint_state(checkpoint: Path) -> dict:
    """``{"global_step": int, "learning_rate": float}`` (the learning rate is absent in older checkpoints)."""
    return json.loads((checkpoint / TRAINING_STATE_FILE).read_text())


def mark_poisoned_checkpoints(output_dir: str, step: int) -> list[Path]:
    """Rename the checkpoints of ``step`` and later ``checkpoint-<step>.poisoned``: their weights produced the
    non-finite loss at ``step`` (a checkpoint of step k holds the weights the loss of step k is computed with)."""
    moved = []
    for checkpoint in list_checkpoints(output_dir):
        if int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1)) >= step:
            target = checkpoint.with_name(checkpoint.name + POISONED_SUFFIX)
            if target.exists():
                shutil.rmtree(target)
            os.replace(checkpoint, target)
            moved.append(target)
    return moved


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


def save_checkpoint(accelerator, args, global_step: int, model, learning_rate: float) -> Path:
    """Write ``checkpoint-<step>`` atomically with its manifest, then enforce ``--checkpoints_total_limit``.

    Refuses (:class:`NonFiniteLossError`) when a trainable weight is not finite; a full disk is reported as such, the
    previous checkpoints untouched."""
    output_dir = Path(args.output_dir)
    final = output_dir / f"checkpoint-{global_step}"
    temp = output_dir / f".checkpoint-{global_step}.tmp"
    weights = [p for p in unwrap_model(model).parameters() if p.requires_grad]
    finite = bool(torch.stack([torch.isfinite(p.detach()).all() for p in weights]).all())
    if not finite:
        checkpoints = list_checkpoints(args.output_dir)
        raise NonFiniteLossError(
            f"The trainable weights are not finite after step {global_step}: checkpoint-{global_step} is not written. "
            + (f"The newest checkpoint is {checkpoints[-1]}. " if checkpoints else "")
            + f"Use a lower --learning_rate (this run: {learning_rate:g})."
        )
    if accelerator.is_main_process and temp.exists():
        shutil.rmtree(temp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (temp / TRAINING_STATE_FILE).write_text(
                json.dumps({"global_step": global_step, "learning_rate": learning_rate})
            )
            write_manifest(temp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(temp, final)
    except Exception as error:  # torch, safetensors and the OS each report a full disk their own way
        if accelerator.is_main_process:
            shutil.rmtree(temp, ignore_errors=True)
        if _is_disk_full(error, output_dir):
            free = shutil.disk_usage(output_dir).free / 2**20
            raise OSError(
                errno.ENOSPC,
                f"No space left on the disk of {output_dir} while writing checkpoint-{global_step} ({free:.0f} MiB "
                "free): free space or lower --checkpoints_total_limit, then resume with --resume_from_checkpoint "
                "latest (the earlier checkpoints are intact)",
            ) from error
        raise
    if accelerator.is_main_process:
        limit = args.checkpoints_total_limit
        if limit is not None:
            existing = [p for p in list_checkpoints(args.output_dir) if p != final]
            for old in existing[: max(0, len(existing) + 1 - limit)]:
                shutil.rmtree(old)
        logger.info("Saved %s", final)
    accelerator.wait_for_everyone()
    return final


def _is_disk_full(error: BaseException, folder: Path) -> bool:
    """A write that failed for lack of room (ENOSPC / a file-size limit), whatever layer reported it (torch's
    serializer raises ``RuntimeError: ... iostream error`` without an errno)."""
    for cause in (error, error.__cause__, error.__context__):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
    text = str(error).lower()
    return ("iostream error" in text or "no space left" in text or "file too large" in text) or (
        shutil.disk_usage(folder).free < 1 << 20
    )
