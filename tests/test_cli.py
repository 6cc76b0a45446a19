"""`lcm-kit generate` (in-process and as the installed console script) and examples/generate_4step.py, offline;
the strict LoRA loading of `lcm-kit generate` / `eval`; `--version`, help texts and no prefix abbreviations."""

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import lcm_kit
from lcm_kit import digits
from lcm_kit.cli import build_parser, main
from lcm_kit.lora import add_lcm_lora, save_lora_weights
from lcm_kit.pipelines import LCMPipeline
from lcm_kit.testing import tiny_sd_components, tiny_unet

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
    # no --model: the shipped digits teacher (load_pipeline(None)), not the random tiny test model
    assert args.command == "generate" and args.num_inference_steps == 4 and args.model is None
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
        (["--output", "{tmp}/out.png", "--height", "33"], 2, "--height: must be an integer in [8, 8192] that is a"),
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


# ---------------------------------------------------------------------------------------------------------------
# The first run: no --model is the shipped digits teacher; --version; help texts; no abbreviations
# ---------------------------------------------------------------------------------------------------------------


def test_generate_without_model_draws_digits_with_the_shipped_teacher(tmp_path):
    """`lcm-kit generate --prompt "a handwritten 7"` is the shipped digits teacher's output (not the random tiny
    test model's noise), and the shipped classifier reads the digit asked for."""
    from lcm_kit.eval import evaluate_images

    out = tmp_path / "seven.png"
    argv = ["generate", "--prompt", "a handwritten 7", "--num_images", "4", "--seed", "1", "--output", str(out)]
    assert main(argv) == 0
    grid = png(out)
    assert grid.shape == (64, 64, 3)  # 2 x 2 tiles of the teacher's native 32 x 32

    pipe = LCMPipeline.from_pretrained(digits.teacher_path())
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a handwritten 7", num_inference_steps=4, num_images_per_prompt=4,
                    generator=torch.Generator("cpu").manual_seed(1)).images
    tiles = [grid[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] for r in range(2) for c in range(2)]
    for tile, image in zip(tiles, expected):
        np.testing.assert_array_equal(tile, np.asarray(image))
    images = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255
    assert evaluate_images(images, [7] * 4, value_range=(0.0, 1.0))["accuracy"] >= 0.75


def test_version(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["--version"])
    assert excinfo.value.code == 0
    assert capsys.readouterr().out.strip() == f"lcm-kit {lcm_kit.__version__}"


def subcommand_parsers():
    (subparsers,) = [a for a in build_parser()._actions if a.dest == "command"]
    return subparsers.choices


@pytest.mark.parametrize("command", ["generate", "eval", "quickstart"])
def test_every_flag_has_help_and_help_shows_the_defaults(command, capsys):
    parser = subcommand_parsers()[command]
    assert parser.allow_abbrev is False
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in parser._actions:
        assert action.help, f"{command} {action.option_strings} has no help text"
        if action.default not in (None, "==SUPPRESS==") and action.option_strings != ["-h", "--help"]:
            default = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            assert f"default: {default})" in text or "(default" in action.help, (command, action.dest)


@pytest.mark.parametrize("argv, flag", [
    (["generate", "--prom", "x"], "--prom"),  # --prompt
    (["generate", "--prompt", "x", "--num_inf", "2"], "--num_inf"),  # --num_inference_steps
    (["eval", "--step", "1"], "--step"),  # --steps
    (["quickstart", "--max_train", "3"], "--max_train"),  # --max_train_steps
    (["--vers"], "--vers"),  # --version
])
def test_no_prefix_abbreviations(argv, flag, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    assert flag in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# --lora of generate and eval: strict loading, never unpickled
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    """A good LoRA file for the tiny SD1 unet (random A and B) and its tensors."""
    unet = tiny_unet("sd1")
    add_lcm_lora(unet, rank=4, alpha=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    file = save_lora_weights(unet, tmp_path_factory.mktemp("tiny_lora"))
    return file, load_file(file)


def _bad_lora(case, tmp_path, tiny_lora):
    file, tensors = tiny_lora
    if case == "a pickled .bin file":
        torch.save(tensors, tmp_path / "lora.bin")
        return tmp_path / "lora.bin", r"lora\.bin' is a pickled PyTorch file: lcm-kit reads LoRA weights from safe"
    if case == "a folder holding only a .bin":
        (tmp_path / "bin_folder").mkdir()
        torch.save(tensors, tmp_path / "bin_folder" / "pytorch_lora_weights.bin")
        return tmp_path / "bin_folder", r"holds only pickled weight files \['pytorch_lora_weights\.bin'\]"
    path = tmp_path / "bad.safetensors"
    if case == "unknown keys":
        save_file({**tensors, "unet.down_blocks.9.conv.lora_A.weight": torch.zeros(4, 8)}, path)
        return path, r"1 keys that match no module.*unet\.down_blocks\.9\.conv\.lora_A\.weight"
    if case == "zero tensors":
        save_file({}, path)
        return path, "holds no tensors"
    if case == "NaN tensors":
        save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, path)
        return path, r"not finite.*lora_A\.weight: \d+ NaN"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["a pickled .bin file", "a folder holding only a .bin", "unknown keys",
                                  "zero tensors", "NaN tensors"])
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_lora_flag_loads_strictly_and_never_unpickles(command, case, tmp_path, tiny_lora, kit, monkeypatch):
    """Stock load_lora_weights unpickles a .bin file, applies part of a file with unknown keys (a log warning),
    applies nothing from a file without tensors and loads NaN (a black PNG), all with exit code 0. The CLI stops
    with an error naming the file and the problem, writes nothing, and never calls the unpickler."""

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a user's LoRA file was unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr("pickle.load", no_unpickling)
    monkeypatch.setattr("pickle.Unpickler", no_unpickling)
    lora, problem = _bad_lora(case, tmp_path, tiny_lora)
    out = tmp_path / "out"
    out.mkdir()
    if command == "generate":
        argv = ["generate", *TINY, "--num_inference_steps", "1", "--lora", str(lora), "--output", str(out / "x.png")]
    else:
        argv = ["eval", "--model", str(kit["sd1"]), "--lora", str(lora), "--scheduler", "lcm", "--steps", "1",
                "--num_per_digit", "2", "--device", "cpu", "--json", str(out / "x.json")]
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    message = str(excinfo.value.code)
    assert message.startswith(f"lcm-kit {command}: error: --lora {str(lora)!r}: "), message
    assert str(lora) in message and re.search(problem, message, flags=re.DOTALL), message
    assert not list(out.iterdir())


def test_eval_lora_flag_applies_a_good_file(tmp_path, tiny_lora, kit):
    """The strict loader is the one that loads eval's --lora, and a good file changes what is scored."""
    file, _ = tiny_lora
    rows = {}
    for lora in (None, file):
        out = tmp_path / f"{lora is not None}.json"
        extra = [] if lora is None else ["--lora", str(lora)]
        assert main(["eval", "--model", str(kit["sd1"]), *extra, "--scheduler", "lcm", "--steps", "1",
                     "--num_per_digit", "2", "--device", "cpu", "--json", str(out)]) == 0
        rows[lora is not None] = json.loads(out.read_text())["rows"][0]
    assert rows[True]["name"] == "lcm + LoRA" and rows[False]["name"] == "lcm"
    assert rows[True]["fd"] != rows[False]["fd"]
