#!/usr/bin/env python
"""Train the small digits teacher shipped in ``lcm_kit/assets/digits_teacher``, then measure its quality with
``lcm_kit.eval`` and record both in the folder's README (the same as ``python -m lcm_kit.digits.teacher``).

    python train_scripts/train_teacher.py --output_dir lcm_kit/assets/digits_teacher --seed 0
    python train_scripts/train_teacher.py --output_dir lcm_kit/assets/digits_teacher --evaluate_only
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lcm_kit.digits.teacher import main  # noqa: E402

if __name__ == "__main__":
    main()
