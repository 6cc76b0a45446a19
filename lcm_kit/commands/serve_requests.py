"""What a page of ``lcm-kit serve`` may ask for: the checked form of a generation request and of an uploaded image.

Every check answers with a :class:`RequestError` whose message names the field, the value received and what is
allowed (``steps: got '12', allowed 1–8``); the page shows it and the server goes on. A request names no file: its
fields are numbers, text and a flag, and an image arrives as the bytes of an upload, never as a path.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import asdict, dataclass

import PIL.Image

from ..argtypes import MAX_SEED

MAX_STEPS = 8  # the range where consistency sampling is useful; more steps only cost time
MAX_PROMPT_CHARS = 500  # CLIP reads 77 tokens; a longer text is a mistake or an attempt to tie up the tokenizer
GUIDANCE_RANGE = (0.0, 15.0)  # covers LCM-LoRA (1–2), a plain teacher (3–8) and distilled LCMs (w + 1 = 8.5)
SIZE_MULTIPLE = 8  # the VAE scale factor of SD 1.x / 2.x / XL; the digits teacher's (4) divides it
MIN_SIDE = 8
DEFAULT_STRENGTH = 0.5  # img2img: half the image is re-noised, so the prompt shows and the picture stays
MAX_UPLOAD_BYTES = 4 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096  # checked from the header before decoding: a small file can claim a huge image
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")  # told apart by PIL from the file's magic bytes, never from a name

REQUEST_FIELDS = ("type", "id", "prompt", "steps", "guidance", "seed", "width", "height", "img2img", "strength")


class RequestError(ValueError):
    """A request or upload the server refuses; ``field`` names what is wrong (``None``: the message as a whole)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ServeLimits:
    """The ranges a request must keep to, sent to the page so its inputs show them."""

    default_guidance: float
    default_side: int  # the model's native size
    max_side: int
    max_steps: int = MAX_STEPS
    max_prompt_chars: int = MAX_PROMPT_CHARS
    min_guidance: float = GUIDANCE_RANGE[0]
    max_guidance: float = GUIDANCE_RANGE[1]
    min_side: int = MIN_SIDE
    size_multiple: int = SIZE_MULTIPLE
    default_strength: float = DEFAULT_STRENGTH
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_upload_pixels: int = MAX_UPLOAD_PIXELS

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GenerateRequest:
    """One image to draw: what ``LCMPipeline.__call__`` gets (``generator`` seeded on the CPU with ``seed``)."""

    id: int
    prompt: str
    steps: int
    guidance: float
    seed: int
    width: int
    height: int
    img2img: bool = False
    strength: float = DEFAULT_STRENGTH


def limits_for(pipe, max_side: int | None = None, default_guidance: float | None = None) -> ServeLimits:
    """The limits for ``pipe``: its native size (the UNet's sample size times the VAE factor), sides up to
    ``max_side`` (default: twice the native side), the page's first guidance ``default_guidance`` (default:
    :attr:`LCMPipeline.default_guidance_scale`)."""
    native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    max_side = 2 * native if max_side is None else max_side
    if max_side < native:
        raise ValueError(f"must be at least the model's native size {native}, got {max_side}")
    if default_guidance is None:
        default_guidance = float(pipe.default_guidance_scale)
    if not GUIDANCE_RANGE[0] <= default_guidance <= GUIDANCE_RANGE[1]:
        raise ValueError(f"must be in {GUIDANCE_RANGE[0]:g}–{GUIDANCE_RANGE[1]:g}, got {default_guidance:g}")
    return ServeLimits(default_guidance=float(default_guidance), default_side=native, max_side=max_side)


def _shown(value) -> str:
    """A received value as the user typed it (``12``), quoted when that would hide something (``''``, ``' 4'``)."""
    if isinstance(value, str) and value and value.strip() == value and value.isprintable() and "'" not in value:
        text = value
    else:
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(field: str, value, low: int, high: int, multiple: int = 1) -> int:
    allowed = f"{low}–{high}" + (f", a multiple of {multiple}" if multiple > 1 else "")
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdecimal():  # what an HTML number input sends, as typed
        number = int(value.strip())
    if number is None or not low <= number <= high or number % multiple:
        raise RequestError(field, f"{field}: got {_shown(value)}, allowed {allowed}")
    return number


def _number(field: str, value, low: float, high: float, low_open: bool = False) -> float:
    allowed = f"more than {low:g} and at most {high:g}" if low_open else f"{low:g}–{high:g}"
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and value.strip():
        try:
            number = float(value)
        except ValueError:
            number = None
    # NaN and inf parse (float("nan"), JSON's NaN), and every comparison with NaN is False.
    if number is None or not math.isfinite(number) or not (low < number if low_open else low <= number) or (
        number > high
    ):
        raise RequestError(field, f"{field}: got {_shown(value)}, allowed {allowed}")
    return number


