"""Run diffusers' own LCM / TCD / consistency-model test suites with lcm-kit's classes (or diffusers', for reference).

    python benchmarks/diffusers_suites/run.py DIFFUSERS_TESTS_DIR [--classes lcm-kit|diffusers] [PYTEST_ARGS...]

``DIFFUSERS_TESTS_DIR`` is the ``tests/`` folder of a diffusers checkout matching the installed version (the suites
are never copied into this project), e.g. from a clone: ``git -C diffusers archive v0.42.1 tests | tar -x -C /tmp``.
Extra arguments go to pytest (``-k``, ``-x``, ``-rA`` ...). Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SUITES = [
    "schedulers/test_scheduler_lcm.py",
    "schedulers/test_scheduler_tcd.py",
    "schedulers/test_scheduler_consistency_model.py",
    "pipelines/latent_consistency_models/test_latent_consistency_models.py",
    "pipelines/latent_consistency_models/test_latent_consistency_models_img2img.py",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tests_dir", type=Path, help="the tests/ folder of a diffusers checkout")
    parser.add_argument("--classes", choices=["lcm-kit", "diffusers"], default="lcm-kit",
                        help="whose classes the suites test (default: lcm-kit's)")
    parser.add_argument("--suite", action="append", choices=SUITES, help="run only this suite (repeatable)")
    args, pytest_args = parser.parse_known_args(argv)

    tests_dir = args.tests_dir.resolve()
    missing = [s for s in SUITES if not (tests_dir / s).is_file()]
    if not (tests_dir / "__init__.py").is_file() or missing:
        parser.error(f"{tests_dir} is not a diffusers tests/ folder (missing: {missing or ['__init__.py']}).")

    import pytest

    os.environ["LCM_KIT_SUITE_CLASSES"] = args.classes
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    paths = [str(tests_dir / s) for s in (args.suite or SUITES)]
    # The suites' own rootdir and conftest; no cache folder in the diffusers checkout.
    return int(pytest.main(["--rootdir", str(tests_dir.parent), "-p", "plugin", "-p", "no:cacheprovider",
                            *paths, *pytest_args]))


if __name__ == "__main__":
    sys.exit(main())
