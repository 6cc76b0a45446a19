"""LCM-LoRA adapters that stock diffusers loads *completely*: save, strict load, kohya export.

Why this module exists (measured with diffusers 0.42.1 / peft 0.21):

* ``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`` mixes two key styles (attention
  layers become ``to_q.lora.down.weight``, everything else stays ``lora_A.weight``). ``load_lora_weights``
  decides the style from the *first* key only, so one of the two groups (often the attention LoRA) is
  dropped with a log warning.
* A file without adapter metadata loads with ``lora_alpha = rank`` (scale 1.0): any ``alpha != rank``
  silently changes the adapter's strength.
* Keys that match no module (e.g. peft's ``base_model.model.`` prefix, which diffusers' own
  ``train_lcm_distill_lora_sd_wds.py`` writes) either fail with ``NoMatchingPeftModuleError`` or are
  skipped with a warning.

The format written here is the one diffusers' loaders read natively: peft keys with the component
prefix, ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight``, plus the safetensors metadata entry
``lora_adapter_metadata`` holding the peft ``LoraConfig`` as JSON with ``unet.``-prefixed keys
(``{"unet.r": 64, "unet.lora_alpha": 64, ...}``), which ``load_lora_adapter`` passes straight to
``LoraConfig`` so alpha, rank pattern and alpha pattern survive.

    unet = add_lcm_lora(pipe.unet, rank=64, alpha=64)
    ...train...
    save_lora_weights(pipe.unet, "out")                              # out/pytorch_lora_weights.safetensors
    pipe2.load_lora_weights("out")                                   # stock diffusers: every tensor applied
    load_lora_weights_strict(pipe2, "out")                           # ...and proven so, or ValueError
    export_kohya(pipe.unet, "out/lcm_lora_kohya.safetensors")        # A1111 / ComfyUI
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

# The same constants diffusers' loaders read (imported, not re-typed, so a rename upstream shows up here).
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE

LCM_LORA_TARGET_MODULES = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
]
"""The standard LCM-LoRA targets (diffusers' ``train_lcm_distill_lora_sd*.py`` and the published adapters)."""

UNET_NAME = "unet"

# kohya / A1111 key prefixes per diffusers component (SD: lora_te_; SDXL: lora_te1_ / lora_te2_).
_KOHYA_PREFIX_TO_COMPONENT = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}

# LoraConfig fields written to the metadata even when they equal peft's defaults (they define the adapter's
# function, so a future change of a peft default cannot change it).
_METADATA_ALWAYS = (
    "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "lora_dropout", "use_rslora", "use_dora"
)
# LoraConfig fields never written: bookkeeping that is not a LoraConfig argument a loader needs, and that
# would make older peft versions (whose LoraConfig lacks newer fields) refuse the file.
_METADATA_SKIP = (
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"
)

_PEFT_KEY = re.compile(r"^(?P<component>[^.]+)\.(?P<module>.+)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_B\.bias)$")
_KOHYA_KEY = re.compile(
    r"^(?P<prefix>lora_unet_|lora_te1_|lora_te2_|lora_te_)(?P<flat>[^.]+)"
    r"\.(?P<role>lora_down\.weight|lora_up\.weight|alpha)$"
)
_KOHYA_TO_PEFT_ROLE = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}


# ----------------------------------------------------------------------------------------------------------
# Building an adapter
# ----------------------------------------------------------------------------------------------------------


