"""``accelerate launch -m lcm_kit.training.train_lcm``: distill a Stable Diffusion teacher into a full latent
consistency model (guidance embedding, EMA target).

    accelerate launch -m lcm_kit.training.train_lcm \
        --pretrained_teacher_model stable-diffusion-v1-5/stable-diffusion-v1-5 --dataset_name <dataset> \
        --output_dir lcm-sd15 --resolution 512 --train_batch_size 8 --max_train_steps 4000 \
        --mixed_precision fp16 --learning_rate 1e-6

Writes ``<output_dir>/unet`` (the EMA target, with ``time_cond_proj_dim``) and ``<output_dir>/scheduler``.
``--help`` lists every flag.
"""

from __future__ import annotations

from typing import Sequence

from .lcm_objective import main_for_mode


def main(argv: Sequence[str] | None = None, hub_client=None):
    """Parse ``argv`` (default ``sys.argv[1:]``) and run; returns the loop's ``TrainingResult``."""
    return main_for_mode("full", argv, hub_client)


if __name__ == "__main__":
    main()
