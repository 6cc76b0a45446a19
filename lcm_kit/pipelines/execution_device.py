"""``pipe.device`` and ``pipe._execution_device`` for lcm-kit's pipelines: diffusers' answers, found with one walk
over each component's modules.

diffusers' ``DiffusionPipeline._execution_device`` looks for group-offloading hooks with ``hasattr`` on every submodule
of every component (``_get_group_onload_device``, which raises and catches per component), and then
``DiffusionPipeline.device`` walks the UNet and the VAE again inside each ``ModelMixin.device``. Each ``hasattr`` that
misses goes through ``nn.Module.__getattr__`` and an exception, a few percent of a four-step call on a CPU
(benchmarks/RESULTS.md). The walk below reads each module's ``__dict__`` instead and keeps diffusers' order and rules,
so every answer is diffusers' own (tested against it with and without offloading hooks).
"""

from __future__ import annotations

import itertools

import torch
from diffusers.hooks.group_offloading import _GROUP_OFFLOADING
from diffusers.models.modeling_utils import ModelMixin


def group_onload_device(module: torch.nn.Module) -> torch.device | None:
    """The onload device of the first group-offloading hook in ``module.modules()`` order (what diffusers'
    ``_get_group_onload_device`` returns), or ``None`` when the module has none."""
    stack, seen = [module], set()
    while stack:
        submodule = stack.pop()
        if id(submodule) in seen:
            continue
        seen.add(id(submodule))
        registry = submodule.__dict__.get("_diffusers_hook")
        if registry is not None:
            hook = registry.get_hook(_GROUP_OFFLOADING)
            if hook is not None:
                return hook.config.onload_device
        # reversed, so that the pop order is modules()'s pre-order
        stack.extend(child for child in reversed(submodule._modules.values()) if child is not None)
    return None


def component_device(module: torch.nn.Module) -> torch.device:
    """``module.device`` as diffusers' ``ModelMixin.device`` computes it (group-offloading onload device, else the
    first parameter or buffer); other modules answer for themselves."""
    if isinstance(module, ModelMixin):
        onload_device = group_onload_device(module)
        if onload_device is not None:
            return onload_device
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            return tensor.device
    return module.device


class ExecutionDeviceMixin:
    """Mixed in before the diffusers pipeline class: the same ``device`` and ``_execution_device``, cheaper."""

    @property
    def device(self) -> torch.device:
        """The device the pipeline is on: the first component off the CPU and the meta device, else the first
        component's (diffusers' ``DiffusionPipeline.device``)."""
        module_names, _ = self._get_signature_keys(self)
        first = None
        for name in module_names:
            module = getattr(self, name, None)
            if not isinstance(module, torch.nn.Module):
                continue
            device = component_device(module)
            if device.type not in ("cpu", "meta"):
                return device
            if first is None:
                first = device
        return first if first is not None else torch.device("cpu")

    @property
    def _execution_device(self) -> torch.device:
        """The device the models run on: a group-offloading onload device, an accelerate hook's execution device,
        else :attr:`device` (diffusers' ``DiffusionPipeline._execution_device``)."""
        modules = [(name, model) for name, model in self.components.items() if isinstance(model, torch.nn.Module)]
        for _, model in modules:
            onload_device = group_onload_device(model)
            if onload_device is not None:
                return onload_device
        for name, model in modules:
            if name in self._exclude_from_cpu_offload:
                continue
            if not hasattr(model, "_hf_hook"):
                return self.device
            for submodule in model.modules():
                hook = getattr(submodule, "_hf_hook", None)
                if hook is not None and getattr(hook, "execution_device", None) is not None:
                    return torch.device(hook.execution_device)
        return self.device
