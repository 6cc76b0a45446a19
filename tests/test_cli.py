"""`lcm-kit generate` (in-process and as the installed console script) and examples/generate_4step.py, offline."""

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcm_kit.cli import build_parser, main
from lcm_kit.pipelines import LCMPipeline
from lcm_kit.testing import tiny_sd_components

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red cube on a table"
TINY = ["--model", "tiny-sd1", "--prompt", PROMPT, "--height", "32", "--width", "32", "--seed", "3"]


def load_example():
    spec = importlib.util.spec_from_file_location("generate_4step", REPO / "examples" / "generate_4step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


@functools.lru_cache(maxsize=None)
def reference_images(num_images=1, lora=None, steps=4):
    """What the pipeline itself gives for the CLI's defaults (CPU generator seeded with --seed)."""
    pipe = LCMPipeline(**tiny_sd_components("sd1"), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    images = pipe(
        PROMPT,
        height=32,
        width=32,
        num_inference_steps=steps,
        guidance_scale=1.0,
        num_images_per_prompt=num_images,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images
    return tuple(np.asarray(image) for image in images)


def test_parser_has_generate_subcommand():
    args = build_parser().parse_args(["generate", "--prompt", "x"])
    assert args.command == "generate" and args.num_inference_steps == 4 and args.model == "tiny-sd1"
    with pytest.raises(SystemExit):
        build_parser().parse_args([])  # a subcommand is required


def test_generate_in_process_matches_pipeline(tmp_path):
    out = tmp_path / "one.png"
    assert main(["generate", *TINY, "--output", str(out)]) == 0
    image = png(out)
    assert image.shape == (32, 32, 3)
    np.testing.assert_array_equal(image, reference_images()[0])


def test_generate_grid(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["generate", *TINY, "--num_images", "4", "--num_inference_steps", "2", "--output", str(out)]) == 0
    grid = png(out)
    assert grid.shape == (64, 64, 3)  # 2 x 2 tiles of 32 x 32
    tiles = [grid[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] for r in range(2) for c in range(2)]
    for tile, expected in zip(tiles, reference_images(num_images=4, steps=2)):
        np.testing.assert_array_equal(tile, expected)


def test_console_script_subprocess_matches_in_process(tmp_path):
    script = Path(sys.executable).parent / "lcm-kit"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lcm_kit.cli"]
    out = tmp_path / "sub.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [*command, "generate", *TINY, "--output", str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4/4" in result.stderr  # the pipeline's progress bar
    image = png(out)
    assert image.shape == (32, 32, 3)
    # Another process may sum in another thread order: allow one 8-bit level, nothing more.
    diff = np.abs(image.astype(int) - reference_images()[0].astype(int)).max()
    assert diff <= 1


def test_lora_flag_and_example_agree(tmp_path):
    """The example (random offline LoRA, 4 steps) and `lcm-kit generate --lora <that LoRA>` give the same PNG,
    which is the pipeline's own output with the LoRA loaded, and differs from the base model's."""
    example = load_example()
    lora = example.make_offline_lcm_lora(tmp_path / "lora")
    example_png = example.main(["--prompt", PROMPT, "--seed", "3", "--output", str(tmp_path / "example.png")])
    cli_png = tmp_path / "cli.png"
    assert main(["generate", *TINY, "--lora", str(lora), "--output", str(cli_png)]) == 0

    with_lora = reference_images(lora=lora)[0]
    np.testing.assert_array_equal(png(example_png), with_lora)
    np.testing.assert_array_equal(png(cli_png), with_lora)
    assert np.abs(with_lora.astype(int) - reference_images()[0].astype(int)).max() > 10


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--output", "{tmp}/missing/out.png"], 2, "does not exist"),
        (["--output", "{tmp}/out.jpg"], 2, ".png"),
        (["--output", "{tmp}/out.png", "--num_images", "0"], 2, "num_images"),
        (["--output", "{tmp}/out.png", "--model", "./no/such/model"], None, "no such file or folder"),
        (["--output", "{tmp}/out.png", "--model", "nobody/no-such-model"], None, "Cannot load model"),
        (["--output", "{tmp}/out.png", "--lora", "./no/such/lora.safetensors"], None, "no such file or folder"),
        (["--output", "{tmp}/out.png", "--negative_prompt", "ugly"], None, "negative prompt"),
        (["--output", "{tmp}/out.png", "--height", "33"], None, "height"),
    ],
)
def test_generate_errors(tmp_path, capsys, monkeypatch, extra, code, message):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # never touch the network
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    args = ["generate", "--prompt", PROMPT, *extra]
    with pytest.raises(SystemExit) as excinfo:
        main(args)
    if code is not None:  # argparse usage errors: exit status 2, message on stderr
        assert excinfo.value.code == code
        assert message in capsys.readouterr().err
    else:  # load / generation errors: the message is the exit value
        assert message in str(excinfo.value.code)
    assert not list(tmp_path.glob("*.png"))
