"""Strict LoRA loading: check a file completely before anything is applied, load it through diffusers' own
``load_lora_weights``, and prove every tensor of it was applied, with its alpha (or raise, naming what was not, and
leave the target as it was)."""

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
    PICKLE_SUFFIXES,
    UNET_NAME,
    adapter_configs,
    config_rank,
    config_scaling,
    inside_lora,
    pickle_refusal,
    read_lora_file,
)
from .kohya import KOHYA_KEY, KOHYA_PREFIX_TO_COMPONENT, KOHYA_TO_PEFT_ROLE, kohya_module_names

_MISSING = object()


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
    ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, LCMPipeline) or a bare UNet. Safetensors only:
    a pickled file (``.bin``, ``.pt``, ``.ckpt``, ...) is refused, never unpickled.

    Before loading, a ValueError naming the file and the key or metadata field, for: a file that is empty,
    truncated or not safetensors; no tensors; a tensor that is not floating point or holds NaN / inf; keys that
    match no LoRA-capable module of a component the target has (diffusers would skip them with a warning), or that
    mix diffusers' two key styles (it would drop one group); a module without both ``lora_A`` and ``lora_B``, with
    ranks that differ between them or from the metadata, or shapes that do not fit the module; metadata that is not
    JSON or whose ``r`` / ``lora_alpha`` / patterns are not positive finite numbers; a kohya ``.alpha`` that is not
    a positive finite scalar. After loading: every tensor in the file must sit, unchanged, in the adapter's layers
    and every layer's scale must be the file's alpha / rank (files without alpha data: 1.0, diffusers'
    convention). On any failure after loading started, the target is put back as it was (the new adapter deleted,
    the layers it wrapped unwrapped) and a ValueError lists what went wrong. Returns the adapter name.

    ``low_cpu_mem_usage`` is passed to diffusers. It defaults to False here (diffusers: True) because
    diffusers' True path makes the layers use the file's tensors in place, at addresses that are not
    64-byte aligned, and CPU kernels then round differently: measured 1.2e-6 on the UNet output, 1.9e-5 on
    4-step LCM latents (x0 amplifies by 1/sqrt(alpha_bar) ~ 15 at t = 999). With False the loaded model
    reproduces the in-memory one bit for bit.
    """
    if adapter_name is not None and (not isinstance(adapter_name, str) or not adapter_name):
        raise ValueError(f"adapter_name must be a non-empty str or None, got {adapter_name!r}.")
    file = _resolve_lora_file(pretrained_model_name_or_path, weight_name, hub_kwargs)
    tensors, file_metadata = read_lora_file(file)
    components = _lora_components(pipe_or_unet)
    if adapter_name is not None:
        taken = sorted(
            n for n, m in components.items() if adapter_name in (getattr(unwrap_model(m), "peft_config", None) or {})
        )
        if taken:
            raise ValueError(f"LoRA file {str(file)!r}: adapter_name {adapter_name!r} is already loaded in {taken}; "
                             "pick another name.")
    entries = _plan(tensors, file_metadata, components, source=str(file))

    snapshot = _snapshot(components)
    try:
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
    except Exception as error:  # a case the checks above do not foresee: the target must not keep half an adapter
        _restore(components, snapshot)
        raise ValueError(
            f"diffusers' load_lora_weights failed on LoRA file {str(file)!r} ({type(error).__name__}: {error}); "
            "nothing was applied."
        ) from error

    added = set()
    for name, model in components.items():
        added |= set(getattr(unwrap_model(model), "peft_config", None) or {}) - snapshot[name][0]
    loaded_name = adapter_name or (added.pop() if len(added) == 1 else None)
    if loaded_name is None:
        problems = [f"diffusers created no single new adapter (new adapters: {sorted(added)})"]
    else:
        problems = _verify(entries, components, loaded_name)
    if problems:
        _restore(components, snapshot)
        raise ValueError(
            f"LoRA file {str(file)!r} was not applied completely by diffusers' load_lora_weights "
            f"({_count(problems)}; the adapter was removed again):\n  " + "\n  ".join(problems)
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
            f"({_count(problems)}):\n  " + "\n  ".join(problems)
        )


# ----------------------------------------------------------------------------------------------------------
# Checks before loading
# ----------------------------------------------------------------------------------------------------------


def _plan(tensors: dict, file_metadata: dict, components: dict, source: str) -> list[_Entry]:
    """Map every key of a LoRA file to (component, module, role) and the expected scale, checking everything that
    can be checked before loading; ValueError naming the file and the keys / fields at fault."""
    if not tensors:
        raise ValueError(f"LoRA file {source!r} holds no tensors (a LoRA file has lora_A / lora_B weights).")
    _check_values(tensors, source)
    is_kohya = all(KOHYA_KEY.match(k) for k in tensors)
    if not is_kohya:
        _check_one_key_style(tensors, source)
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

    adapter_config = {} if is_kohya else adapter_configs(file_metadata, source)
    problems = []
    for entry in entries.values():
        problems += _check_entry(entry, components, adapter_config, is_kohya)
    if problems:
        raise ValueError(f"LoRA file {source!r} does not fit this model ({_count(problems)}):\n  "
                         + "\n  ".join(problems))
    return list(entries.values())


def _check_values(tensors: dict, source: str) -> None:
    problems = []
    for key, tensor in tensors.items():
        if tensor.dtype == torch.bool or tensor.is_complex() or (
            not tensor.is_floating_point() and not key.endswith(".alpha")  # a kohya alpha may be an integer
        ):
            problems.append(f"{key}: dtype {tensor.dtype}, not floating point")
        elif tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                nan = int(torch.isnan(tensor).sum())
                problems.append(f"{key}: {nan} NaN and {bad - nan} infinite values of {tensor.numel()}")
    if problems:
        raise ValueError(f"LoRA file {source!r} holds tensors that are not finite floating-point numbers (they would "
                         "turn every image black or into noise):\n  " + "\n  ".join(sorted(problems)))


def _check_one_key_style(tensors: dict, source: str) -> None:
    """diffusers decides a unet's key style from the first key only (``"lora_A" in first_key``) and then drops the
    keys written in the other style; a file must use one style."""
    unet_keys = [k for k in tensors if k.startswith(f"{UNET_NAME}.")]
    kohya = sorted(k for k in tensors if KOHYA_KEY.match(k))
    if kohya:
        raise ValueError(
            f"LoRA file {source!r} mixes kohya keys ({len(kohya)}, e.g. {kohya[0]!r}) with other keys (e.g. "
            f"{next(k for k in tensors if not KOHYA_KEY.match(k))!r}); diffusers reads such a file in one format and "
            "drops the rest. Write one format (lcm_kit.lora.save_lora_weights or export_kohya)."
        )
    older = [k for k in unet_keys if not PEFT_KEY.match(k) and _as_peft_key(k) != k]
    peft_style = [k for k in unet_keys if PEFT_KEY.match(k)]
    if older and peft_style:
        dropped = older if "lora_A" in unet_keys[0] else peft_style
        modules = sorted({f"{UNET_NAME}.{m['module']}" for m in map(PEFT_KEY.match, map(_as_peft_key, dropped)) if m})
        raise ValueError(
            f"LoRA file {source!r} mixes two key styles: {len(peft_style)} peft keys ('...lora_A.weight', e.g. "
            f"{peft_style[0]!r}) and {len(older)} in diffusers' older style ('...lora.down.weight', e.g. "
            f"{older[0]!r}). "
            "diffusers' load_lora_weights reads the style of the first key only and would drop the LoRA of "
            f"{len(modules)} modules: {', '.join(modules)}. Save it in one style with lcm_kit.lora.save_lora_weights."
        )


def _check_entry(entry: _Entry, components: dict, adapter_config: dict, is_kohya: bool) -> list[str]:
    """Roles, ranks, shapes and alpha of one module; sets ``entry.scaling``."""
    name = f"{entry.component}.{entry.module}"
    missing = {"lora_A.weight", "lora_B.weight"} - set(entry.tensors)
    if missing:
        present = sorted(k for k, _ in entry.tensors.values())
        return [f"{name}: no {' / '.join(sorted(missing))} (the file has only {present})"]
    a_key, a = entry.tensors["lora_A.weight"]
    b_key, b = entry.tensors["lora_B.weight"]
    if a.dim() < 2 or b.dim() < 2:
        return [f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} must both be at least 2-D"]
    rank = a.shape[0]
    if b.shape[1] != rank:
        return [f"{name}: rank {rank} in {a_key} {tuple(a.shape)} but {b.shape[1]} in {b_key} {tuple(b.shape)}"]
    problems = []
    module = unwrap_model(components[entry.component]).get_submodule(entry.module)
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    expected = _expected_shapes(base, rank)
    for role, (key, tensor) in entry.tensors.items():
        if role in expected and tuple(tensor.shape) != expected[role]:
            problems.append(f"{key}: shape {tuple(tensor.shape)}, but a rank-{rank} LoRA of this "
                            f"{type(base).__name__} {_describe(base)} needs {expected[role]}")
    if is_kohya:
        if "alpha" in entry.tensors:
            alpha_key, alpha = entry.tensors.pop("alpha")
            if alpha.numel() != 1 or not alpha.item() > 0:
                problems.append(f"{alpha_key}: alpha must be one number > 0, got "
                                f"{alpha.tolist() if alpha.numel() <= 4 else tuple(alpha.shape)}")
                return problems
            entry.scaling = alpha.item() / rank
        else:
            entry.scaling = 1.0  # kohya's convention without .alpha: alpha = rank
    elif entry.component in adapter_config:
        config = adapter_config[entry.component]
        wanted = config_rank(config, entry.module)
        if wanted != rank:
            problems.append(f"{name}: the metadata gives rank {wanted} ('{entry.component}.r' / rank_pattern), the "
                            f"tensors have rank {rank} ({a_key} {tuple(a.shape)})")
        entry.scaling = config_scaling(config, entry.module, rank)
    else:
        entry.scaling = 1.0  # no metadata: diffusers' convention alpha == rank
    return problems


def _expected_shapes(base, rank: int) -> dict[str, tuple]:
    """The shapes peft gives the LoRA layers of the plain layer ``base`` at ``rank`` (peft's ``Linear`` /
    ``_ConvNd``)."""
    if isinstance(base, torch.nn.Linear):
        return {"lora_A.weight": (rank, base.in_features), "lora_B.weight": (base.out_features, rank),
                "lora_B.bias": (base.out_features,)}
    ones = (1,) * (base.weight.dim() - 2)
    return {"lora_A.weight": (rank, base.in_channels, *base.kernel_size),
            "lora_B.weight": (base.out_channels, rank // base.groups, *ones), "lora_B.bias": (base.out_channels,)}


def _describe(base) -> str:
    if isinstance(base, torch.nn.Linear):
        return f"({base.in_features} -> {base.out_features})"
    return f"({base.in_channels} -> {base.out_channels}, kernel {tuple(base.kernel_size)})"


def _as_peft_key(key: str) -> str:
    """A unet key in diffusers' older styles (``to_q.lora.down.weight``, ``processor.to_q_lora.up.weight``)
    spelled the peft way, with diffusers' own mapping; other keys unchanged."""

    if PEFT_KEY.match(key) or not key.startswith(f"{UNET_NAME}."):
        return key
    return next(iter(convert_unet_state_dict_to_peft({key: None})))


