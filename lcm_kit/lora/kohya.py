"""The kohya / A1111 / ComfyUI LoRA format: its keys, and the export of an lcm-kit adapter into it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from ..utils import atomic_save_file, unwrap_model
from .adapter import (
    LORA_ADAPTER_METADATA_KEY,
    LORA_CAPABLE,
    PEFT_KEY,
    UNET_NAME,
    adapter_configs,
    config_scaling,
    inside_lora,
    lora_state_dict,
    read_lora_file,
)

# kohya / A1111 key prefixes per diffusers component (SD: lora_te_; SDXL: lora_te1_ / lora_te2_).
KOHYA_PREFIX_TO_COMPONENT = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}

KOHYA_KEY = re.compile(
    r"^(?P<prefix>lora_unet_|lora_te1_|lora_te2_|lora_te_)(?P<flat>[^.]+)"
    r"\.(?P<role>lora_down\.weight|lora_up\.weight|alpha)$"
)
KOHYA_TO_PEFT_ROLE = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}


def kohya_module_names(model) -> dict[str, str | None]:
    """kohya name (module path with '.' -> '_') -> module path, for LoRA-capable modules; None if ambiguous."""

    names: dict[str, str | None] = {}
    for name, module in unwrap_model(model).named_modules():
        if name and not inside_lora(name) and isinstance(module, (BaseTunerLayer, *LORA_CAPABLE)):
            flat = name.replace(".", "_")
            names[flat] = None if flat in names else name
    return names


def export_kohya(unet_or_file, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write a LoRA in the kohya format A1111 and ComfyUI load, and return the file's path.

    ``unet_or_file`` is a unet carrying the adapter ``adapter_name``, or a file written by
    :func:`save_lora_weights` (it needs ``lora_adapter_metadata``, or alpha would be a guess). Keys:
    ``lora_unet_<module path, dots as underscores>.lora_down.weight`` (= peft ``lora_A``), ``.lora_up.weight``
    (= ``lora_B``) and ``.alpha`` (a scalar, chosen so that alpha / rank equals the adapter's scale exactly,
    also for rslora). Module paths are diffusers' (``down_blocks_0_attentions_0_...``), which kohya's SD
    1.x/2.x trainer, A1111 and ComfyUI all use; diffusers' ``load_lora_weights`` reads it back.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must be a '.safetensors' file (safetensors only), got {str(path)!r}.")
    if isinstance(unet_or_file, (str, os.PathLike)):
        source = Path(unet_or_file)
        tensors, file_metadata = read_lora_file(source)
        if all(KOHYA_KEY.match(k) for k in tensors):
            raise ValueError(f"unet_or_file {str(source)!r} is already in kohya format.")
        configs = adapter_configs(file_metadata, source=str(source))
        modules: dict[tuple[str, str], dict] = {}
        bad = []
        for key, tensor in tensors.items():
            m = PEFT_KEY.match(key)
            if m is None:
                bad.append(key)
                continue
            modules.setdefault((m["component"], m["module"]), {})[m["role"]] = tensor
        if bad:
            raise ValueError(f"unet_or_file {str(source)!r} has keys that are not peft LoRA keys: {sorted(bad)}.")
        missing_config = sorted({c for c, _ in modules} - set(configs))
        if missing_config:
            raise ValueError(
                f"unet_or_file {str(source)!r} has no '{LORA_ADAPTER_METADATA_KEY}' for {missing_config}, so its "
                "alpha is unknown; load it into the unet and export from the unet instead."
            )
        scalings = {
            (c, m): config_scaling(configs[c], m, t["lora_A.weight"].shape[0]) for (c, m), t in modules.items()
        }
    else:
        unet = unwrap_model(unet_or_file)
        modules, scalings = {}, {}
        for key, tensor in lora_state_dict(unet, adapter_name).items():
            m = PEFT_KEY.match(key)
            modules.setdefault((m["component"], m["module"]), {})[m["role"]] = tensor
        for _, module in modules:
            layer = unet.get_submodule(module)
            assert isinstance(layer, LoraLayer)
            scalings[(UNET_NAME, module)] = float(layer.scaling[adapter_name])

    has_te2 = any(c == "text_encoder_2" for c, _ in modules)
    prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_" if has_te2 else "lora_te_",
        "text_encoder_2": "lora_te2_",
    }
    out: dict[str, torch.Tensor] = {}
    ranks, alphas = set(), set()
    for (component, module), roles in sorted(modules.items()):
        if component not in prefixes:
            raise ValueError(f"component {component!r} has no kohya prefix (supported: {sorted(prefixes)}).")
        if "lora_B.bias" in roles:
            raise ValueError(f"{component}.{module} has a lora_B bias (lora_bias=True), which kohya files cannot hold.")
        name = prefixes[component] + module.replace(".", "_")
        down, up = roles["lora_A.weight"], roles["lora_B.weight"]
        rank = down.shape[0]
        alpha = scalings[(component, module)] * rank  # kohya scale is alpha / rank
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        ranks.add(rank)
        alphas.add(alpha)
    metadata = {"format": "pt", "ss_network_module": "networks.lora"}
    if len(ranks) == 1 and len(alphas) == 1:  # kohya's own summary fields (shown by A1111's LoRA browser)
        metadata.update(ss_network_dim=str(ranks.pop()), ss_network_alpha=f"{alphas.pop():g}")
    return atomic_save_file(out, path, metadata)
