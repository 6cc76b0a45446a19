"""4-step text-to-image with an LCM-LoRA: ``pipe.load_lora_weights(...)``, then ``pipe(..., num_inference_steps=4)``.

Offline (default): a tiny SD-shaped model from ``lcm_kit.testing`` and a small random LCM-LoRA written with
``lcm_kit.lora.save_lora_weights`` — it runs anywhere in seconds and shows the mechanics (the image is noise).

    python examples/generate_4step.py --output cat.png

With network, the real thing (Stable Diffusion 1.5 + the published LCM-LoRA):

    python examples/generate_4step.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --lora latent-consistency/lcm-lora-sdv1-5 --prompt "a photo of a cat, studio light" --output cat.png
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from diffusers.utils import make_image_grid

from lcm_kit import LCMPipeline
from lcm_kit.lora import add_lcm_lora, load_lora_weights_strict, save_lora_weights
from lcm_kit.testing import tiny_sd_components, tiny_unet
from lcm_kit.utils import dtype_kwarg, resolve_device, resolve_dtype


def make_offline_lcm_lora(save_directory, rank: int = 4, alpha: float = 8.0, seed: int = 0) -> Path:
    """Write a small random LCM-LoRA for the tiny SD1 UNet (standard LCM-LoRA targets, ``unet.``-prefixed peft
    keys + adapter metadata, i.e. what ``load_lora_weights`` reads) and return its folder."""
    unet = add_lcm_lora(tiny_unet("sd1"), rank=rank, alpha=alpha)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero (a no-op adapter): give it some effect
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    save_lora_weights(unet, save_directory)
    return Path(save_directory)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-sd1", help="'tiny-sd1' (offline), a diffusers folder or a Hub id")
    parser.add_argument(
        "--lora", default=None, help="LoRA file/folder/Hub id; default (tiny-sd1): a random offline LoRA"
    )
    parser.add_argument("--prompt", default="a photo of a cat, studio light")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_images", type=int, default=1)
    parser.add_argument("--output", default="lcm_4step.png")
    parser.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    device = resolve_device(args.device)
    # LCMPipeline.from_pretrained(model) (fp16 on CUDA), or the offline tiny kit; either way the pipeline samples
    # with a ConsistencyScheduler built from the model's own scheduler config.
    if args.model == "tiny-sd1":
        pipe = LCMPipeline(**tiny_sd_components("sd1"), requires_safety_checker=False)
    else:
        pipe = LCMPipeline.from_pretrained(args.model, **{dtype_kwarg(): resolve_dtype("auto", device)})
    pipe.to(device)

    with tempfile.TemporaryDirectory() as tmp:
        lora = args.lora
        if lora is None:
            if args.model != "tiny-sd1":
                raise SystemExit("--lora is required with a real model, e.g. latent-consistency/lcm-lora-sdv1-5")
            lora = make_offline_lcm_lora(tmp)
        load_lora_weights_strict(pipe, lora)  # diffusers' loader, every tensor verified, safetensors only

    images = pipe(
        args.prompt,
        num_inference_steps=4,
        guidance_scale=1.0,  # LCM-LoRA: no classifier-free guidance (1.0-2.0 is the useful range)
        num_images_per_prompt=args.num_images,
        generator=torch.Generator("cpu").manual_seed(args.seed),
    ).images
    output = Path(args.output)
    grid = images[0] if len(images) == 1 else make_image_grid(images, rows=1, cols=len(images))
    grid.save(output)
    print(f"saved {output} ({images[0].width}x{images[0].height}, {len(images)} image(s))")
    return output


if __name__ == "__main__":
    main()
