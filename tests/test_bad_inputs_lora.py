"""Bad LoRA files: every one is refused by lcm_kit.lora.load_lora_weights_strict before anything is applied, with an
exception naming the file (or the path / repo id given) and what is wrong, and the target pipeline (which already
holds an adapter) is left exactly as it was: same adapters, same state dict, same module types."""

import json
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lcm_kit.lora import add_lcm_lora, export_kohya, lcm_lora_config, load_lora_weights_strict, save_lora_weights
from lcm_kit.testing import tiny_pipeline, tiny_unet

RANK, ALPHA = 4, 8
A_KEY = "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"  # a Conv2d 1x1, 32 -> 32 channels
Q_KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"  # a Linear 32 -> 32


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A good LoRA of the tiny SD1 unet (rank 4, alpha 8, random weights): the unet, its file, tensors, metadata."""
    root = tmp_path_factory.mktemp("source")
    unet = tiny_unet("sd1")
    add_lcm_lora(unet, rank=RANK, alpha=ALPHA)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    file = save_lora_weights(unet, root / "good")
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    return {"root": root, "unet": unet, "file": file, "tensors": load_file(file), "metadata": metadata}


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    """Another LoRA (rank 2) that the target holds as adapter 'existing' before each bad file."""
    unet = tiny_unet("sd1")
    add_lcm_lora(unet, rank=2, alpha=2)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    return save_lora_weights(unet, tmp_path_factory.mktemp("existing"))


@pytest.fixture
def target(existing):
    """A fresh pipeline per case (one failure must not hide behind another) holding the adapter 'existing'."""
    pipe = tiny_pipeline("sd1")
    load_lora_weights_strict(pipe, existing, adapter_name="existing")
    return pipe


def snapshot(pipe):
    models = {c: getattr(pipe, c) for c in ("unet", "text_encoder")}
    return {
        "adapters": pipe.get_list_adapters(),
        "types": {c: [(n, type(m).__name__) for n, m in model.named_modules()] for c, model in models.items()},
        "state": {c: {k: v.clone() for k, v in model.state_dict().items()} for c, model in models.items()},
        "peft_config": {c: sorted(getattr(model, "peft_config", None) or {}) for c, model in models.items()},
    }


def edited(s, name, tensors=None, metadata=None, adapter=None):
    """A copy of the good file with some tensors / metadata fields replaced (``adapter``: fields of the unet's
    lora_adapter_metadata; a value None removes the field)."""
    meta = dict(s["metadata"] if metadata is None else metadata)
    if adapter is not None:
        config = json.loads(meta["lora_adapter_metadata"])
        for key, value in adapter.items():
            config.pop(key) if value is None else config.__setitem__(key, value)
        meta["lora_adapter_metadata"] = json.dumps(config)
    path = s["root"] / f"{name}.safetensors"
    save_file(s["tensors"] if tensors is None else tensors, path, metadata=meta)
    return path


def replaced(s, **changes):
    tensors = dict(s["tensors"])
    for key, value in changes.items():
        key = {"A": A_KEY, "B": A_KEY.replace("lora_A", "lora_B"), "Q": Q_KEY}[key]
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    return tensors


def poisoned(s, value):
    tensor = s["tensors"][A_KEY].clone()
    tensor.view(-1)[3] = value
    return replaced(s, A=tensor)


def write(s, name, data: bytes, suffix=".safetensors"):
    path = s["root"] / f"{name}{suffix}"
    path.write_bytes(data)
    return path


def kohya_with_alpha(s, name, alpha):
    path = export_kohya(s["unet"], s["root"] / f"{name}.safetensors")
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if k.endswith(".alpha"))
    tensors[key] = torch.tensor(alpha)
    save_file(tensors, path)
    return path


def folder(s, name, files):
    path = s["root"] / name
    path.mkdir()
    for file_name, data in files.items():
        (path / file_name).write_bytes(data)
    return path


def peft_wrapped(s):
    wrapped = get_peft_model(tiny_unet("sd1"), lcm_lora_config(rank=RANK, alpha=ALPHA))
    state = get_peft_model_state_dict(wrapped)
    StableDiffusionPipeline.save_lora_weights(s["root"] / "wrapped", unet_lora_layers=state)
    return s["root"] / "wrapped"


def unprefixed(s):
    s["unet"].save_lora_adapter(s["root"] / "unprefixed")
    return s["root"] / "unprefixed" / "pytorch_lora_weights.safetensors"


def mixed_styles(s):
    mixed = convert_state_dict_to_diffusers(get_peft_model_state_dict(s["unet"]))
    StableDiffusionPipeline.save_lora_weights(s["root"] / "mixed", unet_lora_layers=mixed)
    return s["root"] / "mixed"


def torch_saved(s, name, suffix=".bin"):
    path = s["root"] / f"{name}{suffix}"
    torch.save(s["tensors"], path)
    return path


FOUR_BY_35 = torch.zeros(RANK, 35)

# id -> (build(source) -> path or (path, kwargs), exception type, regex of the problem)
CASES = {
    "truncated": (lambda s: write(s, "truncated", s["file"].read_bytes()[:-5000]), ValueError,
                  r"not a readable safetensors file.*incomplete metadata.*truncated"),
    "zero-byte": (lambda s: write(s, "empty", b""), ValueError, r"is empty \(0 bytes\)"),
    "garbage bytes": (lambda s: write(s, "garbage", bytes(range(256)) * 8), ValueError,
                      r"not a readable safetensors file: Error while deserializing header"),
    "pickled .bin (torch.save)": (lambda s: torch_saved(s, "pickled"), ValueError,
                                  r"pickled PyTorch file: lcm-kit reads LoRA weights from safetensors files only"),
    "pickled .ckpt": (lambda s: torch_saved(s, "pickled", ".ckpt"), ValueError, r"pickled PyTorch file.*weights_only"),
    "pickle renamed .safetensors": (lambda s: torch_saved(s, "renamed", ".safetensors"), ValueError,
                                    r"pickled PyTorch file named \.safetensors"),
    "folder holding only a .bin": (lambda s: folder(s, "binonly", {"pytorch_lora_weights.bin": b"\x80\x02}q\x00."}),
                                   ValueError, r"holds only pickled weight files \['pytorch_lora_weights\.bin'\]"),
    "weight_name of a pickle": (lambda s: (s["file"].parent, {"weight_name": "pytorch_lora_weights.bin"}), ValueError,
                                r"\(weight_name 'pytorch_lora_weights\.bin'\) is a pickled PyTorch file: "
                                r"lcm-kit reads"),
    "peft-wrapped base_model.model. keys": (peft_wrapped, ValueError,
                                            r"unet\.base_model\.model\.down_blocks.*peft-wrapped model"),
    "unprefixed keys": (unprefixed, ValueError, r"^(?=.*down_blocks\.0\.attentions\.0\.proj_in\.lora_A\.weight)"
                                                r"(?=.*need the 'unet\.' prefix)"),
    "unknown module names": (lambda s: edited(s, "unknown", {**s["tensors"], "unet.down_blocks.9.conv.lora_A.weight":
                                                             FOUR_BY_35}), ValueError,
                             r"1 keys that match no module.*unet\.down_blocks\.9\.conv\.lora_A\.weight "
                             r"\(no LoRA-capable"),
    "a component the pipeline lacks": (lambda s: edited(s, "te2", {
        **s["tensors"], "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": FOUR_BY_35}),
        ValueError, r"text_encoder_2\.text_model.*no component 'text_encoder_2'; this target has \['text_encoder', "),
    "zero tensors": (lambda s: edited(s, "no_tensors", {}), ValueError, r"holds no tensors"),
    "a non-float tensor": (lambda s: edited(s, "ints", replaced(s, A=torch.ones(RANK, 32, 1, 1, dtype=torch.int64))),
                           ValueError, re.escape(A_KEY) + r": dtype torch\.int64, not floating point"),
    "a NaN tensor": (lambda s: edited(s, "nan", poisoned(s, float("nan"))), ValueError,
                     re.escape(A_KEY) + r": 1 NaN and 0 infinite values of 128"),
    "an inf tensor": (lambda s: edited(s, "inf", poisoned(s, float("-inf"))), ValueError,
                      re.escape(A_KEY) + r": 0 NaN and 1 infinite values"),
    "alpha < 0": (lambda s: edited(s, "alpha_neg", adapter={"unet.lora_alpha": -8}), ValueError,
                  r"'unet\.lora_alpha' must be a finite number > 0, got -8"),
    "alpha = 0": (lambda s: edited(s, "alpha_zero", adapter={"unet.lora_alpha": 0}), ValueError,
                  r"'unet\.lora_alpha' must be a finite number > 0, got 0"),
    "alpha NaN": (lambda s: edited(s, "alpha_nan", adapter={"unet.lora_alpha": float("nan")}), ValueError,
                  r"'unet\.lora_alpha' must be a finite number > 0, got nan"),
    "alpha a string": (lambda s: edited(s, "alpha_str", adapter={"unet.lora_alpha": "8"}), ValueError,
                       r"'unet\.lora_alpha' must be a finite number > 0, got '8' \(a JSON str\)"),
    "alpha missing from the metadata": (lambda s: edited(s, "alpha_missing", adapter={"unet.lora_alpha": None}),
                                        ValueError, r"no 'unet\.lora_alpha'; peft would use its default alpha 8"),
    "rank_pattern value 0": (lambda s: edited(s, "rank_pattern", adapter={"unet.rank_pattern": {"to_q": 0}}),
                             ValueError, r"'unet\.rank_pattern\['to_q'\]' must be an integer >= 1, got 0"),
    "a field LoraConfig does not have": (lambda s: edited(s, "field", adapter={"unet.not_a_lora_field": 1}),
                                         ValueError,
                                         r"'unet\.' fields are not a valid peft LoraConfig.*not_a_lora_field"),
    "non-JSON metadata": (lambda s: edited(s, "nonjson", metadata={**s["metadata"], "lora_adapter_metadata": "{r: 4"}),
                          ValueError, r"metadata 'lora_adapter_metadata' is not valid JSON"),
    "metadata for another rank": (lambda s: edited(s, "meta_rank", adapter={"unet.r": 8}), ValueError,
                                  re.escape(A_KEY[:-len(".lora_A.weight")]) + r": the metadata gives rank 8 "
                                  r"\('unet\.r' / rank_pattern\), the tensors have rank 4"),
    "rank mismatch between A and B": (lambda s: edited(s, "rank_ab", replaced(s, A=s["tensors"][A_KEY][:2].clone())),
                                      ValueError, r"rank 2 in .*proj_in\.lora_A\.weight \(2, 32, 1, 1\) but 4 in "),
    "shape mismatch with the module": (lambda s: edited(s, "shape", replaced(s, Q=FOUR_BY_35)), ValueError,
                                       re.escape(Q_KEY) + r": shape \(4, 35\), but a rank-4 LoRA of this Linear "
                                       r"\(32 -> 32\) needs \(4, 32\)"),
    "a missing lora_B": (lambda s: edited(s, "no_b", replaced(s, B=None)), ValueError,
                         r"proj_in: no lora_B\.weight \(the file has only \['" + re.escape(A_KEY) + r"'\]\)"),
    "mixed key styles": (mixed_styles, ValueError, r"mixes two key styles.*would drop the LoRA of 32 modules: "
                                                   r"unet\.down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1"),
    "kohya mixed with peft keys": (lambda s: edited(s, "kohya_mixed", {
        **s["tensors"], **load_file(export_kohya(s["unet"], s["root"] / "k.safetensors"))}), ValueError,
        r"mixes kohya keys \(\d+, e\.g\. 'lora_unet_"),
    "kohya file with alpha < 0": (lambda s: kohya_with_alpha(s, "kohya_neg", -4.0), ValueError,
                                  r"lora_unet_\w+\.alpha: alpha must be one number > 0, got -4\.0"),
    "kohya file with alpha = 0": (lambda s: kohya_with_alpha(s, "kohya_zero", 0.0), ValueError,
                                  r"lora_unet_\w+\.alpha: alpha must be one number > 0, got 0\.0"),
    "kohya file with a NaN alpha": (lambda s: kohya_with_alpha(s, "kohya_nan", float("nan")), ValueError,
                                    r"lora_unet_\w+\.alpha: 1 NaN"),
    "a folder without the weight file": (lambda s: folder(s, "other_name", {"my_lora.safetensors": b"x"}), ValueError,
                                         r"pytorch_lora_weights\.safetensors' does not exist; weight_name must be one "
                                         r"of the folder's \.safetensors files: \['my_lora\.safetensors'\]"),
    "a missing path": (lambda s: s["root"] / "no" / "such" / "lora.safetensors", ValueError,
                       r"no such file or directory"),
    "a Hub id while offline": (lambda s: ("lcm-kit-tests/no-such-lora", {"local_files_only": True}), ValueError,
                               r"is not a local file or directory, and 'pytorch_lora_weights\.safetensors' could "
                               r"not be fetched from the Hub"),
    "an adapter name already in use": (lambda s: (s["file"], {"adapter_name": "existing"}), ValueError,
                                       r"adapter_name 'existing' is already loaded in \['unet'\]"),
    "a state dict instead of a file": (lambda s: (s["tensors"], {}), TypeError,
                                       r"pass a file, not a state dict"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_lora_file_is_refused_before_anything_is_applied(case, source, target, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # never the network
    build, error_type, problem = CASES[case]
    built = build(source)
    path, kwargs = built if isinstance(built, tuple) else (built, {})
    before = snapshot(target)
    with pytest.raises(error_type) as excinfo:
        load_lora_weights_strict(target, path, **kwargs)
    message = str(excinfo.value)
    if not isinstance(path, dict):
        assert str(path) in message, message  # names the file, folder or repo id
    assert re.search(problem, message, flags=re.DOTALL), message
    after = snapshot(target)
    assert after["adapters"] == before["adapters"] == {"unet": ["existing"]}
    assert after["peft_config"] == before["peft_config"] and after["types"] == before["types"]
    for component, state in before["state"].items():
        assert after["state"][component].keys() == state.keys()
        assert all(torch.equal(after["state"][component][k], v) for k, v in state.items()), component
