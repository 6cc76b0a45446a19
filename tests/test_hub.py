"""lcm_kit.training.hub: model card, secrets never saved or shown, upload through an injected Hub client."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file

from lcm_kit.training.hub import (
    DEFAULT_IGNORE_PATTERNS,
    license_from_model_folder_or_card,
    push_to_hub,
    render_model_card,
)
from lcm_kit.training.redaction import (
    args_for_saving,
    is_secret_name,
    redact_command,
    training_command,
    write_training_args,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOKEN = "hf_" + "Zq8" * 12  # token-shaped, never to be seen again after being passed in


class RecordingHub:
    """Stands in for ``huggingface_hub.HfApi`` (the one thing tests may fake): records the calls and selects the
    files exactly as ``upload_folder`` does (huggingface_hub's own ``filter_repo_objects``)."""

    def __init__(self):
        self.calls = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"me/{repo_id}"})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, dict(kwargs, folder_path=folder_path)))
        root = Path(folder_path)
        files = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file())
        for relative in filter_repo_objects(files, allow_patterns=kwargs.get("allow_patterns"),
                                            ignore_patterns=kwargs.get("ignore_patterns")):
            self.uploaded[relative] = (root / relative).read_bytes()


def _output_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    (out / "checkpoint-10").mkdir(parents=True)
    (out / "checkpoint-10" / "optimizer.bin").write_bytes(b"state")
    (out / "checkpoint-20" / "unet_lora").mkdir(parents=True)
    (out / "checkpoint-20" / "unet_lora" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (out / "latent_cache" / "abc").mkdir(parents=True)
    (out / "latent_cache" / "abc" / "shard-00000.safetensors").write_bytes(b"x")
    (out / ".checkpoint-30.tmp").mkdir()
    (out / ".checkpoint-30.tmp" / "model.safetensors").write_bytes(b"x")
    save_file({"unet.down.lora_A.weight": torch.ones(2, 3)}, str(out / "pytorch_lora_weights.safetensors"))
    (out / "validation.png").write_bytes(b"\x89PNG fake grid bytes")
    (out / "logs" / "run").mkdir(parents=True)
    (out / "logs" / "run" / "events.out.tfevents.1").write_bytes(b"tb")
    return out


def test_model_card_front_matter_snippet_and_redacted_command():
    command = f"accelerate launch train_lcm_lora.py --hub_token {TOKEN} --resolution 512 --hub_model_id me/lcm"
    text = render_model_card("runwayml/stable-diffusion-v1-5", "me/lcm-lora", lora=True, training_command=command,
                             license="creativeml-openrail-m", validation_image="validation.png",
                             extra_tags=("stable-diffusion",), metrics={"fid_4_steps": 11.1034})
    data = ModelCard(text).data
    assert data.base_model == "runwayml/stable-diffusion-v1-5"
    assert data.license == "creativeml-openrail-m"
    assert data.library_name == "diffusers"
    assert data.tags == ["lcm", "lora", "diffusers", "text-to-image", "lcm-kit", "stable-diffusion"]
    assert 'pipe.load_lora_weights("me/lcm-lora")' in text and "num_inference_steps=4" in text
    assert "LCMScheduler" in text and "![validation images](validation.png)" in text
    assert "| fid_4_steps | 11.1 |" in text
    assert "--resolution 512 --hub_model_id me/lcm" in text
    assert TOKEN not in text and "--hub_token '<redacted>'" in text
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    compile(snippet, "snippet", "exec")  # the usage code is valid Python


def test_full_model_card_and_unknown_license_and_local_teacher(tmp_path):
    text = render_model_card(str(tmp_path), "me/lcm-unet", lora=False,
                             training_command=["train_lcm.py", f"--hub_token={TOKEN}"])
    data = ModelCard(text).data
    assert data.base_model is None and data.license is None  # a local path is no Hub id; no guessed license
    assert "lora" not in data.tags and "lcm" in data.tags
    assert 'UNet2DConditionModel.from_pretrained("me/lcm-unet", subfolder="unet"' in text
    assert "LatentConsistencyModelPipeline" in text and "load_lora_weights" not in text
    assert TOKEN not in text and "--hub_token=<redacted>" in text
    assert "License: not known" in text
    compile(text.split("```python\n", 1)[1].split("```", 1)[0], "snippet", "exec")


def test_secrets_never_saved(tmp_path):
    args = argparse.Namespace(hub_token=TOKEN, hub_model_id="me/lcm", tokenizer_name="clip", wandb_api_key="k" * 40,
                              output_dir=tmp_path, resolution=512, note=f"pushed with {TOKEN}",
                              nested={"password": "pw", "lr": 1e-4})
    saved = args_for_saving(args)
    assert "hub_token" not in saved and "wandb_api_key" not in saved
    assert saved["tokenizer_name"] == "clip" and saved["output_dir"] == str(tmp_path)
    assert saved["resolution"] == 512 and saved["nested"] == {"password": "<redacted>", "lr": 1e-4}
    blob = json.dumps(saved)
    assert TOKEN not in blob and "k" * 40 not in blob and '"pw"' not in blob
    path = write_training_args(args, tmp_path)
    assert TOKEN not in path.read_text() and json.loads(path.read_text()) == saved
    assert is_secret_name("hub_token") and is_secret_name("--hub-token") and is_secret_name("report_api_key")
    assert not is_secret_name("tokenizer_name") and not is_secret_name("max_tokens")


def test_redact_command_forms():
    assert redact_command(["t.py", "--hub_token", TOKEN, "--seed", "1"]) == "t.py --hub_token '<redacted>' --seed 1"
    assert TOKEN not in redact_command(f"t.py --hub_token={TOKEN} --note {TOKEN}")
    command = training_command(["train_lcm_lora.py", "--hub_token", TOKEN, "--prompt", "a cat, 4k"])
    assert command == "accelerate launch train_lcm_lora.py --hub_token '<redacted>' --prompt 'a cat, 4k'"


def test_license_from_teacher_card(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    assert license_from_model_folder_or_card(teacher) is None  # no README: unknown
    (teacher / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags:\n- stable-diffusion\n---\n# SD\n")
    assert license_from_model_folder_or_card(teacher) == "creativeml-openrail-m"
    other = tmp_path / "card.md"
    other.write_text("---\nlicense: other\nlicense_name: my-license\n---\ntext\n")
    assert license_from_model_folder_or_card(other) == "my-license"
    assert license_from_model_folder_or_card("nobody-has/this-model-cached") is None  # offline, not in cache


def test_push_to_hub_uploads_card_and_weights_but_no_checkpoints(tmp_path, caplog):
    out = _output_dir(tmp_path)
    card = render_model_card("runwayml/stable-diffusion-v1-5", "lcm-lora", lora=True,
                             training_command=f"train_lcm_lora.py --hub_token {TOKEN}",
                             validation_image="validation.png")
    hub = RecordingHub()
    with caplog.at_level(logging.DEBUG):
        repo = push_to_hub(out, "lcm-lora", token=TOKEN, client=hub, private=True, model_card=card)
    assert repo == "me/lcm-lora"  # the id the Hub resolved, not the short name
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][2]["exist_ok"] is True and hub.calls[0][2]["private"] is True
    assert hub.calls[1][1] == "me/lcm-lora"
    assert sorted(hub.uploaded) == ["README.md", "logs/run/events.out.tfevents.1", "pytorch_lora_weights.safetensors",
                                    "validation.png"]
    assert hub.uploaded["README.md"].decode() == card
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert torch.equal(lora["unet.down.lora_A.weight"], torch.ones(2, 3))
    assert hub.uploaded["pytorch_lora_weights.safetensors"] == (out / "pytorch_lora_weights.safetensors").read_bytes()
    everything = repr(hub.calls) + caplog.text + "".join(v.decode("utf-8", "replace") for v in hub.uploaded.values())
    assert TOKEN not in everything
    assert set(DEFAULT_IGNORE_PATTERNS) <= set(hub.calls[1][2]["ignore_patterns"])


def test_push_to_hub_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        push_to_hub(tmp_path / "missing", "me/x", client=RecordingHub())
    with pytest.raises(ValueError, match="repo_id"):
        push_to_hub(tmp_path, "", client=RecordingHub())
