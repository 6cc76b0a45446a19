"""webdataset tar shards: shard patterns, local shards read map-style through ``datasets``, streamed shards through
``webdataset``."""

from __future__ import annotations

import itertools
import json
import logging
import random
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from braceexpand import UnbalancedBracesError, braceexpand

from .errors import BadSampleError, BadShardError, SkippedSamples
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


# Leading bytes of the compressions tarfile / webdataset read: gzip, bzip2, xz, zstandard.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


def shard_problem(path: Path) -> str | None:
    """Why a local shard is not a tar archive (empty, other content), or ``None``; reads its first bytes only."""
    with open(path, "rb") as handle:
        head = handle.read(262)
    if not head:
        return "is empty (0 bytes)"
    if (len(head) >= 262 and head[257:262] == b"ustar") or head.startswith(_COMPRESSED_MAGIC):
        return None
    try:  # a tar without the ustar magic (old v7 format) still opens
        with tarfile.open(path, "r:") as archive:
            if archive.next() is not None:
                return None
    except (tarfile.TarError, OSError, EOFError):
        pass
    return f"is not a tar archive (it starts with {head[:16]!r})"


def tar_damage(path: Path) -> str | None:
    """Why a local shard cannot be read to its end (a truncated or damaged archive), or ``None``. Reads every
    member header (a compressed shard is decompressed on the way)."""
    try:
        with tarfile.open(path, "r:*") as archive:
            for _member in archive:
                pass
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def check_local_shards(shards: Sequence[str], skip_bad: bool, skipped=None) -> list[str]:
    """The local shards that are tar archives; a shard that is not raises :class:`BadShardError` naming it, or,
    with ``skip_bad``, is left out with a warning (counted in ``skipped``)."""
    kept = []
    for shard in shards:
        if shard.startswith(URL_PREFIXES):
            kept.append(shard)
            continue
        problem = shard_problem(Path(shard).expanduser())
        if problem is None:
            kept.append(shard)
            continue
        error = BadShardError(f"train_shards_path_or_url: shard {shard!r} {problem}", shard)
        if not skip_bad:
            raise error
        if skipped is not None:
            skipped.add(error, "this shard is left out")
    if not kept:
        raise ValueError(f"train_shards_path_or_url: none of the {len(shards)} shards is a tar archive")
    return kept


def _import_webdataset():
    try:
        import webdataset
    except ImportError as error:
        raise ImportError("reading webdataset shards (train_shards_path_or_url) needs `pip install webdataset`"
                          ) from error
    return webdataset


def _open_shard(webdataset, shard: str):
    """A webdataset pipeline over one shard, yielding ``{"__key__", "__url__", ext: bytes}``. (Shards are read one at
    a time so a reading failure can name its shard; workers are dealt shards by :meth:`WebDatasetStream.iter_raw`.
    No node splitter: accelerate dispatches the batches of an iterable loader from process 0, which must therefore
    read every shard.)"""
    # The bare pipeline, not `webdataset.WebDataset`: 0.2.x always appends `split_by_worker` (a worker's one shard
    # would go to worker 0 only) and has no `workersplitter` / `empty_check` arguments to turn it off.
    return webdataset.DataPipeline(webdataset.SimpleShardList([shard]), webdataset.tarfile_to_samples())


def _shard_error(shard: str, error: BaseException, after: str | None) -> BadShardError:
    """A reading failure of ``shard`` (truncated tar, not a tar, unreadable URL) as an error naming it."""
    where = f"past sample {after!r}" if after is not None else "(no sample of it was read)"
    # webdataset appends the stream and URL to the exception's arguments, and " @ <stream>" to the first one.
    message = str(error.args[0]).split(" @ <")[0] if error.args else ""
    return BadShardError(f"train_shards_path_or_url: shard {shard!r} cannot be read {where}: "
                         f"{type(error).__name__}: {message}", shard)


def _shard_samples(webdataset, shard: str) -> Iterator[dict]:
    """The samples of one shard; a reading failure raises :class:`BadShardError` naming the shard (samples
    before the failure have been yielded)."""
    last = None
    try:
        for sample in _open_shard(webdataset, shard):
            last = sample.get("__key__")
            yield sample
    except Exception as error:  # tarfile / gzip / gopen / webdataset grouping errors
        raise _shard_error(shard, error, last) from error


def _peek(shard: str) -> list[dict]:
    return list(itertools.islice(_shard_samples(_import_webdataset(), shard), PEEK_SAMPLES))


