"""LCM-LoRA adapters: build one on a UNet, save it in the format stock diffusers loads completely, read its config
back from a file.

The format is the one diffusers' loaders read natively: peft keys with the component prefix,
``unet.<module path>.lora_A.weight`` / ``.lora_B.weight``, plus the safetensors metadata entry
``lora_adapter_metadata`` holding the peft ``LoraConfig`` as JSON with ``unet.``-prefixed keys
(``{"unet.r": 64, "unet.lora_alpha": 64, ...}``), which ``load_lora_adapter`` passes straight to ``LoraConfig``, so
alpha, rank pattern and alpha pattern survive. What goes wrong otherwise (measured with diffusers 0.42.1 / peft 0.21):

* ``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`` mixes two key styles (attention layers become
  ``to_q.lora.down.weight``, everything else stays ``lora_A.weight``); ``load_lora_weights`` decides the style from
  the *first* key only, so one of the two groups (often the attention LoRA) is dropped with a log warning;
* a file without adapter metadata loads with ``lora_alpha = rank`` (scale 1.0): any ``alpha != rank`` silently
  changes the adapter's strength;
* keys that match no module (e.g. peft's ``base_model.model.`` prefix, which diffusers' own
  ``train_lcm_distill_lora_sd_wds.py`` writes) fail with ``NoMatchingPeftModuleError`` or are skipped.

    unet = add_lcm_lora(pipe.unet, rank=64, alpha=64)
    ...train...
    save_lora_weights(pipe.unet, "out")                              # out/pytorch_lora_weights.safetensors
    pipe2.load_lora_weights("out")                                   # stock diffusers: every tensor applied
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin

# The same constants diffusers' loaders read (imported, not re-typed, so a rename upstream shows up here).
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE
from peft import LoraConfig, get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open

from ..utils import unwrap_model

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

PEFT_KEY = re.compile(r"^(?P<component>[^.]+)\.(?P<module>.+)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_B\.bias)$")
#: Base layers peft can adapt.
LORA_CAPABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


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
    unet = unwrap_model(unet)
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

    unet = unwrap_model(unet)
    check_adapter(unet, adapter_name)
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

    unet = unwrap_model(unet)
    check_adapter(unet, adapter_name)
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
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``unet``'s adapter as ``save_directory/weight_name`` (safetensors) and return the file's path.

    Written by diffusers' own ``StableDiffusionLoraLoaderMixin.save_lora_weights`` with the adapter's config as
    ``unet_lora_adapter_metadata``: keys ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` and
    ``lora_adapter_metadata`` (the LoraConfig, keys prefixed ``unet.``), so ``pipe.load_lora_weights`` applies every
    tensor and keeps alpha, rank pattern and alpha pattern. ``dtype`` casts the tensors (e.g. ``torch.float16`` to
    publish). What this adds: the file is written in a temporary folder and renamed into place, so a crash never
    leaves half a file.
    """

    if not isinstance(weight_name, str) or not weight_name.endswith(".safetensors"):
        raise ValueError(f"weight_name must end with '.safetensors' (safetensors only), got {weight_name!r}.")
    save_directory = Path(save_directory)
    if save_directory.is_file():
        raise ValueError(f"save_directory must be a directory, got the file {str(save_directory)!r}.")
    prefix = f"{UNET_NAME}."
    layers = {key[len(prefix):]: value for key, value in lora_state_dict(unet, adapter_name, dtype=dtype).items()}
    metadata = lora_adapter_metadata(unet, adapter_name)
    save_directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{weight_name}.", dir=save_directory) as staging:
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            staging, unet_lora_layers=layers, weight_name=weight_name, unet_lora_adapter_metadata=metadata
        )
        os.replace(Path(staging) / weight_name, save_directory / weight_name)
    return save_directory / weight_name

