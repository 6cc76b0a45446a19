"""Torch datasets of preprocessed examples ``{"pixel_values", "captions"}`` over a source, map-style or streaming."""

from __future__ import annotations

from torch.utils.data import Dataset, IterableDataset

from .sources import TextImageSource
from .transforms import check_resolution, choose_caption, preprocess_image, sample_rng


def split_item(item) -> tuple[int, int]:
    """``(index, epoch)`` from a sampler item: ``(index, epoch)`` from :class:`EpochSampler`, or a bare index
    (epoch 0)."""
    if isinstance(item, (tuple, list)):
        return int(item[0]), int(item[1])
    return int(item), 0


def make_example(image, caption, rng, spec, where: str) -> dict:
    """One example; the sample's draws in order: caption choice, then crop, then flip."""
    caption = choose_caption(caption, rng, where)
    pixel_values = preprocess_image(image, spec.resolution, spec.center_crop, spec.random_flip, rng)
    return {"pixel_values": pixel_values, "captions": caption}


class PreprocessedDataset(Dataset):
    """Map-style view of a source with the transforms applied; item ``(index, epoch)`` or ``index``."""

    def __init__(self, source: TextImageSource, resolution, center_crop, random_flip, seed):
        self.source, self.resolution = source, check_resolution(resolution)
        self.center_crop, self.random_flip, self.seed = bool(center_crop), bool(random_flip), int(seed)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, item):
        index, epoch = split_item(item)
        image, caption = self.source.get_raw(index)
        return make_example(image, caption, sample_rng(self.seed, epoch, index), self, f"sample {index}")


class StreamingPreprocessedDataset(IterableDataset):
    """Iterable view of a streaming source with the transforms applied; ``set_epoch`` selects the epoch."""

    def __init__(self, source: TextImageSource, resolution, center_crop, random_flip, seed, shuffle):
        self.source, self.resolution = source, check_resolution(resolution)
        self.center_crop, self.random_flip, self.seed = bool(center_crop), bool(random_flip), int(seed)
        self.shuffle, self.epoch = bool(shuffle), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        for sample_id, image, caption in self.source.iter_raw(self.epoch, self.seed, self.shuffle):
            yield make_example(image, caption, sample_rng(self.seed, self.epoch, sample_id), self,
                               f"sample {sample_id}")

