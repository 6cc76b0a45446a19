"""Strict LoRA loading: load a file through diffusers' own ``load_lora_weights`` and prove every tensor of it
was applied, with its alpha (or raise, naming what was not)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from huggingface_hub import hf_hub_download
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from ..utils import unwrap_model
from .adapter import (
    LORA_CAPABLE,
    LORA_WEIGHT_NAME_SAFE,
    PEFT_KEY,
    UNET_NAME,
    adapter_configs,
    config_scaling,
    inside_lora,
    read_lora_file,
)
from .kohya import KOHYA_KEY, KOHYA_PREFIX_TO_COMPONENT, KOHYA_TO_PEFT_ROLE, kohya_module_names


@dataclass
class _Entry:
    """One LoRA module of a file: where it goes and what it must look like once loaded."""

    component: str
    module: str
    tensors: dict = field(default_factory=dict)  # peft role ("lora_A.weight", ...) -> (file key, tensor)
    scaling: float | None = None  # expected effective scale (alpha / r, or alpha / sqrt(r) with rslora)


def load_lora_weights_strict(
    pipe_or_unet,
    pretrained_model_name_or_path: str | os.PathLike,
    adapter_name: str | None = None,
    weight_name: str | None = None,
    low_cpu_mem_usage: bool = False,
    **hub_kwargs,
) -> str:
    """Load a LoRA through diffusers' own ``load_lora_weights`` and prove that all of it was applied.

    Accepts lcm-kit / diffusers peft files (``unet.<module>.lora_A.weight`` + ``lora_adapter_metadata``)
    and kohya / A1111 files (``lora_unet_<module>.lora_down.weight`` + ``.alpha``), as a file, a directory
    (``weight_name`` defaults to ``pytorch_lora_weights.safetensors``) or a Hub repo id (``hub_kwargs`` go to
    ``hf_hub_download``). ``pipe_or_unet`` is a pipeline with diffusers' LoRA loader mixin (stock
    ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, LCMPipeline) or a bare UNet.

    Before loading: every key must name an existing LoRA-capable module of a component the target has;
    otherwise ValueError listing the keys (diffusers would skip them with a warning). After loading: every
    tensor in the file must sit, unchanged, in the adapter's layers and every layer's scale must be the
    file's alpha / rank (files without alpha data: 1.0, diffusers' convention); otherwise the adapter is
    removed again and ValueError lists what was not applied. Returns the adapter name.

    ``low_cpu_mem_usage`` is passed to diffusers. It defaults to False here (diffusers: True) because
    diffusers' True path makes the layers use the file's tensors in place, at addresses that are not
    64-byte aligned, and CPU kernels then round differently: measured 1.2e-6 on the UNet output, 1.9e-5 on
    4-step LCM latents (x0 amplifies by 1/sqrt(alpha_bar) ~ 15 at t = 999). With False the loaded model
    reproduces the in-memory one bit for bit.
    """
    file = _resolve_lora_file(pretrained_model_name_or_path, weight_name, hub_kwargs)
    tensors, file_metadata = read_lora_file(file)
    components = _lora_components(pipe_or_unet)
    entries = _plan(tensors, file_metadata, components, source=str(file))

    before = {name: set(getattr(unwrap_model(model), "peft_config", None) or {}) for name, model in components.items()}
    if _is_pipeline(pipe_or_unet):
        pipe_or_unet.load_lora_weights(str(file), adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    else:
        # Not unet.load_lora_adapter(file, prefix="unet"): in diffusers 0.42.1 that path reads a .safetensors
        # file without its metadata unless use_safetensors=True is passed, so alpha silently becomes the rank.

        state_dict, network_alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
            str(file), return_lora_metadata=True
        )
        StableDiffusionLoraLoaderMixin.load_lora_into_unet(
            state_dict,
            network_alphas,
            unet=unwrap_model(pipe_or_unet),
            adapter_name=adapter_name,
            metadata=metadata,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )

    added = set()
    for name, model in components.items():
        added |= set(getattr(unwrap_model(model), "peft_config", None) or {}) - before[name]
    loaded_name = adapter_name or (added.pop() if len(added) == 1 else None)
    if loaded_name is None:
        problems = [f"diffusers created no single new adapter (new adapters: {sorted(added)})"]
    else:
        problems = _verify(entries, components, loaded_name)
    if problems:
        if loaded_name is not None:
            _delete_adapter(pipe_or_unet, loaded_name)
        raise ValueError(
            f"LoRA file {str(file)!r} was not applied completely by diffusers' load_lora_weights "
            f"({len(problems)} problems; the adapter was removed again):\n  " + "\n  ".join(problems)
        )
    return loaded_name


def check_lora_applied(
    pipe_or_unet,
    pretrained_model_name_or_path: str | os.PathLike,
    adapter_name: str,
    weight_name: str | None = None,
    **hub_kwargs,
) -> None:
    """Raise ValueError unless adapter ``adapter_name`` of ``pipe_or_unet`` holds every tensor of the LoRA file
    unchanged, with the file's alpha / rank as its scale (the check :func:`load_lora_weights_strict` runs after
    loading), for a model loaded any other way, e.g. with ``pipe.load_lora_weights`` or ``unet.load_lora_adapter``.
    Nothing is loaded or removed."""
    file = _resolve_lora_file(pretrained_model_name_or_path, weight_name, hub_kwargs)
    tensors, file_metadata = read_lora_file(file)
    components = _lora_components(pipe_or_unet)
    problems = _verify(_plan(tensors, file_metadata, components, source=str(file)), components, adapter_name)
    if problems:
        raise ValueError(
            f"LoRA file {str(file)!r} is not completely applied as adapter {adapter_name!r} "
            f"({len(problems)} problems):\n  " + "\n  ".join(problems)
        )


def _plan(tensors: dict, file_metadata: dict, components: dict, source: str) -> list[_Entry]:
    """Map every key of a LoRA file to (component, module, role) and the expected scale; ValueError listing
    the keys that match no module (before anything is loaded)."""
    if not tensors:
        raise ValueError(f"LoRA file {source!r} holds no tensors.")
    is_kohya = all(KOHYA_KEY.match(k) for k in tensors)
    unmatched: list[str] = []
    unprefixed = False
    entries: dict[tuple[str, str], _Entry] = {}
    flat_names = {}
    for key, tensor in tensors.items():
        if is_kohya:
            m = KOHYA_KEY.match(key)
            component = KOHYA_PREFIX_TO_COMPONENT[m["prefix"]]
            if component not in flat_names and component in components:
                flat_names[component] = kohya_module_names(components[component])
            module = flat_names.get(component, {}).get(m["flat"])
            role = KOHYA_TO_PEFT_ROLE[m["role"]]
        else:
            m = PEFT_KEY.match(_as_peft_key(key))
            if m is None:
                unmatched.append(f"{key} (not a '<component>.<module>.lora_A.weight' / 'lora_B.weight' key)")
                continue
            component, module, role = m["component"], m["module"], m["role"]
            if component in components and not _is_lora_capable(components[component], module):
                module = None
        if component not in components:
            unprefixed = unprefixed or (
                UNET_NAME in components and _is_lora_capable(components[UNET_NAME], f"{component}.{module}")
            )
            unmatched.append(f"{key} (no component {component!r}; this target has {sorted(components)})")
        elif module is None:
            unmatched.append(f"{key} (no LoRA-capable module of that name in {component})")
        else:
            entry = entries.setdefault((component, module), _Entry(component, module))
            entry.tensors[role] = (key, tensor)
    if unmatched:
        hint = ""
        if any(".base_model.model." in k for k in unmatched):
            hint += ("\nKeys containing 'base_model.model.' come from a peft-wrapped model (get_peft_model); "
                     "save with lcm_kit.lora.save_lora_weights from the unwrapped unet instead.")
        if unprefixed:
            hint += ("\nKeys without a component prefix (written by unet.save_lora_adapter or peft) are ignored by "
                     "pipe.load_lora_weights; they need the 'unet.' prefix that lcm_kit.lora.save_lora_weights writes.")
        raise ValueError(
            f"LoRA file {source!r} has {len(unmatched)} keys that match no module (diffusers would skip them):\n  "
            + "\n  ".join(sorted(unmatched)) + hint
        )

    adapter_config = adapter_configs(file_metadata)
    for entry in entries.values():
        missing = {"lora_A.weight", "lora_B.weight"} - set(entry.tensors)
        if missing:
            raise ValueError(f"LoRA file {source!r}: module {entry.component}.{entry.module} lacks {sorted(missing)}.")
        rank = entry.tensors["lora_A.weight"][1].shape[0]
        if is_kohya:
            alpha = entry.tensors.pop("alpha")[1].item() if "alpha" in entry.tensors else rank
            entry.scaling = alpha / rank
        elif entry.component in adapter_config:
            entry.scaling = config_scaling(adapter_config[entry.component], entry.module, rank)
        else:
            entry.scaling = 1.0  # no metadata: diffusers' convention alpha == rank
    return list(entries.values())


def _as_peft_key(key: str) -> str:
    """A unet key in diffusers' older styles (``to_q.lora.down.weight``, ``processor.to_q_lora.up.weight``)
    spelled the peft way, with diffusers' own mapping; other keys unchanged. Files that *mix* styles pass
    this check and are then caught after loading, when diffusers drops one of the two groups."""

    if PEFT_KEY.match(key) or not key.startswith(f"{UNET_NAME}."):
        return key
    return next(iter(convert_unet_state_dict_to_peft({key: None})))


def _verify(entries: list[_Entry], components: dict, adapter_name: str) -> list[str]:
    """Compare every file tensor and expected scale with the adapter's layers after loading."""

    problems = []
    expected = set()
    for entry in entries:
        expected.add((entry.component, entry.module))
        model = unwrap_model(components[entry.component])
        try:
            layer = model.get_submodule(entry.module)
        except AttributeError:
            layer = None
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            problems.append(f"{entry.component}.{entry.module}: not adapted (tensors "
                            f"{sorted(k for k, _ in entry.tensors.values())} dropped)")
            continue
        loaded = {
            "lora_A.weight": layer.lora_A[adapter_name].weight,
            "lora_B.weight": layer.lora_B[adapter_name].weight,
            "lora_B.bias": getattr(layer.lora_B[adapter_name], "bias", None),
        }
        for role, (key, tensor) in entry.tensors.items():
            have = loaded.get(role)
            if have is None or have.shape != tensor.shape or not torch.equal(
                have.detach().cpu(), tensor.to(have.dtype)
            ):
                problems.append(f"{key}: the loaded tensor differs from the file's")
        scaling = layer.scaling[adapter_name]
        if not math.isclose(scaling, entry.scaling, rel_tol=1e-6):
            problems.append(f"{entry.component}.{entry.module}: scale {scaling:g} after loading, the file says "
                            f"{entry.scaling:g} (alpha / rank lost)")
    # Layers that got this adapter although the file has nothing for them must at least be inert.
    for name, model in components.items():
        for module_name, layer in unwrap_model(model).named_modules():
            if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A and (name, module_name) not in expected:
                if layer.lora_B[adapter_name].weight.abs().max() > 0:
                    problems.append(f"{name}.{module_name}: adapted with non-zero weights the file does not hold")
    return problems


