"""PCM's latent discriminator: the frozen teacher UNet's block features under small trainable heads.

Phased Consistency Models (arXiv 2405.18407) judge latents with a discriminator built from the teacher diffusion
model itself: the teacher UNet, frozen, reads a noisy latent at a timestep under the prompt, and light trainable heads
turn the hidden states of its down, mid and up blocks into patch logits. Only the heads train, with their own
optimiser; they are never part of the distilled model.

* :func:`unet_block_features` collects those hidden states through forward hooks (the UNet's own forward runs: no
  copy of diffusers' forward);
* :class:`DiscriminatorHeads` is the trainable part (one conv head per feature map);
* :class:`TrainableDiscriminator` holds the heads, their AdamW, the step and the checkpoint tensors.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
from torch import nn


def unet_feature_channels(unet) -> list[int]:
    """Channels of the hidden states :func:`unet_block_features` collects from a diffusers ``UNet2DConditionModel``:
    each down block, the mid block (when the UNet has one), each up block, in that order."""
    channels = list(unet.config.block_out_channels)
    mid = [channels[-1]] if unet.mid_block is not None else []
    return channels + mid + channels[::-1]


@contextlib.contextmanager
def unet_block_features(unet):
    """Inside the context every forward of ``unet`` appends the output hidden states of its down blocks, mid block
    and up blocks (in execution order) to the yielded list; the hooks are removed on exit."""
    features: list[torch.Tensor] = []

    def hook(module, inputs, output):
        # down blocks return (hidden_states, residuals); the mid and up blocks return the hidden states
        features.append(output[0] if isinstance(output, tuple) else output)

    blocks = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
    handles = [block.register_forward_hook(hook) for block in blocks]
    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()


def _head(channels: int) -> nn.Sequential:
    groups = math.gcd(32, channels)
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
        nn.Conv2d(channels, 1, 1),
    )


class DiscriminatorHeads(nn.Module):
    """One light conv head per feature map (two 3x3 conv + GroupNorm + SiLU, then a 1x1 conv to one channel):
    ``forward(features) -> [patch logits (B, 1, H_i, W_i)]``. Runs in float32 whatever precision the backbone ran
    in (the heads are small; fp16 head gradients would underflow without a loss scaler of their own)."""

    def __init__(self, feature_channels: Sequence[int]):
        super().__init__()
        channels = list(feature_channels)
        if not channels or any(not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(f"feature_channels must be a non-empty list of positive ints, got {feature_channels!r}.")
        self.feature_channels = channels
        self.heads = nn.ModuleList(_head(c) for c in channels)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} feature maps (channels {self.feature_channels}), got "
                             f"{len(features)}.")
        device_type = features[0].device.type
        full_precision = (torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
                          else contextlib.nullcontext())
        with full_precision:
            return [head(feature.float()) for head, feature in zip(self.heads, features)]


class TrainableDiscriminator:
    """The heads and their optimiser: AdamW with betas (0, 0.999), as in the PCM scripts (no momentum for the
    adversary). :meth:`backward_and_step` accumulates the discriminator loss's gradients and steps on the optimiser
    steps of the loop (``sync``); :meth:`frozen` keeps the generator's loss from reaching the heads."""

    CHECKPOINT_FILE = "discriminator_state.safetensors"

    def __init__(self, heads: DiscriminatorHeads, learning_rate: float, weight_decay: float = 0.0,
                 eps: float = 1e-8, max_grad_norm: float = 0.0):
        if not (math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}.")
        self.heads = heads
        self.params = list(heads.parameters())
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, betas=(0.0, 0.999),
                                           weight_decay=weight_decay, eps=eps)

    def __call__(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.heads(features)

    @contextlib.contextmanager
    def frozen(self):
        """The heads as constants: a loss computed inside gives them no gradient."""
        for p in self.params:
            p.requires_grad_(False)
        try:
            yield self
        finally:
            for p in self.params:
                p.requires_grad_(True)

    def backward_and_step(self, loss: torch.Tensor, sync: bool = True, scale: float = 1.0,
                          reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """``(loss * scale).backward()``; on ``sync`` the gradients are averaged over processes (``reduce``), clipped
        to ``max_grad_norm`` (when > 0), applied, and cleared."""
        (loss * scale).backward()
        if not sync:
            return
        if reduce is not None:
            for p in self.params:
                if p.grad is not None:
                    p.grad = reduce(p.grad)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- checkpoints (safetensors: plain tensors, no pickle) -----------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``heads.<name>`` for every head weight and ``optimizer.<param index>.<key>`` for every optimiser state
        tensor (AdamW's step and moments); the hyper-parameters come from the flags on resume."""
        state = {f"heads.{k}": v for k, v in self.heads.state_dict().items()}
        for index, values in self.optimizer.state_dict()["state"].items():
            state.update({f"optimizer.{index}.{key}": value for key, value in values.items()
                          if isinstance(value, torch.Tensor)})
        return state

    @torch.no_grad()
    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_tensors` exactly; ``ValueError`` unless the keys and shapes are this run's."""
        heads = {k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")}
        expected = self.heads.state_dict()
        if set(heads) != set(expected) or any(heads[k].shape != v.shape for k, v in expected.items()):
            raise ValueError(
                f"the checkpoint's discriminator heads do not match this run's (checkpoint: {len(heads)} tensors, "
                f"run: {len(expected)}): resume with the teacher the checkpoint was trained with."
            )
        optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optimizer_state.setdefault(int(index), {})[name] = value
        stray = [k for k in state if k.split(".")[0] not in ("heads", "optimizer")]
        stray += [f"optimizer.{i}" for i in sorted(set(optimizer_state) - set(range(len(self.params))))]
        if stray:
            raise ValueError(f"unexpected tensors in the discriminator checkpoint: {stray[:5]}.")
        self.heads.load_state_dict(heads)
        current = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": optimizer_state, "param_groups": current["param_groups"]})
