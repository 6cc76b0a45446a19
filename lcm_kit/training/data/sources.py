"""Text-image sources: the source interface, and datasets read through ``datasets`` (Hub, local files, folders)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import BadSampleError, SkippedSamples
from .transforms import open_image

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

_TABULAR_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


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
    #: Skip (count, log) bad samples instead of raising; see :meth:`set_skip_bad_samples`.
    skip_bad_samples: bool = False
    skipped: SkippedSamples | None = None

    def set_skip_bad_samples(self, skip: bool, skipped: SkippedSamples | None = None) -> None:
        """With ``skip``, a sample that cannot be decoded or preprocessed is logged, counted and replaced: by the
        next good index for map-style sources, dropped from the stream for streaming ones. Call it before the
        DataLoader workers start (the count is shared with them); ``skipped``: a count to continue."""
        self.skip_bad_samples = bool(skip)
        if skipped is not None:
            self.skipped = skipped
        elif skip and self.skipped is None:
            self.skipped = SkippedSamples()

    @property
    def num_skipped_samples(self) -> int:
        """Samples skipped so far by this process and its DataLoader workers (0 without skip_bad_samples)."""
        return 0 if self.skipped is None else self.skipped.count

    def describe_sample(self, index: int) -> str:
        """The sample's name for messages: its index, and its file / shard where known."""
        return f"sample {index}"

    @property
    def is_map_style(self) -> bool:
        """True when samples can be read by index (length known, exact shuffling and resuming)."""
        return True

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError(f"{type(self).__name__} is a stream of unknown length")
        return self.num_samples

    def get_raw(self, index: int) -> tuple[Image.Image, Any]:
        """``(RGB image, raw caption)`` of sample ``index`` (map-style sources); a sample that cannot be read
        raises :class:`BadSampleError` naming it."""
        raise NotImplementedError

    def iter_raw(self, epoch: int, seed: int, shuffle: bool
                 ) -> Iterator[tuple[int, str, Callable[[], tuple[Image.Image, Any]]]]:
        """``(sample id, name, load)`` for the calling DataLoader worker's share of the stream (streaming sources):
        the sample id seeds that sample's random choices, ``load()`` returns ``(RGB image, raw caption)`` or raises
        :class:`BadSampleError` naming the sample."""
        raise NotImplementedError

    def identity(self) -> dict:
        """JSON-able description that changes whenever the data changes (keys the encoded cache)."""
        raise NotImplementedError


def resolve_column(kind: str, requested: str | None, available: Sequence[str], detected: str | None,
                   flag: str) -> str:
    """The requested column (checked against ``available``) or the detected one; errors list the choices."""
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


def file_identity(paths: Sequence[Path]) -> list[list]:
    """``[path, size, mtime_ns]`` for every file (directories walked), sorted: changes when any file changes."""
    entries = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                # datasets' own caches may live inside the data folder; they are not data.
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                entries.extend(Path(root, name) for name in files if not name.startswith("."))
        else:
            entries.append(path)
    identity = []
    for entry in sorted(set(entries)):
        stat = entry.stat()
        identity.append([str(entry.resolve()), stat.st_size, stat.st_mtime_ns])
    return identity


