"""lcm-kit's pipelines answer ``device`` and ``_execution_device`` exactly as diffusers' ``DiffusionPipeline`` does,
with group offloading, accelerate hooks and split devices, so the cheaper walk changes no call."""

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from diffusers import UNet2DModel
from diffusers.hooks import apply_group_offloading
from diffusers.hooks.group_offloading import _GROUP_OFFLOADING
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from lcm_kit.pipelines import CMPipeline, LCMPipeline, LCMXLPipeline
from lcm_kit.pipelines.execution_device import group_onload_device
from lcm_kit.schedulers.scheduling_cm import CMMultistepScheduler
from lcm_kit.testing import tiny_sd_components

META = torch.device("meta")


def diffusers_answers(pipe) -> tuple:
    return DiffusionPipeline.device.fget(pipe), DiffusionPipeline._execution_device.fget(pipe)


def build(kind: str):
    if kind == "sd1":
        return LCMPipeline(**tiny_sd_components("sd1"), requires_safety_checker=False)
    if kind == "sdxl":
        return LCMXLPipeline(**tiny_sd_components("sdxl"))
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       layers_per_block=1, norm_num_groups=8)
    return CMPipeline(unet=unet, scheduler=CMMultistepScheduler())


class ExecutionDeviceHook(ModelHook):
    def __init__(self, execution_device):
        self.execution_device = execution_device


def on_cpu(pipe):
    return pipe


def vae_on_meta(pipe):
    if getattr(pipe, "vae", None) is None:
        pipe.unet.to(META)
    else:
        pipe.vae.to(META)
    return pipe


def all_on_meta(pipe):
    return pipe.to(META)


def group_offload_to_meta(module):
    """diffusers' block-level group offloading, its hooks then told to onload to "meta" (CPU-only torch cannot
    apply them with a meta onload device): only the hooks say where the module computes."""
    cpu = torch.device("cpu")
    apply_group_offloading(module, onload_device=cpu, offload_device=cpu, offload_type="block_level",
                           num_blocks_per_group=1)
    for submodule in module.modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        hook = registry.get_hook(_GROUP_OFFLOADING) if registry is not None else None
        if hook is not None:
            hook.config.onload_device = META


def unet_group_offloaded_to_meta(pipe):
    group_offload_to_meta(pipe.unet)
    return pipe


def accelerate_hooks_without_device(pipe):
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            add_hook_to_module(module, ModelHook())
    return pipe


def accelerate_hooks_inside(pipe):
    # A hook without an execution device on every component, and one deeper in the UNet that names "meta".
    accelerate_hooks_without_device(pipe)
    add_hook_to_module(pipe.unet.conv_in, ExecutionDeviceHook("meta"))
    return pipe


SETUPS = [on_cpu, vae_on_meta, all_on_meta, unet_group_offloaded_to_meta, accelerate_hooks_inside,
          accelerate_hooks_without_device]


@pytest.mark.parametrize("setup", SETUPS, ids=[s.__name__ for s in SETUPS])
@pytest.mark.parametrize("kind", ["sd1", "sdxl", "cm"])
def test_device_and_execution_device_are_diffusers_answers(kind, setup):
    pipe = setup(build(kind))
    assert (pipe.device, pipe._execution_device) == diffusers_answers(pipe)


def test_the_setups_give_different_answers():
    """Each setup is a case of its own: the hooks and the split move the answer away from the CPU, so a walk that
    missed them would fail the comparison above."""
    answers = {setup.__name__: diffusers_answers(setup(build("sd1"))) for setup in SETUPS}
    assert answers["on_cpu"] == (torch.device("cpu"), torch.device("cpu"))
    assert answers["unet_group_offloaded_to_meta"][1] == META
    assert answers["accelerate_hooks_inside"][1] == META
    assert answers["all_on_meta"] == (META, META)


def test_group_onload_device_finds_the_first_hook_in_module_order():
    pipe = build("sd1")
    assert group_onload_device(pipe.unet) is None
    group_offload_to_meta(pipe.unet.up_blocks)
    assert group_onload_device(pipe.unet) == META
    assert group_onload_device(pipe.unet.down_blocks) is None


def test_removed_hooks_are_no_longer_seen():
    pipe = accelerate_hooks_inside(build("sd1"))
    assert pipe._execution_device == META
    for module in pipe.unet.modules():
        remove_hook_from_module(module)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            remove_hook_from_module(module)
    assert pipe._execution_device == torch.device("cpu") == diffusers_answers(pipe)[1]
