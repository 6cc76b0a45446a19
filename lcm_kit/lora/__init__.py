"""LCM-LoRA adapters that stock diffusers loads completely.

* :mod:`.adapter`: build an adapter (:func:`add_lcm_lora`) and save it (:func:`save_lora_weights`);
* :mod:`.verify`: load a file strictly (:func:`load_lora_weights_strict`, :func:`check_lora_applied`);
* :mod:`.kohya`: export to the kohya / A1111 / ComfyUI format (:func:`export_kohya`).
"""

from .adapter import (
    LCM_LORA_TARGET_MODULES,
    add_lcm_lora,
    lcm_lora_config,
    lora_adapter_metadata,
    lora_state_dict,
    save_lora_weights,
)
from .kohya import export_kohya
from .verify import check_lora_applied, load_lora_weights_strict

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
