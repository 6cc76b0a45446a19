"""The Accelerate training loop every lcm-kit trainer shares.

The loop knows nothing about consistency models. It drives an *objective*: an object that owns the networks and
computes a loss. Everything around the loss is here, once: optimiser and lr schedule, gradient accumulation and
clipping, mixed precision, multi-process (only rank 0 writes), the tqdm bar, trackers, the validation grid,
atomic checkpoints with a retention limit, bit-exact resume, and the non-finite-loss guard.

How a new objective plugs in (see :class:`TrainingObjective` for the exact contract)::

    accelerator = create_accelerator(args)                       # flags from args.add_training_args
    objective = MyObjective(args, accelerator)                   # builds/loads its networks on accelerator.device
    dataloader = ...                                             # any DataLoader (map-style or iterable)
    result = run_training(args, accelerator, objective, dataloader)
    # result.global_step, result.output_files; rank 0 has written objective.save_final(args.output_dir)

The objective implements:

* ``trainable_modules()`` -> modules holding the trainable parameters (the loop passes them through
  ``accelerator.prepare`` and hands the wrapped ones back via ``set_prepared_modules``);
* ``trainable_parameters()`` -> the parameters the optimiser updates;
* ``compute_loss(batch, step, generator)`` -> ``(loss, logs)``: draw *all* randomness from ``generator`` (seeded
  per micro-step from ``--seed``, the step and the rank), which is what makes resume bit-exact;
* ``after_optimizer_step(step)`` for EMA / target-network updates;
* ``checkpoint_state()`` / ``load_checkpoint_state(state)``: the tensors a checkpoint must hold (trainable weights,
  EMA targets), saved as safetensors; optimiser, lr scheduler and RNG states are the loop's business;
* ``validate(step)`` -> PIL images or ``None`` (rank 0 only; must not consume the global RNG);
* ``save_final(output_dir)`` -> list of written files (rank 0 only).

Checkpoints are folders ``<output_dir>/checkpoint-<step>``: written to ``.checkpoint-<step>.tmp`` first, then
renamed, so a run killed mid-save never leaves a half checkpoint that ``--resume_from_checkpoint latest`` would pick.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
OBJECTIVE_STATE_FILE = "objective_state.safetensors"
TRAINING_STATE_FILE = "training_state.json"


class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN/inf; the weights of the last checkpoint are left untouched."""


class TrainingObjective:
    """What :func:`run_training` trains. Subclass it (or duck-type it) and implement the methods below."""

    def trainable_modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def set_prepared_modules(self, modules: list[torch.nn.Module]) -> None:
        """Receive the ``accelerator.prepare``-wrapped modules (same order as :meth:`trainable_modules`)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def compute_loss(self, batch: Any, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Called once per optimiser step (after gradients were applied); EMA / target updates go here."""

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def validate(self, step: int) -> list | None:
        return None

    def save_final(self, output_dir: str) -> list[str]:
        raise NotImplementedError


@dataclass
class TrainingResult:
    global_step: int
    output_files: list[str] = field(default_factory=list)
    last_loss: float | None = None
    validation_grids: list[str] = field(default_factory=list)
    objective: Any = None  # the trained objective (e.g. ``result.objective.inference_unet()``)


# ----------------------------------------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------------------------------------


def create_accelerator(args, *, cpu: bool | None = None):
    """An ``Accelerator`` configured from the training flags.

    The data sampler is Accelerate's seedable one (order of epoch e = f(seed, e)), so a resumed run sees the
    same batches as an uninterrupted one without replaying earlier epochs.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    report_to = None if args.report_to in (None, "none", "") else args.report_to
    project_config = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
    )
    kwargs = {}
    if cpu is not None:
        kwargs["cpu"] = cpu
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=project_config,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        **kwargs,
    )
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Same seed on every rank: identical initialisation of new weights (LoRA A matrices, guidance projection).
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def weight_dtype_for(accelerator) -> torch.dtype:
    """The dtype frozen modules are cast to under the accelerator's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def step_generator(seed: int, step: int, micro_step: int, process_index: int, device) -> torch.Generator:
    """A generator seeded from (seed, step, micro-step, rank) only: the randomness of a training step does not
    depend on what ran before, so resuming reproduces it exactly, and ranks draw different noise."""
    entropy = np.random.SeedSequence([seed & 0xFFFFFFFF, step, micro_step, process_index]).generate_state(2)
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int(entropy[0]) << 32 | int(entropy[1]))
    return generator


