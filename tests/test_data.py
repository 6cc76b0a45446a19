"""lcm_kit.training.data on real files: every input kind, transforms, determinism, resuming, encoded cache."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcm_kit.training.data import (
    EncodedCache,
    build_dataloader,
    build_encoded_cache,
    expand_shard_pattern,
    load_train_dataset,
    preprocess_image,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RES = 16
NUM = 6


def _image(index: int) -> Image.Image:
    """Distinct random content and varied sizes/modes (landscape, portrait, RGBA, greyscale)."""
    rng = np.random.RandomState(index)
    height, width = [(20, 28), (32, 20), (16, 16), (24, 40), (21, 17), (30, 30)][index % 6]
    array = rng.randint(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    if index == 2:
        image = image.convert("L")
    if index == 3:
        image = image.convert("RGBA")  # fully opaque: RGB conversion must keep the colours
    return image


def _expected(index: int, center_crop: bool = True) -> torch.Tensor:
    return preprocess_image(_image(index).convert("RGB"), RES, center_crop, False)


def _caption(index: int) -> str:
    return f"a photo number {index}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    images = root / "folder"
    images.mkdir()
    for i in range(NUM):
        _image(i).save(images / f"{i}.png")
    with open(images / "metadata.jsonl", "w") as f:
        for i in range(NUM):
            f.write(json.dumps({"file_name": f"{i}.png", "text": _caption(i)}) + "\n")
    # csv / jsonl next to a sub folder: paths are relative to the data file, not to the cwd
    with open(root / "table.csv", "w") as f:
        f.write("image_path,caption,score\n")
        for i in range(NUM):
            f.write(f"folder/{i}.png,{_caption(i)},{i}\n")
    with open(root / "lines.jsonl", "w") as f:
        for i in range(NUM):
            f.write(json.dumps({"image": f"folder/{i}.png", "prompt": _caption(i)}) + "\n")
    import datasets

    ds = datasets.Dataset.from_dict(
        {"img": [str(images / f"{i}.png") for i in range(NUM)], "sentence": [_caption(i) for i in range(NUM)]},
        features=datasets.Features({"img": datasets.Image(), "sentence": datasets.Value("string")}),
    )
    ds.save_to_disk(str(root / "saved"))
    # webdataset shards: 2 shards, jpg-free on purpose (png + webp keys) and txt / json captions
    for shard in range(2):
        with tarfile.open(root / f"shard-{shard:05d}.tar", "w") as tar:
            for i in range(shard * 3, shard * 3 + 3):
                buffer = io.BytesIO()
                _image(i).save(buffer, format="PNG")
                members = {"png": buffer.getvalue(), "json": json.dumps({"caption": _caption(i), "w": 1}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"sample{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def _source(kind: str, root: Path, **kwargs):
    cache = str(root / ".hf-cache")
    if kind == "imagefolder":
        return load_train_dataset(dataset_name=str(root / "folder"), cache_dir=cache, **kwargs)
    if kind == "csv":
        return load_train_dataset(dataset_name=str(root / "table.csv"), cache_dir=cache, **kwargs)
    if kind == "jsonl":
        return load_train_dataset(dataset_name=str(root / "lines.jsonl"), cache_dir=cache, **kwargs)
    if kind == "save_to_disk":
        return load_train_dataset(dataset_name=str(root / "saved"), **kwargs)
    if kind == "wds":
        return load_train_dataset(train_shards_path_or_url=str(root / "shard-{00000..00001}.tar"), cache_dir=cache,
                                  **kwargs)
    if kind == "wds-stream":
        return load_train_dataset(train_shards_path_or_url=str(root / "shard-{00000..00001}.tar"), streaming=True,
                                  **kwargs)
    raise AssertionError(kind)


EXPECTED_COLUMNS = {
    "imagefolder": ("image", "text"), "csv": ("image_path", "caption"), "jsonl": ("image", "prompt"),
    "save_to_disk": ("img", "sentence"), "wds": ("png", "json"), "wds-stream": ("png", "json"),
}


@pytest.mark.parametrize("kind", list(EXPECTED_COLUMNS))
def test_every_input_kind_yields_the_right_pixels_for_each_caption(kind, data_root):
    source = _source(kind, data_root)
    assert (source.image_column, source.caption_column) == EXPECTED_COLUMNS[kind]
    if kind != "wds-stream":
        assert len(source) == NUM
    workers = 2 if kind.startswith("wds") else 0  # the anchor's webdataset bug shows up in worker processes
    loader = build_dataloader(source, RES, center_crop=True, random_flip=False, batch_size=4,
                              num_workers=workers, seed=0, shuffle=False)
    seen = {}
    for batch in loader:
        assert batch["pixel_values"].dtype == torch.float32
        assert batch["pixel_values"].shape[1:] == (3, RES, RES)
        for caption, pixels in zip(batch["captions"], batch["pixel_values"]):
            seen[caption] = pixels
    assert sorted(seen) == sorted(_caption(i) for i in range(NUM))
    for i in range(NUM):
        torch.testing.assert_close(seen[_caption(i)], _expected(i), rtol=0, atol=0)


def test_max_train_samples_and_explicit_columns(data_root):
    source = _source("csv", data_root, max_train_samples=4, image_column="image_path", caption_column="caption")
    assert len(source) == 4
    captions = [c for b in build_dataloader(source, RES, True, False, 3, 0, 0, shuffle=False) for c in b["captions"]]
    assert captions == [_caption(i) for i in range(4)]
    shards = _source("wds", data_root, max_train_samples=5)
    assert len(shards) == 5


def test_streaming_max_train_samples_is_the_same_subset_every_epoch(data_root):
    source = _source("wds-stream", data_root, max_train_samples=4)
    loader = build_dataloader(source, RES, True, False, 2, 2, seed=3, shuffle=True)
    epochs = [sorted(c for b in loader for c in b["captions"]) for _ in range(2)]
    assert epochs[0] == epochs[1] == sorted(_caption(i) for i in range(4))


def test_missing_column_lists_the_available_columns(data_root):
    with pytest.raises(ValueError, match=r"image_column='photo'.*available columns: \['image', 'text'\]"):
        _source("imagefolder", data_root, image_column="photo")
    with pytest.raises(ValueError, match=r"caption_column='txt'.*\['image_path', 'caption', 'score'\]"):
        _source("csv", data_root, caption_column="txt")
    with pytest.raises(ValueError, match=r"caption_column='txt'.*\['json', 'png'\]"):
        _source("wds", data_root, caption_column="txt")
    with pytest.raises(ValueError, match="exactly one of dataset_name and train_shards_path_or_url"):
        load_train_dataset(dataset_name=str(data_root / "table.csv"),
                           train_shards_path_or_url=str(data_root / "shard-00000.tar"))
    with pytest.raises(ValueError, match="do not exist"):
        load_train_dataset(train_shards_path_or_url=str(data_root / "shard-{00000..00002}.tar"))


def test_caption_lists_pick_one_caption_per_sample_deterministically(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [_image(i) for i in range(4)], "captions": [[f"{i}-a", f"{i}-b", f"{i}-c"] for i in range(4)]},
        features=datasets.Features({"image": datasets.Image(),
                                    "captions": datasets.List(datasets.Value("string"))}),
    )
    ds.save_to_disk(str(tmp_path / "lists"))
    source = load_train_dataset(dataset_name=str(tmp_path / "lists"))
    assert source.caption_column == "captions"

    def run(seed):
        loader = build_dataloader(source, RES, True, False, 4, 0, seed=seed, shuffle=False)
        return [[c for b in loader for c in b["captions"]] for _ in range(4)]  # 4 epochs

    first = run(0)
    assert first == run(0)
    assert all(c.split("-")[0] == str(i) for epoch in first for i, c in enumerate(epoch))
    picked = {c for epoch in first for c in epoch}
    assert len(picked) > 4  # different captions of a sample are used across epochs


def test_compressed_shards_are_streamed(tmp_path, data_root):
    import gzip

    from lcm_kit.training.data import WebDatasetStream

    for shard in range(2):
        data = (data_root / f"shard-{shard:05d}.tar").read_bytes()
        (tmp_path / f"s{shard}.tar.gz").write_bytes(gzip.compress(data))
    source = load_train_dataset(train_shards_path_or_url=str(tmp_path / "s{0,1}.tar.gz"))
    assert isinstance(source, WebDatasetStream) and not source.is_map_style
    loader = build_dataloader(source, RES, True, False, batch_size=4, num_workers=2, seed=0)
    seen = {c: p for b in loader for c, p in zip(b["captions"], b["pixel_values"])}
    assert sorted(seen) == sorted(_caption(i) for i in range(NUM))
    torch.testing.assert_close(seen[_caption(4)], _expected(4), rtol=0, atol=0)


def test_expand_shard_pattern():
    assert expand_shard_pattern("d/{008..011}.tar") == ["d/008.tar", "d/009.tar", "d/010.tar", "d/011.tar"]
    assert expand_shard_pattern("a-{x,y}-{1..2}.tar::b.tar") == ["a-x-1.tar", "a-x-2.tar", "a-y-1.tar",
                                                               "a-y-2.tar", "b.tar"]
    assert expand_shard_pattern(["a/{0..1}.tar", "b.tar"]) == ["a/0.tar", "a/1.tar", "b.tar"]
    with pytest.raises(ValueError, match=r"cannot expand 'd/\{abc\}.tar'"):
        expand_shard_pattern("d/{abc}.tar")
    with pytest.raises(ValueError, match="train_shards_path_or_url pattern 'd/{0..2.tar'"):
        expand_shard_pattern("d/{0..2.tar")


# ------------------------------------------------------------------------------------- webdataset shards

NUM_SHARDS, PER_SHARD = 4, 5


def _write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    """A real webdataset tar: members ``<key>.<ext>`` in sample order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _shard_image(index: int) -> Image.Image:
    rng = np.random.RandomState(100 + index)
    height, width = int(rng.randint(RES + 2, 2 * RES)), int(rng.randint(RES + 2, 2 * RES))
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """4 shards of 5 samples (png + txt), as .tar and as .tar.gz."""
    import gzip

    root = tmp_path_factory.mktemp("shards")
    for shard in range(NUM_SHARDS):
        indices = range(shard * PER_SHARD, (shard + 1) * PER_SHARD)
        path = root / f"shard-{shard:04d}.tar"
        _write_shard(path, {f"k{i:04d}": {"png": _png(_shard_image(i)), "txt": f" shard caption {i}\n".encode()}
                            for i in indices})
        (root / f"shard-{shard:04d}.tar.gz").write_bytes(gzip.compress(path.read_bytes()))
    return root


