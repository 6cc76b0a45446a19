#!/usr/bin/env python
"""Distill a Stable Diffusion 1.x / 2.x teacher into an LCM-LoRA.

    accelerate launch train_scripts/train_lcm_lora.py --help

The same as ``accelerate launch -m lcm_kit.training.train_lcm_lora``; all logic lives in :mod:`lcm_kit.training`.
"""

from lcm_kit.training.train_lcm_lora import main

if __name__ == "__main__":
    main()