def lcm_lora_config(
    rank: int = 64,
    alpha: float = 64,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
):
    """The peft ``LoraConfig`` of an LCM-LoRA (defaults: r 64, alpha 64, no dropout, the standard targets).

    ``rank_pattern`` / ``alpha_pattern`` (peft's names) give per-module ranks / alphas, keyed by a module
    name suffix (e.g. ``{"to_q": 8}``); :func:`save_lora_weights` stores them so they survive loading.
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}.")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
    targets = list(LCM_LORA_TARGET_MODULES if target_modules is None else target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be a non-empty list of module names, got {target_modules!r}.")
    for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for key, value in (pattern or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}[{key!r}] must be a number > 0, got {value!r}.")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=targets,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
    )


def add_lcm_lora(
    unet,
    rank: int = 64,
    alpha: float = 64,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    adapter_name: str = "default",
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
):
    """Add an LCM-LoRA adapter to a diffusers ``UNet2DConditionModel`` in place (``unet.add_adapter``) and
    return the unet.

    Every target name must match at least one module (``name == target`` or ``name.endswith("." + target)``,
    peft's rule); otherwise a ValueError lists the names that match nothing, rather than training an
    adapter that silently skips them.
    """
    config = lcm_lora_config(rank, alpha, dropout, target_modules, rank_pattern, alpha_pattern)
    unet = _unwrap(unet)
    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        raise ValueError(f"adapter_name {adapter_name!r} is already in use on this unet; pick another name.")
    module_names = [name for name, _ in unet.named_modules() if name]
    unmatched = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in module_names)]
    if unmatched:
        raise ValueError(
            f"target_modules {sorted(unmatched)} match no module of this {type(unet).__name__}; "
            "pass target_modules without them (module names end with one of the targets, e.g. 'to_q')."
        )
    unet.add_adapter(config, adapter_name=adapter_name)
    return unet


# ----------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------


def lora_state_dict(unet, adapter_name: str = "default", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors :func:`save_lora_weights` writes: peft keys with the ``unet.`` prefix
    (``unet.<module path>.lora_A.weight``), detached, contiguous, on CPU (cast to ``dtype`` if given)."""
    from peft import get_peft_model_state_dict

    unet = _unwrap(unet)
    _check_adapter(unet, adapter_name)
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {
        f"{UNET_NAME}.{key}": value.detach().to("cpu", dtype=dtype or value.dtype).contiguous()
        for key, value in state.items()
    }


def lora_adapter_metadata(unet, adapter_name: str = "default") -> dict:
    """The adapter's ``LoraConfig`` as the JSON-able dict diffusers' loaders pass to ``LoraConfig(**...)``.

    Only the fields that define the adapter are kept (r, lora_alpha, target_modules, rank_pattern,
    alpha_pattern, and any field that differs from peft's default), so older peft versions can read it.
    """
    from peft import LoraConfig

    unet = _unwrap(unet)
    _check_adapter(unet, adapter_name)
    config = unet.peft_config[adapter_name]
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"adapter {adapter_name!r} is a {type(config).__name__}; only LoraConfig adapters are supported."
        )
    defaults = _jsonable(LoraConfig().to_dict())
    full = _jsonable(config.to_dict())
    return {
        key: value
        for key, value in full.items()
        if key not in _METADATA_SKIP and (key in _METADATA_ALWAYS or value != defaults.get(key))
    }


def save_lora_weights(
    unet,
    save_directory: str | os.PathLike,
    adapter_name: str = "default",
    weight_name: str = LORA_WEIGHT_NAME_SAFE,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``unet``'s adapter as ``save_directory/weight_name`` (safetensors) and return the file's path.

    Keys are ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight``; the safetensors metadata holds
    ``lora_adapter_metadata`` (the LoraConfig, keys prefixed ``unet.``), so ``pipe.load_lora_weights``
    applies every tensor and keeps alpha, rank pattern and alpha pattern. ``metadata`` adds free-form
    string entries (e.g. the base model). ``dtype`` casts the tensors (e.g. ``torch.float16`` to publish).
    The file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    if not isinstance(weight_name, str) or not weight_name.endswith(".safetensors"):
        raise ValueError(f"weight_name must end with '.safetensors' (safetensors only), got {weight_name!r}.")
    save_directory = Path(save_directory)
    if save_directory.is_file():
        raise ValueError(f"save_directory must be a directory, got the file {str(save_directory)!r}.")
    file_metadata = {"format": "pt"}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"metadata must map str to str (safetensors metadata), got {key!r}: {type(value).__name__}."
            )
        if key in (LORA_ADAPTER_METADATA_KEY, "format"):
            raise ValueError(f"metadata key {key!r} is reserved (written by save_lora_weights).")
        file_metadata[key] = value
    tensors = lora_state_dict(unet, adapter_name, dtype=dtype)
    adapter_metadata = {f"{UNET_NAME}.{k}": v for k, v in lora_adapter_metadata(unet, adapter_name).items()}
    file_metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(adapter_metadata, indent=2, sort_keys=True)
    return _atomic_save_file(tensors, save_directory / weight_name, file_metadata)


