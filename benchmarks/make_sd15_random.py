"""Random-weight model folders and small datasets for ``benchmarks/gpu_check.py`` (nothing downloaded).

    python benchmarks/make_sd15_random.py --out WORK           # SD1.5 shapes: UNet 860M, VAE, CLIP ViT-L text encoder
    python benchmarks/make_sd15_random.py --out WORK --tiny    # lcm_kit.testing's tiny SD1 kit instead (CPU tests)

Writes into WORK:

* ``sd15/``: a Stable Diffusion folder (``StableDiffusionPipeline.from_pretrained`` loads it) with the SD1.5
  configuration (``bench_train_step.sd15_shaped_components``) and random weights, float32, and SD's own scheduler
  config;
* ``images/``: an imagefolder of 8 smooth random colour fields at ``--resolution`` (512; tiny: 32) with captions;
* ``cm_teacher/``: a class-conditional pixel ``UNet2DModel`` (32x32, 10 classes) with a DDPM scheduler: the CD
  teacher and the initial weights of every consistency run (``--pretrained_unet``);
* ``cm_images/``: 16 images at 32x32 whose captions are class labels 0-9;
* ``manifest.json``: what was built and how long it took.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent


def image_folder(folder: Path, n: int, size: int, captions, seed: int) -> Path:
    """``n`` smooth random colour fields (a 4x4 field upsampled) as PNGs with a metadata.jsonl of captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(n):
            field = (rng.random((4, 4, 3)) * 255).astype("uint8")
            Image.fromarray(field).resize((size, size), Image.BICUBIC).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": captions(i)}) + "\n")
    return folder


def stable_diffusion_folder(path: Path, tiny: bool) -> dict:
    from diffusers import StableDiffusionPipeline

    from lcm_kit.testing import tiny_scheduler, tiny_sd_components

    if tiny:
        components = tiny_sd_components("sd1")
    else:
        sys.path.insert(0, str(HERE))
        from bench_train_step import sd15_shaped_components

        components = sd15_shaped_components(seed=0)
        components.update(safety_checker=None, feature_extractor=None, image_encoder=None)
    components["scheduler"] = tiny_scheduler("sd1")  # SD 1.x's scheduler config (scaled_linear, steps_offset 1)
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return {"unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
            "vae_parameters": sum(p.numel() for p in pipe.vae.parameters()),
            "text_encoder_parameters": sum(p.numel() for p in pipe.text_encoder.parameters())}


def consistency_teacher_folder(path: Path, tiny: bool) -> dict:
    """A class-conditional 32x32 pixel UNet2DModel (+ DDPM scheduler) in the layout ``--teacher`` reads."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(1)
    if tiny:
        blocks, layers = (16, 32), 1
        down, up = ("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D")
    else:  # CIFAR-sized (attention at 16x16, as DDPM's CIFAR-10 model)
        blocks, layers = (128, 256, 256, 256), 2
        down = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
        up = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=blocks,
                       layers_per_block=layers, down_block_types=down, up_block_types=up,
                       norm_num_groups=min(32, blocks[0]), num_class_embeds=10)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(path, safe_serialization=True)
    return {"cm_unet_parameters": sum(p.numel() for p in unet.parameters())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Folder to write into (created).")
    parser.add_argument("--tiny", action="store_true", help="The tiny SD1 kit and 32x32 images (CPU tests).")
    parser.add_argument("--resolution", type=int, default=None, help="Image size of images/ (default 512; tiny 32).")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    resolution = args.resolution or (32 if args.tiny else 512)
    start = time.perf_counter()
    info = {"tiny": args.tiny, "resolution": resolution}
    info.update(stable_diffusion_folder(out / "sd15", args.tiny))
    info.update(consistency_teacher_folder(out / "cm_teacher", args.tiny))
    image_folder(out / "images", 8, resolution, lambda i: f"a photograph of colour field number {i}", seed=0)
    image_folder(out / "cm_images", 16, 32, lambda i: str(i % 10), seed=1)
    info["seconds"] = round(time.perf_counter() - start, 1)
    (out / "manifest.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()
