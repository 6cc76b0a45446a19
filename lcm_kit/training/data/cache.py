"""The encoded cache: a dataset's latents and / or prompt embeddings, encoded once into safetensors shards."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .examples import PreprocessedDataset, StreamingPreprocessedDataset, read_example, split_item
from .sources import TextImageSource
from .transforms import (check_resolution, choose_caption, collate_text_image, flipped_crop_top_left, preprocess_image,
                         sample_rng)

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: each row also holds the SDXL micro-conditioning (original size, crop corner)
_GEOMETRY_ROWS = ("original_sizes", "crop_top_lefts")
_RESERVED_NAMES = ("latents", "latents_flipped", "captions", "pixel_values", "crop_top_lefts_flipped") + _GEOMETRY_ROWS


def encoded_cache_key(source: TextImageSource, fingerprint: Any, resolution: int, center_crop: bool,
                      random_flip: bool, seed: int, cache_latents: bool = True, cache_prompts: bool = True,
                      cache_dir: str | os.PathLike | None = None) -> tuple[str, dict]:
    """``(key, material)``: the cache directory name and the JSON it hashes (stored next to the cache).

    Files under ``cache_dir`` are left out of the dataset identity (a cache kept inside the data folder must
    not invalidate itself)."""
    identity = source.identity()
    if cache_dir is not None and identity.get("files"):
        inside = str(Path(cache_dir).resolve()) + os.sep
        identity = dict(identity, files=[entry for entry in identity["files"] if not entry[0].startswith(inside)])
    material = {
        "format": CACHE_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "preprocessing": {"resolution": check_resolution(resolution), "center_crop": bool(center_crop),
                          "random_flip": bool(random_flip),
                          "flip_policy": "both-encoded-pick-per-epoch" if random_flip else "none",
                          "crop_and_caption_seed": int(seed)},
        "contents": {"latents": bool(cache_latents), "prompts": bool(cache_prompts)},
        "source": identity,
    }
    text = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24], material


class EncodedCache(Dataset):
    """Encoded samples stored as safetensors shards (read lazily, one row at a time).

    Items (``index`` or ``(index, epoch)``) are ``{"latents", <prompt tensors>..., "original_sizes",
    "crop_top_lefts", "captions"}`` (the crop corner mirrored with the latents when flipped); with
    ``random_flip`` the mirrored latents are returned for the samples whose ``(seed, epoch, index)`` draw says
    flip. When latents were not cached (text-only cache) the item holds ``pixel_values`` preprocessed from the
    source instead.
    """

    def __init__(self, directory: str | os.PathLike, source: TextImageSource | None = None, seed: int = 0):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        self.captions: list[str] = json.loads((self.directory / "captions.json").read_text())
        prep = self.meta["material"]["preprocessing"]
        self.resolution, self.center_crop = prep["resolution"], prep["center_crop"]
        self.random_flip = prep["random_flip"]
        self.crop_seed = prep["crop_and_caption_seed"]
        self.samples_per_shard = self.meta["samples_per_shard"]
        self.tensor_names: list[str] = self.meta["tensor_names"]
        self.has_latents = self.meta["material"]["contents"]["latents"]
        if not self.has_latents and source is None:
            raise ValueError("this cache holds no latents: pass the source to read images from")
        self.source = source
        self.seed = int(seed)
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.meta["num_samples"]

    @property
    def key(self) -> str:
        return self.directory.name

    def with_seed(self, seed: int) -> EncodedCache:
        clone = copy.copy(self)
        clone.seed, clone._handles = int(seed), {}
        return clone

    def check_preprocessing(self, resolution, center_crop, random_flip) -> None:
        requested = {"resolution": resolution, "center_crop": bool(center_crop), "random_flip": bool(random_flip)}
        cached = {"resolution": self.resolution, "center_crop": self.center_crop, "random_flip": self.random_flip}
        if requested != cached:
            raise ValueError(f"the encoded cache was built with {cached}, the loader asks for {requested}")

    def __getstate__(self):  # safetensors handles do not pickle; workers reopen them
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _row(self, name: str, index: int) -> torch.Tensor:
        shard = index // self.samples_per_shard
        handle = self._handles.get(shard)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.directory / f"shard-{shard:05d}.safetensors"), framework="pt")
            self._handles[shard] = handle
        return handle.get_slice(name)[index % self.samples_per_shard]

    def __getitem__(self, item) -> dict:
        index, epoch = split_item(item)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)} samples")
        flip = False
        if self.random_flip:
            flip = bool(sample_rng(self.seed, epoch, index).random() < 0.5)
        example = {}
        mirrored = {"latents": "latents_flipped", "crop_top_lefts": "crop_top_lefts_flipped"}
        for name in self.tensor_names:
            if name in mirrored.values():
                continue
            example[name] = self._row(mirrored[name] if flip and name in mirrored else name, index)
        if not self.has_latents:
            # Replay the encode-time draws (caption choice, then crop) so the crop matches the cached captions;
            # read_example picks the same replacement for a bad sample as the encode pass did.
            def make(image, raw_caption):
                rng = sample_rng(self.crop_seed, 0, index)
                choose_caption(raw_caption, rng)
                return preprocess_image(image, self.resolution, self.center_crop, False, rng, flip=flip)

            example["pixel_values"] = read_example(self.source, index, make)
        example["captions"] = self.captions[index]
        return example


def build_encoded_cache(
    source: TextImageSource,
    encode_images: Callable[[torch.Tensor], torch.Tensor] | None,
    encode_prompts: Callable[[list[str]], Mapping[str, torch.Tensor]] | None,
    resolution: int,
    center_crop: bool,
    random_flip: bool,
    cache_dir: str | os.PathLike,
    fingerprint: Any,
    batch_size: int = 16,
    seed: int = 0,
    num_workers: int = 0,
    samples_per_shard: int = 1024,
) -> EncodedCache:
    """Encode the dataset once and return the cache (reused as is while nothing it depends on changes).

    Args:
        source: from :func:`load_train_dataset`.
        encode_images: ``pixel_values (B,3,H,W) in [-1,1] -> latents (B,...)`` (e.g. VAE encode * scaling
            factor; it handles device and dtype). ``None``: latents are not cached (text-only cache).
        encode_prompts: ``list[str] -> {"prompt_embeds": (B,...), ...}``. ``None``: only captions are stored.
        resolution / center_crop / random_flip: the preprocessing (see the package docstring for flips).
        cache_dir: parent directory; the cache lives in ``cache_dir/<key>/``.
        fingerprint: JSON-able identity of the encoders (model path/revision, dtype, ...): change it and the
            cache is rebuilt.
        seed: seeds the random crop window and the caption picked from a list (fixed once per cache).
        samples_per_shard: rows per safetensors file.

    Multi-process: call it inside ``accelerator.main_process_first()``; a process that finds another's
    finished cache in place keeps that one. The directory appears atomically (built in a temporary directory
    then renamed), so an interrupted encode leaves no partial cache behind.
    """
    if encode_images is None and encode_prompts is None:
        raise ValueError("build_encoded_cache needs encode_images, encode_prompts or both (got neither)")
    if not isinstance(source, TextImageSource):
        raise TypeError(f"source must be a TextImageSource, got {type(source).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if encode_images is None and not source.is_map_style:
        raise ValueError("a text-only cache (encode_images=None) needs a map-style source to read images from")
    key, material = encoded_cache_key(source, fingerprint, resolution, center_crop, random_flip, seed,
                                      encode_images is not None, encode_prompts is not None, cache_dir)
    cache_dir = Path(cache_dir)
    final = cache_dir / key
    if (final / "meta.json").is_file():
        logger.info("using the encoded cache %s", final)
        return EncodedCache(final, source if encode_images is None else None, seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        # Encoded as seen at epoch 0, never flipped (the mirrored latents are encoded from the same batch).
        examples = _examples_in_order(source, check_resolution(resolution), bool(center_crop), seed, batch_size,
                                      num_workers)
        total = len(source) if source.is_map_style else None
        num_samples, tensor_names, captions = _encode_into(tmp, examples, total, bool(random_flip), encode_images,
                                                           encode_prompts, samples_per_shard, resolution)
        if source.num_skipped_samples:
            logger.warning("skip_bad_samples: %d bad sample(s) skipped while encoding the cache (each one named "
                           "in an earlier warning)", source.num_skipped_samples)
        (tmp / "captions.json").write_text(json.dumps(captions))
        meta = {"num_samples": num_samples, "samples_per_shard": samples_per_shard,
                "tensor_names": tensor_names, "material": material}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            logger.info("another process finished the encoded cache %s first; using it", final)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EncodedCache(final, source if encode_images is None else None, seed)


def _examples_in_order(source: TextImageSource, resolution: int, center_crop: bool, seed: int, batch_size: int,
                       num_workers: int) -> DataLoader:
    """Batches of the source in dataset order with epoch-0 draws and no flip."""
    if source.is_map_style:
        dataset = PreprocessedDataset(source, resolution, center_crop, False, seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          collate_fn=collate_text_image)
    dataset = StreamingPreprocessedDataset(source, resolution, center_crop, False, seed, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, num_workers=0, collate_fn=collate_text_image)


def _encode_into(directory: Path, batches, total: int | None, random_flip: bool, encode_images, encode_prompts,
                 samples_per_shard: int, resolution: int):
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    pending: dict[str, list[torch.Tensor]] = {}
    captions: list[str] = []
    tensor_names: list[str] | None = None
    shard_index = 0

    def flush(final: bool):
        nonlocal shard_index
        while pending and (len(next(iter(pending.values()))) >= samples_per_shard
                           or (final and next(iter(pending.values())))):
            rows = {name: values[:samples_per_shard] for name, values in pending.items()}
            for values in pending.values():
                del values[:samples_per_shard]
            tensors = {name: torch.stack(values).contiguous() for name, values in rows.items()}
            save_file(tensors, str(directory / f"shard-{shard_index:05d}.safetensors"),
                      metadata={"format": "lcm-kit-encoded-cache"})
            shard_index += 1

    with torch.no_grad(), tqdm(total=total, desc="Encoding dataset", unit="img") as progress:
        for batch in batches:
            count = len(batch["captions"])
            outputs: dict[str, torch.Tensor] = {}
            for name in _GEOMETRY_ROWS:
                outputs[name] = batch[name]
            if random_flip:
                outputs["crop_top_lefts_flipped"] = torch.tensor(
                    [flipped_crop_top_left(size.tolist(), corner.tolist(), resolution)
                     for size, corner in zip(batch["original_sizes"], batch["crop_top_lefts"])], dtype=torch.int64)
            if encode_images is not None:
                outputs["latents"] = _check_output(encode_images(batch["pixel_values"]), count, "encode_images")
                if random_flip:
                    outputs["latents_flipped"] = _check_output(encode_images(batch["pixel_values"].flip(-1)),
                                                               count, "encode_images")
            if encode_prompts is not None:
                embeddings = encode_prompts(list(batch["captions"]))
                if not isinstance(embeddings, Mapping):
                    raise TypeError(f"encode_prompts must return a dict of tensors, got {type(embeddings).__name__}")
                for name, value in embeddings.items():
                    if name in _RESERVED_NAMES:
                        raise ValueError(f"encode_prompts returned the reserved key {name!r}; reserved: "
                                         f"{list(_RESERVED_NAMES)}")
                    outputs[name] = _check_output(value, count, f"encode_prompts()[{name!r}]")
            names = sorted(outputs)
            if tensor_names is None:
                tensor_names = names
                pending.update({name: [] for name in names})
            elif names != tensor_names:
                raise ValueError(f"encoders returned keys {names} after {tensor_names} for earlier batches")
            for name, value in outputs.items():
                pending[name].extend(value.detach().to("cpu").unbind(0))
            captions.extend(batch["captions"])
            flush(final=False)
            progress.update(count)
    if not captions:
        raise ValueError("the source yielded no samples to encode")
    flush(final=True)
    return len(captions), tensor_names, captions


def _check_output(value, count: int, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must return a torch.Tensor, got {type(value).__name__}")
    if value.ndim == 0 or value.shape[0] != count:
        raise ValueError(f"{what} returned shape {tuple(value.shape)} for a batch of {count}: the first "
                         "dimension must be the batch")
    return value
