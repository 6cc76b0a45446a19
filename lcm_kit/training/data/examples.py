"""Torch datasets of preprocessed examples ``{"pixel_values", "captions", "original_sizes", "crop_top_lefts"}`` over
a source, map-style or streaming, and the policy for bad samples (raise, naming the sample; or skip it with ``skip_bad_samples``)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from torch.utils.data import Dataset, IterableDataset

from .errors import BadSampleError
from .sources import TextImageSource
from .transforms import check_resolution, choose_caption, preprocess_image_and_geometry, sample_rng

logger = logging.getLogger("lcm_kit.training.data")


def split_item(item) -> tuple[int, int]:
    """``(index, epoch)`` from a sampler item: ``(index, epoch)`` from :class:`EpochSampler`, or a bare index
    (epoch 0)."""
    if isinstance(item, (tuple, list)):
        return int(item[0]), int(item[1])
    return int(item), 0


def make_example(image, caption, rng, spec) -> dict:
    """One example; the sample's draws in order: caption choice, then crop, then flip."""
    caption = choose_caption(caption, rng)
    pixel_values, original_size, crop_top_left = preprocess_image_and_geometry(
        image, spec.resolution, spec.center_crop, spec.random_flip, rng)
    return {"pixel_values": pixel_values, "captions": caption, **geometry_rows(original_size, crop_top_left)}


def geometry_rows(original_size, crop_top_left) -> dict:
    """SDXL micro-conditioning of a sample as int64 (2,) tensors (batched like the pixels)."""
    return {"original_sizes": torch.tensor(original_size, dtype=torch.int64),
            "crop_top_lefts": torch.tensor(crop_top_left, dtype=torch.int64)}


def _example_at(source: TextImageSource, index: int, make: Callable, known_bad: dict | None = None) -> dict:
    if known_bad is not None and index in known_bad:
        raise BadSampleError(*known_bad[index])  # a fresh error: re-raising one would grow its traceback
    try:
        image, caption = source.get_raw(index)
    except BadSampleError as error:
        if known_bad is not None:  # only read errors are remembered: the checks in make depend on its resolution
            known_bad[index] = (str(error), error.sample)
        raise
    try:
        return make(image, caption)
    except ValueError as error:  # the caption or the image size (the checks of choose_caption / preprocess_image)
        name = source.describe_sample(index)
        raise BadSampleError(f"{name}: {error}", name) from error


def read_example(source: TextImageSource, index: int, make: Callable) -> dict:
    """``make(image, raw caption)`` for sample ``index`` of a map-style source.

    A bad sample raises :class:`BadSampleError` naming it. With ``source.skip_bad_samples`` the next index that
    reads (wrapping round) takes its place, still with ``make``'s draws for ``index``: which sample replaces which
    depends on the data only, so the length, the shuffle order, every other sample and a resumed run are all
    unchanged. ``make`` must draw from a fresh generator on every call."""
    if not source.skip_bad_samples:
        return _example_at(source, index, make)
    known_bad = source.skipped.known_bad
    try:
        return _example_at(source, index, make, known_bad)
    except BadSampleError as error:
        first = error
    count = len(source)
    for offset in range(1, count):
        candidate = (index + offset) % count
        try:
            example = _example_at(source, candidate, make, known_bad)
        except BadSampleError:
            continue  # it is logged when it is visited itself
        source.skipped.add(first, f"sample {candidate} takes its place")
        return example
    raise ValueError(f"skip_bad_samples: none of the {count} samples of the dataset can be read; the first "
                     f"error: {first}") from first


class PreprocessedDataset(Dataset):
    """Map-style view of a source with the transforms applied; item ``(index, epoch)`` or ``index``."""

    def __init__(self, source: TextImageSource, resolution, center_crop, random_flip, seed):
        self.source, self.resolution = source, check_resolution(resolution)
        self.center_crop, self.random_flip, self.seed = bool(center_crop), bool(random_flip), int(seed)
        self._reported = 0

    def __len__(self):
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Called in the main process at each epoch's start: logs the skipped-sample total when it grew."""
        self._reported = _report_total(self.source, self._reported)

    def __getitem__(self, item):
        index, epoch = split_item(item)

        def make(image, caption):
            return make_example(image, caption, sample_rng(self.seed, epoch, index), self)

        return read_example(self.source, index, make)


class StreamingPreprocessedDataset(IterableDataset):
    """Iterable view of a streaming source with the transforms applied; ``set_epoch`` selects the epoch. With
    ``skip_bad_samples`` a bad sample is dropped from the stream (the same ones for the same seed and epoch)."""

    def __init__(self, source: TextImageSource, resolution, center_crop, random_flip, seed, shuffle):
        self.source, self.resolution = source, check_resolution(resolution)
        self.center_crop, self.random_flip, self.seed = bool(center_crop), bool(random_flip), int(seed)
        self.shuffle, self.epoch = bool(shuffle), 0
        self._reported = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._reported = _report_total(self.source, self._reported)

    def __iter__(self):
        for sample_id, name, load in self.source.iter_raw(self.epoch, self.seed, self.shuffle):
            try:
                image, caption = load()
                try:
                    example = make_example(image, caption, sample_rng(self.seed, self.epoch, sample_id), self)
                except ValueError as error:
                    raise BadSampleError(f"{name}: {error}", name) from error
            except BadSampleError as error:
                if not self.source.skip_bad_samples:
                    raise
                self.source.skipped.add(error, "dropped from the stream")
                continue
            yield example


def _report_total(source: TextImageSource, reported: int) -> int:
    total = source.num_skipped_samples
    if total > reported:
        logger.warning("skip_bad_samples: %d bad sample(s) skipped so far in this run (each one named in an "
                       "earlier warning)", total)
    return total
