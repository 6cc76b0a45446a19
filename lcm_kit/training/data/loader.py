"""Training loaders: the epoch-seeded sampler, the epoch-aware DataLoader and :func:`build_dataloader`."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .cache import EncodedCache
from .examples import PreprocessedDataset, StreamingPreprocessedDataset
from .sources import TextImageSource
from .transforms import collate_text_image


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


class EpochDataLoader(DataLoader):
    """A ``DataLoader`` with ``set_epoch``: each ``iter()`` runs the next epoch unless one was set explicitly.

    (``accelerator.prepare`` replaces the loader class but keeps our sampler / dataset, whose ``set_epoch`` it
    calls itself.)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        for target in (self.sampler, self.dataset):
            if hasattr(target, "set_epoch"):
                target.set_epoch(self.epoch)
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
    [str]}``. From an :class:`EncodedCache` they hold its tensors (``latents``, prompt embeddings...) and
    ``captions``; ``resolution`` / ``center_crop`` / ``random_flip`` must then match the cache's.

    ``seed`` fixes the shuffle order and every per-sample random choice (``None``: a random seed). Map-style
    sources give a map-style loader that ``accelerate.skip_first_batches`` resumes exactly; a streaming source
    gives the same stream again for the same seed, epoch and ``num_workers``, so skipping batches resumes it too.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    generator = torch.Generator().manual_seed(int(seed))  # worker base seeds: reproducible too
    common = {"batch_size": batch_size, "num_workers": num_workers, "collate_fn": collate_text_image,
              "drop_last": drop_last, "pin_memory": pin_memory, "generator": generator}
    if isinstance(source, EncodedCache):
        source.check_preprocessing(resolution, center_crop, random_flip)
        dataset = source.with_seed(int(seed))
        return EpochDataLoader(dataset, sampler=EpochSampler(len(dataset), shuffle, int(seed)), **common)
    if not isinstance(source, TextImageSource):
        raise TypeError(f"source must be a TextImageSource (load_train_dataset) or an EncodedCache "
                        f"(build_encoded_cache), got {type(source).__name__}")
    if source.is_map_style:
        dataset = PreprocessedDataset(source, resolution, center_crop, random_flip, seed)
        return EpochDataLoader(dataset, sampler=EpochSampler(len(dataset), shuffle, int(seed)), **common)
    dataset = StreamingPreprocessedDataset(source, resolution, center_crop, random_flip, seed, shuffle)
    return EpochDataLoader(dataset, **common)


def build_dataloader_from_args(args, source) -> EpochDataLoader:
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


def skipped_sample_count(loader) -> int:
    """Bad samples skipped so far (``skip_bad_samples``) by the loader's source in this process and its workers;
    ``loader`` is one from :func:`build_dataloader`, also once ``accelerator.prepare`` has wrapped it. 0 when none
    were skipped or the loader reads an encoded cache (skips while encoding are logged then)."""
    source = getattr(getattr(loader, "dataset", None), "source", None)
    return source.num_skipped_samples if isinstance(source, TextImageSource) else 0
