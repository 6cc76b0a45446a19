"""The evaluation protocol at one matched guidance: which rows a distilled digits model is compared on, scoring them,
and the sample grid (one row per sampler, one column per digit).

Rows: teacher DPM-Solver 25 steps (the reference), teacher DDIM (``timestep_spacing="trailing"``) 1/2/4, the teacher
under the consistency scheduler without distillation 1/2/4 (what distillation adds), the TCD-LoRA 1/2/4 (diffusers'
``TCDScheduler`` on its distillation grid, ``eta=0.3``), the LCM-LoRA 1/2/4 (lcm-kit's ``ConsistencyScheduler``) and,
when given, the full-weight LCM (w-embedding) 1/2/4. Both LoRAs are sampled with ``guidance_scale=1`` (the guidance is
baked in), each in a pipeline of its own, so no row sees another model's adapter. Every row records how it was sampled
(``scheduler``, ``eta``, ``original_inference_steps``).
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Sequence

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import numpy_to_pil
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ..lora import load_lora_weights_strict
from ..utils import dtype_kwarg, resolve_device, resolve_dtype
from .metrics import evaluate_pipeline, load_classifier, make_scheduler

# The digits teacher's guidance every row is compared at: CFG 3 is where the teacher is both accurate and close to
# the data (its README's table); a distilled model is scored at the guidance it was distilled for (LCM w = CFG - 1).
DEFAULT_GUIDANCE = 3.0
LCM_STEPS = (1, 2, 4)
TEACHER_REFERENCE_STEPS = 25
# TCD's stochasticity gamma as its users sample (TCDScheduler.step's default); StableDiffusionPipeline passes eta=0
# unless told, so the rows pass it explicitly.
TCD_ETA = 0.3
# The distilled LoRAs a protocol can hold, in row order: model key -> (row name prefix, scheduler).
LORA_MODELS = {"tcd-lora": ("TCD-LoRA", "tcd"), "lcm-lora": ("LCM-LoRA", "consistency")}
# grid.png layout: a label strip, then one 32x32 (generation resolution) tile per digit.
GRID_LABEL_WIDTH = 224
GRID_COLUMNS = 10


def evaluate_row(pipe, name: str, scheduler: str, steps: int, guidance_scale: float, num_per_digit: int,
                 seed: int, classifier, scheduler_config: dict | None = None, eta: float | None = None,
                 **extra) -> tuple[dict, list]:
    """Generate ``num_per_digit`` images of every digit with ``scheduler`` (see
    :func:`~lcm_kit.eval.metrics.make_scheduler`; ``scheduler_config``: its config overrides, ``eta``: the pipeline
    call's, passed only when given) and score them.
    Returns ``(row, tiles)``: the row (name, scheduler, steps, guidance_scale, accuracy, fd, n, per_digit_accuracy,
    seconds, the sampler settings of :func:`sampler_settings`, ``extra``) and the first image of each digit (PIL) for
    the grid."""
    scheduler_config = dict(scheduler_config or {})
    call = {} if eta is None else {"eta": float(eta)}
    row, images = evaluate_pipeline(pipe, scheduler, steps, guidance_scale, num_per_digit, seed, name=name,
                                    classifier=classifier, return_images=True, scheduler_config=scheduler_config,
                                    **call)
    row.update(sampler_settings(pipe, scheduler, scheduler_config, eta))
    row.update(extra)
    # digit-major order: the first sample of each digit (images in [0, 1])
    tiles = numpy_to_pil(images[::num_per_digit].permute(0, 2, 3, 1).numpy())
    return row, tiles


def sampler_settings(pipe, scheduler: str, scheduler_config: dict | None = None, eta: float | None = None) -> dict:
    """How a row of ``pipe`` with ``scheduler`` samples: ``{"eta", "original_inference_steps"}`` as the sampler uses
    them (``eta``: the one given, else the pipeline's default 0.0 where the scheduler's ``step`` takes one, else
    None; ``original_inference_steps``: the scheduler's config value, None where it has no skip grid)."""
    built = make_scheduler(scheduler, pipe.scheduler.config, **(scheduler_config or {})) or pipe.scheduler
    takes_eta = "eta" in inspect.signature(built.step).parameters
    grid = built.config.get("original_inference_steps")
    return {"eta": float(eta) if eta is not None else (0.0 if takes_eta else None),
            "original_inference_steps": None if grid is None else int(grid)}


def protocol_rows(guidance: float, lcm_steps: Sequence[int] = LCM_STEPS, full: bool = False,
                  loras: Sequence[str] = tuple(LORA_MODELS), tcd_original_inference_steps: int | None = None
                  ) -> list[dict]:
    """The rows of the evaluation protocol at matched ``guidance``: ``{"name", "model", "scheduler", "steps",
    "guidance_scale", "scheduler_config", "eta"}`` with ``model`` one of ``"teacher"``, ``"tcd-lora"``,
    ``"lcm-lora"``, ``"full"``. ``loras``: the distilled LoRAs to hold rows for (keys of :data:`LORA_MODELS`, rows in
    that order); the TCD-LoRA rows need ``tcd_original_inference_steps``, the ``--num_ddim_timesteps`` it was
    distilled with (``TCDScheduler`` picks its timesteps from that grid)."""
    unknown = [m for m in loras if m not in LORA_MODELS]
    if unknown:
        raise ValueError(f"loras must be among {tuple(LORA_MODELS)}, got {list(loras)!r}.")
    if "tcd-lora" in loras and (tcd_original_inference_steps is None or int(tcd_original_inference_steps) < 1):
        raise ValueError(f"the TCD-LoRA rows need tcd_original_inference_steps >= 1 (the --num_ddim_timesteps it was "
                         f"distilled with), got {tcd_original_inference_steps!r}.")
    g = f"{guidance:g}"
    teacher = dict(model="teacher", guidance_scale=guidance, scheduler_config={}, eta=None)
    rows = [dict(name="teacher DPM-Solver", scheduler="dpmsolver", steps=TEACHER_REFERENCE_STEPS, **teacher)]
    rows += [dict(name="teacher DDIM (trailing)", scheduler="ddim", steps=s, **teacher) for s in lcm_steps]
    rows += [dict(name="teacher + consistency scheduler, no LoRA", scheduler="consistency", steps=s, **teacher)
             for s in lcm_steps]
    samplers = {"tcd-lora": ({"original_inference_steps": int(tcd_original_inference_steps or 0)}, TCD_ETA),
                "lcm-lora": ({}, None)}  # LCM: the teacher's scheduler config, as LCM-LoRA users sample
    for model in (m for m in LORA_MODELS if m in loras):
        label, scheduler = LORA_MODELS[model]
        config, eta = samplers[model]
        # A LoRA has the guidance baked in: sampled without CFG (guidance_scale 1).
        rows += [dict(name=f"{label} (distilled for CFG {g})", model=model, scheduler=scheduler, steps=s,
                      guidance_scale=1.0, scheduler_config=dict(config), eta=eta) for s in lcm_steps]
    if full:
        # The full LCM takes w = guidance_scale - 1 through its w-embedding (one forward per step, no CFG).
        rows += [dict(name=f"full LCM (w-embedding, CFG {g})", model="full", scheduler="consistency", steps=s,
                      guidance_scale=guidance, scheduler_config={}, eta=None) for s in lcm_steps]
    return rows


def make_grid(tile_rows: Sequence[Sequence], labels: Sequence[str], tile_size: int = 32):
    """One PIL image: row r shows ``tile_rows[r]`` (digits 0-9) after a :data:`GRID_LABEL_WIDTH`-pixel strip with
    ``labels[r]``; size ``(GRID_LABEL_WIDTH + 10 * tile_size, rows * tile_size)``."""
    if len(tile_rows) != len(labels):
        raise ValueError(f"tile_rows ({len(tile_rows)}) and labels ({len(labels)}) must have the same length.")
    grid = Image.new("RGB", (GRID_LABEL_WIDTH + GRID_COLUMNS * tile_size, len(tile_rows) * tile_size), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, (tiles, label) in enumerate(zip(tile_rows, labels)):
        if len(tiles) != GRID_COLUMNS:
            raise ValueError(f"row {r} ({label!r}) must have {GRID_COLUMNS} tiles (digits 0-9), got {len(tiles)}.")
        draw.text((4, r * tile_size + tile_size // 2), label, fill="black", font=font, anchor="lm")
        for c, tile in enumerate(tiles):
            tile = tile.convert("RGB")
            if tile.size != (tile_size, tile_size):
                tile = tile.resize((tile_size, tile_size))
            grid.paste(tile, (GRID_LABEL_WIDTH + c * tile_size, r * tile_size))
    return grid


def row_label(row: dict) -> str:
    short = {"teacher DPM-Solver": "teacher DPM-Solver", "teacher DDIM (trailing)": "teacher DDIM",
             "teacher + consistency scheduler, no LoRA": "teacher + CM sched."}
    name = short.get(row["name"], row["name"].split(" (")[0])
    return f"{name} {row['steps']} step{'s' if row['steps'] > 1 else ''}"


def evaluate_protocol(
    teacher: str | os.PathLike,
    lcm_lora_dir: str | os.PathLike | None = None,
    guidance: float = DEFAULT_GUIDANCE,
    num_per_digit: int = 20,
    seed: int = 0,
    full_dir: str | os.PathLike | None = None,
    device: str = "auto",
    lcm_steps: Sequence[int] = LCM_STEPS,
    tcd_lora_dir: str | os.PathLike | None = None,
    tcd_original_inference_steps: int | None = None,
):
    """Score every protocol row (:func:`protocol_rows`): the TCD-LoRA rows need ``tcd_lora_dir`` (and
    ``tcd_original_inference_steps``, its distillation grid), the LCM-LoRA rows ``lcm_lora_dir``, the full-LCM rows
    ``full_dir`` (a ``train_lcm.py`` output folder with ``unet/``); rows of a model not given are left out. Each LoRA
    is loaded with ``lcm_kit.lora.load_lora_weights_strict`` (diffusers' loader, every tensor verified) into a stock
    ``StableDiffusionPipeline`` of the teacher of its own; the teacher rows use one without any adapter. Returns
    ``(rows, grid)``."""
    device = resolve_device(device)
    dtype = resolve_dtype("auto", device)
    lora_dirs = {"tcd-lora": tcd_lora_dir, "lcm-lora": lcm_lora_dir}
    loras = [m for m, folder in lora_dirs.items() if folder is not None]
    plan = protocol_rows(guidance, lcm_steps, full=full_dir is not None, loras=loras,
                         tcd_original_inference_steps=tcd_original_inference_steps)

    def pipeline(unet=None):
        kwargs = {dtype_kwarg(): dtype} if unet is None else {"unet": unet, dtype_kwarg(): dtype}
        pipe = StableDiffusionPipeline.from_pretrained(str(teacher), **kwargs).to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    classifier = load_classifier(device=device)
    pipes = {"teacher": pipeline()}
    rows, tile_rows = [], []
    for spec in tqdm(plan, desc="evaluating samplers", dynamic_ncols=True):
        model = spec["model"]
        if model not in pipes:
            # rows come grouped by model: the previous model's pipeline (and its adapter) is done with
            pipes = {"teacher": pipes["teacher"]}
            if model == "full":
                unet = UNet2DConditionModel.from_pretrained(str(Path(full_dir) / "unet"), **{dtype_kwarg(): dtype})
                pipes[model] = pipeline(unet)
            else:
                pipes[model] = pipeline()
                load_lora_weights_strict(pipes[model], lora_dirs[model], low_cpu_mem_usage=True)  # the figures' loader
        extra = {"model": model}
        if model != "teacher":
            extra["distilled_for_guidance"] = float(guidance)
        row, tiles = evaluate_row(pipes[model], spec["name"], spec["scheduler"], spec["steps"], spec["guidance_scale"],
                                  num_per_digit, seed, classifier, scheduler_config=spec["scheduler_config"],
                                  eta=spec["eta"], **extra)
        rows.append(row)
        tile_rows.append(tiles)
    reference = rows[0]["fd"]
    for row in rows:
        row["fd_ratio"] = row["fd"] / reference if reference > 0 else math.nan
    grid = make_grid(tile_rows, [row_label(r) for r in rows])
    return rows, grid
