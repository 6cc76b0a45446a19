"""benchmarks/image_statistics.py: its statistics tell blur from leftover noise, and the script runs end to end on an
adapter folder of the shipped digits teacher."""

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from lcm_kit import digits
from lcm_kit.lora import add_lcm_lora, save_lora_weights

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("image_statistics", REPO / "benchmarks" / "image_statistics.py")
image_statistics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(image_statistics)


def test_blur_lowers_and_noise_raises_the_laplacian_energy():
    generator = torch.Generator().manual_seed(0)
    images = 0.25 + 0.5 * (digits.load_split("heldout", 32)[0][:8].float() + 1) / 2  # in [0.25, 0.75]
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    noisy = (images + 0.3 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    energy = {name: image_statistics.image_statistics(x)["laplacian_energy"]
              for name, x in (("sharp", images), ("blurred", blurred), ("noisy", noisy))}
    assert energy["blurred"] < energy["sharp"] < energy["noisy"]
    same = image_statistics.image_statistics(images[:1].repeat(4, 1, 1, 1))
    assert same["spread"] == 0 and math.isclose(same["mean"], images[0].mean().item(), rel_tol=1e-6)
    flat = image_statistics.image_statistics(torch.full((2, 3, 8, 8), 0.4))
    assert flat["laplacian_energy"] < 1e-12


def test_the_script_prints_the_teacher_and_each_adapter(tmp_path, capsys):
    unet = UNet2DConditionModel.from_pretrained(str(digits.teacher_path()), subfolder="unet")
    add_lcm_lora(unet, rank=4, alpha=4)
    save_lora_weights(unet, tmp_path / "adapter")
    image_statistics.main([str(tmp_path / "adapter"), "--steps", "1", "2", "--per_digit", "1", "--teacher_as_lcm"])
    lines = capsys.readouterr().out.splitlines()
    number = r"([0-9.]+)"
    rows = [re.match(rf"^\| (.+) \| (\d+) \| {number} \| {number} \| {number} \|$", line) for line in lines[2:]]
    assert all(rows) and len(rows) == 5, lines
    assert [(m.group(1), m.group(2)) for m in rows] == [
        ("teacher, DPM-Solver CFG 3", "25"), ("teacher, LCMScheduler CFG 3", "1"), ("teacher, LCMScheduler CFG 3", "2"),
        (str(tmp_path / "adapter"), "1"), (str(tmp_path / "adapter"), "2")]
    assert all(math.isfinite(float(m.group(i))) for m in rows for i in (3, 4, 5))


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/absent"], "adapter folders not found"),
    (["{tmp}", "--steps", "0"], "--steps must be >= 1"),
    (["{tmp}", "--per_digit", "0"], "--per_digit >= 1"),
])
def test_bad_arguments_are_named(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        image_statistics.main([a.format(tmp=tmp_path) for a in argv])
    assert message in capsys.readouterr().err
