"""The fused LoRA forward of the distillation trainers: each LoRA layer as ONE linear / conv with ``W + s·B·A``.

Trainer-only speed: same function and same gradients as peft's ``base(x) + B(A(x))·s`` (up to float rounding), fewer
kernels, and for the no-grad target forward fewer FLOPs (figures in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import contextlib

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

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


def _fused_lora_forward_fn(layer, adapter_name: str, peft_forward, weights: dict | None = None):
    """``layer``'s forward as ONE linear / conv with the effective weight ``W + s·B·A``.

    The delta comes from peft's own differentiable ``get_delta_weight``, so autograd yields exactly the gradients of
    lora_A and lora_B. Whenever the layer is not in the plain single-adapter state the fusion was built for
    (adapters disabled, e.g. the teacher forward; merged; other adapters active; peft's per-sample
    ``adapter_names``), it calls peft's forward unchanged.

    ``weights`` (a dict shared by the layers) keeps the effective weight a grad-enabled forward built, and a no-grad
    forward reuses it instead of building it again: the same tensor while lora_A / lora_B are unchanged, so the
    owner of the dict must drop it whenever they change (after an optimiser step). A no-grad weight is never kept:
    a later grad-enabled forward must build its own graph.
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
        grad = torch.is_grad_enabled()
        weight = None if weights is None or grad else weights.get(layer)
        if weight is None:
            weight = base.weight + layer.get_delta_weight(adapter_name)
            if weights is not None and grad:
                weights[layer] = weight
        bias = base.bias
        if not _autocast_enabled(x.device.type):
            # without autocast the op runs in the input's dtype, as the base layer would
            weight = weight.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        if is_conv:
            return base._conv_forward(x, weight, bias)
        return torch.nn.functional.linear(x, weight, bias)

    return forward


def _base_forward_fn(layer):
    """``layer``'s forward with its adapter off: the base layer alone, what peft's forward runs for a disabled,
    unmerged adapter (``adapter_names``, peft's per-sample adapter choice, means nothing then and is dropped as peft
    drops it)."""
    base = layer.get_base_layer()

    def forward(x, *args, **kwargs):
        kwargs.pop("adapter_names", None)
        return base(x, *args, **kwargs)

    return forward


@contextlib.contextmanager
def adapter_disabled(model):
    """peft's own switch: every adapter of ``model`` off inside the context, back on after."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


class FusedLoRA:
    """The LoRA layers of one adapter of a model, checked and listed once, and two ways to run them that cost one
    attribute per layer to switch on and off (the training step switches several times per step):

    * :meth:`fused`: each layer as ONE linear / conv with ``W + s·B·A`` (the student and the target);
    * :meth:`base`: the adapter off, each layer its base alone (the LoRA trainer's teacher), equal to peft's
      ``disable_adapters()`` without its walk over every module and its ``requires_grad`` switching.

    Raises ``ValueError`` if any layer cannot be fused (see :func:`lora_fusion_blockers`, e.g. ``lora_dropout > 0``);
    callers fall back to peft's forward explicitly.

        fusion = FusedLoRA(unet)
        weights = {}                                  # one step's effective weights
        with fusion.base():
            teacher_out = unet(x, t, encoder_hidden_states=emb).sample
        with fusion.fused(weights):
            loss = loss_fn(unet(x, t, encoder_hidden_states=emb).sample)
        with torch.no_grad(), fusion.fused(weights):  # reuses the student's W + s·B·A
            target = unet(x_prev, s, encoder_hidden_states=emb).sample
        loss.backward()   # may run outside the context: the graph holds the fused ops
    """

    def __init__(self, unet, adapter_name: str = "default"):
        model = unwrap_model(unet)
        blockers = lora_fusion_blockers(model, adapter_name)
        if blockers:
            listed = "; ".join(f"{name}: {why}" for name, why in list(blockers.items())[:5])
            raise ValueError(
                f"adapter {adapter_name!r} cannot run fused in {len(blockers)} layer(s) ({listed}); "
                "use peft's unfused forward for it."
            )
        self.adapter_name = adapter_name
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]
        # base() switches only these layers: any other tuner layer would keep its adapter on
        self._has_other_tuner_layers = sum(isinstance(m, BaseTunerLayer) for m in model.modules()) > len(self.layers)
        self._model = model

    @staticmethod
    def _foreign_forward(layer) -> bool:
        """Whether ``layer.forward`` was replaced by someone else (a hook), not by a context of this class."""
        current = vars(layer).get("forward")
        return current is not None and not hasattr(current, "peft_forward")

    @contextlib.contextmanager
    def _patched(self, make_forward):
        replaced = []
        try:
            for layer in self.layers:
                if self._foreign_forward(layer):
                    continue  # peft's path runs under the hook: unfused, but exact
                current = vars(layer).get("forward")
                peft_forward = current.peft_forward if current is not None else layer.forward
                forward = make_forward(layer, peft_forward)
                forward.peft_forward = peft_forward
                layer.forward = forward
                replaced.append((layer, current))
            yield self._model
        finally:
            for layer, previous in replaced:  # an enclosing context's forward, or the class's (peft's)
                if previous is None:
                    del layer.forward
                else:
                    layer.forward = previous

    def fused(self, weights: dict | None = None):
        """Context: every layer as ONE op with ``W + s·B·A``; ``weights`` shares effective weights between a
        grad-enabled forward and later no-grad ones (drop it whenever lora_A / lora_B change)."""
        return self._patched(lambda layer, peft: _fused_lora_forward_fn(layer, self.adapter_name, peft, weights))

    @contextlib.contextmanager
    def base(self):
        """Context: the adapter off, each layer its base layer alone."""
        if self._has_other_tuner_layers or any(layer.merged or self._foreign_forward(layer) for layer in self.layers):
            # another adapter's layers, a merged adapter to take out of W, or a layer whose forward a hook owns:
            # peft's own switch covers them all
            with adapter_disabled(self._model) as model:
                yield model
            return
        with self._patched(lambda layer, peft: _base_forward_fn(layer)) as model:
            yield model


@contextlib.contextmanager
def fused_lora_forward(unet, adapter_name: str = "default"):
    """Inside this context every LoRA layer of ``adapter_name`` runs as ONE op with the effective weight
    ``W + s·B·A`` built differentiably, instead of peft's three (``base(x) + B(A(x))·s``).

    Same function and same gradients for lora_A / lora_B (up to float rounding); fewer kernels and, for the
    no-grad target forward, fewer FLOPs. Layers whose adapter is disabled (``unet.disable_adapters()``, the LCM
    teacher) run their plain base layer as before. Raises ``ValueError`` if any layer cannot be fused (see
    :func:`lora_fusion_blockers`, e.g. ``lora_dropout > 0``); callers fall back to peft's forward explicitly.
    A loop that enters it often builds one :class:`FusedLoRA` instead (the checks and the layer list once).

        with fused_lora_forward(unet):
            loss = loss_fn(unet(x, t, encoder_hidden_states=emb).sample)
        loss.backward()   # may run outside the context: the graph holds the fused ops
    """

    with FusedLoRA(unet, adapter_name).fused() as model:
        yield model
