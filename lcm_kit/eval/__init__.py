"""Quality harness for the digits domain: the shipped classifier (:mod:`.classifier`), prompt accuracy and a
classifier-feature Fréchet distance for any sampler (:mod:`.metrics`), and the evaluation protocol at matched guidance
with its sample grid (:mod:`.protocol`)."""

from .classifier import DigitClassifier
from .metrics import (
    SCHEDULERS,
    classifier_outputs,
    evaluate_images,
    evaluate_pipeline,
    feature_statistics,
    format_table,
    frechet_distance,
    generate_digits,
    load_classifier,
    make_scheduler,
    optional_standard_metrics,
    real_floor,
    reference_statistics,
)

__all__ = [
    "DigitClassifier",
    "SCHEDULERS",
    "classifier_outputs",
    "evaluate_images",
    "evaluate_pipeline",
    "feature_statistics",
    "format_table",
    "frechet_distance",
    "generate_digits",
    "load_classifier",
    "make_scheduler",
    "optional_standard_metrics",
    "real_floor",
    "reference_statistics",
]
