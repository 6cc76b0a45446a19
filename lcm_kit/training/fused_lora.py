"""The fused LoRA forward of the distillation trainers: each LoRA layer as ONE linear / conv with ``W + s·B·A``.

Trainer-only speed: same function and same gradients as peft's ``base(x) + B(A(x))·s`` (up to float rounding), fewer
kernels, and for the no-grad target forward fewer FLOPs (figures in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import contextlib

import torch
from peft.tuners.lora import LoraLayer

from ..lora.adapter import check_adapter
from ..utils import unwrap_model


def lora_fusion_blockers(unet, adapter_name: str = "default") -> dict[str, str]:
    """``{module name: reason}`` for every LoRA layer of ``adapter_name`` that :func:`fused_lora_forward` cannot
    run as one op (empty when all can).

    Fusion computes ``base(x; W + s·B·A)``, which equals peft's ``base(x; W) + B(A(dropout(x)))·s`` only for plain
    LoRA (no dropout, no DoRA / other variants, no LoRA bias) on an ``nn.Linear`` or ``nn.Conv2d`` base layer.
    """

    unet = unwrap_model(unet)
    check_adapter(unet, adapter_name)
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


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for device types autocast does not know (``meta``, where
    ``torch.is_autocast_enabled`` raises)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


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
        if not _autocast_enabled(x.device.type):
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

    model = unwrap_model(unet)
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