# ----------------------------------------------------------------------------------------------------------
# Checks after loading, and undoing a load
# ----------------------------------------------------------------------------------------------------------


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


def _snapshot(components: dict) -> dict:
    """Per component: its adapter names, the modules peft has wrapped, its ``_hf_peft_config_loaded`` flag."""
    state = {}
    for name, model in components.items():
        model = unwrap_model(model)
        wrapped = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
        state[name] = (set(getattr(model, "peft_config", None) or {}), wrapped,
                       model.__dict__.get("_hf_peft_config_loaded", _MISSING))
    return state


def _restore(components: dict, snapshot: dict) -> None:
    """Undo a load: delete the adapters it added and put back the plain layers it wrapped. diffusers'
    ``delete_adapters`` alone leaves every wrapped layer a peft layer without adapters (a different state dict)."""
    for name, model in components.items():
        model = unwrap_model(model)
        adapters, wrapped, flag = snapshot[name]
        config = getattr(model, "peft_config", None) or {}
        for adapter in set(config) - adapters:
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.delete_adapter(adapter)
            config.pop(adapter, None)
        for module_name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer) and module_name not in wrapped:
                parent, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent), child, module.get_base_layer())
        if not adapters:
            model.__dict__.pop("peft_config", None)
        if flag is _MISSING:
            model.__dict__.pop("_hf_peft_config_loaded", None)
        else:
            model._hf_peft_config_loaded = flag


