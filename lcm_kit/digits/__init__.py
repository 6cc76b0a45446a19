"""The shipped digits domain: real handwritten digits (:mod:`.data`), and the builders of the shipped assets, the
text-to-image teacher (:mod:`.teacher`) and the evaluation classifier (:mod:`.classifier`).

``from lcm_kit import digits`` gives the data API (``digits.load_split``, ``digits.teacher_path()``, ...); the
builders are imported on their own (``python -m lcm_kit.digits.classifier``, ``train_scripts/train_teacher.py``).
"""

from .data import (
    CAPTION_TEMPLATES,
    DEFAULT_RESOLUTION,
    DEFAULT_SPLIT_SEED,
    DIGIT_WORDS,
    EVAL_PROMPT_TEMPLATE,
    HELDOUT_FRACTION,
    SPLITS,
    DigitsDataset,
    caption_for,
    caption_vocabulary,
    classifier_path,
    eval_prompt,
    load_split,
    split_indices,
    teacher_path,
    to_hf_dataset,
    upscale,
)

__all__ = [
    "CAPTION_TEMPLATES",
    "DEFAULT_RESOLUTION",
    "DEFAULT_SPLIT_SEED",
    "DIGIT_WORDS",
    "EVAL_PROMPT_TEMPLATE",
    "HELDOUT_FRACTION",
    "SPLITS",
    "DigitsDataset",
    "caption_for",
    "caption_vocabulary",
    "classifier_path",
    "eval_prompt",
    "load_split",
    "split_indices",
    "teacher_path",
    "to_hf_dataset",
    "upscale",
]
