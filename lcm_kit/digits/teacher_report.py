"""Measure the digits teacher's quality with the harness and write it, with how it was made, into its README."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from ..eval import evaluate_pipeline, format_table, real_floor
from ..training.hub import render_card
from . import data as digits


def evaluate_and_write_readme(
    output_dir,
    num_per_digit: int = 20,
    guidance_scales=(1.0, 2.0, 3.0, 5.0, 7.5),
    protocol_guidance: float | None = None,
    device: str = "cpu",
    seed: int = 0,
    command: str | None = None,
) -> list[dict]:
    """Measure the saved teacher (DPM-Solver 25 steps at each of ``guidance_scales``; DDIM with trailing
    spacing and the undistilled teacher under lcm-kit's ``ConsistencyScheduler`` (real CFG) at 1/2/4 steps at
    ``protocol_guidance``, by default the 25-step guidance with the lowest
    Fréchet distance among those with >= 90% prompt accuracy) and (re)write ``output_dir/README.md``."""

    output_dir = Path(output_dir)
    record = json.loads((output_dir / "training_config.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(output_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for guidance in tqdm(list(guidance_scales), desc="teacher DPM-Solver 25 steps", dynamic_ncols=True):
        rows.append(
            evaluate_pipeline(pipe, "dpmsolver", 25, guidance, num_per_digit=num_per_digit, seed=seed,
                              name="teacher DPM-Solver")
        )
    if protocol_guidance is None:
        good = [r for r in rows if r["accuracy"] >= 0.9] or rows
        protocol_guidance = min(good, key=lambda r: r["fd"])["guidance_scale"]
    few_step = [(s, n) for s in ("ddim", "consistency") for n in (1, 2, 4)]
    for scheduler, steps in tqdm(few_step, desc="teacher few-step rows", dynamic_ncols=True):
        name = {"ddim": "teacher DDIM (trailing)", "consistency": "teacher + ConsistencyScheduler, no LoRA"}
        rows.append(
            evaluate_pipeline(pipe, scheduler, steps, protocol_guidance, num_per_digit=num_per_digit, seed=seed,
                              name=name[scheduler])
        )
    floor = real_floor(num_per_digit=num_per_digit)
    record["quality"] = {
        "rows": rows,
        "protocol_guidance": protocol_guidance,
        "num_per_digit": num_per_digit,
        "real_floor": {"accuracy": floor["accuracy"], "fd": floor["fd"]},
        "command": command,
    }
    (output_dir / "training_config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    write_teacher_readme(output_dir, record)
    return rows


def write_teacher_readme(output_dir, record: dict) -> Path:
    """Write ``README.md``: what the model is, the exact command, seed, versions, wall time, quality."""

    output_dir = Path(output_dir)
    config, stats, versions = record["config"], record["stats"], record["versions"]
    params = stats["parameters"]
    lines = [
        "A small but genuine Stable-Diffusion-style text-to-image latent diffusion model trained from scratch on",
        "the train split (80%, seeded) of scikit-learn's handwritten digits, upscaled (bicubic) to "
        f"{config['resolution']}x{config['resolution']}.",
        "Standard diffusers folder: `AutoencoderKL` + `UNet2DConditionModel` + `CLIPTextModel` + `CLIPTokenizer`",
        "(a real CLIP byte-level BPE with a small vocabulary: CLIP's 512 byte symbols, the CLIP merges the caption",
        f"words use, the two special tokens; {stats['vocab_size']} tokens) + `DDIMScheduler` (SD 1.x config: epsilon",
        "prediction, scaled-linear betas 0.00085-0.012, 1,000 steps). UNet and VAE weights are stored in float16",
        "and load as float32 by default.",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline, DPMSolverMultistepScheduler",
        "from lcm_kit.digits import teacher_path",
        "pipe = StableDiffusionPipeline.from_pretrained(teacher_path())",
        "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)",
        'image = pipe("a handwritten 7", num_inference_steps=25, guidance_scale=3.0).images[0]',
        "```",
        "",
        "## How it was made",
        "",
        "```bash",
        f"HF_HUB_OFFLINE=1 {record.get('command') or 'python train_scripts/train_teacher.py'}",
        "```",
        "",
        f"- seed: {config['seed']} (data split seed {digits.DEFAULT_SPLIT_SEED}); device: {config['device']}",
        f"- versions: torch {versions['torch']}, diffusers {versions['diffusers']}, "
        f"transformers {versions['transformers']}",
        f"- wall time: {stats['total_seconds'] / 60:.1f} min in total (VAE {stats['vae_seconds'] / 60:.1f} min, "
        f"UNet + text encoder {stats['unet_seconds'] / 60:.1f} min) on 2 shared CPU cores",
        f"- parameters: UNet {params['unet']:,}, VAE {params['vae']:,}, text encoder {params['text_encoder']:,}",
        f"- VAE: {config['vae_steps']} steps, latents 4x{config['resolution'] // 4}x{config['resolution'] // 4}, "
        f"held-out reconstruction MSE {stats['vae_heldout_mse']:.4f} (images in [-1, 1]), "
        f"scaling_factor {stats['vae_scaling_factor']:.4f}",
        f"- UNet + text encoder: {config['unet_steps']} steps x batch {config['batch_size']}, lr {config['lr']}, "
        f"caption dropout {config['caption_dropout']}, min-SNR gamma {config['snr_gamma']}, "
        f"EMA {config['ema_decay']}",
        "- every hyperparameter: `training_config.json`",
    ]
    quality = record.get("quality")
    if quality:
        lines += [
            "",
            "## Measured quality",
            "",
            f"`lcm_kit.eval.evaluate_pipeline`, {quality['num_per_digit']} samples per digit (prompt "
            f"`{digits.eval_prompt(7).replace('7', '<d>')}`), fixed seeds. Accuracy: the shipped classifier's",
            "agreement with the prompted digit. FD: Fréchet distance between the classifier's penultimate",
            "features of the samples and of the held-out real digits (lower is better; real-vs-real floor in",
            "`lcm_kit/assets/digits_classifier/README.md`). Few-step rows (DDIM with `timestep_spacing=\"trailing\"`, "
            "and the un-distilled teacher under lcm-kit's `ConsistencyScheduler` with real CFG: what distillation "
            f"must improve on) use guidance {quality['protocol_guidance']}. Real train digits at the same count "
            f"score {100 * quality['real_floor']['accuracy']:.1f}% / FD {quality['real_floor']['fd']:.3f} "
            "(the floor).",
            "",
            format_table(quality["rows"]),
            "",
            f"Measured with `HF_HUB_OFFLINE=1 {quality.get('command') or 'python train_scripts/train_teacher.py --evaluate_only'}`.",
        ]
    path = output_dir / "README.md"
    path.write_text(render_card("digits teacher (lcm-kit)", ["\n".join(lines)]))
    return path