def list_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary folders of interrupted saves excluded)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> Path | None:
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


def _dataloader_length(dataloader) -> int | None:
    try:
        return len(dataloader)
    except TypeError:
        return None


def _tracker_config(config: dict) -> dict:
    """Tracker hparams accept scalars and strings only."""
    clean = {}
    for key, value in config.items():
        if isinstance(value, (bool, int, float, str)):
            clean[key] = value
        elif value is None:
            clean[key] = "None"
        else:
            clean[key] = str(value)
    return clean


def saved_args(args) -> dict:
    """The flags as saved in outputs and sent to trackers: secrets (``--hub_token``) are never included."""
    from .hub import args_for_saving

    return args_for_saving(args)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def run_training(args, accelerator, objective, train_dataloader) -> TrainingResult:
    """Train ``objective`` on ``train_dataloader`` according to the training flags (see the module docstring)."""
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    params = [p for p in objective.trainable_parameters() if p.requires_grad]
    if not params:
        raise ValueError("The objective has no trainable parameters (requires_grad=True).")
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(
        params,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    batches_per_epoch = _dataloader_length(train_dataloader)
    if batches_per_epoch is None and args.max_train_steps is None:
        raise ValueError("--max_train_steps is required when the dataset has no length (webdataset shards).")
    if batches_per_epoch is not None:
        # Per-rank batches once the loader is sharded across processes.
        batches_per_epoch = math.ceil(batches_per_epoch / accelerator.num_processes)
        steps_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
        max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    else:
        steps_per_epoch, max_train_steps, num_epochs = None, args.max_train_steps, 1

    # Accelerate's prepared scheduler steps once per process per optimiser step; scale the step counts to match.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )

    modules = objective.trainable_modules()
    prepared = accelerator.prepare(*modules, optimizer, train_dataloader, lr_scheduler)
    prepared_modules, optimizer, train_dataloader, lr_scheduler = (
        list(prepared[: len(modules)]),
        *prepared[len(modules):],
    )
    objective.set_prepared_modules(prepared_modules)
    _register_checkpoint_hooks(accelerator, objective)

    if accelerator.log_with:  # every rank calls it; Accelerate starts the trackers on rank 0 only
        project = args.tracker_project_name or getattr(objective, "name", "lcm-kit")
        accelerator.init_trackers(project, config=_tracker_config(saved_args(args)))

    # ---- resume -----------------------------------------------------------------------------------------------
    global_step, first_epoch, skip_batches = 0, 0, 0
    checkpoint = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if args.resume_from_checkpoint is not None and checkpoint is None:
        accelerator.print(f"No checkpoint found in {args.output_dir!r}: starting a new training run.")
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / TRAINING_STATE_FILE).read_text())
        global_step = int(state["global_step"])
        if steps_per_epoch is not None:
            first_epoch = global_step // steps_per_epoch
            skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
        else:
            skip_batches = global_step * args.gradient_accumulation_steps

    progress = tqdm(
        total=max_train_steps,
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    result = TrainingResult(global_step=global_step, objective=objective)
    device = accelerator.device
    micro_step = 0
    epoch = first_epoch
    while global_step < max_train_steps and (steps_per_epoch is None or epoch < num_epochs):
        # The epoch selects the shuffle order and per-sample augmentation draws (history-independent).
        for holder in (train_dataloader, getattr(train_dataloader, "dataset", None)):
            if hasattr(holder, "set_epoch"):
                holder.set_epoch(epoch)
        batches: Iterable = train_dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for batch in batches:
            with accelerator.accumulate(*prepared_modules):
                generator = step_generator(args.seed, global_step, micro_step, accelerator.process_index, device)
                loss, logs = objective.compute_loss(batch, global_step, generator)
                _check_finite(accelerator, loss, global_step, args.output_dir)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            if not accelerator.sync_gradients:
                continue
            micro_step = 0
            objective.after_optimizer_step(global_step)
            global_step += 1
            loss_value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
            result.last_loss = loss_value
            lr = lr_scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4g}", lr=f"{lr:.3g}")
            accelerator.log({"loss": loss_value, "lr": lr, **logs}, step=global_step)

            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, global_step)
            if global_step % args.validation_steps == 0:
                grid = run_validation(accelerator, objective, args, global_step)
                if grid:
                    result.validation_grids.append(grid)
            if global_step >= max_train_steps:
                break
        epoch += 1
    progress.close()

    accelerator.wait_for_everyone()
    result.global_step = global_step
    if accelerator.is_main_process:
        if not result.validation_grids or not result.validation_grids[-1].endswith(f"{global_step:06d}.png"):
            grid = run_validation(accelerator, objective, args, global_step, sync=False)
            if grid:
                result.validation_grids.append(grid)
        result.output_files = list(objective.save_final(args.output_dir))
        from .hub import write_training_args

        result.output_files.append(str(write_training_args(args, args.output_dir)))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _check_finite(accelerator, loss: torch.Tensor, step: int, output_dir: str) -> None:
    """Stop every rank together when any rank's loss is not finite (before it can reach the weights)."""
    flags = accelerator.gather(torch.isfinite(loss.detach().float()).reshape(1))
    if bool(flags.all()):
        return
    checkpoints = list_checkpoints(output_dir)
    kept = (
        f"The last good checkpoint is {checkpoints[-1]} (resume with --resume_from_checkpoint latest, e.g. with a "
        "lower --learning_rate)."
        if checkpoints
        else "No checkpoint was written before this step."
    )
    raise NonFiniteLossError(
        f"Non-finite loss ({loss.detach().float().item()}) at step {step}: training stopped before applying it. {kept}"
    )