# ----------------------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------------------


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
    tensors, file_metadata = _read_safetensors(file)
    components = _lora_components(pipe_or_unet)
    entries = _plan(tensors, file_metadata, components, source=str(file))

    before = {name: set(getattr(_unwrap(model), "peft_config", None) or {}) for name, model in components.items()}
    if _is_pipeline(pipe_or_unet):
        pipe_or_unet.load_lora_weights(str(file), adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    else:
        # Not unet.load_lora_adapter(file, prefix="unet"): in diffusers 0.42.1 that path reads a .safetensors
        # file without its metadata unless use_safetensors=True is passed, so alpha silently becomes the rank.
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        state_dict, network_alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
            str(file), return_lora_metadata=True
        )
        StableDiffusionLoraLoaderMixin.load_lora_into_unet(
            state_dict,
            network_alphas,
            unet=_unwrap(pipe_or_unet),
            adapter_name=adapter_name,
            metadata=metadata,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )

    added = set()
    for name, model in components.items():
        added |= set(getattr(_unwrap(model), "peft_config", None) or {}) - before[name]
    loaded_name = adapter_name or (added.pop() if len(added) == 1 else None)
    if loaded_name is None:
        problems = [f"diffusers created no single new adapter (new adapters: {sorted(added)})"]
    else:
        problems = _verify(entries, components, loaded_name)
    if problems:
        if loaded_name is not None:
            _delete_adapter(pipe_or_unet, components, loaded_name)
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
    tensors, file_metadata = _read_safetensors(file)
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
    is_kohya = all(_KOHYA_KEY.match(k) for k in tensors)
    unmatched: list[str] = []
    unprefixed = False
    entries: dict[tuple[str, str], _Entry] = {}
    flat_names = {}
    for key, tensor in tensors.items():
        if is_kohya:
            m = _KOHYA_KEY.match(key)
            component = _KOHYA_PREFIX_TO_COMPONENT[m["prefix"]]
            if component not in flat_names and component in components:
                flat_names[component] = _flat_module_names(components[component])
            module = flat_names.get(component, {}).get(m["flat"])
            role = _KOHYA_TO_PEFT_ROLE[m["role"]]
        else:
            m = _PEFT_KEY.match(_as_peft_key(key))
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

    adapter_config = _adapter_configs(file_metadata)
    for entry in entries.values():
        missing = {"lora_A.weight", "lora_B.weight"} - set(entry.tensors)
        if missing:
            raise ValueError(f"LoRA file {source!r}: module {entry.component}.{entry.module} lacks {sorted(missing)}.")
        rank = entry.tensors["lora_A.weight"][1].shape[0]
        if is_kohya:
            alpha = entry.tensors.pop("alpha")[1].item() if "alpha" in entry.tensors else rank
            entry.scaling = alpha / rank
        elif entry.component in adapter_config:
            entry.scaling = _config_scaling(adapter_config[entry.component], entry.module, rank)
        else:
            entry.scaling = 1.0  # no metadata: diffusers' convention alpha == rank
    return list(entries.values())


def _as_peft_key(key: str) -> str:
    """A unet key in diffusers' older styles (``to_q.lora.down.weight``, ``processor.to_q_lora.up.weight``)
    spelled the peft way, with diffusers' own mapping; other keys unchanged. Files that *mix* styles pass
    this check and are then caught after loading, when diffusers drops one of the two groups."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    if _PEFT_KEY.match(key) or not key.startswith(f"{UNET_NAME}."):
        return key
    return next(iter(convert_unet_state_dict_to_peft({key: None})))


def _verify(entries: list[_Entry], components: dict, adapter_name: str) -> list[str]:
    """Compare every file tensor and expected scale with the adapter's layers after loading."""
    from peft.tuners.lora import LoraLayer

    problems = []
    expected = set()
    for entry in entries:
        expected.add((entry.component, entry.module))
        model = _unwrap(components[entry.component])
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
        for module_name, layer in _unwrap(model).named_modules():
            if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A and (name, module_name) not in expected:
                if layer.lora_B[adapter_name].weight.abs().max() > 0:
                    problems.append(f"{name}.{module_name}: adapted with non-zero weights the file does not hold")
    return problems


# ----------------------------------------------------------------------------------------------------------
# kohya / A1111 / ComfyUI export
# ----------------------------------------------------------------------------------------------------------


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
        tensors, file_metadata = _read_safetensors(source)
        if all(_KOHYA_KEY.match(k) for k in tensors):
            raise ValueError(f"unet_or_file {str(source)!r} is already in kohya format.")
        configs = _adapter_configs(file_metadata)
        modules: dict[tuple[str, str], dict] = {}
        bad = []
        for key, tensor in tensors.items():
            m = _PEFT_KEY.match(key)
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
            (c, m): _config_scaling(configs[c], m, t["lora_A.weight"].shape[0]) for (c, m), t in modules.items()
        }
    else:
        from peft.tuners.lora import LoraLayer

        unet = _unwrap(unet_or_file)
        modules, scalings = {}, {}
        for key, tensor in lora_state_dict(unet, adapter_name).items():
            m = _PEFT_KEY.match(key)
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
    return _atomic_save_file(out, path, metadata)


