"""Text-image training data shared by every lcm-kit trainer: sources, deterministic loaders, the encoded cache.

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

Modules: :mod:`.load` (:func:`load_train_dataset`), :mod:`.sources` (the source interface, ``datasets``
inputs), :mod:`.shards` (webdataset shards), :mod:`.transforms` (decoding, resize / crop / flip, captions,
collation), :mod:`.examples` (the torch datasets), :mod:`.loader` (sampler, loader, :func:`build_dataloader`),
:mod:`.cache` (the encoded cache).

Inputs (`load_train_dataset`):

* ``dataset_name``: a Hub dataset id, or anything ``datasets`` reads locally: an imagefolder (with
  ``metadata.jsonl``), a csv / tsv / json(-lines) / parquet file whose image column holds paths relative to
  that file, or a ``save_to_disk`` directory.
* ``train_shards_path_or_url``: webdataset tar shards, brace patterns allowed (``data/{00000..00003}.tar``),
  several patterns separated by ``::``. Local uncompressed shards are converted once by
  ``datasets.load_dataset("webdataset")`` (into the ``datasets`` cache, image and caption members only) and
  read map-style, so they have a length, shuffle exactly and resume with ``accelerate.skip_first_batches``.
  URLs (``http(s)://``, ``pipe:``, ``s3://``...) and compressed shards are streamed by ``webdataset.WebDataset``
  (``pip install webdataset``). Samples lacking the image or caption member are skipped with a warning that
  counts them.

Determinism. Every random choice for a sample (which caption of a list, then the random crop, then the flip)
is drawn from a generator seeded by ``(seed, epoch, sample index)``, never from global or per-worker state, so
results do not depend on ``num_workers`` and a resumed run sees exactly the same batches. The shuffle order is
a permutation seeded by ``(seed, epoch)``. ``accelerate``'s prepared loaders call ``set_epoch`` on our sampler
every epoch; a plain loader returned by :func:`build_dataloader` advances its epoch each time it is iterated,
and ``loader.set_epoch(e)`` selects one explicitly (do that before ``skip_first_batches`` when resuming).
Streamed shards: the sample id is a hash of shard URL and key, shards are reshuffled per ``(seed, epoch)`` and
dealt to workers, then a shuffle buffer seeded by ``(seed, epoch, worker)`` mixes them: the same seed, epoch
and ``num_workers`` give the same stream.

Checks and bad samples. :func:`load_train_dataset` checks the data before anything else runs
(:func:`check_train_dataset`): the dataset has samples (its length, from the metadata), the columns exist and
have usable types, and the first sample decodes, has a caption and is big enough for ``resolution`` (one sample
read, never the whole dataset); local shards must be tar archives (their first bytes are read). Any later failure
raises :class:`BadSampleError` (a ``ValueError``) naming the sample (index or key), its file and its shard, from
the library's original error, also across DataLoader worker processes; a damaged shard raises
:class:`BadShardError`. With ``skip_bad_samples=True`` (``--skip_bad_samples``) each bad sample is logged by
name with a running count instead (:func:`skipped_sample_count` reads the count): a map-style source serves the
next index that reads in its place, with the bad index's own random draws, so the length, the shuffle order,
every good sample and resuming stay exactly as they are (the replacement is seen twice that epoch); a stream drops
it. Shards that are missing, not tar archives or damaged are left out, each named in a warning.

Encoded cache (`build_encoded_cache`). The dataset is preprocessed and encoded once (VAE latents and/or text
embeddings) into safetensors shards under ``cache_dir/<key>/``; the key hashes the caller's model fingerprint,
the preprocessing parameters, the dataset identity (paths with sizes and modification times, or the datasets
fingerprint of a Hub dataset) and ``max_train_samples``, so a stale cache is never read. Choices made once at
encode time with the cache's ``seed``: the random crop window and the caption picked from a list. Random flips
stay random per epoch: with ``random_flip`` the image *and* its mirror image are encoded and each epoch picks
one per sample with the loader's seed.
"""

from .cache import EncodedCache, build_encoded_cache, encoded_cache_key
from .errors import BadSampleError, BadShardError, SkippedSamples
from .load import check_train_dataset, load_train_dataset, load_train_dataset_from_args
from .loader import EpochDataLoader, EpochSampler, build_dataloader, build_dataloader_from_args, skipped_sample_count
from .shards import WebDatasetShards, WebDatasetStream, expand_shard_pattern
from .sources import CAPTION_COLUMN_CANDIDATES, IMAGE_COLUMN_CANDIDATES, DatasetsSource, TextImageSource
from .transforms import collate_text_image, preprocess_image

__all__ = [
    "BadSampleError",
    "BadShardError",
    "CAPTION_COLUMN_CANDIDATES",
    "IMAGE_COLUMN_CANDIDATES",
    "DatasetsSource",
    "EncodedCache",
    "EpochDataLoader",
    "EpochSampler",
    "SkippedSamples",
    "TextImageSource",
    "WebDatasetShards",
    "WebDatasetStream",
    "build_dataloader",
    "build_dataloader_from_args",
    "build_encoded_cache",
    "check_train_dataset",
    "collate_text_image",
    "encoded_cache_key",
    "expand_shard_pattern",
    "load_train_dataset",
    "load_train_dataset_from_args",
    "preprocess_image",
    "skipped_sample_count",
]