def _peek_first(shards: Sequence[str], skip_bad: bool, skipped) -> tuple[list[dict], list[str]]:
    """The first samples of the first readable shard and the shards left; with ``skip_bad`` unreadable or empty
    leading shards are skipped (and counted), otherwise they raise naming the shard."""
    shards = list(shards)
    while shards:
        try:
            peeked = _peek(shards[0])
            if not peeked:
                raise BadShardError(f"train_shards_path_or_url: the first shard {shards[0]!r} holds no samples",
                                    shards[0])
            return peeked, shards
        except BadShardError as error:
            if not skip_bad:
                raise
            skipped.add(error, "this shard is left out")
            shards.pop(0)
    raise ValueError("train_shards_path_or_url: no shard can be read (every one was skipped)")


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
                 max_train_samples: int | None = None, cache_dir: str | None = None, skip_bad_samples: bool = False,
                 skipped: SkippedSamples | None = None):
        self.set_skip_bad_samples(skip_bad_samples, skipped)
        shards = [str(Path(s).expanduser().resolve()) for s in shards]
        peeked, shards = _peek_first(check_local_shards(shards, skip_bad_samples, self.skipped), skip_bad_samples,
                                     self.skipped)
        image_column, caption_column = _detect_columns(peeked, image_column, caption_column)
        caption_feature, self._json_key = _caption_feature(peeked, caption_column)
        dataset, self.shards = self._convert(shards, image_column, caption_column, caption_feature, cache_dir)
        dataset = _drop_incomplete(dataset, image_column, caption_column)
        super().__init__(dataset, image_column, caption_column,
                         description={"kind": "webdataset", "files": file_identity([Path(s) for s in self.shards])},
                         max_train_samples=max_train_samples, name_columns=("__key__", "__url__"))

    def _convert(self, shards, image_column, caption_column, caption_feature, cache_dir):
        """``(dataset, shards converted)``. A shard that fails the conversion is named (datasets' error names
        none); with skip_bad_samples the damaged shards are left out and the others converted."""
        import datasets

        # Declaring the features keeps only these columns: the builder's own inference from the first samples
        # fails on metadata members whose fields change type (e.g. json null first, then a string).
        features = datasets.Features({image_column: datasets.Image(), caption_column: caption_feature,
                                      "__key__": datasets.Value("string"), "__url__": datasets.Value("string")})
        try:
            return datasets.load_dataset("webdataset", data_files=shards, split="train", features=features,
                                         cache_dir=cache_dir), shards
        except Exception as error:
            # Find the culprit (this reads the shards again, on failure only): a damaged archive, else a member the
            # builder cannot decode (a .txt that is not UTF-8, a .json that is not JSON).
            damaged = {shard: BadShardError(f"train_shards_path_or_url: shard {shard!r} is damaged: {problem}", shard)
                       for shard in shards if (problem := tar_damage(Path(shard))) is not None}
            if not damaged:
                damaged = {shard: bad for shard in shards if (bad := _undecodable_member(shard)) is not None}
            if not damaged:
                cause = error.__cause__ or error.__context__
                raise ValueError(
                    f"train_shards_path_or_url: datasets could not convert the shards {shards}: "
                    f"{type(error).__name__}: {error}" + (f" (caused by {type(cause).__name__}: {cause})" if cause
                                                          else "")) from error
            if not self.skip_bad_samples:
                raise next(iter(damaged.values())) from error
            for bad in damaged.values():
                self.skipped.add(bad, "this shard is left out (datasets converts whole shards)")
        kept = [shard for shard in shards if shard not in damaged]
        if not kept:
            raise ValueError("train_shards_path_or_url: no shard can be converted, e.g. "
                             f"{next(iter(damaged.values()))}")
        return datasets.load_dataset("webdataset", data_files=kept, split="train", features=features,
                                     cache_dir=cache_dir), kept

    def _caption_feature_ok(self, feature) -> bool:
        return True  # built by _caption_feature from the members themselves

    def describe_sample(self, index: int) -> str:
        try:
            row = self._names[int(index)]
        except Exception:  # the name is best effort: the caller reports the real error
            return f"webdataset sample {index}"
        return f"webdataset sample {index} (key {row['__key__']!r} in shard {row['__url__']!r})"

    def get_raw(self, index: int):
        image, value = super().get_raw(index)
        if self._json_key is not None:
            value = value[self._json_key]
            if value is None:
                name = self.describe_sample(index)
                raise BadSampleError(f"{name}: its {self.caption_column!r} member has no {self._json_key!r} "
                                     "caption (the key found in the first samples)", name)
        elif isinstance(value, bytes):
            try:
                value = decode_caption(value, self.caption_column)
            except ValueError as error:  # also a caption that is not UTF-8
                name = self.describe_sample(index)
                raise BadSampleError(f"{name}: {error}", name) from error
        elif isinstance(value, str) and not _is_json(self.caption_column):
            value = value.strip()
        return image, value

    def __repr__(self):
        return (f"WebDatasetShards({len(self.shards)} shards, image_column={self.image_column!r}, "
                f"caption_column={self.caption_column!r}, num_samples={self.num_samples})")


