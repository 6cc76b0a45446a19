"""webdataset tar shards: shard patterns, local shards read map-style through ``datasets``, streamed shards through
``webdataset``."""

from __future__ import annotations

import itertools
import json
import logging
import random
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from braceexpand import UnbalancedBracesError, braceexpand

from .sources import DatasetsSource, TextImageSource, file_identity, resolve_column
from .transforms import open_image

logger = logging.getLogger(__name__)

#: webdataset extensions (lower case) that hold an image, in detection order.
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
#: webdataset extensions that hold a caption, in detection order.
WDS_CAPTION_EXTENSIONS = ("txt", "text", "caption", "json")
#: Keys read from a webdataset ``.json`` member when it is the caption column.
JSON_CAPTION_KEYS = ("caption", "text", "prompt", "txt")
URL_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://", "ftp://")
#: Samples of the first shard read to detect the columns.
PEEK_SAMPLES = 16
# Members that datasets' webdataset builder decodes before storing them: as text, as JSON.
_BUILDER_TEXT_EXTENSIONS = ("txt", "text", "transcript")
_BUILDER_JSON_EXTENSIONS = ("json", "jsn")


def expand_shard_pattern(pattern: str | Sequence[str]) -> list[str]:
    """Expand webdataset shard patterns: ``{000..012}`` ranges (zero padding kept), ``{a,b}`` lists, several
    patterns joined by ``::`` or given as a list."""
    if not isinstance(pattern, str):
        return [url for item in pattern for url in expand_shard_pattern(item)]
    try:
        urls = [url for part in pattern.split("::") if part for url in braceexpand(part)]
    except UnbalancedBracesError as error:
        raise ValueError(f"train_shards_path_or_url pattern {pattern!r}: {error}") from error
    unexpanded = [url for url in urls if "{" in url or "}" in url]
    if unexpanded:
        raise ValueError(f"train_shards_path_or_url pattern {pattern!r}: cannot expand {unexpanded[0]!r} "
                         "(use {000..009} or {a,b})")
    return urls


def is_plain_tar(path: Path) -> bool:
    """An uncompressed tar file (its ``ustar`` magic), which datasets' webdataset builder reads in place."""
    with open(path, "rb") as handle:
        magic = handle.read(262)
    return len(magic) >= 262 and magic[257:262] == b"ustar"


def _import_webdataset():
    try:
        import webdataset
    except ImportError as error:
        raise ImportError("reading webdataset shards (train_shards_path_or_url) needs `pip install webdataset`"
                          ) from error
    return webdataset


def _open_shards(webdataset, shards: Sequence[str], split_by_worker: bool):
    """A webdataset pipeline over ``shards`` in the given order, yielding ``{"__key__", "__url__", ext: bytes}``.

    No node splitter: accelerate dispatches the batches of an iterable loader from process 0, which must therefore
    read every shard."""
    return webdataset.WebDataset(list(shards), shardshuffle=False, nodesplitter=None,
                                 workersplitter=webdataset.split_by_worker if split_by_worker else None,
                                 empty_check=False)


def _peek(shard: str) -> list[dict]:
    return list(itertools.islice(_open_shards(_import_webdataset(), [shard], False), PEEK_SAMPLES))


def _detect_columns(samples: Sequence[Mapping], image_column, caption_column) -> tuple[str, str]:
    available = sorted({key for sample in samples for key in sample if not key.startswith("__")})
    detected_image = next((e for e in WDS_IMAGE_EXTENSIONS if e in available), None)
    detected_caption = next((e for e in WDS_CAPTION_EXTENSIONS if e in available), None)
    image = resolve_column("image", image_column, available, detected_image, "image_column")
    caption = resolve_column("caption", caption_column, available, detected_caption, "caption_column")
    return image, caption


def _is_json(column: str) -> bool:
    return column.rsplit(".", 1)[-1] in _BUILDER_JSON_EXTENSIONS


def _json_caption_key(value: Any, text: str) -> str | None:
    """The key holding the caption in a decoded json member (``None``: the member is the caption itself)."""
    if not isinstance(value, dict):
        return None
    key = next((k for k in JSON_CAPTION_KEYS if k in value), None)
    if key is None:
        raise ValueError(f"json caption {text[:200]!r} has none of the keys {list(JSON_CAPTION_KEYS)}")
    return key


