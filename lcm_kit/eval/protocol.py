"""The evaluation protocol at one matched guidance: which rows a distilled digits model is compared on, scoring them,
and the sample grid (one row per sampler, one column per digit).

Rows: teacher DPM-Solver 25 steps (the reference), teacher DDIM (``timestep_spacing="trailing"``) 1/2/4, the teacher
under the consistency scheduler without distillation 1/2/4 (what distillation adds), the LCM-LoRA 1/2/4 (sampled
with ``guidance_scale=1``: the guidance is baked in) and, when given, the full-weight LCM (w-embedding) 1/2/4.
"""

from __future__ import annotations

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
from .metrics import evaluate_pipeline, load_classifier

# The digits teacher's guidance every row is compared at: CFG 3 is where the teacher is both accurate and close to
# the data (its README's table); a distilled model is scored at the guidance it was distilled for (LCM w = CFG - 1).
DEFAULT_GUIDANCE = 3.0
LCM_STEPS = (1, 2, 4)
TEACHER_REFERENCE_STEPS = 25
# grid.png layout: a label strip, then one 32x32 (generation resolution) tile per digit.
GRID_LABEL_WIDTH = 224
GRID_COLUMNS = 10


def evaluate_row(pipe, name: str, scheduler: str, steps: int, guidance_scale: float, num_per_digit: int,
                 seed: int, classifier, **extra) -> tuple[dict, list]:
    """Generate ``num_per_digit`` images of every digit with ``scheduler`` (see :func:`~lcm_kit.eval.metrics.make_scheduler`)
    and score them. Returns ``(row, tiles)``: the row (name, scheduler, steps, guidance_scale, accuracy, fd, n,
    per_digit_accuracy, seconds, ``extra``) and the first image of each digit (PIL) for the grid."""
    row, images = evaluate_pipeline(pipe, scheduler, steps, guidance_scale, num_per_digit, seed, name=name,
                                    classifier=classifier, return_images=True)
    row.update(extra)
    # digit-major order: the first sample of each digit (images in [0, 1])
    tiles = numpy_to_pil(images[::num_per_digit].permute(0, 2, 3, 1).numpy())
    return row, tiles


def protocol_rows(guidance: float, lcm_steps: Sequence[int] = LCM_STEPS, full: bool = False) -> list[dict]:
    """The rows of the evaluation protocol at matched ``guidance``: ``{"name", "model", "scheduler", "steps",
    "guidance_scale"}`` with ``model`` one of ``"teacher"``, ``"lora"``, ``"full"``."""
    g = f"{guidance:g}"
    rows = [dict(name="teacher DPM-Solver", model="teacher", scheduler="dpmsolver",
                 steps=TEACHER_REFERENCE_STEPS, guidance_scale=guidance)]
    rows += [dict(name="teacher DDIM (trailing)", model="teacher", scheduler="ddim", steps=s, guidance_scale=guidance)
             for s in lcm_steps]
    rows += [dict(name="teacher + consistency scheduler, no LoRA", model="teacher", scheduler="consistency", steps=s,
                  guidance_scale=guidance) for s in lcm_steps]
    # The LoRA has the guidance baked in: sampled without CFG (guidance_scale 1).
    rows += [dict(name=f"LCM-LoRA (distilled for CFG {g})", model="lora", scheduler="consistency", steps=s,
                  guidance_scale=1.0) for s in lcm_steps]
    if full:
        # The full LCM takes w = guidance_scale - 1 through its w-embedding (one forward per step, no CFG).
        rows += [dict(name=f"full LCM (w-embedding, CFG {g})", model="full", scheduler="consistency", steps=s,
                      guidance_scale=guidance) for s in lcm_steps]
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
    lora_dir: str | os.PathLike | None,
    guidance: float = DEFAULT_GUIDANCE,
    num_per_digit: int = 20,
    seed: int = 0,
    full_dir: str | os.PathLike | None = None,
    device: str = "auto",
    lcm_steps: Sequence[int] = LCM_STEPS,
):
    """Score every protocol row (:func:`protocol_rows`); the LoRA rows need ``lora_dir``, the full-LCM rows
    ``full_dir`` (a ``train_lcm.py`` output folder with ``unet/``). The LoRA is loaded with
    ``lcm_kit.lora.load_lora_weights_strict`` (diffusers' loader, every tensor verified) into a stock
    ``StableDiffusionPipeline`` of the teacher. Returns ``(rows, grid)``."""
    device = resolve_device(device)
    dtype = resolve_dtype("auto", device)
    pipe = StableDiffusionPipeline.from_pretrained(str(teacher), **{dtype_kwarg(): dtype}).to(device)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(device=device)
    plan = [r for r in protocol_rows(guidance, lcm_steps, full=full_dir is not None)
            if r["model"] == "teacher" or (r["model"] == "lora" and lora_dir is not None) or r["model"] == "full"]
    rows, tile_rows = [], []
    lora_loaded = False
    full_pipe = None
    for spec in tqdm(plan, desc="evaluating samplers", dynamic_ncols=True):
        target = pipe
        if spec["model"] == "lora" and not lora_loaded:
            load_lora_weights_strict(pipe, lora_dir, low_cpu_mem_usage=True)  # the figures' loader settings
            lora_loaded = True
        if spec["model"] == "full":
            if full_pipe is None:
                unet = UNet2DConditionModel.from_pretrained(str(Path(full_dir) / "unet"), **{dtype_kwarg(): dtype})
                full_pipe = StableDiffusionPipeline.from_pretrained(
                    str(teacher), unet=unet, **{dtype_kwarg(): dtype}
                ).to(device)
                full_pipe.set_progress_bar_config(disable=True)
            target = full_pipe
        extra = {"model": spec["model"]}
        if spec["model"] != "teacher":
            extra["distilled_for_guidance"] = float(guidance)
        row, tiles = evaluate_row(target, spec["name"], spec["scheduler"], spec["steps"], spec["guidance_scale"],
                                  num_per_digit, seed, classifier, **extra)
        rows.append(row)
        tile_rows.append(tiles)
    reference = rows[0]["fd"]
    for row in rows:
        row["fd_ratio"] = row["fd"] / reference if reference > 0 else math.nan
    grid = make_grid(tile_rows, [row_label(r) for r in rows])
    return rows, grid