# ----------------------------------------------------------------------------------------------------------
# Where the file is, what the target is
# ----------------------------------------------------------------------------------------------------------


def _resolve_lora_file(path_or_repo, weight_name: str | None, hub_kwargs: dict) -> Path:
    if not isinstance(path_or_repo, (str, os.PathLike)):
        raise TypeError(f"pretrained_model_name_or_path must be a path or a Hub repo id, got "
                        f"{type(path_or_repo).__name__} (pass a file, not a state dict: lcm-kit checks files).")
    if weight_name is not None and Path(weight_name).suffix.lower() in PICKLE_SUFFIXES:
        where = Path(path_or_repo) / weight_name
        what = f"LoRA file {str(where)!r} (weight_name {weight_name!r}) is a pickled PyTorch file"
        raise ValueError(pickle_refusal(what))
    path = Path(path_or_repo).expanduser()
    if path.is_file():
        if weight_name is not None and path.name != weight_name:
            raise ValueError(f"weight_name {weight_name!r} given with the file path {str(path)!r}; pass one of them.")
        return path
    name = weight_name or LORA_WEIGHT_NAME_SAFE
    if path.is_dir():
        if not (path / name).is_file():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if not found and pickled:
                raise ValueError(pickle_refusal(f"LoRA folder {str(path)!r} holds only pickled weight files {pickled}"))
            raise ValueError(
                f"{str(path / name)!r} does not exist; weight_name must be one of the folder's .safetensors files: "
                f"{found if found else 'it has none'}."
            )
        return path / name
    text = str(path_or_repo)
    # A Hub repo id is "name" or "owner/name"; anything else that is not on disk is a path that does not exist.
    weight_suffix = path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)
    if os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text or weight_suffix:
        raise ValueError(f"pretrained_model_name_or_path {text!r}: no such file or directory.")
    try:
        return Path(hf_hub_download(text, name, **hub_kwargs))
    except Exception as error:  # offline, unknown repo, missing file: one message naming the argument
        raise ValueError(
            f"pretrained_model_name_or_path {text!r} is not a local file or directory, and "
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


def _count(problems: list) -> str:
    return f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
