"""Text-image sources: the source interface, and datasets read through ``datasets`` (Hub, local files, folders)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

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

    def iter_raw(self, epoch: int, seed: int, shuffle: bool) -> Iterator[tuple[int, Image.Image, Any]]:
        """``(sample id, image, raw caption)`` for the calling DataLoader worker's share of the stream (streaming
        sources); the sample id seeds that sample's random choices."""
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
                 base_dir: Path | None = None, max_train_samples: int | None = None):
        import datasets

        features = dataset.features
        columns = list(features)
        detected_image = next((c for c in columns if isinstance(features[c], datasets.Image)), None)
        if detected_image is None:
            detected_image = next((c for c in IMAGE_COLUMN_CANDIDATES if c in columns), None)
        self.image_column = resolve_column("image", image_column, columns, detected_image, "image_column")
        string_like = [c for c in columns if c != self.image_column and _is_text_feature(features[c])]
        detected_caption = next((c for c in CAPTION_COLUMN_CANDIDATES if c in columns and c != self.image_column),
                                None)
        if detected_caption is None and len(string_like) == 1:
            detected_caption = string_like[0]
        self.caption_column = resolve_column("caption", caption_column, columns, detected_caption,
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
        return open_image(row[self.image_column], self.base_dir), row[self.caption_column]

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


def load_datasets_source(dataset_name: str, dataset_config_name, image_column, caption_column,
                         max_train_samples, cache_dir) -> DatasetsSource:
    """``dataset_name`` opened with ``datasets``: a ``save_to_disk`` directory, a data folder, a data file or a
    Hub id."""
    import datasets

    path = Path(dataset_name).expanduser()
    base_dir = None
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        dataset = _split_train(datasets.load_from_disk(str(path)), dataset_name)
        description = {"kind": "save_to_disk", "name": str(path.resolve()), "files": file_identity([path])}
    elif path.is_dir():
        dataset = _split_train(datasets.load_dataset(str(path), dataset_config_name, cache_dir=cache_dir),
                               dataset_name)
        description = {"kind": "folder", "name": str(path.resolve()), "config": dataset_config_name,
                       "files": file_identity([path])}
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
        description = {"kind": "file", "name": str(path.resolve()), "files": file_identity([path])}
        base_dir = path.parent
    else:
        if dataset_name.startswith(("/", "./", "../", "~")) or os.sep + os.sep in dataset_name:
            raise ValueError(f"dataset_name={dataset_name!r} looks like a local path but does not exist")
        dataset = _split_train(datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir),
                               dataset_name)
        description = {"kind": "hub", "name": dataset_name, "config": dataset_config_name,
                       "fingerprint": getattr(dataset, "_fingerprint", None)}
    return DatasetsSource(dataset, image_column, caption_column, description, base_dir, max_train_samples)
