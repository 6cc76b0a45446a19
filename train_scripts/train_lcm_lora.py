#!/usr/bin/env python
"""Distill a Stable Diffusion 1.x / 2.x teacher into an LCM-LoRA.

    accelerate launch train_scripts/train_lcm_lora.py \
        --pretrained_teacher_model runwayml/stable-diffusion-v1-5 --dataset_name <dataset> \
        --output_dir lcm-lora-sd15 --resolution 512 --train_batch_size 8 --max_train_steps 4000 \
        --mixed_precision fp16 --cache_latents --cache_text_embeddings

Writes ``<output_dir>/pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights`` loads it completely).
All logic lives in :mod:`lcm_kit.training.lcm_distill`; ``--help`` lists every flag.
"""

from lcm_kit.training.lcm_distill import train_lcm_lora

if __name__ == "__main__":
    train_lcm_lora()