SHARD_CAPTIONS = sorted(f"shard caption {i}" for i in range(NUM_SHARDS * PER_SHARD))


def _batches(loader) -> list[tuple[list[str], torch.Tensor]]:
    return [(batch["captions"], batch["pixel_values"]) for batch in loader]


def _assert_same_batches(got, want):
    assert [captions for captions, _ in got] == [captions for captions, _ in want]
    for (_, got_pixels), (_, want_pixels) in zip(got, want):
        assert torch.equal(got_pixels, want_pixels)


def _by_caption(batches) -> dict[str, torch.Tensor]:
    return {c: p for captions, pixels in batches for c, p in zip(captions, pixels)}


def _set_epoch(loader, epoch):
    """What the trainers do at the start of every epoch (lcm_kit.training.loop)."""
    for holder in (loader, getattr(loader, "dataset", None)):
        if hasattr(holder, "set_epoch"):
            holder.set_epoch(epoch)


def test_local_shards_are_map_style_deterministic_and_resume_exactly(shard_dir):
    from accelerate import Accelerator

    from lcm_kit.training.data import WebDatasetShards

    source = load_train_dataset(train_shards_path_or_url=str(shard_dir / "shard-{0000..0003}.tar"),
                                cache_dir=str(shard_dir / ".hf-cache"))
    assert isinstance(source, WebDatasetShards) and source.is_map_style
    assert len(source) == NUM_SHARDS * PER_SHARD and (source.image_column, source.caption_column) == ("png", "txt")
    image, caption = source.get_raw(7)
    assert caption == "shard caption 7"  # text members are stripped
    assert np.array_equal(np.asarray(image), np.asarray(_shard_image(7)))

    def loader(workers, seed=4):
        return build_dataloader(source, RES, center_crop=False, random_flip=True, batch_size=3,
                                num_workers=workers, seed=seed)

    two_workers = loader(2)
    reference = [_batches(two_workers) for _ in range(2)]
    again = loader(2)
    for epoch in range(2):
        _assert_same_batches(_batches(again), reference[epoch])  # same seed, same batches
    no_workers = loader(0)
    for epoch in range(2):
        _assert_same_batches(_batches(no_workers), reference[epoch])  # independent of num_workers
    assert [c for b in reference[0] for c in b[0]] != [c for b in reference[1] for c in b[0]]
    assert sorted(c for b in reference[1] for c in b[0]) == SHARD_CAPTIONS
    assert [c for b in _batches(loader(2, seed=5)) for c in b[0]] != [c for b in reference[0] for c in b[0]]

    accelerator = Accelerator(cpu=True)
    resumed = accelerator.prepare(loader(2))
    _set_epoch(resumed, 1)
    rest = _batches(accelerator.skip_first_batches(resumed, 3))
    _assert_same_batches(rest, reference[1][3:])


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "pipe"])
def test_streamed_shards_are_deterministic_and_resume_exactly(kind, shard_dir):
    from accelerate import Accelerator

    from lcm_kit.training.data import WebDatasetStream

    pattern = {"tar": str(shard_dir / "shard-{0000..0003}.tar"), "tar.gz": str(shard_dir / "shard-{0000..0003}.tar.gz"),
               "pipe": f"pipe:cat {shard_dir}/shard-{{0000..0001}}.tar::pipe:cat {shard_dir}/shard-{{0002..0003}}.tar"}
    source = load_train_dataset(train_shards_path_or_url=pattern[kind], streaming=True if kind == "tar" else None)
    assert isinstance(source, WebDatasetStream) and not source.is_map_style
    assert (source.image_column, source.caption_column) == ("png", "txt")

    def loader(workers, seed=4):
        return build_dataloader(source, RES, center_crop=False, random_flip=True, batch_size=3,
                                num_workers=workers, seed=seed)

    two_workers = loader(2)
    reference = [_batches(two_workers) for _ in range(2)]
    again = loader(2)
    for epoch in range(2):
        _assert_same_batches(_batches(again), reference[epoch])  # same seed and workers: the same stream
    orders = [[c for b in epoch for c in b[0]] for epoch in reference]
    assert sorted(orders[0]) == sorted(orders[1]) == SHARD_CAPTIONS and orders[0] != orders[1]
    # the order depends on the workers, each sample's caption, crop and flip do not
    pixels = _by_caption(reference[0])
    single = _by_caption(_batches(loader(0)))
    assert sorted(single) == SHARD_CAPTIONS
    assert all(torch.equal(single[c], pixels[c]) for c in SHARD_CAPTIONS)
    index = 13
    expected = preprocess_image(_shard_image(index), RES, True, False)
    centred = _by_caption(_batches(build_dataloader(source, RES, True, False, 4, 0, seed=0, shuffle=False)))
    assert torch.equal(centred[f"shard caption {index}"], expected)

    accelerator = Accelerator(cpu=True)
    uninterrupted = accelerator.prepare(loader(2))
    _set_epoch(uninterrupted, 1)
    want = _batches(uninterrupted)
    _assert_same_batches(want, reference[1])
    resumed = accelerator.prepare(loader(2))
    _set_epoch(resumed, 1)
    _assert_same_batches(_batches(accelerator.skip_first_batches(resumed, 2)), want[2:])


