"""Small helpers every layer shares: unwrapping, EMA, the device / dtype policy, latent sampling, atomic writes.

Nothing here knows about consistency models; :mod:`lcm_kit.consistency` holds the math.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import save_file

DTYPES = ("auto", "float32", "float16", "bfloat16")


def unwrap_model(model):
    """The module under DDP / DataParallel / DeepSpeed / ``torch.compile`` wrappers (accelerate's
    ``extract_model_from_parallel``). The mixed-precision forward wrapper is kept: unwrapping must not change how
    the module runs for the caller that still holds the wrapped one."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)


@torch.no_grad()
def ema_update_(target: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    """``target <- decay * target + (1 - decay) * online`` for every parameter (decay 0 copies ``online``).

    One lerp over a live module rather than diffusers' ``EMAModel``: the target networks of LCM / CD / CT run a
    forward at every step (``EMAModel`` keeps detached shadow tensors, not a module), and their decay must be
    exactly the paper's (CT's mu(k), LCM's fixed 0.95), where ``EMAModel.get_decay`` returns 0 at its first step
    and caps the decay at ``(1 + k) / (10 + k)``.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}.")
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError(
            f"target and online models must have the same parameters, got {len(target_params)} and "
            f"{len(online_params)}."
        )
    torch._foreach_lerp_(target_params, [p.detach().to(t.dtype) for p, t in zip(online_params, target_params)],
                         1.0 - decay)


def resolve_device(device: str | None = None) -> str:
    """``None`` / ``"auto"`` -> ``"cuda"`` if available, else ``"mps"`` if available, else ``"cpu"``."""
    if device not in (None, "auto"):
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``"auto"`` -> float16 on CUDA (the usual inference precision), float32 elsewhere; a name from
    :data:`DTYPES` or a ``torch.dtype`` is returned as that dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    return getattr(torch, dtype)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 kernels natively (AVX-512 bf16 or AMX, as oneDNN reports it); without them torch
    emulates bf16 and a bf16 convolution is an order of magnitude slower than the fp32 one."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def dtype_kwarg() -> str:
    """The name of ``from_pretrained``'s dtype argument: ``dtype`` in diffusers releases that renamed it (the old
    ``torch_dtype`` now warns), ``torch_dtype`` in older ones."""
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None,
                   scaling_factor: float, shift_factor: float | None = None) -> torch.Tensor:
    """A VAE latent drawn from its posterior ``N(mean, std^2)`` with ``generator``, shifted and scaled the way the
    diffusion model sees latents: ``(mean + std * z - shift_factor) * scaling_factor``. ``z`` is drawn as diffusers'
    ``DiagonalGaussianDistribution.sample`` draws it (on the generator's device, then moved)."""

    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise - (shift_factor or 0.0)) * scaling_factor


def check_exactly_one(**named: Any) -> str:
    """The name of the one argument that is not ``None``; ``ValueError`` naming them all otherwise."""
    given = [name for name, value in named.items() if value is not None]
    if len(given) != 1:
        quoted = [f"`{name}`" for name in named]
        names = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        received = ", ".join(f"{name}={named[name]!r}" for name in given)
        got = "neither" if not given else f"several ({received})"
        raise ValueError(f"Pass exactly one of {names}; got {got}.")
    return given[0]


def atomic_save_file(tensors: Mapping[str, torch.Tensor], file: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file under a temporary name in the same folder, then rename it: a crash never leaves
    half a file under ``file``."""

    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata) if metadata is not None else None)
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return file


def captioned_grid(images, captions=None, cols: int | None = None, caption_height: int = 14):
    """One PIL image of ``images`` in rows of ``cols`` (default: all in one row), each with its caption (default:
    ``image.info["caption"]`` when set) written in a strip below it, clipped to the tile's width."""
    from PIL import Image, ImageDraw, ImageFont

    images = [image.convert("RGB") for image in images]
    if not images:
        raise ValueError("images must hold at least one image.")
    if captions is None:
        captions = [image.info.get("caption") for image in images]
    if len(captions) != len(images):
        raise ValueError(f"captions has {len(captions)} entries for {len(images)} images.")
    cols = cols or len(images)
    width, height = images[0].size
    strip = caption_height if any(captions) else 0
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * width, rows * (height + strip)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for index, (image, caption) in enumerate(zip(images, captions)):
        x, y = (index % cols) * width, (index // cols) * (height + strip)
        grid.paste(image.resize((width, height)) if image.size != (width, height) else image, (x, y))
        if caption:
            text = str(caption)
            while text and draw.textlength(text, font=font) > width - 2:
                text = text[:-1]
            draw.text((x + 1, y + height + 1), text, fill="black", font=font)
    return grid