# ----------------------------------------------------------------------------------------------------------
# Fused LoRA forward (training speed)
# ----------------------------------------------------------------------------------------------------------


def lora_fusion_blockers(unet, adapter_name: str = "default") -> dict[str, str]:
    """``{module name: reason}`` for every LoRA layer of ``adapter_name`` that :func:`fused_lora_forward` cannot
    run as one op (empty when all can).

    Fusion computes ``base(x; W + s·B·A)``, which equals peft's ``base(x; W) + B(A(dropout(x)))·s`` only for plain
    LoRA (no dropout, no DoRA / other variants, no LoRA bias) on an ``nn.Linear`` or ``nn.Conv2d`` base layer.
    """
    from peft.tuners.lora import LoraLayer

    unet = _unwrap(unet)
    _check_adapter(unet, adapter_name)
    blockers = {}
    for name, layer in unet.named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            continue
        base = layer.get_base_layer()
        dropout = layer.lora_dropout[adapter_name]
        if type(base) not in (torch.nn.Linear, torch.nn.Conv2d):
            blockers[name] = f"base layer is a {type(base).__name__} (fusion supports nn.Linear and nn.Conv2d)"
        elif not isinstance(dropout, torch.nn.Identity) and getattr(dropout, "p", 1.0) > 0:
            blockers[name] = f"lora_dropout={getattr(dropout, 'p', dropout)!r} (fusion needs dropout 0)"
        elif adapter_name in getattr(layer, "lora_variant", {}):
            blockers[name] = f"LoRA variant {type(layer.lora_variant[adapter_name]).__name__} (e.g. DoRA)"
        elif getattr(layer.lora_B[adapter_name], "bias", None) is not None:
            blockers[name] = "lora_B has a bias (lora_bias=True)"
    return blockers


def _fused_lora_forward_fn(layer, adapter_name: str, peft_forward):
    """``layer``'s forward as ONE linear / conv with the effective weight ``W + s·B·A``.

    The delta comes from peft's own differentiable ``get_delta_weight``, so autograd yields exactly the gradients of
    lora_A and lora_B. Whenever the layer is not in the plain single-adapter state the fusion was built for
    (adapters disabled, e.g. the teacher forward; merged; other adapters active; peft's per-sample
    ``adapter_names``), it calls peft's forward unchanged.
    """
    base = layer.get_base_layer()
    is_conv = isinstance(base, torch.nn.Conv2d)

    def forward(x, *args, **kwargs):
        if (
            args
            or kwargs
            or layer.disable_adapters
            or layer.merged
            or [a for a in layer.active_adapters if a in layer.lora_A] != [adapter_name]
        ):
            return peft_forward(x, *args, **kwargs)
        weight = base.weight + layer.get_delta_weight(adapter_name)
        bias = base.bias
        if not torch.is_autocast_enabled(x.device.type):
            # without autocast the op runs in the input's dtype, as the base layer would
            weight = weight.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        if is_conv:
            return base._conv_forward(x, weight, bias)
        return torch.nn.functional.linear(x, weight, bias)

    return forward


