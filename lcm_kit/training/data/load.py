"""Opening the training data: :func:`load_train_dataset` checks the arguments and picks the source."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .shards import URL_PREFIXES, WebDatasetShards, WebDatasetStream, expand_shard_pattern, is_plain_tar
from .sources import TextImageSource, load_datasets_source


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
        cache_dir: the ``datasets`` cache directory (local shards are converted into it once).
        streaming: shards only: ``None`` streams URLs and compressed shards and reads local ``.tar`` files
            map-style; ``True`` forces streaming, ``False`` forces map-style.
    """
    if (dataset_name is None) == (train_shards_path_or_url is None):
        raise ValueError(
            "pass exactly one of dataset_name and train_shards_path_or_url; got "
            f"dataset_name={dataset_name!r}, train_shards_path_or_url={train_shards_path_or_url!r}"
        )
    if max_train_samples is not None and (isinstance(max_train_samples, bool) or
                                          not isinstance(max_train_samples, int) or max_train_samples <= 0):
        raise ValueError(f"max_train_samples must be a positive int or None, got {max_train_samples!r}")
    cache_dir = None if cache_dir is None else str(cache_dir)
    if dataset_name is not None:
        return load_datasets_source(str(dataset_name), dataset_config_name, image_column, caption_column,
                                    max_train_samples, cache_dir)
    shards = expand_shard_pattern(train_shards_path_or_url)
    if not shards:
        raise ValueError(f"train_shards_path_or_url={train_shards_path_or_url!r} expands to no shard")
    remote = [s for s in shards if s.startswith(URL_PREFIXES)]
    if not remote:
        missing = [s for s in shards if not Path(s).expanduser().is_file()]
        if missing:
            raise ValueError(f"train_shards_path_or_url={train_shards_path_or_url!r}: {len(missing)} shard file(s) "
                             f"do not exist, e.g. {missing[:3]}")
    map_style_possible = not remote and all(is_plain_tar(Path(s).expanduser()) for s in shards)
    if streaming is None:
        streaming = not map_style_possible
    if not streaming and not map_style_possible:
        raise ValueError("streaming=False needs local uncompressed .tar shards; got "
                         f"train_shards_path_or_url={train_shards_path_or_url!r}")
    if streaming:
        return WebDatasetStream(shards, image_column, caption_column, max_train_samples)
    return WebDatasetShards(shards, image_column, caption_column, max_train_samples, cache_dir)


def load_train_dataset_from_args(args) -> TextImageSource:
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
