#!/usr/bin/env python
"""Consistency distillation (cd), consistency training (ct) and improved consistency training (ict) of a diffusers
``UNet2DModel``, unconditional or class-conditional, in pixel or VAE-latent space, on the shared Accelerate loop.

    accelerate launch train_scripts/train_consistency.py --mode ict --dataset_name <imagefolder or Hub id> \
        --resolution 32 --train_batch_size 64 --max_train_steps 100000 --learning_rate 1e-4 \
        --output_dir ict-model --dropout 0.3
    accelerate launch train_scripts/train_consistency.py --mode cd --teacher <diffusers folder: unet/ + scheduler/> ...

Class-conditional: ``--num_class_embeds 10`` with integer labels (or ``--class_names``) in ``--caption_column``.
Latent space: ``--pretrained_vae_model_name_or_path``. The output folder is a stock diffusers
``ConsistencyModelPipeline`` (sampling EMA in ``unet/``); ``--help`` lists every flag.
"""

from lcm_kit.training.consistency_models import train_consistency

if __name__ == "__main__":
    train_consistency()