def decode_caption(data: bytes, column: str) -> Any:
    """A caption member's raw bytes as a string (text, stripped) or the json caption (string or list)."""
    text = data.decode("utf-8")
    if _is_json(column):
        value = json.loads(text)
        key = _json_caption_key(value, text)
        return value if key is None else value[key]
    return text.strip()


def _complete_samples(samples: Iterable[dict], image_column: str, caption_column: str) -> Iterator[dict]:
    """The samples holding both members; each one lacking a member is reported (with a running count)."""
    skipped = 0
    for sample in samples:
        missing = [c for c in (image_column, caption_column) if c not in sample]
        if missing:
            skipped += 1
            logger.warning("webdataset sample %r in %s lacks a %s member: skipped (%d skipped so far by this reader)",
                           sample.get("__key__"), sample.get("__url__"), " and ".join(map(repr, missing)), skipped)
            continue
        yield sample


class WebDatasetShards(DatasetsSource):
    """Local uncompressed webdataset shards, converted once by ``datasets.load_dataset("webdataset")`` into its
    Arrow cache and read map-style (known length, exact shuffling and resuming)."""

    def __init__(self, shards: Sequence[str], image_column: str | None, caption_column: str | None,
                 max_train_samples: int | None = None, cache_dir: str | None = None):
        import datasets

        self.shards = [str(Path(s).expanduser().resolve()) for s in shards]
        peeked = _peek(self.shards[0])
        if not peeked:
            raise ValueError(f"train_shards_path_or_url: the first shard {self.shards[0]!r} holds no samples")
        image_column, caption_column = _detect_columns(peeked, image_column, caption_column)
        caption_feature, self._json_key = _caption_feature(peeked, caption_column)
        # Declaring the features keeps only these columns: the builder's own inference from the first samples
        # fails on metadata members whose fields change type (e.g. json null first, then a string).
        features = datasets.Features({image_column: datasets.Image(), caption_column: caption_feature,
                                      "__key__": datasets.Value("string"), "__url__": datasets.Value("string")})
        dataset = datasets.load_dataset("webdataset", data_files=self.shards, split="train", features=features,
                                        cache_dir=cache_dir)
        dataset = _drop_incomplete(dataset, image_column, caption_column)
        super().__init__(dataset, image_column, caption_column,
                         description={"kind": "webdataset", "files": file_identity([Path(s) for s in self.shards])},
                         max_train_samples=max_train_samples)

    def get_raw(self, index: int):
        image, value = super().get_raw(index)
        if self._json_key is not None:
            value = value[self._json_key]
            if value is None:
                raise ValueError(f"webdataset sample {index}: its {self.caption_column!r} member has no "
                                 f"{self._json_key!r} caption (the key found in the first samples)")
        elif isinstance(value, bytes):
            try:
                value = decode_caption(value, self.caption_column)
            except ValueError as error:  # also a caption that is not UTF-8
                raise ValueError(f"webdataset sample {index}: {error}") from error
        elif isinstance(value, str) and not _is_json(self.caption_column):
            value = value.strip()
        return image, value

    def __repr__(self):
        return (f"WebDatasetShards({len(self.shards)} shards, image_column={self.image_column!r}, "
                f"caption_column={self.caption_column!r}, num_samples={self.num_samples})")


def _caption_feature(peeked: Sequence[Mapping], column: str) -> tuple[Any, str | None]:
    """``(feature, json key)`` storing the caption member as datasets' webdataset builder decodes it: json
    members become the caption string / list (or a struct of only the caption key), text members a string,
    others stay bytes."""
    import datasets

    extension = column.rsplit(".", 1)[-1]
    if not _is_json(column):
        return datasets.Value("string" if extension in _BUILDER_TEXT_EXTENSIONS else "binary"), None
    raw = next(sample[column] for sample in peeked if column in sample).decode("utf-8")
    value = json.loads(raw)
    key = _json_caption_key(value, raw)
    caption = value if key is None else value[key]
    if isinstance(caption, str):
        feature = datasets.Value("string")
    elif isinstance(caption, list) and all(isinstance(v, str) for v in caption):
        feature = datasets.Sequence(datasets.Value("string"))
    else:
        raise ValueError(f"webdataset caption member {column!r} holds {caption!r}: expected a string or a list of "
                         "strings")
    return (feature if key is None else {key: feature}), key