class DatasetsSource(TextImageSource):
    """A map-style ``datasets.Dataset`` (Hub id, local files, imagefolder or ``save_to_disk`` directory)."""

    def __init__(self, dataset, image_column: str | None, caption_column: str | None, description: dict,
                 base_dir: Path | None = None, max_train_samples: int | None = None,
                 name_columns: Sequence[str] = ()):
        import datasets

        self._description = description
        features = dataset.features
        columns = list(features)
        detected_image = detect_image_column(features)
        self.image_column = resolve_column("image", image_column, columns, detected_image, "image_column")
        self.caption_column = resolve_column("caption", caption_column, columns,
                                             detect_caption_column(features, self.image_column), "caption_column")
        if self.caption_column == self.image_column:
            raise ValueError(f"image_column and caption_column are both {self.image_column!r}")
        self._check_column_types(features, image_column is None, caption_column is None)
        # A string image column holds paths (csv / json lines): those image files are part of the data identity.
        self._image_is_path = _is_text_feature(features[self.image_column])
        if max_train_samples is not None:
            dataset = dataset.select(range(min(max_train_samples, len(dataset))))
        # Only the two columns are decoded per item (other image columns would cost time for nothing).
        self.dataset = dataset.select_columns([self.image_column, self.caption_column])
        # Read only to name a bad sample: the image column undecoded (its path), the shard columns.
        self._names = dataset.select_columns([self.image_column, *name_columns])
        if isinstance(features[self.image_column], datasets.Image):
            self._names = self._names.cast_column(self.image_column, datasets.Image(decode=False))
        self.num_samples = len(self.dataset)
        self.max_train_samples = max_train_samples
        self.base_dir = base_dir

    def _caption_feature_ok(self, feature) -> bool:
        return _is_text_feature(feature)

    def _check_column_types(self, features, image_detected: bool, caption_detected: bool) -> None:
        """Refuse columns whose type cannot hold images / captions, before any sample is read."""
        import datasets

        name = self._description.get("name")
        image = features[self.image_column]
        image_ok = (isinstance(image, (datasets.Image, dict)) or _is_text_feature(image) or
                    (isinstance(image, datasets.Value) and image.dtype in ("binary", "large_binary")))
        if not image_ok:
            raise ValueError(
                f"image_column={self.image_column!r}{' (detected)' if image_detected else ''} of dataset {name!r} "
                f"holds {_describe_feature(image)} values: expected images, image file paths or encoded image "
                f"bytes; columns: {_describe_features(features)}"
            )
        caption = features[self.caption_column]
        if not self._caption_feature_ok(caption):
            raise ValueError(
                f"caption_column={self.caption_column!r}{' (detected)' if caption_detected else ''} of dataset "
                f"{name!r} holds {_describe_feature(caption)} values: expected strings or lists of strings; "
                f"columns: {_describe_features(features)}"
            )

    def describe_sample(self, index: int) -> str:
        where = f"sample {index} of {self._description.get('name')}"
        try:
            value = self._names[int(index)][self.image_column]
        except Exception:  # the name is best effort: the caller reports the real error
            return where
        path = value.get("path") if isinstance(value, Mapping) else value if isinstance(value, str) else None
        if path is None:
            return where
        if "://" not in path and (not isinstance(value, Mapping) or value.get("bytes") is None):
            path = Path(path).expanduser()
            if not path.is_absolute() and self.base_dir is not None:
                path = self.base_dir / path
            return f"sample {index} (image file {str(path)!r})"
        return f"{where} (image {path!r})"

    def get_raw(self, index: int):
        if not 0 <= index < self.num_samples:  # a caller's error, never a bad sample to skip
            raise IndexError(f"sample index {index} out of range for a dataset of {self.num_samples} samples")
        try:
            row = self.dataset[int(index)]
            image = open_image(row[self.image_column], self.base_dir)
        except Exception as error:  # any failure to read one sample: PIL, a missing file, a damaged Arrow row
            name = self.describe_sample(index)
            raise BadSampleError(f"{name}: cannot read the image: {type(error).__name__}: {error}", name) from error
        return image, row[self.caption_column]

    def identity(self) -> dict:
        identity = dict(self._description)
        identity.update(columns=[self.image_column, self.caption_column], num_samples=self.num_samples,
                        max_train_samples=self.max_train_samples)
        if identity.get("files") is not None and self._image_is_path:
            # Tabular files name their images by path: those files are part of the data too.
            referenced = {Path(v).expanduser() for v in self.dataset[self.image_column] if isinstance(v, str)}
            base = self.base_dir or Path.cwd()
            paths = [p if p.is_absolute() else base / p for p in referenced]
            identity["files"] = identity["files"] + file_identity([p for p in paths if p.is_file()])
        return identity

    def __repr__(self):
        return (f"DatasetsSource({self._description.get('name')!r}, image_column={self.image_column!r}, "
                f"caption_column={self.caption_column!r}, num_samples={self.num_samples})")


def detect_image_column(features) -> str | None:
    """The first ``Image`` feature, else the first present of :data:`IMAGE_COLUMN_CANDIDATES`."""
    import datasets

    columns = list(features)
    detected = next((c for c in columns if isinstance(features[c], datasets.Image)), None)
    return detected if detected is not None else next((c for c in IMAGE_COLUMN_CANDIDATES if c in columns), None)


def detect_caption_column(features, image_column: str | None) -> str | None:
    """The first present of :data:`CAPTION_COLUMN_CANDIDATES`, else the only text column."""
    columns = [c for c in features if c != image_column]
    detected = next((c for c in CAPTION_COLUMN_CANDIDATES if c in columns), None)
    string_like = [c for c in columns if _is_text_feature(features[c])]
    if detected is None and len(string_like) == 1:
        detected = string_like[0]
    return detected


