#!/usr/bin/env python
"""Distill a Stable Diffusion 1.x / 2.x teacher into a full latent consistency model (guidance embedding, EMA).

    accelerate launch train_scripts/train_lcm.py --help

The same as ``accelerate launch -m lcm_kit.training.train_lcm``; all logic lives in :mod:`lcm_kit.training`.
"""

from lcm_kit.training.train_lcm import main

if __name__ == "__main__":
    main()