def test_shard_samples_lacking_a_member_are_reported(tmp_path, caplog):
    samples = {f"k{i:04d}": {"png": _png(_shard_image(i)), "txt": f"caption {i}".encode()} for i in range(6)}
    del samples["k0003"]["txt"]
    del samples["k0004"]["png"]
    _write_shard(tmp_path / "gaps.tar", samples)
    pattern = str(tmp_path / "gaps.tar")
    with caplog.at_level("WARNING", logger="lcm_kit.training.data"):
        source = load_train_dataset(train_shards_path_or_url=pattern, cache_dir=str(tmp_path / "hf"))
    assert len(source) == 4
    assert "2 of 6 samples lack a 'png' or 'txt' member" in caplog.text and "'k0003'" in caplog.text
    captions = [c for b in build_dataloader(source, RES, True, False, 4, 0, 0, shuffle=False) for c in b["captions"]]
    assert captions == ["caption 0", "caption 1", "caption 2", "caption 5"]

    caplog.clear()
    stream = load_train_dataset(train_shards_path_or_url=pattern, streaming=True)
    with caplog.at_level("WARNING", logger="lcm_kit.training.data"):
        captions = [c for b in build_dataloader(stream, RES, True, False, 4, 0, 0, shuffle=False)
                    for c in b["captions"]]
    assert captions == ["caption 0", "caption 1", "caption 2", "caption 5"]
    assert "'k0003'" in caplog.text and "lacks a 'txt' member" in caplog.text
    assert "'k0004'" in caplog.text and "lacks a 'png' member" in caplog.text
    assert "(2 skipped so far" in caplog.text