def _register_checkpoint_hooks(accelerator, objective) -> None:
    """Checkpoints hold the objective's own tensors (e.g. only the LoRA weights, never the frozen base)."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        weights.clear()  # the objective decides what is saved
        if accelerator.is_main_process:
            state = {k: v.detach().contiguous().cpu() for k, v in objective.checkpoint_state().items()}
            save_file(state, os.path.join(output_dir, OBJECTIVE_STATE_FILE))

    def load_hook(models, input_dir):
        models.clear()
        objective.load_checkpoint_state(load_file(os.path.join(input_dir, OBJECTIVE_STATE_FILE)))

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


def run_validation(accelerator, objective, args, global_step: int, sync: bool = True) -> str | None:
    """Rank 0 renders the objective's validation images into ``<output_dir>/validation/step-<step>.png`` and
    sends them to the trackers; the other ranks wait."""
    path = None
    if accelerator.is_main_process:
        images = objective.validate(global_step)
        if images:
            from diffusers.utils import make_image_grid

            grid = make_image_grid(list(images), rows=1, cols=len(images))
            folder = Path(args.output_dir) / "validation"
            folder.mkdir(parents=True, exist_ok=True)
            path = str(folder / f"step-{global_step:06d}.png")
            grid.save(path)
            _log_images(accelerator, images, global_step)
    if sync:
        accelerator.wait_for_everyone()
    return path


def _log_images(accelerator, images, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            array = np.stack([np.asarray(img.convert("RGB")) for img in images])
            tracker.writer.add_images("validation", array, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(img) for img in images]}, step=step)
