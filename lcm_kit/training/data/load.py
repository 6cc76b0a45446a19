"""Opening the training data: :func:`load_train_dataset` checks the arguments and picks the source."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from .errors import BadSampleError, BadShardError, SkippedSamples
from .shards import (
    URL_PREFIXES,
    WebDatasetShards,
    WebDatasetStream,
    check_local_shards,
    expand_shard_pattern,
    is_plain_tar,
)
from .sources import TextImageSource, load_datasets_source
from .transforms import check_image_size, check_resolution, choose_caption, sample_rng

logger = logging.getLogger("lcm_kit.training.data")

#: With skip_bad_samples, the start-up check looks this far for a first sample that reads.
CHECK_SCAN = 100


def load_train_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_shards_path_or_url: str | Sequence[str] | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    max_train_samples: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    streaming: bool | None = None,
    skip_bad_samples: bool = False,
    resolution: int | None = None,
) -> TextImageSource:
    """Open the training data (and only the data: call it before loading any model, so a wrong column name
    fails in seconds) and check it (:func:`check_train_dataset`).

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
        skip_bad_samples: a sample that cannot be decoded or preprocessed is logged (named), counted and
            replaced by the next good index (map-style) or dropped (streams) instead of raising; shards that are
            missing, not tar archives or damaged are left out with a warning. See
            :meth:`TextImageSource.set_skip_bad_samples`.
        resolution: the training resolution, if known: the check then also refuses a first image too small for
            it.

    Raises:
        ValueError: bad arguments, an empty dataset, missing or mistyped columns; :class:`BadSampleError` /
            :class:`BadShardError` (both ``ValueError``) naming the first sample or shard that cannot be read.
    """
    if not isinstance(skip_bad_samples, bool):
        raise TypeError(f"skip_bad_samples must be a bool, got {skip_bad_samples!r}")
    if resolution is not None:
        resolution = check_resolution(resolution)
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
        source = load_datasets_source(str(dataset_name), dataset_config_name, image_column, caption_column,
                                      max_train_samples, cache_dir)
        source.set_skip_bad_samples(skip_bad_samples)
    else:
        source = _load_shards(train_shards_path_or_url, image_column, caption_column, max_train_samples, cache_dir,
                              streaming, skip_bad_samples)
    check_train_dataset(source, resolution)
    return source


def _load_shards(pattern, image_column, caption_column, max_train_samples, cache_dir, streaming, skip_bad_samples):
    shards = expand_shard_pattern(pattern)
    if not shards:
        raise ValueError(f"train_shards_path_or_url={pattern!r} expands to no shard")
    remote = [s for s in shards if s.startswith(URL_PREFIXES)]
    skipped = SkippedSamples() if skip_bad_samples else None
    if not remote:
        missing = [s for s in shards if not Path(s).expanduser().is_file()]
        if missing and (not skip_bad_samples or len(missing) == len(shards)):
            hint = " (only brace patterns are expanded, not * or ?)" if any(c in str(pattern) for c in "*?[") else ""
            raise ValueError(f"train_shards_path_or_url={pattern!r}: {len(missing)} of {len(shards)} shard "
                             f"file(s) do not exist{hint}, e.g. {missing[:3]}")
        for shard in missing:
            skipped.add(BadShardError(f"train_shards_path_or_url: shard {shard!r} does not exist", shard),
                        "this shard is left out")
        shards = [s for s in shards if s not in missing]
    shards = check_local_shards(shards, skip_bad_samples, skipped)
    map_style_possible = not remote and all(is_plain_tar(Path(s).expanduser()) for s in shards)
    if streaming is None:
        streaming = not map_style_possible
    if not streaming and not map_style_possible:
        raise ValueError("streaming=False needs local uncompressed .tar shards; got "
                         f"train_shards_path_or_url={pattern!r}")
    if streaming:
        return WebDatasetStream(shards, image_column, caption_column, max_train_samples,
                                skip_bad_samples=skip_bad_samples, skipped=skipped)
    return WebDatasetShards(shards, image_column, caption_column, max_train_samples, cache_dir,
                            skip_bad_samples=skip_bad_samples, skipped=skipped)


def check_train_dataset(source: TextImageSource, resolution: int | None = None) -> None:
    """The start-up check (:func:`load_train_dataset` runs it): the dataset has samples (counted from its
    metadata, nothing read), and its first sample decodes, has a usable caption and, with ``resolution``, is big
    enough. It reads one sample, never the whole dataset. With ``source.skip_bad_samples`` a bad first sample is
    reported and the next ones tried (up to :data:`CHECK_SCAN`).

    Raises:
        ValueError: an empty dataset; :class:`BadSampleError` naming the first sample when it is bad (or, with
            skip_bad_samples, when the first :data:`CHECK_SCAN` samples all are).
    """
    if source.is_map_style:
        if len(source) == 0:
            raise ValueError(f"{source!r} holds no samples")
        candidates = [(lambda i=i: source.describe_sample(i), lambda i=i: source.get_raw(i))
                      for i in range(min(len(source), CHECK_SCAN if source.skip_bad_samples else 1))]
    else:
        candidates = [(lambda name=name: name, load) for name, load in source.first_samples()]
        if not source.skip_bad_samples:
            candidates = candidates[:1]
    first_error = None
    for describe, load in candidates:
        try:
            image, caption = load()
            try:
                choose_caption(caption, sample_rng(0, 0, 0))
                if resolution is not None:
                    check_image_size(image, resolution)
            except ValueError as error:
                raise BadSampleError(f"{describe()}: {error}", describe()) from error
            return
        except BadSampleError as error:
            if not source.skip_bad_samples:
                raise
            first_error = first_error or error
            logger.warning("skip_bad_samples: the start-up check found a bad sample, to be skipped in training: %s",
                           error)
    raise BadSampleError(f"skip_bad_samples: none of the first {len(candidates)} samples can be read, e.g. "
                         f"{first_error}", first_error.sample) from first_error


def load_train_dataset_from_args(args) -> TextImageSource:
    """:func:`load_train_dataset` from the parsed data flags of :func:`lcm_kit.training.args.add_data_args`
    (``--dataset_name``, ``--train_shards_path_or_url``, columns, ``--max_train_samples``, ``--cache_dir``,
    ``--skip_bad_samples``; ``--resolution`` for the start-up check)."""
    return load_train_dataset(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_shards_path_or_url=args.train_shards_path_or_url,
        image_column=args.image_column,
        caption_column=args.caption_column,
        max_train_samples=args.max_train_samples,
        cache_dir=args.cache_dir,
        skip_bad_samples=args.skip_bad_samples,
        resolution=args.resolution,
    )