def _drop_incomplete(dataset, image_column: str, caption_column: str):
    """The rows holding both members; the others are reported in one warning (count and examples)."""
    missing = np.zeros(len(dataset), dtype=bool)
    for column in (image_column, caption_column):
        missing |= dataset.data.column(column).is_null().to_numpy(zero_copy_only=False)
    if not missing.any():
        return dataset
    if missing.all():
        raise ValueError(f"train_shards_path_or_url: no sample has both a {image_column!r} and a "
                         f"{caption_column!r} member")
    examples = [f"{dataset[int(i)]['__key__']!r} in {dataset[int(i)]['__url__']}" for i in np.flatnonzero(missing)[:3]]
    logger.warning("webdataset shards: %d of %d samples lack a %r or %r member and are skipped, e.g. %s",
                   int(missing.sum()), len(dataset), image_column, caption_column, "; ".join(examples))
    return dataset.select(np.flatnonzero(~missing))


class WebDatasetStream(TextImageSource):
    """webdataset shards streamed through ``webdataset.WebDataset`` (URLs, ``pipe:``, compressed shards): length
    unknown, shards reshuffled every epoch and dealt to DataLoader workers, then a seeded shuffle buffer."""

    def __init__(self, shards: Sequence[str], image_column: str | None, caption_column: str | None,
                 max_train_samples: int | None = None, shuffle_buffer: int = 1000):
        self.shards = list(shards)
        peeked = _peek(self.shards[0])
        if not peeked:
            raise ValueError(f"train_shards_path_or_url: the first shard {self.shards[0]!r} holds no samples")
        self.image_column, self.caption_column = _detect_columns(peeked, image_column, caption_column)
        self.num_samples = None
        self.max_train_samples = max_train_samples
        self.shuffle_buffer = shuffle_buffer

    @property
    def is_map_style(self) -> bool:
        return False

    def iter_raw(self, epoch, seed, shuffle):
        webdataset = _import_webdataset()
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        limited = self.max_train_samples is not None
        shards = list(self.shards)
        # Without a limit, shards are shuffled per epoch and dealt to workers. With max_train_samples the
        # subset must not change between epochs: shards keep their order and samples are dealt round robin.
        if shuffle and not limited:
            # Our own (seed, epoch) order: WebDataset(shardshuffle=..., seed=...) repeats one order every epoch
            # (its epoch counter restarts in each fresh worker process, and without detshuffle it reseeds).
            np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 7919]).shuffle(shards)
        if not limited and num_workers > len(shards) and worker_id == 0:
            logger.warning("%d DataLoader workers but only %d shards: some workers stay idle",
                           num_workers, len(shards))
        samples = _complete_samples(_open_shards(webdataset, shards, split_by_worker=not limited),
                                    self.image_column, self.caption_column)
        if limited:
            samples = itertools.islice(samples, worker_id, self.max_train_samples, num_workers)
        if shuffle:
            state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), 104729, worker_id]).generate_state(1)
            samples = webdataset.shuffle(self.shuffle_buffer, rng=random.Random(int(state[0])))(samples)
        for sample in samples:
            key, url = sample["__key__"], sample["__url__"]
            try:
                caption = decode_caption(sample[self.caption_column], self.caption_column)
            except ValueError as error:  # also a caption that is not UTF-8
                raise ValueError(f"webdataset sample {key!r} in {url}: {error}") from error
            yield zlib.crc32(f"{url}/{key}".encode()), open_image(sample[self.image_column]), caption

    def identity(self) -> dict:
        local = [Path(s) for s in self.shards if not s.startswith(URL_PREFIXES)]
        return {"kind": "webdataset-stream", "urls": self.shards, "files": file_identity(local),
                "columns": [self.image_column, self.caption_column], "max_train_samples": self.max_train_samples}

    def __repr__(self):
        return (f"WebDatasetStream({len(self.shards)} shards, image_column={self.image_column!r}, "
                f"caption_column={self.caption_column!r})")
