"""Text-image training data shared by every lcm-kit trainer.

Three steps, each usable on its own::

    source = load_train_dataset(dataset_name="path/to/imagefolder")          # touches only the data
    loader = build_dataloader(source, resolution=512, center_crop=False, random_flip=True,
                              batch_size=8, num_workers=4, seed=0)
    for batch in loader:                       # {"pixel_values": (B,3,H,W) in [-1,1], "captions": [str]}
        ...

    cache = build_encoded_cache(source, encode_images, encode_prompts, 512, False, True,
                                cache_dir="cache", fingerprint="sd15-vae-fp16")
    loader = build_dataloader(cache, 512, False, True, batch_size=8, num_workers=0, seed=0)
    for batch in loader:                       # {"latents": ..., "prompt_embeds": ..., "captions": [str]}
        ...

Inputs (`load_train_dataset`):

* ``dataset_name``: a Hub dataset id, or anything ``datasets`` reads locally: an imagefolder (with
  ``metadata.jsonl``), a csv / tsv / json(-lines) / parquet file whose image column holds paths relative to
  that file, or a ``save_to_disk`` directory.
* ``train_shards_path_or_url``: webdataset tar shards, brace patterns allowed (``data/{00000..00003}.tar``),
  several patterns separated by ``::``. Local uncompressed shards are *indexed* (tar member offsets) and read
  map-style, so they have a length, shuffle exactly and resume with ``accelerate.skip_first_batches``. URLs
  (``http(s)://``, ``pipe:``, ``s3://``...) and compressed shards are streamed. Both paths read tar files with
  the standard library (the ``webdataset`` package is only used to open remote URLs), so the
  ``KeyError: 'fname'`` failure of diffusers' webdataset pipeline under webdataset 1.0 does not apply.

Determinism. Every random choice for a sample (random crop, flip, which caption of a list) is drawn from a
generator seeded by ``(seed, epoch, sample index)``, never from global or per-worker state, so results do not
depend on ``num_workers`` and a resumed run sees exactly the same batches. The shuffle order is a permutation
seeded by ``(seed, epoch)``. ``accelerate``'s prepared loaders call ``set_epoch`` on our sampler every epoch; a
plain loader returned by :func:`build_dataloader` advances its epoch each time it is iterated, and
``loader.set_epoch(e)`` selects one explicitly (do that before ``skip_first_batches`` when resuming).

Encoded cache (`build_encoded_cache`). The dataset is preprocessed and encoded once (VAE latents and/or text
embeddings) into safetensors shards under ``cache_dir/<key>/``; the key hashes the caller's model fingerprint,
the preprocessing parameters, the dataset identity (paths with sizes and modification times, or the datasets
fingerprint of a Hub dataset) and ``max_train_samples``, so a stale cache is never read. Choices made once at
encode time with the cache's ``seed``: the random crop window and the caption picked from a list. Random flips
stay random per epoch: with ``random_flip`` the image *and* its mirror image are encoded and each epoch picks
one per sample with the loader's seed.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

logger = logging.getLogger(__name__)

__all__ = [
    "TextImageSource",
    "DatasetsSource",
    "TarShardSource",
    "StreamingTarSource",
    "EncodedCache",
    "EpochSampler",
    "load_train_dataset",
    "build_dataloader",
    "build_encoded_cache",
    "encoded_cache_key",
    "preprocess_image",
    "expand_shard_pattern",
    "collate_text_image",
    "IMAGE_COLUMN_CANDIDATES",
    "CAPTION_COLUMN_CANDIDATES",
]

#: Column names tried, in order, when ``image_column`` is not given and no feature is image-typed.
IMAGE_COLUMN_CANDIDATES = (
    "image", "img", "images", "jpg", "jpeg", "png", "webp", "file_name", "image_path", "image_file", "path",
    "file",
)
#: Column names tried, in order, when ``caption_column`` is not given.
CAPTION_COLUMN_CANDIDATES = (
    "text", "caption", "captions", "prompt", "prompts", "txt", "json", "sentence", "sentences", "description",
    "alt_text", "alt",
)
#: webdataset extensions (lower case) that hold an image.
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
#: Keys read from a webdataset ``.json`` member when it is the caption column.
JSON_CAPTION_KEYS = ("caption", "text", "prompt", "txt")

_URL_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://", "ftp://")
CACHE_FORMAT_VERSION = 1
_RESERVED_CACHE_KEYS = ("latents", "latents_flipped", "captions", "original_sizes", "crop_top_lefts",
                        "crop_top_lefts_flipped")


# ----------------------------------------------------------------------------------------------- helpers


def _sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for every random choice about sample ``index`` in ``epoch`` (independent of workers)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


def _file_identity(paths: Sequence[Path]) -> list[list]:
    """``[path, size, mtime_ns]`` for every file (directories walked), sorted: changes when any file changes."""
    entries = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                # datasets' own caches may live inside the data folder; they are not data.
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in files:
                    if not name.startswith("."):
                        entries.append(Path(root, name))
        else:
            entries.append(path)
    identity = []
    for entry in sorted(set(entries)):
        stat = entry.stat()
        identity.append([str(entry.resolve()), stat.st_size, stat.st_mtime_ns])
    return identity


def _open_image(value: Any, base_dir: Path | None = None) -> Image.Image:
    """Decode a dataset image value (PIL image, ``{"bytes", "path"}`` dict, path string or raw bytes) to RGB."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, Mapping) and (value.get("bytes") is not None or value.get("path") is not None):
        if value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        else:
            return _open_image(value["path"], base_dir)
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ValueError(f"image file {str(path)!r} (from the image column value {str(value)!r}) does not exist")
        image = Image.open(path)
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    else:
        raise TypeError(
            f"image value of type {type(value).__name__} is not supported: expected a PIL image, a "
            "{'bytes','path'} dict, a path string or encoded image bytes"
        )
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited over white (instead of whatever colour hides under alpha=0)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _choose_caption(value: Any, rng: np.random.Generator, where: str) -> str:
    """A caption string; a list of captions yields one picked with ``rng``."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return value[int(rng.integers(len(value)))]
    raise ValueError(
        f"caption of {where} is {value!r}: expected a string or a non-empty list of strings "
        "(fill missing captions in the dataset, or choose another caption_column)"
    )


def _check_resolution(resolution: Any) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution <= 0:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    return int(resolution)


@dataclass(frozen=True)
class PreprocessedImage:
    """Output of :func:`preprocess_image`. Sizes are ``(height, width)``, the crop corner ``(top, left)``."""

    pixel_values: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    resized_size: tuple[int, int]
    flipped: bool


def preprocess_image(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    random_flip: bool,
    rng: np.random.Generator | None = None,
    flip: bool | None = None,
) -> PreprocessedImage:
    """Resize the shorter side to ``resolution`` (bilinear), crop a square, maybe flip, scale to [-1, 1].

    Args:
        image: an RGB PIL image.
        resolution: output side length.
        center_crop: crop the centre; otherwise a random window drawn from ``rng``.
        random_flip: mirror horizontally with probability 0.5 (drawn from ``rng``).
        rng: the sample's generator (required for a random crop or flip).
        flip: force the flip decision (used by the encoded cache), overriding ``random_flip``.

    Returns:
        :class:`PreprocessedImage`; ``pixel_values`` is float32 ``(3, resolution, resolution)``. For a flipped
        image ``crop_top_left`` is the crop corner in the mirrored image (SDXL's crop conditioning).
    """
    resolution = _check_resolution(resolution)
    if image.mode != "RGB":
        image = _to_rgb(image)
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if center_crop:
        top, left = int(round((new_h - resolution) / 2.0)), int(round((new_w - resolution) / 2.0))
    else:
        if rng is None:
            raise ValueError("rng is required for a random crop (center_crop=False)")
        top = int(rng.integers(0, new_h - resolution + 1))
        left = int(rng.integers(0, new_w - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip is None:
        if random_flip and rng is None:
            raise ValueError("rng is required for random_flip=True")
        flip = bool(random_flip and rng.random() < 0.5)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        left = new_w - left - resolution
    array = np.asarray(image, dtype=np.float32)
    pixel_values = torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    return PreprocessedImage(pixel_values, (height, width), (top, left), (new_h, new_w), flip)


def collate_text_image(examples: list[dict]) -> dict:
    """Stack tensors, keep captions as a list of strings (the batch layout of every lcm-kit loader)."""
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        batch[key] = values if key == "captions" else torch.stack(values)
    return batch


# ----------------------------------------------------------------------------------------------- sources


class TextImageSource:
    """A text-image dataset: what :func:`load_train_dataset` returns and :func:`build_dataloader` takes.

    Attributes:
        image_column / caption_column: the columns (webdataset: member extensions) read.
        num_samples: the number of samples, or ``None`` for a stream of unknown length.
        max_train_samples: the truncation applied (part of the dataset identity).
    """

    image_column: str
    caption_column: str
    num_samples: int | None
    max_train_samples: int | None = None

    @property
    def is_map_style(self) -> bool:
        """True when samples can be read by index (length known, exact shuffling and resuming)."""
        return True

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError(f"{type(self).__name__} is a stream of unknown length")
        return self.num_samples

    def get_raw(self, index: int) -> tuple[Image.Image, Any]:
        """``(RGB image, raw caption)`` of sample ``index`` (map-style sources)."""
        raise NotImplementedError

    def iter_raw(self, epoch: int, seed: int, shuffle: bool, worker_id: int = 0, num_workers: int = 1
                 ) -> Iterator[tuple[int, Image.Image, Any]]:
        """``(sample id, image, raw caption)`` for this worker's share of the stream (streaming sources)."""
        raise NotImplementedError

    def identity(self) -> dict:
        """JSON-able description that changes whenever the data changes (keys the encoded cache)."""
        raise NotImplementedError


def _resolve_column(kind: str, requested: str | None, available: Sequence[str], detected: str | None,
                    flag: str) -> str:
    if requested is not None:
        if requested not in available:
            raise ValueError(
                f"{flag}={requested!r} is not a column of the dataset; available columns: {list(available)}"
            )
        return requested
    if detected is None:
        raise ValueError(
            f"could not detect the {kind} column among the dataset columns {list(available)}; pass {flag} "
            f"(tried: {list(IMAGE_COLUMN_CANDIDATES if kind == 'image' else CAPTION_COLUMN_CANDIDATES)})"
        )
    return detected


class DatasetsSource(TextImageSource):
    """A map-style ``datasets.Dataset`` (Hub id, local files, imagefolder or ``save_to_disk`` directory)."""

    def __init__(self, dataset, image_column: str | None, caption_column: str | None, description: dict,
                 base_dir: Path | None = None, max_train_samples: int | None = None):
        import datasets

        features = dataset.features
        columns = list(features)
        detected_image = next((c for c in columns if isinstance(features[c], datasets.Image)), None)
        if detected_image is None:
            detected_image = next((c for c in IMAGE_COLUMN_CANDIDATES if c in columns), None)
        self.image_column = _resolve_column("image", image_column, columns, detected_image, "image_column")
        string_like = [c for c in columns if c != self.image_column and _is_text_feature(features[c])]
        detected_caption = next((c for c in CAPTION_COLUMN_CANDIDATES if c in columns and c != self.image_column),
                                None)
        if detected_caption is None and len(string_like) == 1:
            detected_caption = string_like[0]
        self.caption_column = _resolve_column("caption", caption_column, columns, detected_caption,
                                              "caption_column")
        if self.caption_column == self.image_column:
            raise ValueError(f"image_column and caption_column are both {self.image_column!r}")
        # A string image column holds paths (csv / json lines): those image files are part of the data identity.
        self._image_is_path = _is_text_feature(features[self.image_column])
        if max_train_samples is not None:
            dataset = dataset.select(range(min(max_train_samples, len(dataset))))
        # Only the two columns are decoded per item (other image columns would cost time for nothing).
        self.dataset = dataset.select_columns([self.image_column, self.caption_column])
        self.num_samples = len(self.dataset)
        self.max_train_samples = max_train_samples
        self.base_dir = base_dir
        self._description = description

    def get_raw(self, index: int):
        row = self.dataset[int(index)]
        return _open_image(row[self.image_column], self.base_dir), row[self.caption_column]

    def identity(self) -> dict:
        identity = dict(self._description)
        identity.update(columns=[self.image_column, self.caption_column], num_samples=self.num_samples,
                        max_train_samples=self.max_train_samples)
        if identity.get("files") is not None and self._image_is_path:
            # Tabular files name their images by path: those files are part of the data too.
            referenced = {Path(v).expanduser() for v in self.dataset[self.image_column] if isinstance(v, str)}
            base = self.base_dir or Path.cwd()
            paths = [p if p.is_absolute() else base / p for p in referenced]
            identity["files"] = identity["files"] + _file_identity([p for p in paths if p.is_file()])
        return identity

    def __repr__(self):
        return (f"DatasetsSource({self._description.get('name')!r}, image_column={self.image_column!r}, "
                f"caption_column={self.caption_column!r}, num_samples={self.num_samples})")


def _is_text_feature(feature) -> bool:
    """A string column, or a list-of-strings column (several captions per image)."""
    import datasets

    if isinstance(feature, list):  # datasets' shorthand for a list feature
        feature = feature[0] if feature else None
    else:
        feature = getattr(feature, "feature", feature)
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _split_train(dataset_dict, name: str):
    import datasets

    if isinstance(dataset_dict, (datasets.Dataset,)):
        return dataset_dict
    if "train" in dataset_dict:
        return dataset_dict["train"]
    if len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    raise ValueError(f"dataset_name={name!r} has no 'train' split; splits: {list(dataset_dict)}")


_TABULAR_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _load_datasets_source(dataset_name: str, dataset_config_name, image_column, caption_column,
                          max_train_samples, cache_dir) -> DatasetsSource:
    import datasets

    path = Path(dataset_name).expanduser()
    base_dir = None
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        dataset = _split_train(datasets.load_from_disk(str(path)), dataset_name)
        description = {"kind": "save_to_disk", "name": str(path.resolve()), "files": _file_identity([path])}
    elif path.is_dir():
        dataset = _split_train(datasets.load_dataset(str(path), dataset_config_name, cache_dir=cache_dir),
                               dataset_name)
        description = {"kind": "folder", "name": str(path.resolve()), "config": dataset_config_name,
                       "files": _file_identity([path])}
        base_dir = path
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix not in _TABULAR_BUILDERS:
            raise ValueError(
                f"dataset_name={dataset_name!r} is a file with suffix {suffix!r}; supported files: "
                f"{sorted(_TABULAR_BUILDERS)} (for tar shards use train_shards_path_or_url)"
            )
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        dataset = datasets.load_dataset(_TABULAR_BUILDERS[suffix], data_files=str(path), cache_dir=cache_dir,
                                        **kwargs)["train"]
        description = {"kind": "file", "name": str(path.resolve()), "files": _file_identity([path])}
        base_dir = path.parent
    else:
        if dataset_name.startswith(("/", "./", "../", "~")) or os.sep + os.sep in dataset_name:
            raise ValueError(f"dataset_name={dataset_name!r} looks like a local path but does not exist")
        dataset = _split_train(datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir),
                               dataset_name)
        description = {"kind": "hub", "name": dataset_name, "config": dataset_config_name,
                       "fingerprint": getattr(dataset, "_fingerprint", None)}
    return DatasetsSource(dataset, image_column, caption_column, description, base_dir, max_train_samples)


