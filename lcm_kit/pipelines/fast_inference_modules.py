"""The module side of :mod:`lcm_kit.pipelines.fast_inference`: what ``enable_fast_inference`` asked for, the state
it keeps, and how it brings the pipeline's modules into shape (dtype, SDPA, channels_last, compiled forwards, LoRA and
QKV fusion) and back, bit for bit."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from peft.tuners.tuners_utils import BaseTunerLayer

LORA_COMPONENTS = ("unet", "text_encoder")

@dataclass
class FastSettings:
    """What the user asked for; ``None`` means "the default for the device the pipeline is on"."""

    dtype: torch.dtype | None
    compile: bool | None
    compile_mode: str | None
    backend: str | Callable
    fullgraph: bool
    channels_last: bool | None
    fuse_qkv: bool | None
    fuse_lora: bool
    lora_scale: float
    vae: torch.nn.Module | None
    prompt_cache_size: int

    def resolved(self, device: torch.device) -> dict:
        cuda = device.type == "cuda"
        compile_ = cuda if self.compile is None else self.compile
        mode = self.compile_mode
        if mode is None and self.backend == "inductor":
            mode = "reduce-overhead" if cuda else "default"
        return dict(
            compile=compile_,
            compile_mode=mode,
            channels_last=cuda if self.channels_last is None else self.channels_last,
            fuse_qkv=cuda if self.fuse_qkv is None else self.fuse_qkv,
            # CUDA graphs keep their outputs in static buffers that the next replay overwrites.
            cudagraphs=compile_ and cuda and self.backend == "inductor" and mode in ("reduce-overhead", "max-autotune"),
        )


@dataclass
class FastSchedule:
    """One schedule's constants: device timesteps for the UNet, CPU 0-d alphas / scalings for the step."""

    scheduler: Any
    config: Any
    timesteps: torch.Tensor  # on the device, as the eager loop passes them
    alphas: list[torch.Tensor]
    alphas_prev: list[torch.Tensor | None]
    c_skip: list[torch.Tensor]
    c_out: list[torch.Tensor]


@dataclass
class FusedLoRAState:
    components: list[str]
    weights: list[tuple[torch.Tensor, torch.Tensor]]  # (parameter, CPU copy before fusing)
    scalings: list[tuple[BaseTunerLayer, dict]]  # diffusers' fuse_lora(lora_scale != 1) rescales and never unscales


@dataclass
class FastState:
    settings: FastSettings
    structure: tuple | None = None
    dirty: bool = True
    resolved: dict = field(default_factory=dict)
    original_dtypes: dict = field(default_factory=dict)  # component name -> (module, dtype)
    channels_last_modules: list = field(default_factory=list)
    attn_processors: list = field(default_factory=list)  # (module, processors before SDPA was set)
    fused: FusedLoRAState | None = None
    device: torch.device | None = None
    hooked: bool = False  # offloading hooks found below the top modules
    fused_qkv: list = field(default_factory=list)  # (module, its Attention modules, had original_attn_processors)
    unet_fn: Callable | None = None
    decode_fn: Callable | None = None
    decoder: torch.nn.Module | None = None
    prompt_cache: OrderedDict = field(default_factory=OrderedDict)
    schedules: OrderedDict = field(default_factory=OrderedDict)
    w_embeddings: OrderedDict = field(default_factory=OrderedDict)
    stats: dict = field(default_factory=lambda: dict(fast_calls=0, fallbacks={}, prompt_cache_hits=0,
                                                       prompt_cache_misses=0))


