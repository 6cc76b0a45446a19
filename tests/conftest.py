"""Fixtures the test modules share (tests never import each other): threads, Accelerate state, the tiny kit saved as
folders with a small image dataset, the trainers' base flags, the LCM objective on the tiny kit, a Hub stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

#: Token-shaped: must never show up in any file, log, card or tracker.
HUB_TOKEN = "hf_" + "SeCrEt" * 6


@pytest.fixture(scope="session", autouse=True)
def datasets_cache(tmp_path_factory):
    """datasets' caches (converted shards, imagefolders) in a temporary folder, never in ~/.cache; trainer
    subprocesses inherit it through the environment."""
    import datasets

    root = tmp_path_factory.mktemp("hf-datasets-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", str(root))
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", root)
        patch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", root / "downloads")
        patch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", root / "downloads" / "extracted")
        yield root


@pytest.fixture(autouse=True)
def one_thread():
    """2 shared cores: one intra-op thread is several times faster than two fighting other processes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _reset_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def reset_accelerate():
    """Call it before an in-process training run: Accelerate keeps process-wide singletons."""
    _reset_accelerate_state()
    yield _reset_accelerate_state
    _reset_accelerate_state()


@pytest.fixture
def hub_token():
    return HUB_TOKEN


def make_image_dataset(folder: Path, n: int = 8, size: int = 40, seed: int = 0) -> Path:
    """An imagefolder (PNG + metadata.jsonl) of smooth random colour fields with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(n):
            base = rng.random((4, 4, 3))
            image = Image.fromarray((base * 255).astype("uint8")).resize((size, size), Image.BILINEAR)
            image.save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a colour field number {i}"}) + "\n")
    return folder


@pytest.fixture(scope="session")
def kit(tmp_path_factory):
    """The tiny SD1 / SD2 / SDXL kits saved as diffusers folders, and an 8-image imagefolder dataset."""
    from lcm_kit.testing import save_tiny_pipeline

    root = tmp_path_factory.mktemp("kit")
    return {
        "sd1": save_tiny_pipeline("sd1", root / "sd1"),
        "sd2": save_tiny_pipeline("sd2", root / "sd2"),
        "sdxl": save_tiny_pipeline("sdxl", root / "sdxl"),
        "data": make_image_dataset(root / "data"),
    }


@pytest.fixture
def image_dataset():
    """``make_image_dataset(folder, n=8, size=40, seed=0)``."""
    return make_image_dataset


@pytest.fixture
def train_argv(kit):
    """``train_argv(output_dir, kind="sd1", steps=4)``: the LCM trainers' flags for a short run on the kit (no
    validation; the last flag is the empty ``--validation_prompts``)."""

    def build(output_dir, kind="sd1", steps=4):
        return [
            "--pretrained_teacher_model", str(kit[kind]), "--dataset_name", str(kit["data"]),
            "--output_dir", str(output_dir), "--resolution", "32", "--train_batch_size", "2",
            "--max_train_steps", str(steps), "--seed", "3", "--report_to", "none",
            "--checkpointing_steps", "1000", "--validation_steps", "1000", "--validation_prompts",
        ]

    return build


@pytest.fixture
def lcm_objective():
    """``lcm_objective(mode="lora", kind="sd1", mixed_precision="no", **flag_overrides) -> (objective, components)``:
    an :class:`~lcm_kit.training.lcm_objective.LCMObjective` on the tiny kit, in process."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from lcm_kit.testing import tiny_sd_components
    from lcm_kit.training.args import build_lcm_lora_parser, build_lcm_parser
    from lcm_kit.training.lcm_objective import LCMObjective

    def build(mode="lora", kind="sd1", mixed_precision="no", **overrides):
        common = ["--pretrained_teacher_model", "tiny", "--dataset_name", "unused", "--output_dir", "unused",
                  "--resolution", "32", "--report_to", "none"]
        if mode == "lora":
            args = build_lcm_lora_parser().parse_args(common + ["--lora_rank", "4"])
        else:
            args = build_lcm_parser().parse_args(common + ["--unet_time_cond_proj_dim", "32"])
        for key, value in overrides.items():
            setattr(args, key, value)
        _reset_accelerate_state()  # each objective its own precision
        accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
        torch.manual_seed(0)
        components = tiny_sd_components(kind)
        components["scheduler"] = DDPMScheduler.from_config(components["scheduler"].config)
        return LCMObjective(args, accelerator, mode=mode, components=components), components

    yield build
    _reset_accelerate_state()


@pytest.fixture
def lcm_batch():
    """``lcm_batch(n=2, seed=0)``: pixels in [-1, 1] at 32x32 and captions."""

    def build(n=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1,
                "captions": ["a red cube", "a cat"][:n]}

    return build


@pytest.fixture
def randomize_lora():
    """``randomize_lora(unet, seed=0)``: every LoRA tensor set to N(0, 0.05^2) (peft starts B at zero)."""

    def apply(unet, seed=0):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)

    return apply


class RecordingHubClient:
    """Stands in for huggingface_hub.HfApi (the only faked component): records what would be uploaded."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": f"someone/{repo_id}"})()

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        self.calls.append(("upload_folder", kwargs, {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}))


@pytest.fixture
def hub_client():
    return RecordingHubClient()