@contextlib.contextmanager
def fused_lora_forward(unet, adapter_name: str = "default"):
    """Inside this context every LoRA layer of ``adapter_name`` runs as ONE op with the effective weight
    ``W + s·B·A`` built differentiably, instead of peft's three (``base(x) + B(A(x))·s``).

    Same function and same gradients for lora_A / lora_B (up to float rounding); fewer kernels and, for the
    no-grad target forward, fewer FLOPs. Layers whose adapter is disabled (``unet.disable_adapters()``, the LCM
    teacher) run their plain base layer as before. Raises ``ValueError`` if any layer cannot be fused (see
    :func:`lora_fusion_blockers`, e.g. ``lora_dropout > 0``); callers fall back to peft's forward explicitly.

        with fused_lora_forward(unet):
            loss = loss_fn(unet(x, t, encoder_hidden_states=emb).sample)
        loss.backward()   # may run outside the context: the graph holds the fused ops
    """
    from peft.tuners.lora import LoraLayer

    model = _unwrap(unet)
    blockers = lora_fusion_blockers(model, adapter_name)
    if blockers:
        listed = "; ".join(f"{name}: {why}" for name, why in list(blockers.items())[:5])
        raise ValueError(
            f"adapter {adapter_name!r} cannot run fused in {len(blockers)} layer(s) ({listed}); "
            "use peft's unfused forward for it."
        )
    patched = []
    try:
        for layer in model.modules():
            if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A and "forward" not in vars(layer):
                layer.forward = _fused_lora_forward_fn(layer, adapter_name, layer.forward)
                patched.append(layer)
        yield model
    finally:
        for layer in patched:
            del layer.forward  # back to the class's (peft's) forward


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _unwrap(model):
    """The underlying model of a DDP / torch.compile wrapper (what diffusers' loaders see)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
        else:
            return model


def _check_adapter(model, adapter_name: str) -> None:
    present = sorted(getattr(model, "peft_config", None) or {})
    if adapter_name not in present:
        raise ValueError(f"adapter_name {adapter_name!r} not found on this {type(model).__name__}; it has {present}.")


def _jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "value") and isinstance(getattr(value, "value"), str):  # str enums (PeftType, TaskType)
        return value.value
    return value


def _atomic_save_file(tensors: dict, file: Path, metadata: dict) -> Path:
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return file


def _read_safetensors(file: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    file = Path(file)
    if file.suffix != ".safetensors" or not file.is_file():
        raise ValueError(f"expected an existing '.safetensors' LoRA file (safetensors only), got {str(file)!r}.")
    with safe_open(str(file), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


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
    from huggingface_hub import hf_hub_download

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
    model = _unwrap(pipe_or_unet)
    if not hasattr(model, "load_lora_adapter"):
        raise TypeError(
            f"pipe_or_unet must be a pipeline with diffusers' LoRA loader mixin or a diffusers UNet, "
            f"got {type(pipe_or_unet).__name__}."
        )
    return {UNET_NAME: model}


_LORA_CAPABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _is_lora_capable(model, module_name: str) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        module = _unwrap(model).get_submodule(module_name)
    except AttributeError:
        return False
    return isinstance(module, BaseTunerLayer) or (isinstance(module, _LORA_CAPABLE) and not _inside_lora(module_name))


def _inside_lora(module_name: str) -> bool:
    """True for peft's own sub-layers (``to_q.base_layer``, ``to_q.lora_A.default``), which take no LoRA."""
    return any(part in ("base_layer", "lora_A", "lora_B", "lora_dropout") for part in module_name.split("."))


def _flat_module_names(model) -> dict[str, str | None]:
    """kohya name (module path with '.' -> '_') -> module path, for LoRA-capable modules; None if ambiguous."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names: dict[str, str | None] = {}
    for name, module in _unwrap(model).named_modules():
        if name and not _inside_lora(name) and isinstance(module, (BaseTunerLayer, *_LORA_CAPABLE)):
            flat = name.replace(".", "_")
            names[flat] = None if flat in names else name
    return names


def _adapter_configs(file_metadata: dict) -> dict:
    """Per component, the ``LoraConfig`` stored in a file's ``lora_adapter_metadata`` (diffusers' layout:
    one JSON object whose keys are prefixed with the component name)."""
    from peft import LoraConfig

    raw = file_metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    flat = json.loads(raw)
    unprefixed = sorted(k for k in flat if "." not in k)
    if unprefixed:
        raise ValueError(
            f"'{LORA_ADAPTER_METADATA_KEY}' has keys without a component prefix {unprefixed[:6]}; diffusers' "
            "load_lora_weights only reads '<component>.<field>' keys (e.g. 'unet.lora_alpha') and would drop alpha."
        )
    per_component: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field_name = key.partition(".")
        per_component.setdefault(component, {})[field_name] = value
    return {component: LoraConfig(**kwargs) for component, kwargs in per_component.items()}


def _config_scaling(config, module_name: str, rank: int) -> float:
    """The scale peft gives ``module_name`` under ``config`` (alpha / r, or alpha / sqrt(r) with rslora)."""
    from peft.utils.other import get_pattern_key

    alpha = config.lora_alpha
    if config.alpha_pattern:
        key = get_pattern_key(list(config.alpha_pattern), module_name)
        alpha = config.alpha_pattern.get(key, alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def _delete_adapter(pipe_or_unet, components: dict, adapter_name: str) -> None:
    if _is_pipeline(pipe_or_unet):
        pipe_or_unet.delete_adapters(adapter_name)
    else:
        _unwrap(pipe_or_unet).delete_adapters(adapter_name)


__all__ = [
    "LCM_LORA_TARGET_MODULES",
    "lcm_lora_config",
    "add_lcm_lora",
    "lora_state_dict",
    "lora_adapter_metadata",
    "save_lora_weights",
    "load_lora_weights_strict",
    "check_lora_applied",
    "export_kohya",
]