class VAEDecode(torch.nn.Module):
    """``vae.decode(latents)[0]`` as a module, so torch.compile guards on the VAE like on any submodule."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def cache_put(cache: OrderedDict, key, value, size: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)


def cache_get(cache: OrderedDict, key):
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def hashable(value):
    return tuple(value) if isinstance(value, list) else value


def peft_adapters(model) -> tuple:
    config = getattr(model, "peft_config", None) or {}
    return tuple((name, id(cfg)) for name, cfg in config.items())


def tuner_layers(model) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)] if model is not None else []


def unmerged_lora(layer) -> bool:
    """A peft layer whose active adapter runs beside the base weight (fusing q/k/v would drop it)."""
    return isinstance(layer, BaseTunerLayer) and bool(layer.active_adapters) and not layer.merged and (
        not layer.disable_adapters
    )


def modules_key(structure: tuple) -> tuple:
    """The part of :meth:`FastInferenceMixin._fast_structure` that needs the module settings re-applied: the
    components themselves and the device (an adapter change only needs re-fusing and new caches)."""
    return structure[:4] + structure[-1:]


def has_offload_hooks(module, recurse: bool = False) -> bool:
    """Offloading hooks (accelerate's, which diffusers' ``remove_all_hooks`` also finds on the top module, or
    diffusers' own group offloading): they move weights around every forward, which compiled graphs cannot follow."""
    modules = module.modules() if recurse and isinstance(module, torch.nn.Module) else [module]
    return any(hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook") for m in modules)


# diffusers' ``ModelMixin.device`` / ``.dtype`` look for group-offloading hooks in every submodule on each access
# (see execution_device.py). Without hooks (which the fast path checks when the modules change) the first parameter
# says the same.
def param_device(module) -> torch.device:
    return next(module.parameters()).device


def param_dtype(module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


class FastInferenceModules:
    """The module state of the fast path (see :class:`~lcm_kit.pipelines.fast_inference.FastInferenceMixin`, which
    subclasses it): re-applied when the components change, undone by ``disable_fast_inference``."""

    _fast_state: FastState | None = None

    def _fast_structure(self) -> tuple:
        """What, when it changes, makes the fast path re-apply its settings and drop its caches."""
        tokenizer = getattr(self, "tokenizer", None)
        return (
            id(self.unet), id(self.vae), id(self.text_encoder), id(tokenizer),
            len(tokenizer) if tokenizer is not None else 0,
            peft_adapters(self.unet), peft_adapters(self.text_encoder), param_device(self.unet),
        )

    def _fast_sync(self) -> None:
        """Bring modules, fusion and caches in line with the pipeline as it is now (cheap when nothing changed)."""
        state = self._fast_state
        structure = self._fast_structure()
        if structure == state.structure and not state.dirty:
            return
        self._fast_release_weights()
        state.device = structure[-1]
        components = ("unet", "vae", "text_encoder")
        state.hooked = any(has_offload_hooks(getattr(self, name, None), recurse=True) for name in components)
        if state.hooked:
            state.dirty = True  # look again on the next call
            return
        if state.structure is None or modules_key(structure) != modules_key(state.structure):
            self._fast_restore_modules()
            self._fast_apply_modules()
        state.prompt_cache.clear()
        state.schedules.clear()
        state.w_embeddings.clear()
        if state.settings.fuse_lora:
            self._fast_fuse_lora()
        self._fast_fuse_qkv()
        state.structure = self._fast_structure()
        state.dirty = False

    def _fast_components(self) -> dict:
        return {name: module for name, module in self.components.items() if isinstance(module, torch.nn.Module)}

    def _fast_apply_modules(self) -> None:
        state = self._fast_state
        settings = state.settings
        device = state.device
        state.resolved = resolved = settings.resolved(device)
        dtype = settings.dtype
        if dtype is None and device.type == "cuda" and param_dtype(self.unet) == torch.float32:
            dtype = torch.float16
        decoder = settings.vae if settings.vae is not None else self.vae
        modules = dict(self._fast_components())
        if settings.vae is not None:
            modules["fast_inference_vae"] = settings.vae
            settings.vae.to(device=device)
        if dtype is not None:
            for name, module in modules.items():
                module_dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
                if module_dtype is not None and module_dtype != dtype:
                    state.original_dtypes[name] = (module, module_dtype)
                    module.to(dtype=dtype)
        elif settings.vae is not None:
            settings.vae.to(dtype=param_dtype(self.unet))
        for module in (self.unet, decoder):
            if hasattr(module, "attn_processors"):
                processors = module.attn_processors
                if processors and all(type(p) in (AttnProcessor, AttnProcessor2_0) for p in processors.values()):
                    if any(type(p) is AttnProcessor for p in processors.values()):
                        state.attn_processors.append((module, processors))
                        module.set_attn_processor(AttnProcessor2_0())
        if resolved["channels_last"]:
            for module in (self.unet, decoder):
                module.to(memory_format=torch.channels_last)
                state.channels_last_modules.append(module)
        state.decoder = decoder
        state.unet_fn, state.decode_fn = self.unet, VAEDecode(decoder)
        if resolved["compile"]:
            options = dict(backend=settings.backend, fullgraph=settings.fullgraph, dynamic=False)
            if resolved["compile_mode"] is not None:
                options["mode"] = resolved["compile_mode"]
            state.unet_fn = torch.compile(self.unet, **options)
            state.decode_fn = torch.compile(state.decode_fn, **options)

    def _fast_restore_modules(self) -> None:
        state = self._fast_state
        for module, processors in reversed(state.attn_processors):
            module.set_attn_processor(processors)
        for module in state.channels_last_modules:
            module.to(memory_format=torch.contiguous_format)
        for module, module_dtype in state.original_dtypes.values():
            module.to(dtype=module_dtype)
        state.attn_processors, state.channels_last_modules, state.original_dtypes = [], [], {}
        state.unet_fn = state.decode_fn = state.decoder = None

    def _fast_fuse_lora(self) -> None:
        """Fuse the active, enabled adapters of the UNet and text encoder, keeping what is needed to undo it."""
        state = self._fast_state
        components, weights, scalings = [], [], []
        for name in LORA_COMPONENTS:
            layers = tuner_layers(getattr(self, name, None))
            active = [m for m in layers if m.active_adapters and not m.merged]
            if not active or any(m.disable_adapters for m in layers):
                continue
            components.append(name)
            for layer in active:
                scalings.append((layer, dict(layer.scaling)))
                base = layer.get_base_layer()
                for param in (base.weight, getattr(base, "bias", None)):
                    if param is not None:
                        weights.append((param, param.detach().to("cpu", copy=True)))
        if not components:
            return
        super().fuse_lora(components=components, lora_scale=state.settings.lora_scale)
        state.fused = FusedLoRAState(components, weights, scalings)

    def _fast_fuse_qkv(self) -> None:
        state = self._fast_state
        if not state.resolved["fuse_qkv"]:
            return
        for module in (self.unet, state.decoder):
            if not hasattr(module, "fuse_qkv_projections"):
                continue
            processors = module.attn_processors
            if not processors or any(type(p) is not AttnProcessor2_0 for p in processors.values()):
                continue
            attentions = [m for m in module.modules() if isinstance(m, Attention)]
            if any(unmerged_lora(getattr(a, name, None)) for a in attentions for name in ("to_q", "to_k", "to_v")):
                continue
            had_attribute = "original_attn_processors" in vars(module)
            module.fuse_qkv_projections()
            state.fused_qkv.append((module, attentions, had_attribute))

    def _fast_unfuse_qkv(self) -> None:
        """diffusers' ``unfuse_qkv_projections`` only switches the processors back; the fused projections it made
        are removed too, so the modules hold exactly what they held before."""
        state = self._fast_state
        for module, attentions, had_attribute in reversed(state.fused_qkv):
            module.unfuse_qkv_projections()
            for attention in attentions:
                for name in ("to_qkv", "to_kv", "to_added_qkv"):
                    if hasattr(attention, name):
                        delattr(attention, name)
                attention.fused_projections = False
            if not had_attribute:
                del module.original_attn_processors
        state.fused_qkv = []

    def _fast_release_weights(self) -> None:
        """Undo QKV and LoRA fusion (before a LoRA change, or when the modules change)."""
        if self._fast_state is not None:
            self._fast_unfuse_qkv()
            self._fast_restore_lora()

    def _fast_restore_lora(self) -> None:
        """Undo the fast path's fusion exactly: diffusers' ``unfuse_lora`` subtracts the delta again, which does not
        give the original bits back, so the saved weights and LoRA scalings are copied in after it."""
        state = self._fast_state
        if state is None or state.fused is None:
            return
        fused, state.fused = state.fused, None
        super().unfuse_lora(components=fused.components)
        with torch.no_grad():
            for param, saved in fused.weights:
                param.copy_(saved)
        for layer, scaling in fused.scalings:
            layer.scaling.clear()
            layer.scaling.update(scaling)
