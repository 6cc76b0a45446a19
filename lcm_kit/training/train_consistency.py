"""``accelerate launch -m lcm_kit.training.train_consistency``: consistency distillation (cd), consistency training
(ct) and improved consistency training (ict) of a diffusers ``UNet2DModel``, unconditional or class-conditional, in
pixel or VAE-latent space.

    accelerate launch -m lcm_kit.training.train_consistency --mode ict --dataset_name <imagefolder or Hub id> \
        --resolution 32 --train_batch_size 64 --max_train_steps 100000 --learning_rate 1e-4 \
        --output_dir ict-model --dropout 0.3
    accelerate launch -m lcm_kit.training.train_consistency --mode cd --teacher <folder: unet/ + scheduler/> ...

Class-conditional: ``--num_class_embeds 10`` with integer labels (or ``--class_names``) in ``--caption_column``.
Latent space: ``--pretrained_vae_model_name_or_path``. The output folder is a stock diffusers
``ConsistencyModelPipeline`` (sampling EMA in ``unet/``); ``--help`` lists every flag.
"""

from __future__ import annotations

import sys
from typing import Sequence

from .args import build_consistency_parser
from .cm_objective import train_consistency_model


def main(argv: Sequence[str] | None = None, hub_client=None):
    """Parse ``argv`` (default ``sys.argv[1:]``) and run; returns the loop's ``TrainingResult``."""
    args = build_consistency_parser().parse_args(argv)
    command = ["train_consistency.py", *(sys.argv[1:] if argv is None else argv)]
    return train_consistency_model(args, hub_client=hub_client, command=command)


if __name__ == "__main__":
    main()