def _resolve_lora_file(path_or_repo, weight_name: str | None, hub_kwargs: dict) -> Path:
    path = Path(path_or_repo)
    if path.is_file():
        if weight_name is not None and path.name != weight_name:
            raise ValueError(f"weight_name {weight_name!r} given with the file path {str(path)!r}; pass one of them.")
        return path
    name = weight_name or LORA_WEIGHT_NAME_SAFE
    if path.is_dir():
        if not (path / name).is_file():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            raise ValueError(f"{str(path / name)!r} does not exist; weight_name must be one of {found}.")
        return path / name
    if os.path.isabs(str(path_or_repo)) or str(path_or_repo).startswith("."):
        raise ValueError(f"pretrained_model_name_or_path {str(path_or_repo)!r} is neither a file nor a directory.")

    try:
        return Path(hf_hub_download(str(path_or_repo), name, **hub_kwargs))
    except Exception as error:  # offline, unknown repo, missing file: one message naming the argument
        raise ValueError(
            f"pretrained_model_name_or_path {str(path_or_repo)!r} is not a local file or directory, and "
            f"{name!r} could not be fetched from the Hub repo of that name: {error}"
        ) from error


def _is_pipeline(obj) -> bool:
    return hasattr(obj, "load_lora_weights") and hasattr(obj, "_lora_loadable_modules")


def _lora_components(pipe_or_unet) -> dict:
    """The models a LoRA file may address, by diffusers' component name."""
    if _is_pipeline(pipe_or_unet):
        return {
            name: getattr(pipe_or_unet, name)
            for name in pipe_or_unet._lora_loadable_modules
            if getattr(pipe_or_unet, name, None) is not None
        }
    model = unwrap_model(pipe_or_unet)
    if not hasattr(model, "load_lora_adapter"):
        raise TypeError(
            f"pipe_or_unet must be a pipeline with diffusers' LoRA loader mixin or a diffusers UNet, "
            f"got {type(pipe_or_unet).__name__}."
        )
    return {UNET_NAME: model}


def _is_lora_capable(model, module_name: str) -> bool:
    try:
        module = unwrap_model(model).get_submodule(module_name)
    except AttributeError:
        return False
    return isinstance(module, BaseTunerLayer) or (isinstance(module, LORA_CAPABLE) and not inside_lora(module_name))


def _delete_adapter(pipe_or_unet, adapter_name: str) -> None:
    if _is_pipeline(pipe_or_unet):
        pipe_or_unet.delete_adapters(adapter_name)
    else:
        unwrap_model(pipe_or_unet).delete_adapters(adapter_name)
