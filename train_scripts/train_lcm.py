#!/usr/bin/env python
"""Distill a Stable Diffusion 1.x / 2.x teacher into a full latent consistency model (guidance embedding, EMA).

    accelerate launch train_scripts/train_lcm.py \
        --pretrained_teacher_model runwayml/stable-diffusion-v1-5 --dataset_name <dataset> \
        --output_dir lcm-sd15 --resolution 512 --train_batch_size 8 --max_train_steps 4000 \
        --mixed_precision fp16 --learning_rate 1e-6

Writes ``<output_dir>/unet`` (the EMA target, with ``time_cond_proj_dim``) and ``<output_dir>/scheduler``; load with
``LCMPipeline`` or diffusers' ``LatentConsistencyModelPipeline``. ``--help`` lists every flag.
"""

from lcm_kit.training.lcm_distill import train_lcm

if __name__ == "__main__":
    train_lcm()