# ----------------------------------------------------------------------------------------------------------
# Reading a file back
# ----------------------------------------------------------------------------------------------------------


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Suffixes of pickled PyTorch files, which lcm-kit refuses to read (unpickling a file can run code)."""


def pickle_refusal(what: str) -> str:
    """The message for a pickled weight file: lcm-kit reads safetensors only, and how to convert one."""
    return (
        f"{what}: lcm-kit reads LoRA weights from safetensors files only and never unpickles a file (unpickling "
        "can run arbitrary code). Convert it once, only if you trust where it came from: python -c \"import torch; "
        "from safetensors.torch import save_file; "
        "save_file(torch.load('pytorch_lora_weights.bin', weights_only=True), 'pytorch_lora_weights.safetensors')\""
    )


def read_lora_file(file: Path) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a ``.safetensors`` LoRA file (never a pickle); ValueError naming the file when it is
    pickled, missing, empty, truncated or not safetensors at all."""

    file = Path(file)
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(pickle_refusal(f"LoRA file {str(file)!r} is a pickled PyTorch file"))
    if file.suffix != ".safetensors":
        raise ValueError(f"LoRA file {str(file)!r}: expected a '.safetensors' file (safetensors only).")
    if not file.is_file():
        raise ValueError(f"LoRA file {str(file)!r} does not exist.")
    if file.stat().st_size == 0:
        raise ValueError(f"LoRA file {str(file)!r} is empty (0 bytes): an interrupted download or copy?")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except SafetensorError as error:
        with open(file, "rb") as f:
            head = f.read(2)
        # torch.save writes a zip archive ("PK"), older torch and pickle.dump a pickle (protocol byte 0x80).
        if head == b"PK" or head[:1] == b"\x80":
            what = f"LoRA file {str(file)!r} is a pickled PyTorch file named .safetensors"
            raise ValueError(pickle_refusal(what)) from error
        raise ValueError(
            f"LoRA file {str(file)!r} ({file.stat().st_size} bytes) is not a readable safetensors file: {error}. It is "
            "truncated (an interrupted download or copy?) or not a safetensors file at all."
        ) from error


def adapter_configs(file_metadata: dict, source: str = "?") -> dict:
    """Per component, the ``LoraConfig`` stored in a file's ``lora_adapter_metadata`` (diffusers' layout:
    one JSON object whose keys are prefixed with the component name). ValueError naming the file (``source``) and
    the field for metadata that is not JSON or holds a rank / alpha that is not a positive finite number."""

    raw = file_metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:  # diffusers' reading: an empty entry is no metadata
        return {}
    where = f"LoRA file {source!r}: metadata '{LORA_ADAPTER_METADATA_KEY}'"
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON ({error}): {raw[:80]!r}") from error
    if not isinstance(flat, dict):
        raise ValueError(f"{where} must be a JSON object of '<component>.<field>' keys, got {type(flat).__name__}.")
    unprefixed = sorted(k for k in flat if "." not in k)
    if unprefixed:
        raise ValueError(
            f"{where} has keys without a component prefix {unprefixed[:6]}; diffusers' "
            "load_lora_weights only reads '<component>.<field>' keys (e.g. 'unet.lora_alpha') and would drop alpha."
        )
    per_component: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field_name = key.partition(".")
        per_component.setdefault(component, {})[field_name] = value
    configs = {}
    for component, kwargs in per_component.items():
        if "lora_alpha" not in kwargs:
            raise ValueError(f"{where} has no '{component}.lora_alpha'; peft would use its default alpha 8.")
        _check_number(where, f"{component}.r", kwargs.get("r", 8), integer=True)
        _check_number(where, f"{component}.lora_alpha", kwargs["lora_alpha"])
        for pattern, integer in (("rank_pattern", True), ("alpha_pattern", False)):
            values = kwargs.get(pattern) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{where}: '{component}.{pattern}' must be an object, got {values!r}.")
            for module, value in values.items():
                _check_number(where, f"{component}.{pattern}[{module!r}]", value, integer=integer)
        try:
            configs[component] = LoraConfig(**kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{where}: the '{component}.' fields are not a valid peft LoraConfig ({error})."
            ) from error
    return configs


def _check_number(where: str, name: str, value, integer: bool = False) -> None:
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: '{name}' must be an integer >= 1, got {value!r}.")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        kind = f" (a JSON {type(value).__name__})" if not isinstance(value, (int, float)) else ""
        raise ValueError(f"{where}: '{name}' must be a finite number > 0, got {value!r}{kind}.")


def config_rank(config, module_name: str) -> int:
    """The rank peft gives ``module_name`` under ``config`` (``rank_pattern``, else ``r``)."""
    if config.rank_pattern:
        key = get_pattern_key(list(config.rank_pattern), module_name)
        return config.rank_pattern.get(key, config.r)
    return config.r


def config_scaling(config, module_name: str, rank: int) -> float:
    """The scale peft gives ``module_name`` under ``config`` (alpha / r, or alpha / sqrt(r) with rslora)."""

    alpha = config.lora_alpha
    if config.alpha_pattern:
        key = get_pattern_key(list(config.alpha_pattern), module_name)
        alpha = config.alpha_pattern.get(key, alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def inside_lora(module_name: str) -> bool:
    """True for peft's own sub-layers (``to_q.base_layer``, ``to_q.lora_A.default``), which take no LoRA."""
    return any(part in ("base_layer", "lora_A", "lora_B", "lora_dropout") for part in module_name.split("."))


def check_adapter(model, adapter_name: str) -> None:
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