def test_shards_whose_metadata_changes_type_load_map_style(tmp_path):
    """img2dataset-style shards: the json metadata member has fields that are null in the first samples."""
    samples = {f"k{i:04d}": {"jpg": _png(_shard_image(i)), "txt": f"caption {i}".encode(),
                             "json": json.dumps({"error_message": None if i < 6 else "late", "width": 8}).encode()}
               for i in range(10)}
    _write_shard(tmp_path / "meta.tar", samples)
    source = load_train_dataset(train_shards_path_or_url=str(tmp_path / "meta.tar"), cache_dir=str(tmp_path / "hf"))
    assert len(source) == 10 and (source.image_column, source.caption_column) == ("jpg", "txt")
    assert source.get_raw(8)[1] == "caption 8"
    json_captions = {f"k{i:04d}": {"png": _png(_shard_image(i)),
                                   "json": json.dumps({"caption": [f"{i}-a", f"{i}-b"], "extra": None}).encode()}
                     for i in range(4)}
    _write_shard(tmp_path / "lists.tar", json_captions)
    source = load_train_dataset(train_shards_path_or_url=str(tmp_path / "lists.tar"), cache_dir=str(tmp_path / "hf"))
    assert source.caption_column == "json" and source.get_raw(2)[1] == ["2-a", "2-b"]


