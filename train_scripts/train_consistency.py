#!/usr/bin/env python
"""Consistency distillation (cd), consistency training (ct) and improved CT (ict) of a diffusers UNet2DModel.

    accelerate launch train_scripts/train_consistency.py --help

The same as ``accelerate launch -m lcm_kit.training.train_consistency``; all logic lives in :mod:`lcm_kit.training`.
"""

from lcm_kit.training.train_consistency import main

if __name__ == "__main__":
    main()
