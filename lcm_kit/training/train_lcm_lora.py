"""``accelerate launch -m lcm_kit.training.train_lcm_lora``: distill a Stable Diffusion teacher into an LCM-LoRA.

    accelerate launch -m lcm_kit.training.train_lcm_lora \
        --pretrained_teacher_model stable-diffusion-v1-5/stable-diffusion-v1-5 --dataset_name <dataset> \
        --output_dir lcm-lora-sd15 --resolution 512 --train_batch_size 8 --max_train_steps 4000 \
        --mixed_precision fp16 --cache_latents --cache_text_embeddings

Writes ``<output_dir>/pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights`` loads it completely).
``--help`` lists every flag.
"""

from __future__ import annotations

from typing import Sequence

from .lcm_objective import main_for_mode


def main(argv: Sequence[str] | None = None, hub_client=None):
    """Parse ``argv`` (default ``sys.argv[1:]``) and run; returns the loop's ``TrainingResult``."""
    return main_for_mode("lora", argv, hub_client)


if __name__ == "__main__":
    main()