def parse_message(text: str) -> dict:
    """A websocket text frame as a JSON object, or a RequestError saying why not."""
    try:
        message = json.loads(text)
    except ValueError:
        raise RequestError(None, f"request: not JSON (got {_shown(text)})") from None
    if not isinstance(message, dict):
        raise RequestError(None, f"request: must be a JSON object, got {type(message).__name__}")
    return message


def parse_generate_request(message: dict, limits: ServeLimits) -> GenerateRequest:
    """The checked :class:`GenerateRequest` of a ``{"type": "generate", ...}`` message; fields left out take the
    defaults (empty prompt, 4 steps, the model's guidance and size, seed 0, text-to-image). Numbers may come as
    JSON numbers or as the strings an HTML input holds. Unknown fields are refused, so nothing is silently
    ignored and no field can smuggle in a path."""
    unknown = sorted(set(message) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"{unknown[0]}: unknown field; allowed fields: {', '.join(REQUEST_FIELDS)}")
    if message.get("type", "generate") != "generate":
        raise RequestError("type", f"type: got {_shown(message.get('type'))}, allowed 'generate'")
    request_id = _integer("id", message.get("id", 0), 0, 2**53 - 1)  # the page counts with JS numbers
    prompt = message.get("prompt", "")
    if not isinstance(prompt, str):
        raise RequestError("prompt", f"prompt: got {type(prompt).__name__}, allowed text")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError("prompt", f"prompt: got {len(prompt)} characters, allowed up to {limits.max_prompt_chars}")
    img2img = message.get("img2img", False)
    if not isinstance(img2img, bool):
        raise RequestError("img2img", f"img2img: got {_shown(img2img)}, allowed true or false")
    side = {"low": limits.min_side, "high": limits.max_side, "multiple": limits.size_multiple}
    return GenerateRequest(
        id=request_id,
        prompt=prompt,
        steps=_integer("steps", message.get("steps", 4), 1, limits.max_steps),
        guidance=_number("guidance", message.get("guidance", limits.default_guidance), limits.min_guidance,
                         limits.max_guidance),
        seed=_integer("seed", message.get("seed", 0), 0, MAX_SEED),
        width=_integer("width", message.get("width", limits.default_side), **side),
        height=_integer("height", message.get("height", limits.default_side), **side),
        img2img=img2img,
        strength=_number("strength", message.get("strength", limits.default_strength), 0.0, 1.0, low_open=True),
    )


def decode_upload(data: bytes, limits: ServeLimits) -> PIL.Image.Image:
    """An uploaded image as RGB: at most ``max_upload_bytes``, a PNG, JPEG or WebP by its magic bytes (PIL's
    detection, not a file name), at most ``max_upload_pixels`` as its header says, checked before decoding (a
    decompression bomb is refused without being decompressed), and decoding completely."""
    megabytes = limits.max_upload_bytes / 2**20
    if len(data) > limits.max_upload_bytes:
        raise RequestError("image", f"image: got {len(data):,} bytes, allowed up to {megabytes:g} MiB")
    if not data:
        raise RequestError("image", "image: got an empty file, allowed a PNG, JPEG or WebP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning):
        raise RequestError("image", "image: its header claims far more pixels than allowed (up to "
                                    f"{limits.max_upload_pixels:,} pixels); refused without decoding") from None
    except (PIL.UnidentifiedImageError, OSError, ValueError):
        raise RequestError("image", f"image: not a PNG, JPEG or WebP file (it starts with {data[:8]!r}); allowed "
                                    "PNG, JPEG or WebP") from None
    with image:
        width, height = image.size
        if width * height > limits.max_upload_pixels:
            raise RequestError("image", f"image: got {width}x{height} pixels, allowed up to "
                                        f"{limits.max_upload_pixels:,} pixels")
        if min(width, height) < limits.min_side:
            raise RequestError("image", f"image: got {width}x{height} pixels, allowed at least "
                                        f"{limits.min_side} on each side")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
                image.load()
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                # transparency over white, as LCMPipeline does with an RGBA image
                rgba = image.convert("RGBA")
                white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return PIL.Image.alpha_composite(white, rgba).convert("RGB")
            return image.convert("RGB")
        except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombWarning,
                PIL.Image.DecompressionBombError) as err:
            raise RequestError("image", f"image: the {image.format} file is damaged ({err})") from None
