"""The Accelerate training loop every lcm-kit trainer shares.

The loop knows nothing about consistency models. It drives an *objective*: an object that owns the networks and
computes a loss. Everything around the loss is here, once: optimiser and lr schedule, gradient accumulation and
clipping, mixed precision, multi-process (only rank 0 writes), the EMA updates of averaged copies, the tqdm bar,
trackers, the validation grid, checkpoints (:mod:`lcm_kit.training.checkpoints`), bit-exact resume and the
non-finite-loss guard.

    accelerator = create_accelerator(args)                       # flags from args.add_training_args
    objective = MyObjective(args, accelerator)                   # builds/loads its networks on accelerator.device
    result = run_training(args, accelerator, objective, dataloader)
    # result.global_step, result.output_files; rank 0 has written objective.save_final(model, args.output_dir)

See :class:`TrainingObjective` for what an objective implements.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..utils import captioned_grid, cpu_has_native_bf16, ema_update_, unwrap_model
from .checkpoints import (
    NonFiniteLossError,
    list_checkpoints,
    mark_poisoned_checkpoints,
    read_checkpoint_state,
    register_checkpoint_hooks,
    resolve_resume_checkpoint,
    save_checkpoint,
)
from .data import skipped_sample_count
from .redaction import SecretFilter, args_for_saving, write_training_args

logger = logging.getLogger(__name__)


class TrainingObjective:
    """What :func:`run_training` trains. Subclass it (or duck-type it) and implement the methods below.

    ``model`` arguments are the network of :meth:`trainable_model`: as prepared by Accelerate (DDP-wrapped, with the
    mixed-precision forward) in :meth:`compute_loss`, unwrapped in :meth:`validate` and :meth:`save_final`.
    """

    name = "lcm-kit"  # the tracker project unless --tracker_project_name is given

    def trainable_model(self) -> torch.nn.Module:
        """The network the optimiser updates (its ``requires_grad`` parameters; checkpoints hold exactly those)."""
        raise NotImplementedError

    def averaged_models(self) -> dict[str, tuple[torch.nn.Module, Callable[[int], float]]]:
        """EMA copies of the trained network, ``{name: (module, decay(step))}``: after each optimiser step the
        loop moves each toward the network by ``1 - decay(step)``, and checkpoints hold them."""
        return {}

    def compute_loss(self, model, batch: Any, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """``(scalar loss, logs)``. Draw *all* randomness from ``generator`` (seeded per micro-step from ``--seed``,
        the step and the rank): that is what makes resume bit-exact."""
        raise NotImplementedError

    def validate(self, model, step: int) -> list | None:
        """PIL images of the validation grid, or ``None`` (rank 0 only; must not consume the global RNG)."""
        return None

    def save_final(self, model, output_dir: str) -> list[str]:
        """Write the trained outputs (rank 0 only); returns the written paths."""
        raise NotImplementedError


@dataclass
class TrainingResult:
    global_step: int
    output_files: list[str] = field(default_factory=list)
    last_loss: float | None = None
    validation_grids: list[str] = field(default_factory=list)
    objective: Any = None  # the trained objective
    model: Any = None  # its trained network, unwrapped


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
    if accelerator.mixed_precision == "fp16" and accelerator.device.type not in ("cuda", "xpu", "npu", "mlu", "musa"):
        raise ValueError(
            f"--mixed_precision fp16 needs a GPU, but this run is on {accelerator.device.type}: use --mixed_precision "
            "bf16 (or no) there; fp16 gradient scaling only exists for accelerators."
        )
    configure_logging(accelerator)
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning("--mixed_precision bf16 on this CPU runs emulated bf16 kernels (it has no AVX-512 bf16 or AMX): "
                       "expect each step to be several times slower than with --mixed_precision no.")
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Same seed on every rank: identical initialisation of new weights (LoRA A matrices, guidance projection).
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def configure_logging(accelerator) -> None:
    """INFO from lcm-kit on the main process (its configuration, checkpoints, summary), warnings elsewhere; every
    handler masks secrets (:class:`~lcm_kit.training.redaction.SecretFilter`)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in root.handlers:
        if not any(isinstance(f, SecretFilter) for f in handler.filters):
            handler.addFilter(SecretFilter())
    logging.getLogger("lcm_kit").setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)


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


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def run_training(args, accelerator, objective, train_dataloader) -> TrainingResult:
    """Train ``objective`` on ``train_dataloader`` according to the training flags (see the module docstring)."""

    model = objective.trainable_model()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The objective's trainable_model() has no trainable parameters (requires_grad=True).")
    start_time = time.time()
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = _optimizer(args, params, learning_rate)

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

    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    register_checkpoint_hooks(accelerator, objective, model)
    averaged = objective.averaged_models()

    if accelerator.log_with:  # every rank calls it; Accelerate starts the trackers on rank 0 only
        project = args.tracker_project_name or getattr(objective, "name", "lcm-kit")
        accelerator.init_trackers(project, config=_tracker_config(args_for_saving(args)))
    if accelerator.is_main_process:
        logger.info("%s: %d optimiser steps, %d process(es), device %s, mixed precision %s; configuration:\n%s",
                    getattr(objective, "name", "training"), max_train_steps, accelerator.num_processes,
                    accelerator.device, accelerator.mixed_precision,
                    json.dumps(args_for_saving(args), indent=1, sort_keys=True))

    # ---- resume -----------------------------------------------------------------------------------------------
    global_step, first_epoch, skip_batches = 0, 0, 0
    checkpoint = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if args.resume_from_checkpoint is not None and checkpoint is None:
        accelerator.print(f"No checkpoint found in {args.output_dir!r}: starting a new training run.")
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        accelerator.load_state(str(checkpoint))
        state = read_checkpoint_state(checkpoint)
        global_step = state["global_step"]
        previous_lr = state.get("learning_rate", learning_rate)
        if previous_lr != learning_rate:
            _replace_learning_rate(optimizer, lr_scheduler, previous_lr, learning_rate)
            accelerator.print(f"Learning rate {previous_lr:g} of {checkpoint.name} replaced by {learning_rate:g}.")
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
            with accelerator.accumulate(model):
                generator = step_generator(args.seed, global_step, micro_step, accelerator.process_index, device)
                loss, logs = objective.compute_loss(model, batch, global_step, generator)
                # One host sync per micro-step: the ranks' losses, for the guard (before anything is applied) and
                # the log.
                rank_losses = accelerator.gather(loss.detach().float().reshape(1)).tolist()
                _check_finite(accelerator, rank_losses, global_step, learning_rate, args.output_dir)
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
            for module, decay in averaged.values():
                ema_update_(module, unwrap_model(model), decay(global_step))
            global_step += 1
            loss_value = sum(rank_losses) / len(rank_losses)
            result.last_loss = loss_value
            lr = lr_scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4g}", lr=f"{lr:.3g}")
            accelerator.log({"loss": loss_value, "lr": lr, **logs}, step=global_step)

            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, global_step, model, learning_rate)
            if global_step % args.validation_steps == 0:
                grid = run_validation(accelerator, objective, model, args, global_step)
                if grid:
                    result.validation_grids.append(grid)
            if global_step >= max_train_steps:
                break
        epoch += 1
    progress.close()

    accelerator.wait_for_everyone()
    result.global_step = global_step
    result.model = unwrap_model(model)
    if accelerator.is_main_process:
        # The weights first: a failing final validation must not cost the finished run.
        result.output_files = list(objective.save_final(result.model, args.output_dir))
        result.output_files.append(str(write_training_args(args, args.output_dir)))
        logger.info("Saved the trained outputs: %s", ", ".join(result.output_files))
        if not result.validation_grids or not result.validation_grids[-1].endswith(f"{global_step:06d}.png"):
            grid = run_validation(accelerator, objective, model, args, global_step, sync=False)
            if grid:
                result.validation_grids.append(grid)
        skipped = skipped_sample_count(train_dataloader)
        if skipped:
            logger.warning("--skip_bad_samples: %d bad sample(s) skipped in this run (each named in a warning above)",
                           skipped)
        logger.info("Finished %d steps in %.0f s; last loss %s; validation grids: %s", global_step,
                    time.time() - start_time, f"{result.last_loss:.4g}" if result.last_loss is not None else "-",
                    ", ".join(result.validation_grids) or "none")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _check_finite(accelerator, rank_losses: list[float], step: int, learning_rate: float, output_dir: str) -> None:
    """Stop every rank together when any rank's loss is not finite, before it reaches the weights. The checkpoints
    whose weights gave it (those of this step and later) are set aside as ``*.poisoned``; the error names the
    newest one left."""
    if all(math.isfinite(value) for value in rank_losses):
        return
    poisoned = mark_poisoned_checkpoints(output_dir, step) if accelerator.is_main_process else []
    accelerator.wait_for_everyone()
    checkpoints = list_checkpoints(output_dir)
    advice = f"a lower --learning_rate (e.g. {learning_rate / 10:g}; this run used {learning_rate:g})"
    if checkpoints:
        kept = (f"The newest checkpoint before the divergence is {checkpoints[-1]}: resume it with "
                f"--resume_from_checkpoint latest and {advice}.")
    else:
        kept = f"No checkpoint was written before the divergence: start again with {advice}."
    if poisoned:
        kept += f" Set aside (their weights gave this loss): {', '.join(str(p) for p in poisoned)}."
    raise NonFiniteLossError(
        f"Non-finite loss ({rank_losses}) at step {step}: training stopped before applying it. {kept}"
    )


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def _optimizer(args, params, learning_rate: float):
    kwargs = dict(lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                  eps=args.adam_epsilon)
    if args.use_8bit_adam:
        import bitsandbytes  # optional: pip install 'lcm-kit[8bit]'

        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    params = list(params)
    # torch.optim.AdamW's default for CPU tensors is a Python loop over the tensors (foreach only on CUDA); the fused
    # kernel is one call per step on both (benchmarks/RESULTS.md).
    fused = bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def _replace_learning_rate(optimizer, lr_scheduler, previous: float, new: float) -> None:
    """Rescale a resumed run's learning rate: the schedule's position is kept, its base becomes ``new``."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    ratio = new / previous
    scheduler.base_lrs = [base * ratio for base in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio


def run_validation(accelerator, objective, model, args, global_step: int, sync: bool = True) -> str | None:
    """Rank 0 renders the objective's validation images into ``<output_dir>/validation/step-<step>.png`` and
    sends them to the trackers; the other ranks wait."""
    path = None
    if accelerator.is_main_process:
        images = objective.validate(unwrap_model(model), global_step)
        if images:
            grid = captioned_grid(list(images))  # captions from image.info["caption"] (the prompt or class)
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