def _undecodable_member(shard: str) -> BadSampleError | None:
    """The first member of ``shard`` that datasets' webdataset builder fails to decode (it decodes members by
    extension while converting), as an error naming the sample and the shard; ``None`` if every member decodes."""
    from datasets.packaged_modules.webdataset.webdataset import WebDataset as Builder
    from datasets.packaged_modules.webdataset.webdataset import base_plus_ext

    with tarfile.open(shard, "r:") as archive:
        for member in archive:
            key, field = base_plus_ext(member.name) if member.isreg() else (None, None)
            decode = Builder.DECODERS.get(field.split(".")[-1].lower()) if key is not None else None
            if decode is None:
                continue
            try:
                decode(archive.extractfile(member).read())
            except Exception as error:  # the builder's decoders: UTF-8 text, JSON, numpy, ...
                name = f"webdataset sample {key!r} in shard {shard!r}"
                return BadSampleError(f"train_shards_path_or_url: {name}: its {field!r} member cannot be decoded "
                                      f"({type(error).__name__}: {error})", name)
    return None


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
    """webdataset shards streamed through webdataset's tar reader (URLs, ``pipe:``, compressed shards): length
    unknown, shards reshuffled every epoch and dealt to DataLoader workers, then a seeded shuffle buffer."""

    def __init__(self, shards: Sequence[str], image_column: str | None, caption_column: str | None,
                 max_train_samples: int | None = None, shuffle_buffer: int = 1000, skip_bad_samples: bool = False,
                 skipped: SkippedSamples | None = None):
        self.set_skip_bad_samples(skip_bad_samples, skipped)
        peeked, shards = _peek_first(check_local_shards(list(shards), skip_bad_samples, self.skipped),
                                     skip_bad_samples, self.skipped)
        self.shards = shards
        self.peeked = peeked
        self.image_column, self.caption_column = _detect_columns(peeked, image_column, caption_column)
        self.num_samples = None
        self.max_train_samples = max_train_samples
        self.shuffle_buffer = shuffle_buffer

    @property
    def is_map_style(self) -> bool:
        return False

    def __getstate__(self):
        state = dict(self.__dict__)
        state["peeked"] = []  # only the start-up check reads them
        return state

    def _samples(self, webdataset, shards: Sequence[str]) -> Iterator[dict]:
        """The samples of ``shards`` in order; a damaged shard raises naming it, or with skip_bad_samples ends
        early with a warning (the samples read before the damage are kept)."""
        for shard in shards:
            try:
                yield from _shard_samples(webdataset, shard)
            except BadShardError as error:
                if not self.skip_bad_samples:
                    raise
                self.skipped.add(error, "the rest of this shard is skipped")

    def _load(self, sample: dict) -> tuple:
        name = f"webdataset sample {sample['__key__']!r} in shard {sample['__url__']!r}"
        try:
            image = open_image(sample[self.image_column])
        except Exception as error:  # PIL's errors for corrupt, truncated or empty members
            raise BadSampleError(f"{name}: cannot read its {self.image_column!r} member: "
                                 f"{type(error).__name__}: {error}", name) from error
        try:
            caption = decode_caption(sample[self.caption_column], self.caption_column)
        except ValueError as error:  # also a caption that is not UTF-8
            raise BadSampleError(f"{name}: {error}", name) from error
        return image, caption

    def first_samples(self) -> list[tuple[str, Callable[[], tuple]]]:
        """``(name, load)`` of the complete samples among the first ones of the first shard (the start-up check
        reads them)."""
        samples = list(_complete_samples(self.peeked, self.image_column, self.caption_column))
        if not samples:
            raise ValueError(f"train_shards_path_or_url: none of the first {len(self.peeked)} samples of "
                             f"{self.shards[0]!r} has both a {self.image_column!r} and a {self.caption_column!r} "
                             "member")
        return [(f"webdataset sample {s['__key__']!r} in shard {s['__url__']!r}", lambda s=s: self._load(s))
                for s in samples]

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
        if not limited:
            shards = shards[worker_id::num_workers]  # as webdataset.split_by_worker deals them
        samples = _complete_samples(self._samples(webdataset, shards), self.image_column, self.caption_column)
        if limited:
            samples = itertools.islice(samples, worker_id, self.max_train_samples, num_workers)
        if shuffle:
            state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), 104729, worker_id]).generate_state(1)
            samples = webdataset.shuffle(self.shuffle_buffer, rng=random.Random(int(state[0])))(samples)
        for sample in samples:
            key, url = sample["__key__"], sample["__url__"]
            yield (zlib.crc32(f"{url}/{key}".encode()), f"webdataset sample {key!r} in shard {url!r}",
                   lambda sample=sample: self._load(sample))

    def identity(self) -> dict:
        local = [Path(s) for s in self.shards if not s.startswith(URL_PREFIXES)]
        return {"kind": "webdataset-stream", "urls": self.shards, "files": file_identity(local),
                "columns": [self.image_column, self.caption_column], "max_train_samples": self.max_train_samples}

    def __repr__(self):
        return (f"WebDatasetStream({len(self.shards)} shards, image_column={self.image_column!r}, "
                f"caption_column={self.caption_column!r})")