def _describe_feature(feature) -> str:
    import datasets

    if isinstance(feature, datasets.Value):
        return feature.dtype
    if isinstance(feature, dict):
        return "struct"
    return type(feature).__name__


def _describe_features(features) -> dict:
    return {name: _describe_feature(feature) for name, feature in features.items()}


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

    if isinstance(dataset_dict, datasets.Dataset):
        return dataset_dict
    if "train" in dataset_dict:
        return dataset_dict["train"]
    if len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    raise ValueError(f"dataset_name={name!r} has no 'train' split; splits: {list(dataset_dict)}")


def _load(name: str, load, *args, **kwargs):
    """``load(*args, **kwargs)`` with any failure re-raised as a ValueError naming the dataset and the cause
    (datasets' own message is often generic, e.g. "An error occurred while generating the dataset")."""
    try:
        return load(*args, **kwargs)
    except Exception as error:
        cause = error.__cause__ or error.__context__
        detail = f"{type(error).__name__}: {error}"
        if cause is not None and str(cause) not in detail:
            detail += f" (caused by {type(cause).__name__}: {cause})"
        raise ValueError(f"dataset_name={name!r}: datasets could not read it: {detail}") from error


#: Files that give an imagefolder its captions (datasets' imagefolder builder).
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet", "metadata.json")


def _has_data_files(path: Path) -> bool:
    """Any file in the folder besides hidden ones and metadata files."""
    for _root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not name.startswith(".") and name not in METADATA_FILES for name in files):
            return True
    return False


def load_datasets_source(dataset_name: str, dataset_config_name, image_column, caption_column,
                         max_train_samples, cache_dir) -> DatasetsSource:
    """``dataset_name`` opened with ``datasets``: a ``save_to_disk`` directory, a data folder, a data file or a
    Hub id."""
    import datasets

    path = Path(dataset_name).expanduser()
    base_dir = None
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        dataset = _split_train(_load(dataset_name, datasets.load_from_disk, str(path)), dataset_name)
        description = {"kind": "save_to_disk", "name": str(path.resolve()), "files": file_identity([path])}
    elif path.is_dir():
        if not _has_data_files(path):
            raise ValueError(f"dataset_name={dataset_name!r} holds no image or data file: an imagefolder needs image "
                             "files and a metadata.jsonl with a file_name and a caption (e.g. text) column per image")
        dataset = _split_train(_load(dataset_name, datasets.load_dataset, str(path), dataset_config_name,
                                     cache_dir=cache_dir), dataset_name)
        files = file_identity([path])
        description = {"kind": "folder", "name": str(path.resolve()), "config": dataset_config_name,
                       "files": files}
        base_dir = path
        has_metadata = any(Path(entry[0]).name in METADATA_FILES for entry in files)
        if (not has_metadata and caption_column is None
                and detect_caption_column(dataset.features, image_column or detect_image_column(dataset.features))
                is None):
            raise ValueError(
                f"dataset_name={dataset_name!r} has no metadata.jsonl, so its images have no captions (columns: "
                f"{list(dataset.features)}): write a metadata.jsonl beside the images, one line per image such as "
                '{"file_name": "0001.png", "text": "a caption"}, or pass --caption_column'
            )
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix not in _TABULAR_BUILDERS:
            raise ValueError(
                f"dataset_name={dataset_name!r} is a file with suffix {suffix!r}; supported files: "
                f"{sorted(_TABULAR_BUILDERS)} (for tar shards use train_shards_path_or_url)"
            )
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        dataset = _load(dataset_name, datasets.load_dataset, _TABULAR_BUILDERS[suffix], data_files=str(path),
                        cache_dir=cache_dir, **kwargs)["train"]
        description = {"kind": "file", "name": str(path.resolve()), "files": file_identity([path])}
        base_dir = path.parent
    else:
        if dataset_name.startswith(("/", "./", "../", "~")) or os.sep + os.sep in dataset_name:
            raise ValueError(f"dataset_name={dataset_name!r} looks like a local path but does not exist")
        dataset = _split_train(datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir),
                               dataset_name)
        description = {"kind": "hub", "name": dataset_name, "config": dataset_config_name,
                       "fingerprint": getattr(dataset, "_fingerprint", None)}
    if len(dataset) == 0:
        raise ValueError(f"dataset_name={dataset_name!r} holds no samples (columns: {list(dataset.features)})")
    return DatasetsSource(dataset, image_column, caption_column, description, base_dir, max_train_samples)