def expand_shard_pattern(pattern: str | Sequence[str]) -> list[str]:
    """Expand webdataset shard patterns: ``{000..012}`` ranges (zero padding kept), ``{a,b}`` lists, several
    patterns joined by ``::`` or given as a list."""
    if not isinstance(pattern, str):
        return [url for item in pattern for url in expand_shard_pattern(item)]
    if "::" in pattern:
        return [url for part in pattern.split("::") if part for url in expand_shard_pattern(part)]
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end():], match.group(1)
    range_match = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if range_match:
        lo, hi = range_match.groups()
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        start, stop = int(lo), int(hi)
        step = 1 if stop >= start else -1
        choices = [str(i).zfill(width) for i in range(start, stop + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"train_shards_path_or_url pattern {pattern!r}: cannot expand {{{body}}} "
                         "(use {000..009} or {a,b})")
    return [url for choice in choices for url in expand_shard_pattern(head + choice + tail)]


def _split_member_name(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the basename, the rest the ext."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower() if dot else ""


def _detect_wds_columns(extensions: Sequence[str], image_column, caption_column) -> tuple[str, str]:
    available = sorted(set(extensions))
    detected_image = next((e for e in WDS_IMAGE_EXTENSIONS if e in available), None)
    detected_caption = next((e for e in ("txt", "text", "caption", "json") if e in available), None)
    image = _resolve_column("image", image_column, available, detected_image, "image_column")
    caption = _resolve_column("caption", caption_column, available, detected_caption, "caption_column")
    return image, caption


def _decode_wds_caption(data: bytes, extension: str) -> Any:
    text = data.decode("utf-8")
    if extension == "json" or extension.endswith(".json"):
        value = json.loads(text)
        if isinstance(value, dict):
            for key in JSON_CAPTION_KEYS:
                if key in value:
                    return value[key]
            raise ValueError(f"json caption {text[:200]!r} has none of the keys {list(JSON_CAPTION_KEYS)}")
        return value
    return text.strip()


class TarShardSource(TextImageSource):
    """Local uncompressed webdataset shards read map-style through an index of member offsets."""

    def __init__(self, shards: Sequence[str], image_column: str | None, caption_column: str | None,
                 max_train_samples: int | None = None):
        self.shards = [str(Path(s).expanduser().resolve()) for s in shards]
        samples: list[tuple[str, dict[str, tuple[int, int, int]]]] = []  # (key, {ext: (shard, offset, size)})
        for shard_id, shard in enumerate(self.shards):
            current_key, current = None, {}
            with tarfile.open(shard, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_member_name(member.name)
                    if key != current_key:
                        if current:
                            samples.append((current_key, current))
                        current_key, current = key, {}
                    current[ext] = (shard_id, member.offset_data, member.size)
            if current:
                samples.append((current_key, current))
        if not samples:
            raise ValueError(f"train_shards_path_or_url: no samples in the shards {self.shards}")
        extensions = sorted({ext for _, members in samples for ext in members})
        self.image_column, self.caption_column = _detect_wds_columns(extensions, image_column, caption_column)
        complete = [(k, m) for k, m in samples if self.image_column in m and self.caption_column in m]
        if len(complete) < len(samples):
            logger.warning("webdataset shards: %d of %d samples lack a %r or %r member and are skipped",
                           len(samples) - len(complete), len(samples), self.image_column, self.caption_column)
        if not complete:
            raise ValueError(f"train_shards_path_or_url: no sample has both a {self.image_column!r} and a "
                             f"{self.caption_column!r} member; member extensions: {extensions}")
        if max_train_samples is not None:
            complete = complete[:max_train_samples]
        self._samples = [(key, members[self.image_column], members[self.caption_column]) for key, members in complete]
        self.num_samples = len(self._samples)
        self.max_train_samples = max_train_samples

    def _read(self, location: tuple[int, int, int]) -> bytes:
        shard_id, offset, size = location
        with open(self.shards[shard_id], "rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    def get_raw(self, index: int):
        key, image_loc, caption_loc = self._samples[int(index)]
        image = _open_image(self._read(image_loc))
        return image, _decode_wds_caption(self._read(caption_loc), self.caption_column)

    def identity(self) -> dict:
        return {"kind": "webdataset", "files": _file_identity([Path(s) for s in self.shards]),
                "columns": [self.image_column, self.caption_column], "num_samples": self.num_samples,
                "max_train_samples": self.max_train_samples}

    def __repr__(self):
        return (f"TarShardSource({len(self.shards)} shards, image_column={self.image_column!r}, "
                f"caption_column={self.caption_column!r}, num_samples={self.num_samples})")


def _open_stream(url: str):
    if url.startswith(_URL_PREFIXES):
        try:
            import webdataset
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("streaming webdataset shards from URLs needs `pip install webdataset`") from error
        return webdataset.gopen(url, "rb")
    return open(Path(url).expanduser(), "rb")


def _iter_tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group the members of a (possibly compressed, possibly remote) tar stream into webdataset samples."""
    stream = _open_stream(url)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            current_key, current = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member_name(member.name)
                if key != current_key:
                    if current:
                        yield current_key, current
                    current_key, current = key, {}
                current[ext] = tar.extractfile(member).read()
            if current:
                yield current_key, current
    finally:
        stream.close()


class StreamingTarSource(TextImageSource):
    """webdataset shards streamed in order (URLs, compressed shards): length unknown, shard-level shuffling
    plus a seeded shuffle buffer, shards split over DataLoader workers."""

    def __init__(self, shards: Sequence[str], image_column: str | None, caption_column: str | None,
                 max_train_samples: int | None = None, shuffle_buffer: int = 1000):
        self.shards = list(shards)
        first = next(_iter_tar_samples(self.shards[0]), None)
        if first is None:
            raise ValueError(f"train_shards_path_or_url: the first shard {self.shards[0]!r} holds no samples")
        self.image_column, self.caption_column = _detect_wds_columns(list(first[1]), image_column, caption_column)
        self.num_samples = None
        self.max_train_samples = max_train_samples
        self.shuffle_buffer = shuffle_buffer

    @property
    def is_map_style(self) -> bool:
        return False

    def iter_raw(self, epoch, seed, shuffle, worker_id=0, num_workers=1):
        shards = list(self.shards)
        limited = self.max_train_samples is not None
        # Without a limit, shards are shuffled per epoch and dealt to workers. With max_train_samples the
        # subset must not change between epochs: shards keep their order and samples are dealt round robin.
        if shuffle and not limited:
            np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 7919]).shuffle(shards)
        if not limited and num_workers > len(shards) and worker_id == 0:
            logger.warning("%d DataLoader workers but only %d shards: some workers stay idle",
                           num_workers, len(shards))
        buffer: list[tuple[int, Image.Image, Any]] = []
        buffer_rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 104729, worker_id])
        position = 0
        for shard_index, shard in enumerate(shards):
            if not limited and shard_index % num_workers != worker_id:
                continue
            for key, members in _iter_tar_samples(shard):
                if limited and position >= self.max_train_samples:
                    break
                if self.image_column not in members or self.caption_column not in members:
                    logger.warning("webdataset sample %r in %s lacks %r or %r: skipped", key, shard,
                                   self.image_column, self.caption_column)
                    continue
                position += 1
                if limited and (position - 1) % num_workers != worker_id:
                    continue
                sample_id = zlib.crc32(f"{shard}/{key}".encode())
                item = (sample_id, _open_image(members[self.image_column]),
                        _decode_wds_caption(members[self.caption_column], self.caption_column))
                if not shuffle:
                    yield item
                    continue
                buffer.append(item)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(int(buffer_rng.integers(len(buffer))))
            if limited and position >= self.max_train_samples:
                break
        while buffer:
            yield buffer.pop(int(buffer_rng.integers(len(buffer))))

    def identity(self) -> dict:
        local = [Path(s) for s in self.shards if not s.startswith(_URL_PREFIXES)]
        return {"kind": "webdataset-stream", "urls": self.shards, "files": _file_identity(local),
                "columns": [self.image_column, self.caption_column], "max_train_samples": self.max_train_samples}

    def __repr__(self):
        return (f"StreamingTarSource({len(self.shards)} shards, image_column={self.image_column!r}, "
                f"caption_column={self.caption_column!r})")


def load_train_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_shards_path_or_url: str | Sequence[str] | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    max_train_samples: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    streaming: bool | None = None,
) -> TextImageSource:
    """Open the training data (and only the data: call it before loading any model, so a wrong column name
    fails in seconds).

    Args:
        dataset_name: Hub dataset id, local imagefolder / data file / ``save_to_disk`` directory.
        dataset_config_name: the dataset configuration (Hub datasets with several).
        train_shards_path_or_url: webdataset tar shards (brace patterns, ``::``-separated or a list).
        image_column / caption_column: default: detected (an ``Image`` feature, then the first present of
            :data:`IMAGE_COLUMN_CANDIDATES` / :data:`CAPTION_COLUMN_CANDIDATES`; for shards the image and
            caption member extensions). A column that does not exist raises ``ValueError`` listing the
            available ones.
        max_train_samples: keep the first ``max_train_samples`` samples (in dataset order).
        cache_dir: the ``datasets`` cache directory.
        streaming: shards only: ``None`` streams URLs and compressed shards and indexes local ``.tar`` files;
            ``True`` forces streaming, ``False`` forces indexing.
    """
    if (dataset_name is None) == (train_shards_path_or_url is None):
        raise ValueError(
            "pass exactly one of dataset_name and train_shards_path_or_url; got "
            f"dataset_name={dataset_name!r}, train_shards_path_or_url={train_shards_path_or_url!r}"
        )
    if max_train_samples is not None and (isinstance(max_train_samples, bool) or
                                          not isinstance(max_train_samples, int) or max_train_samples <= 0):
        raise ValueError(f"max_train_samples must be a positive int or None, got {max_train_samples!r}")
    if dataset_name is not None:
        return _load_datasets_source(str(dataset_name), dataset_config_name, image_column, caption_column,
                                     max_train_samples, None if cache_dir is None else str(cache_dir))
    shards = expand_shard_pattern(train_shards_path_or_url)
    if not shards:
        raise ValueError(f"train_shards_path_or_url={train_shards_path_or_url!r} expands to no shard")
    remote = [s for s in shards if s.startswith(_URL_PREFIXES)]
    if not remote:
        missing = [s for s in shards if not Path(s).expanduser().is_file()]
        if missing:
            raise ValueError(f"train_shards_path_or_url={train_shards_path_or_url!r}: {len(missing)} shard file(s) "
                             f"do not exist, e.g. {missing[:3]}")
    indexable = not remote and all(_is_plain_tar(Path(s).expanduser()) for s in shards)
    if streaming is None:
        streaming = not indexable
    if not streaming and not indexable:
        raise ValueError("streaming=False needs local uncompressed .tar shards; got "
                         f"train_shards_path_or_url={train_shards_path_or_url!r}")
    if streaming:
        return StreamingTarSource(shards, image_column, caption_column, max_train_samples)
    return TarShardSource(shards, image_column, caption_column, max_train_samples)


def load_train_dataset_from_args(args) -> "TextImageSource":
    """:func:`load_train_dataset` from the parsed data flags of :func:`lcm_kit.training.args.add_data_args`
    (``--dataset_name``, ``--train_shards_path_or_url``, columns, ``--max_train_samples``, ``--cache_dir``)."""
    return load_train_dataset(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_shards_path_or_url=args.train_shards_path_or_url,
        image_column=args.image_column,
        caption_column=args.caption_column,
        max_train_samples=args.max_train_samples,
        cache_dir=args.cache_dir,
    )



def build_dataloader_from_args(args, source) -> "EpochDataLoader":
    """:func:`build_dataloader` over ``source`` (a data source or an encoded cache) with the parsed flags
    ``--resolution``, ``--center_crop``, ``--random_flip``, ``--train_batch_size``, ``--dataloader_num_workers``
    and ``--seed``."""
    return build_dataloader(
        source,
        resolution=args.resolution,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers,
        seed=args.seed,
    )

def _is_plain_tar(path: Path) -> bool:
    with open(path, "rb") as handle:
        magic = handle.read(262)
    return len(magic) >= 262 and magic[257:262] == b"ustar"


# ------------------------------------------------------------------------------------ torch datasets


class EpochSampler(Sampler):
    """Yields ``(index, epoch)``: a permutation seeded by ``(seed, epoch)`` (or ``range(n)``), the epoch riding
    along so per-sample random choices are seeded too. ``set_epoch`` picks the epoch (accelerate calls it)."""

    def __init__(self, num_samples: int, shuffle: bool, seed: int):
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        epoch = self.epoch
        if self.shuffle:
            state = np.random.SeedSequence([int(self.seed) & 0xFFFFFFFF, epoch]).generate_state(2)
            generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        for index in order:
            yield (index, epoch)


def _split_item(item) -> tuple[int, int]:
    if isinstance(item, (tuple, list)):
        return int(item[0]), int(item[1])
    return int(item), 0


class _PreprocessedDataset(Dataset):
    """Map-style view of a source with the transforms applied; item ``(index, epoch)`` or ``index``."""

    def __init__(self, source: TextImageSource, resolution, center_crop, random_flip, seed):
        self.source, self.resolution = source, _check_resolution(resolution)
        self.center_crop, self.random_flip, self.seed = bool(center_crop), bool(random_flip), int(seed)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, item):
        index, epoch = _split_item(item)
        image, caption = self.source.get_raw(index)
        return _make_example(image, caption, _sample_rng(self.seed, epoch, index), self, f"sample {index}")


def _make_example(image, caption, rng, spec, where, flip=None) -> dict:
    caption = _choose_caption(caption, rng, where)
    processed = preprocess_image(image, spec.resolution, spec.center_crop, spec.random_flip, rng, flip=flip)
    return {"pixel_values": processed.pixel_values, "captions": caption,
            "original_sizes": torch.tensor(processed.original_size),
            "crop_top_lefts": torch.tensor(processed.crop_top_left)}


class _StreamingPreprocessedDataset(IterableDataset):
    """Iterable view of a streaming source with the transforms applied; ``set_epoch`` selects the epoch."""

    def __init__(self, source: TextImageSource, resolution, center_crop, random_flip, seed, shuffle):
        self.source, self.resolution = source, _check_resolution(resolution)
        self.center_crop, self.random_flip, self.seed = bool(center_crop), bool(random_flip), int(seed)
        self.shuffle, self.epoch = bool(shuffle), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for sample_id, image, caption in self.source.iter_raw(self.epoch, self.seed, self.shuffle, worker_id,
                                                               num_workers):
            rng = _sample_rng(self.seed, self.epoch, sample_id)
            yield _make_example(image, caption, rng, self, f"sample {sample_id}")


class EpochDataLoader(DataLoader):
    """A ``DataLoader`` with ``set_epoch``: each ``iter()`` runs the next epoch unless one was set explicitly.

    (``accelerator.prepare`` replaces the loader class but keeps our sampler / dataset, whose ``set_epoch`` it
    calls itself.)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _propagate_epoch(self, epoch: int) -> None:
        for target in (self.sampler, self.dataset):
            if hasattr(target, "set_epoch"):
                target.set_epoch(epoch)

    def __iter__(self):
        self._propagate_epoch(self.epoch)
        iterator = super().__iter__()
        self.epoch += 1
        return iterator


def build_dataloader(
    source: TextImageSource | EncodedCache,
    resolution: int,
    center_crop: bool,
    random_flip: bool,
    batch_size: int,
    num_workers: int,
    seed: int | None,
    shuffle: bool = True,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> EpochDataLoader:
    """A deterministic training loader.

    From a :class:`TextImageSource` batches are ``{"pixel_values": float32 (B,3,H,W) in [-1,1], "captions":
    [str], "original_sizes": (B,2), "crop_top_lefts": (B,2)}`` (sizes ``(h, w)``, corners ``(top, left)``, for
    SDXL's micro-conditioning). From an :class:`EncodedCache` they hold its tensors (``latents``, prompt
    embeddings...) and ``captions``; ``resolution`` / ``center_crop`` / ``random_flip`` must then match the
    cache's.

    ``seed`` fixes the shuffle order and every per-sample random choice (``None``: a random seed). Map-style
    sources give a map-style loader that ``accelerate.skip_first_batches`` resumes exactly.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    generator = torch.Generator().manual_seed(int(seed))  # worker base seeds: reproducible too
    common = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate_text_image,
                  drop_last=drop_last, pin_memory=pin_memory, generator=generator)
    if isinstance(source, EncodedCache):
        source.check_preprocessing(resolution, center_crop, random_flip)
        dataset = source.with_seed(int(seed))
        return EpochDataLoader(dataset, sampler=EpochSampler(len(dataset), shuffle, int(seed)), **common)
    if not isinstance(source, TextImageSource):
        raise TypeError(f"source must be a TextImageSource (load_train_dataset) or an EncodedCache "
                        f"(build_encoded_cache), got {type(source).__name__}")
    if source.is_map_style:
        dataset = _PreprocessedDataset(source, resolution, center_crop, random_flip, seed)
        return EpochDataLoader(dataset, sampler=EpochSampler(len(dataset), shuffle, int(seed)), **common)
    dataset = _StreamingPreprocessedDataset(source, resolution, center_crop, random_flip, seed, shuffle)
    return EpochDataLoader(dataset, **common)


# -------------------------------------------------------------------------------------- encoded cache


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
        "preprocessing": {"resolution": _check_resolution(resolution), "center_crop": bool(center_crop),
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
    "crop_top_lefts", "captions"}``; with ``random_flip`` the mirrored latents are returned for the samples
    whose ``(seed, epoch, index)`` draw says flip. When latents were not cached (text-only cache) the item
    holds ``pixel_values`` preprocessed from the source instead.
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
        index, epoch = _split_item(item)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)} samples")
        flip = False
        if self.random_flip:
            flip = bool(_sample_rng(self.seed, epoch, index).random() < 0.5)
        example = {}
        for name in self.tensor_names:
            if name in ("latents_flipped", "crop_top_lefts_flipped"):
                continue
            if flip and name in ("latents", "crop_top_lefts"):
                example[name] = self._row(f"{name}_flipped", index)
            else:
                example[name] = self._row(name, index)
        if not self.has_latents:
            # Replay the encode-time draws (caption choice, then crop) so the crop matches the cached corner.
            image, raw_caption = self.source.get_raw(index)
            rng = _sample_rng(self.crop_seed, 0, index)
            _choose_caption(raw_caption, rng, f"sample {index}")
            processed = preprocess_image(image, self.resolution, self.center_crop, False, rng, flip=flip)
            example["pixel_values"] = processed.pixel_values
        example["captions"] = self.captions[index]
        return example


def _batched_examples(source: TextImageSource, spec, seed: int, batch_size: int, num_workers: int):
    """Batches for encoding: sequential order, epoch 0 choices, never flipped (mirrors are made from them)."""
    if source.is_map_style:
        dataset = _PreprocessedDataset(source, spec.resolution, spec.center_crop, False, seed)
        sampler = EpochSampler(len(dataset), shuffle=False, seed=seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                          collate_fn=collate_text_image)
    dataset = _StreamingPreprocessedDataset(source, spec.resolution, spec.center_crop, False, seed, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, num_workers=0, collate_fn=collate_text_image)


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
        resolution / center_crop / random_flip: the preprocessing (see the module docstring for flips).
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
    spec = _Spec(_check_resolution(resolution), bool(center_crop), bool(random_flip))
    try:
        num_samples, tensor_names, captions = _encode_into(tmp, source, spec, seed, encode_images,
                                                           encode_prompts, batch_size, num_workers,
                                                           samples_per_shard)
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


@dataclass(frozen=True)
class _Spec:
    resolution: int
    center_crop: bool
    random_flip: bool


def _encode_into(directory: Path, source, spec: _Spec, seed, encode_images, encode_prompts, batch_size,
                 num_workers, samples_per_shard):
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    pending: dict[str, list[torch.Tensor]] = {}
    captions: list[str] = []
    tensor_names: list[str] | None = None
    shard_index = 0

    def flush(final: bool):
        nonlocal shard_index
        while pending and (len(pending["original_sizes"]) >= samples_per_shard or (final and pending["original_sizes"])):
            rows = {name: values[:samples_per_shard] for name, values in pending.items()}
            for name in pending:
                del pending[name][:samples_per_shard]
            tensors = {name: torch.stack(values).contiguous() for name, values in rows.items()}
            save_file(tensors, str(directory / f"shard-{shard_index:05d}.safetensors"),
                      metadata={"format": "lcm-kit-encoded-cache"})
            shard_index += 1

    total = len(source) if source.is_map_style else None
    with torch.no_grad(), tqdm(total=total, desc="Encoding dataset", unit="img") as progress:
        for batch in _batched_examples(source, spec, seed, batch_size, num_workers):
            count = len(batch["captions"])
            outputs: dict[str, torch.Tensor] = {"original_sizes": batch["original_sizes"],
                                                "crop_top_lefts": batch["crop_top_lefts"]}
            if spec.random_flip:
                corners = batch["crop_top_lefts"].clone()
                resized_w = _resized_widths(batch["original_sizes"], spec.resolution)
                corners[:, 1] = resized_w - corners[:, 1] - spec.resolution
                outputs["crop_top_lefts_flipped"] = corners
            if encode_images is not None:
                outputs["latents"] = _check_output(encode_images(batch["pixel_values"]), count, "encode_images")
                if spec.random_flip:
                    outputs["latents_flipped"] = _check_output(encode_images(batch["pixel_values"].flip(-1)),
                                                               count, "encode_images")
            if encode_prompts is not None:
                embeddings = encode_prompts(list(batch["captions"]))
                if not isinstance(embeddings, Mapping):
                    raise TypeError(f"encode_prompts must return a dict of tensors, got {type(embeddings).__name__}")
                for name, value in embeddings.items():
                    if name in _RESERVED_CACHE_KEYS or name == "pixel_values":
                        raise ValueError(f"encode_prompts returned the reserved key {name!r}; reserved: "
                                         f"{list(_RESERVED_CACHE_KEYS)}")
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


def _resized_widths(original_sizes: torch.Tensor, resolution: int) -> torch.Tensor:
    heights, widths = original_sizes[:, 0].double(), original_sizes[:, 1].double()
    scale = resolution / torch.minimum(heights, widths)
    resized = torch.tensor([max(resolution, round(float(w))) for w in widths * scale], dtype=torch.long)
    return resized


def _check_output(value, count: int, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must return a torch.Tensor, got {type(value).__name__}")
    if value.ndim == 0 or value.shape[0] != count:
        raise ValueError(f"{what} returned shape {tuple(value.shape)} for a batch of {count}: the first "
                         "dimension must be the batch")
    return value
