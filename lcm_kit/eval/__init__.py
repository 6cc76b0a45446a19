"""Quality harness for the digits domain: a shipped classifier, prompt accuracy and a classifier-feature
Fréchet distance for any sampler (see :mod:`lcm_kit.eval.metrics`), and the ``lcm-kit eval`` command
(:mod:`lcm_kit.eval.cli`)."""

from lcm_kit.eval.classifier import DigitClassifier
from lcm_kit.eval.metrics import (
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