def test_shards_without_webdataset_installed_say_how_to_install(monkeypatch, shard_dir):
    import sys

    monkeypatch.setitem(sys.modules, "webdataset", None)  # makes `import webdataset` fail
    with pytest.raises(ImportError, match="pip install webdataset"):
        load_train_dataset(train_shards_path_or_url=str(shard_dir / "shard-0000.tar.gz"))


# ----------------------------------------------------------------------------------------- transforms


def test_resize_shorter_side_center_crop_matches_pil_and_value_range():
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 40, 3), dtype=np.uint8))
    out = preprocess_image(image, 10, center_crop=True, random_flip=False)
    reference = np.asarray(image.resize((20, 10), Image.BILINEAR).crop((5, 0, 15, 10)), dtype=np.float32)
    torch.testing.assert_close(out, torch.from_numpy(reference / 127.5 - 1).permute(2, 0, 1))
    assert out.dtype == torch.float32 and out.shape == (3, 10, 10)
    extremes = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]] * 2, dtype=np.uint8))
    values = preprocess_image(extremes, 2, True, False)
    assert values.min().item() == -1.0 and values.max().item() == 1.0


def test_random_crop_and_flip_follow_the_rng():
    # column index encoded in the red channel: the first column of a crop reveals the crop's left edge
    width = 24
    array = np.zeros((8, width, 3), dtype=np.uint8)
    array[:, :, 0] = np.arange(width, dtype=np.uint8)[None, :] * 10
    image = Image.fromarray(array)
    lefts, flips = set(), set()
    for seed in range(40):
        out = preprocess_image(image, 8, center_crop=False, random_flip=True, rng=np.random.default_rng(seed))
        red = ((out[0] + 1) * 127.5).round().long()
        columns = (red[0] // 10).tolist()
        flipped = columns[0] > columns[-1]
        if flipped:
            columns = columns[::-1]
        assert columns == list(range(columns[0], columns[0] + 8))
        # the draws, in order: crop top, crop left, then the flip
        replay = np.random.default_rng(seed)
        assert int(replay.integers(0, 1)) == 0 and int(replay.integers(0, width - 8 + 1)) == columns[0]
        assert flipped == bool(replay.random() < 0.5)
        lefts.add(columns[0])
        flips.add(flipped)
        again = preprocess_image(image, 8, False, True, rng=np.random.default_rng(seed))
        assert torch.equal(out, again)
    assert len(lefts) > 5 and flips == {True, False}


def test_non_rgb_images_become_rgb(data_root):
    source = _source("imagefolder", data_root)
    image, _ = source.get_raw(2)  # saved as greyscale
    assert image.mode == "RGB"
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    out = preprocess_image(transparent, 4, True, False)
    assert torch.allclose(out, torch.ones_like(out))  # transparent pixels composited over white


# ---------------------------------------------------------------------------------------- determinism


def _epoch(loader):
    batches = list(loader)
    return [c for b in batches for c in b["captions"]], torch.cat([b["pixel_values"] for b in batches])


@pytest.mark.parametrize("kind", ["imagefolder", "wds"])
def test_same_seed_same_batches_regardless_of_workers(kind, data_root):
    source = _source(kind, data_root)

    def loader(seed, workers):
        return build_dataloader(source, RES, center_crop=False, random_flip=True, batch_size=2,
                                num_workers=workers, seed=seed)

    a0 = _epoch(loader(0, 0))
    reference = loader(0, 0)
    first, second = _epoch(reference), _epoch(reference)  # iterating again runs epoch 1
    b0 = _epoch(loader(0, 2))
    assert a0[0] == first[0] == b0[0]
    assert torch.equal(a0[1], b0[1]) and torch.equal(a0[1], first[1])
    assert second[0] != first[0] or not torch.equal(second[1], first[1])
    assert sorted(second[0]) == sorted(first[0])
    a1 = loader(0, 0)
    a1.set_epoch(1)
    replay = _epoch(a1)
    assert replay[0] == second[0] and torch.equal(replay[1], second[1])
    other = _epoch(loader(1, 0))
    assert other[0] != first[0]


def test_accelerate_prepare_and_skip_first_batches_resume_the_same_epoch(data_root):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    source = _source("imagefolder", data_root)

    def prepared():
        return accelerator.prepare(build_dataloader(source, RES, False, True, batch_size=2, num_workers=0, seed=5))

    full = prepared()
    epochs = [list(full) for _ in range(2)]
    assert [c for b in epochs[0] for c in b["captions"]] != [c for b in epochs[1] for c in b["captions"]]
    resumed = prepared()
    resumed.set_epoch(1)
    rest = list(accelerator.skip_first_batches(resumed, 1))
    assert len(rest) == len(epochs[1]) - 1
    for got, want in zip(rest, epochs[1][1:]):
        assert got["captions"] == want["captions"]
        assert torch.equal(got["pixel_values"], want["pixel_values"])


# --------------------------------------------------------------------------------------- encoded cache


class CountingEncoders:
    """Deterministic stand-in encoders (the cache logic is what is under test; the VAE test is below)."""

    def __init__(self, fail_on_batch: int | None = None):
        self.image_calls = self.prompt_calls = 0
        self.fail_on_batch = fail_on_batch

    def images(self, pixel_values):
        self.image_calls += 1
        if self.fail_on_batch is not None and self.image_calls >= self.fail_on_batch:
            raise RuntimeError("encoder crashed")
        return torch.nn.functional.avg_pool2d(pixel_values, 2)

    def prompts(self, captions):
        self.prompt_calls += 1
        return {"prompt_embeds": torch.tensor([[len(c), sum(map(ord, c))] for c in captions], dtype=torch.float32)}


def _cache(source, encoders, cache_dir, resolution=RES, fingerprint="teacher-a", random_flip=False, **kwargs):
    return build_encoded_cache(source, encoders.images, encoders.prompts, resolution, False, random_flip,
                               cache_dir=cache_dir, fingerprint=fingerprint, batch_size=4, **kwargs)


def test_cache_hit_miss_and_staleness(tmp_path, data_root):
    import shutil

    data = tmp_path / "folder"
    shutil.copytree(data_root / "folder", data)
    cache_dir = tmp_path / "cache"

    def source(**kw):
        return load_train_dataset(dataset_name=str(data), cache_dir=str(tmp_path / "hf"), **kw)

    enc = CountingEncoders()
    first = _cache(source(), enc, cache_dir)
    assert (enc.image_calls, enc.prompt_calls) == (2, 2)  # 6 samples, batches of 4
    again = _cache(source(), enc, cache_dir)
    assert (enc.image_calls, enc.prompt_calls) == (2, 2) and again.key == first.key  # hit: nothing re-encoded
    keys = {first.key}
    for change in ({"resolution": 8}, {"fingerprint": "teacher-b"}, {"max_train_samples": 5}):
        before = enc.image_calls
        kwargs = dict(change)
        src = source(max_train_samples=kwargs.pop("max_train_samples")) if "max_train_samples" in change else source()
        cache = _cache(src, enc, cache_dir, **kwargs)
        assert enc.image_calls > before, change
        keys.add(cache.key)
    # a data file changes (same name, new content): stale, re-encoded, and the new latents differ
    _image(5).transpose(Image.FLIP_TOP_BOTTOM).save(data / "5.png")
    before = enc.image_calls
    changed = _cache(source(), enc, cache_dir)
    assert enc.image_calls > before and changed.key not in keys
    index = next(i for i in range(NUM) if changed[i]["captions"] == _caption(5))
    assert not torch.equal(changed[index]["latents"], first[index]["latents"])
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(keys | {changed.key})  # no temp dirs left


def test_cache_of_a_csv_is_stale_when_a_referenced_image_changes(tmp_path, data_root):
    import shutil

    shutil.copytree(data_root / "folder", tmp_path / "data" / "folder")
    shutil.copy(data_root / "table.csv", tmp_path / "data" / "table.csv")
    enc = CountingEncoders()

    def cache():
        source = load_train_dataset(dataset_name=str(tmp_path / "data" / "table.csv"), cache_dir=str(tmp_path / "hf"))
        return _cache(source, enc, tmp_path / "cache")

    first = cache()
    assert cache().key == first.key and enc.image_calls == 2
    _image(0).rotate(90).save(tmp_path / "data" / "folder" / "0.png")  # the csv itself is untouched
    assert cache().key != first.key and enc.image_calls == 4


def test_cache_contents_equal_direct_encoding_and_feed_the_loader(tmp_path, data_root):
    enc = CountingEncoders()
    source = _source("wds", data_root)
    cache = _cache(source, enc, tmp_path, samples_per_shard=4)  # 2 safetensors shards
    assert len(cache) == NUM and len(list(Path(cache.directory).glob("shard-*.safetensors"))) == 2
    for i in range(NUM):
        item = cache[i]
        index = int(item["captions"].split()[-1])
        processed = preprocess_image(_image(index).convert("RGB"), RES, False, False,
                                     rng=np.random.default_rng([0, 0, i]))
        torch.testing.assert_close(item["latents"], enc.images(processed[None])[0])
        torch.testing.assert_close(item["prompt_embeds"], enc.prompts([_caption(index)])["prompt_embeds"][0])
    loader = build_dataloader(cache, RES, False, False, batch_size=4, num_workers=2, seed=0)
    batches = list(loader)
    assert [b["latents"].shape for b in batches] == [(4, 3, RES // 2, RES // 2), (2, 3, RES // 2, RES // 2)]
    assert sorted(c for b in batches for c in b["captions"]) == sorted(_caption(i) for i in range(NUM))
    with pytest.raises(ValueError, match="built with"):
        build_dataloader(cache, RES * 2, False, False, 4, 0, 0)


def test_cache_random_flip_encodes_both_and_picks_per_epoch(tmp_path, data_root):
    enc = CountingEncoders()
    cache = _cache(_source("imagefolder", data_root), enc, tmp_path, random_flip=True)
    assert enc.image_calls == 4  # each batch encoded twice: as is and mirrored
    loader = build_dataloader(cache, RES, False, True, batch_size=NUM, num_workers=0, seed=0, shuffle=False)
    plain = torch.stack([cache._row("latents", i) for i in range(NUM)])
    mirrored = torch.stack([cache._row("latents_flipped", i) for i in range(NUM)])
    torch.testing.assert_close(mirrored, plain.flip(-1))  # avg-pool commutes with the mirror
    choices = []
    for _ in range(4):
        latents = next(iter(loader))["latents"]
        is_flipped = [torch.equal(latents[i], mirrored[i]) for i in range(NUM)]
        assert all(f or torch.equal(latents[i], plain[i]) for i, f in enumerate(is_flipped))
        choices.append(is_flipped)
    assert any(any(c) for c in choices) and any(not all(c) for c in choices)
    assert len({tuple(c) for c in choices}) > 1  # a new draw every epoch


def test_interrupted_encode_leaves_no_cache(tmp_path, data_root):
    source = _source("imagefolder", data_root)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        _cache(source, CountingEncoders(fail_on_batch=2), tmp_path)
    assert list(tmp_path.iterdir()) == []
    enc = CountingEncoders()
    cache = _cache(source, enc, tmp_path)
    assert enc.image_calls == 2 and len(cache) == NUM


def test_text_only_cache_keeps_images_live(tmp_path, data_root):
    enc = CountingEncoders()
    source = _source("imagefolder", data_root)
    cache = build_encoded_cache(source, None, enc.prompts, RES, True, False, tmp_path, "te", batch_size=4)
    assert enc.image_calls == 0 and isinstance(cache, EncodedCache)
    batch = next(iter(build_dataloader(cache, RES, True, False, NUM, 0, 0, shuffle=False)))
    assert "latents" not in batch
    for caption, pixels, embeds in zip(batch["captions"], batch["pixel_values"], batch["prompt_embeds"]):
        index = int(caption.split()[-1])
        torch.testing.assert_close(pixels, _expected(index))
        torch.testing.assert_close(embeds, enc.prompts([caption])["prompt_embeds"][0])


def test_cache_with_the_tiny_vae_and_text_encoder_round_trips(tmp_path, data_root):
    from lcm_kit.testing import tiny_sd_components

    parts = tiny_sd_components("sd1")
    vae, text_encoder, tokenizer = parts["vae"], parts["text_encoder"], parts["tokenizer"]

    def encode_images(pixel_values):
        return vae.encode(pixel_values).latent_dist.mode() * vae.config.scaling_factor

    def encode_prompts(captions):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return {"prompt_embeds": text_encoder(ids)[0]}

    source = _source("imagefolder", data_root)
    with torch.no_grad():
        cache = build_encoded_cache(source, encode_images, encode_prompts, 32, True, False, tmp_path,
                                    fingerprint={"vae": "tiny-sd1", "dtype": "float32"}, batch_size=4)
        item = cache[1]
        pixels = preprocess_image(source.get_raw(1)[0], 32, True, False)[None]
        torch.testing.assert_close(item["latents"], encode_images(pixels)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(item["prompt_embeds"], encode_prompts([_caption(1)])["prompt_embeds"][0],
                                   rtol=1e-5, atol=1e-5)
    assert item["latents"].shape == (vae.config.latent_channels, 16, 16)


def test_a_skipping_source_pickles_and_keeps_its_count(data_root):
    """The shared count travels to worker processes; any other pickle (a copy saved, a spawn start) keeps the count
    it had instead of failing on the shared memory."""
    import pickle

    from lcm_kit.training.data import BadSampleError

    source = load_train_dataset(dataset_name=str(data_root / "folder"), skip_bad_samples=True)
    source.skipped.add(BadSampleError("sample 9: test", "sample 9"), "test")
    copy = pickle.loads(pickle.dumps(source))
    assert copy.num_skipped_samples == 1 and copy.skip_bad_samples
    copy.skipped.add(BadSampleError("sample 8: test", "sample 8"), "test")
    assert (copy.num_skipped_samples, source.num_skipped_samples) == (2, 1)


def test_encoded_caches_hold_the_replacement_of_a_skipped_sample(tmp_path, data_root, caplog):
    """Encoding with skip_bad_samples stores the next good sample at a bad index; a text-only cache (images read
    live) replays the same replacement, so its captions and pixels still agree."""
    import shutil

    folder = tmp_path / "folder"
    shutil.copytree(data_root / "folder", folder)
    (folder / "2.png").write_bytes(b"not a png")
    source = load_train_dataset(dataset_name=str(folder), skip_bad_samples=True)
    enc = CountingEncoders()
    with caplog.at_level("WARNING", logger="lcm_kit.training.data"):
        cache = build_encoded_cache(source, enc.images, enc.prompts, RES, True, False, tmp_path / "c", "te",
                                    batch_size=4)
    assert cache.captions == [_caption(3 if i == 2 else i) for i in range(NUM)]
    torch.testing.assert_close(cache[2]["latents"], enc.images(_expected(3)[None])[0])
    assert any("1 bad sample(s) skipped while encoding" in r.getMessage() for r in caplog.records)
    text_only = build_encoded_cache(source, None, enc.prompts, RES, True, False, tmp_path / "t", "te", batch_size=4)
    item = text_only[2]
    assert item["captions"] == _caption(3)
    torch.testing.assert_close(item["pixel_values"], _expected(3))


def test_spawned_workers_add_to_the_same_skip_count(tmp_path, data_root):
    """Under the "spawn" start method (macOS, Windows) the shared count is pickled into each worker: their skips
    still add up in the main process."""
    import shutil

    from torch.utils.data import DataLoader

    from lcm_kit.training.data import collate_text_image

    folder = tmp_path / "folder"
    shutil.copytree(data_root / "folder", folder)
    (folder / "1.png").write_bytes(b"")
    (folder / "4.png").write_bytes(b"junk")
    source = load_train_dataset(dataset_name=str(folder), skip_bad_samples=True)
    dataset = build_dataloader(source, RES, True, False, 2, 0, seed=0).dataset
    loader = DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context="spawn",
                        collate_fn=collate_text_image)
    captions = [c for batch in loader for c in batch["captions"]]
    assert captions == [_caption({1: 2, 4: 5}.get(i, i)) for i in range(NUM)]
    assert source.num_skipped_samples == 2
