"""How a distillation teacher is conditioned, per family: SD 1.x / 2.x (one CLIP encoder's last hidden state) or SDXL
(two encoders' penultimate states concatenated, the pooled embedding and the ``add_time_ids`` micro-conditioning).

The objective only sees a dict of conditioning tensors (what ``encode`` returns and ``--cache_text_embeddings``
stores) and asks for the UNet keyword arguments of a batch; the unconditional branch of classifier-free guidance is
``uncond``. SDXL prompts are encoded by diffusers' own ``StableDiffusionXLPipeline.encode_prompt``, so training and
inference see the same embeddings.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from ..consistency import append_dims


class PromptConditioning:
    """SD 1.x / 2.x: ``{"prompt_embeds"}`` from the text encoder's last hidden state; the unconditional branch is the
    empty prompt's embedding (as diffusers' SD scripts and StableDiffusionPipeline)."""

    family = "sd"

    def __init__(self, tokenizers, text_encoders, device):
        self.tokenizers, self.text_encoders, self.device = list(tokenizers), list(text_encoders), device
        self._uncond = None

    @torch.no_grad()
    def encode(self, captions) -> dict[str, torch.Tensor]:
        tokenizer, text_encoder = self.tokenizers[0], self.text_encoders[0]
        ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(self.device)
        return {"prompt_embeds": text_encoder(ids)[0].float()}

    def uncond(self, batch_size: int) -> dict[str, torch.Tensor]:
        if self._uncond is None:
            self._uncond = self.encode([""])
        return {name: value.expand(batch_size, *value.shape[1:]) for name, value in self._uncond.items()}

    def to(self, device) -> "PromptConditioning":
        """Encode on ``device`` from now on (the unconditional embeddings move along)."""
        self.device = device
        if self._uncond is not None:
            self._uncond = {name: value.to(device) for name, value in self._uncond.items()}
        return self

    def with_empty_prompts(self, cond: dict, empty: torch.Tensor) -> dict:
        """``cond`` with the rows flagged in ``empty`` (a (B,) bool tensor) replaced by the unconditional ones."""
        uncond = self.uncond(empty.shape[0])
        return {name: torch.where(append_dims(empty, value.ndim), uncond[name], value) for name, value in cond.items()}

    def unet_kwargs(self, cond: dict, batch: dict | None = None, dtype=None) -> dict:
        """Keyword arguments of the UNet for conditioning tensors ``cond`` (``batch``: the data batch, unused)."""
        embeds = cond["prompt_embeds"]
        return {"encoder_hidden_states": embeds if dtype is None else embeds.to(dtype)}

    def modules(self) -> list:
        return [*self.text_encoders]


class SDXLPromptConditioning(PromptConditioning):
    """SDXL: ``{"prompt_embeds", "pooled_prompt_embeds"}``; the unconditional branch is zeros (SDXL's
    ``force_zeros_for_empty_prompt``, as diffusers' SDXL distillation scripts); ``add_time_ids`` come from each
    sample's original size and crop corner (``original_sizes`` / ``crop_top_lefts`` in the batch) and the
    training resolution, or ``(resolution, resolution)`` and ``(0, 0)`` with ``use_fix_crop_and_size``."""

    family = "sdxl"

    def __init__(self, tokenizers, text_encoders, device, resolution: int, use_fix_crop_and_size: bool = False):
        super().__init__(tokenizers, text_encoders, device)
        self.resolution, self.use_fix_crop_and_size = int(resolution), bool(use_fix_crop_and_size)
        # A pipeline of the two encoders only: its encode_prompt is the one inference uses.
        self._encoder_pipeline = StableDiffusionXLPipeline(
            vae=None, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
            tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=None, scheduler=None,
            add_watermarker=False,
        )
        self._encoder_pipeline.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def encode(self, captions) -> dict[str, torch.Tensor]:
        prompt_embeds, _, pooled, _ = self._encoder_pipeline.encode_prompt(
            list(captions), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": prompt_embeds.float(), "pooled_prompt_embeds": pooled.float()}

    def uncond(self, batch_size: int) -> dict[str, torch.Tensor]:
        if self._uncond is None:
            self._uncond = {name: torch.zeros_like(value) for name, value in self.encode([""]).items()}
        return {name: value.expand(batch_size, *value.shape[1:]) for name, value in self._uncond.items()}

    def time_ids(self, batch: dict, batch_size: int) -> torch.Tensor:
        """(B, 6) ``original_size + crop_top_left + target_size`` per sample."""
        target = torch.tensor([self.resolution, self.resolution], device=self.device, dtype=torch.float32)
        if self.use_fix_crop_and_size:
            fixed = torch.cat([target, torch.zeros(2, device=self.device), target])
            return fixed.expand(batch_size, 6)
        missing = [key for key in ("original_sizes", "crop_top_lefts") if key not in batch]
        if missing:
            raise ValueError(f"an SDXL batch needs the micro-conditioning {missing} (from the data loader or the "
                             f"encoded cache), got keys {sorted(batch)}; or pass --use_fix_crop_and_size.")
        sizes = batch["original_sizes"].to(self.device, torch.float32)
        crops = batch["crop_top_lefts"].to(self.device, torch.float32)
        return torch.cat([sizes, crops, target.expand(batch_size, 2)], dim=1)

    def unet_kwargs(self, cond: dict, batch: dict | None = None, dtype=None) -> dict:
        embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        time_ids = cond.get("time_ids")
        if time_ids is None:
            time_ids = self.time_ids(batch or {}, embeds.shape[0])
        if dtype is not None:
            embeds, pooled, time_ids = embeds.to(dtype), pooled.to(dtype), time_ids.to(dtype)
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def prompt_conditioning(components: dict, device, resolution: int, use_fix_crop_and_size: bool = False):
    """The conditioning of a teacher's components (SDXL when they hold ``text_encoder_2``)."""
    if components.get("text_encoder_2") is not None:
        return SDXLPromptConditioning([components["tokenizer"], components["tokenizer_2"]],
                                      [components["text_encoder"], components["text_encoder_2"]], device,
                                      resolution, use_fix_crop_and_size)
    return PromptConditioning([components["tokenizer"]], [components["text_encoder"]], device)
