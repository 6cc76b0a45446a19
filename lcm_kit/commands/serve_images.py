"""Drawing one image for ``lcm-kit serve``: a checked request in, the pipeline's image out as PNG bytes.

The call is exactly the one ``lcm-kit generate`` makes (a CPU generator seeded with the request's seed, then
``pipe(prompt=..., num_inference_steps=..., guidance_scale=..., height=..., width=...)``), so the page shows what
``LCMPipeline`` gives for the same settings; PNG keeps every pixel, so the page can be checked against it.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import PIL.Image
import torch

from .serve_requests import GenerateRequest, RequestError


@dataclass(frozen=True)
class RenderJob:
    """A request and, for image-to-image, the image its page uploaded."""

    request: GenerateRequest
    image: PIL.Image.Image | None = None


@dataclass(frozen=True)
class RenderedImage:
    id: int
    png: bytes
    width: int
    height: int
    ms: float  # the pipeline call and the PNG encoding, as the page shows it


def encode_png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless at any level; 1 is the fastest
    return buffer.getvalue()


def shrink_to_fit(image: PIL.Image.Image, max_side: int) -> PIL.Image.Image:
    """``image`` itself when both sides are at most ``max_side``, else a Lanczos-reduced copy whose longer side is
    ``max_side`` (aspect kept). Why: the pipeline resizes the upload to the request's size on every keystroke, and a
    12-megapixel photo would make each of those resizes, and the memory a page holds, large for nothing."""
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, PIL.Image.LANCZOS)


class ImageRenderer:
    """``renderer(job) -> RenderedImage`` with one loaded pipeline; called by the single worker thread only."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, job: RenderJob) -> RenderedImage:
        request = job.request
        start = time.perf_counter()
        kwargs = {}
        if request.img2img:
            if job.image is None:
                raise RequestError("image", "image: none uploaded; choose a PNG, JPEG or WebP file for img2img")
            kwargs = {"image": job.image, "strength": request.strength}
        image = self.pipe(
            prompt=request.prompt,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            height=request.height,
            width=request.width,
            # A CPU generator gives the same image for a seed on every device (diffusers draws on CPU, then moves).
            generator=torch.Generator("cpu").manual_seed(request.seed),
            **kwargs,
        ).images[0]
        png = encode_png(image)
        return RenderedImage(request.id, png, image.width, image.height, (time.perf_counter() - start) * 1000)
