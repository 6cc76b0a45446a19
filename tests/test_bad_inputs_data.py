"""Bad datasets and bad data flags, written as real files: each is refused with an error naming the file, sample,
shard or flag, at start-up when a first look can tell, otherwise when the sample is met (across DataLoader worker
processes too). With --skip_bad_samples the run trains on the good samples and counts and names the others."""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lcm_kit.training.args import TrainingArgumentParser, add_data_args, validate_data_args
from lcm_kit.training.data import (
    BadSampleError,
    BadShardError,
    build_dataloader_from_args,
    load_train_dataset_from_args,
)

RES = 16


def _png(index: int, size=(20, 24)) -> bytes:
    array = np.random.RandomState(index).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _caption(index: int) -> str:
    return f"caption {index}"


def _folder(root: Path, n=4, images=None, rows=None, metadata=True) -> Path:
    """An imagefolder of ``n`` PNGs (``images`` overrides some files' bytes) with a metadata.jsonl."""
    folder = root / "folder"
    folder.mkdir()
    images = {i: _png(i) for i in range(n)} | (images or {})
    for i, data in images.items():
        if data is not None:
            (folder / f"{i}.png").write_bytes(data)
    if metadata:
        rows = rows if rows is not None else [{"file_name": f"{i}.png", "text": _caption(i)} for i in range(n)]
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def _tar(path: Path, samples: dict, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as archive:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def _shard_samples(first: int, count: int, bad: dict | None = None) -> dict:
    samples = {f"k{i:04d}": {"png": _png(i), "txt": _caption(i).encode()} for i in range(first, first + count)}
    for key, members in (bad or {}).items():
        samples[key] = members
    return samples


def _shards(root: Path, damage=None) -> str:
    """Two local shards of 4 samples each; ``damage(second shard path)`` spoils the second one."""
    _tar(root / "shard-0.tar", _shard_samples(0, 4))
    second = _tar(root / "shard-1.tar", _shard_samples(4, 4))
    if damage is not None:
        damage(second)
    return str(root / "shard-{0..1}.tar")


def _truncate(path: Path):
    """Cut a tar shard in the middle of its third member's data (cutting in the end padding would harm nothing)."""
    with tarfile.open(path) as archive:
        third = archive.getmembers()[2]
    path.write_bytes(path.read_bytes()[: third.offset_data + third.size // 2])


def _gz_shards(root: Path, truncate_second: bool) -> str:
    for shard, first in ((0, 0), (1, 4)):
        plain = _tar(root / f"plain-{shard}.tar", _shard_samples(first, 4))
        path = root / f"shard-{shard}.tar.gz"
        path.write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
        plain.unlink()
    if truncate_second:
        path = root / "shard-1.tar.gz"
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return str(root / "shard-{0..1}.tar.gz")


def _parse(argv):
    parser = TrainingArgumentParser(prog="data-test")
    add_data_args(parser)
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--train_batch_size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _run(argv, stage: list | None = None) -> tuple:
    """What a trainer does with the data flags: parse, validate, open (the start-up check), then one epoch.
    Returns the source, the dataset indices in the loader's order (map-style) and the batches; ``stage`` records
    how far it got."""
    stage = [] if stage is None else stage
    stage.append("parse")
    args = _parse(["--resolution", str(RES), *argv])
    stage.append("validate")
    validate_data_args(args)
    stage.append("load")
    source = load_train_dataset_from_args(args)
    stage.append("iterate")
    loader = build_dataloader_from_args(args, source)
    order = [index for index, _epoch in loader.sampler] if source.is_map_style else None
    iterator = iter(loader)
    try:
        return source, order, list(iterator)
    except Exception:
        # A failed epoch's iterator lives on in the traceback; torch's garbage-collected shutdown then waits 5 s
        # per worker process. Stop them now.
        getattr(iterator, "_shutdown_workers", lambda: None)()
        raise


def _name(folder) -> list[str]:
    return ["--dataset_name", str(folder)]


def _urls(pattern) -> list[str]:
    return ["--train_shards_path_or_url", str(pattern)]


def _rows(caption=lambda i: _caption(i), key="text", n=4) -> list[dict]:
    return [{"file_name": f"{i}.png", key: caption(i)} for i in range(n)]


WORKERS = ["--dataloader_num_workers", "2"]
_BAD_MEMBER = {"k0006": {"png": b"garbage", "txt": b"bad"}}
_JSON_SAMPLES = {"k0": {"png": _png(0), "json": b'{"caption": "fine"}'}, "k1": {"png": _png(1), "json": b'{"t": 1}'}}
_NOT_UTF8 = {"k0": {"png": _png(0), "txt": b"ok"}, "k1": {"png": _png(1), "txt": b"\xff\xfe bad"}}

# (id, build(tmp_path) -> data flags, exception type, the step that raises, regex the message must match)
BAD_CASES = [
    ("empty imagefolder", lambda r: _name(_mkdir(r / "empty")), ValueError, "load",
     r"dataset_name='.*empty' holds no image or data file"),
    ("metadata without images", lambda r: _name(_folder(r, n=0, rows=[])), ValueError, "load",
     r"dataset_name='.*folder' holds no image or data file"),
    ("corrupt png, in a worker", lambda r: _name(_folder(r, images={2: b"\x89PNG not really"})) + WORKERS,
     BadSampleError, "iterate",
     r"sample 2 \(image file '.*folder/2\.png'\): cannot read the image: UnidentifiedImageError"),
    ("truncated png", lambda r: _name(_folder(r, images={1: _png(1)[:60]})), BadSampleError, "iterate",
     r"sample 1 \(image file '.*folder/1\.png'\): cannot read the image: OSError: image file is truncated"),
    ("truncated png named by a csv", lambda r: _name(_csv(r, truncated=3)), BadSampleError, "iterate",
     r"sample 3 \(image file '.*images/3\.png'\): cannot read the image: OSError: image file is truncated"),
    ("zero-byte png", lambda r: _name(_folder(r, images={3: b""})), BadSampleError, "iterate",
     r"sample 3 \(image file '.*folder/3\.png'\): cannot read the image"),
    ("first image corrupt: at start-up", lambda r: _name(_folder(r, images={0: b"junk"})), BadSampleError, "load",
     r"sample 0 \(image file '.*folder/0\.png'\)"),
    ("image too small", lambda r: _name(_folder(r, images={0: _png(0, (1, 5))})), BadSampleError, "load",
     r"sample 0 .*0\.png.*is 1x5 pixels, too small for resolution 16.*at least 2"),
    ("image path to a missing file", lambda r: _name(_csv(r, missing=2)), BadSampleError, "iterate",
     r"sample 2 \(image file '.*images/missing\.png'\): cannot read the image: .*does not exist"),
    ("missing metadata.jsonl", lambda r: _name(_folder(r, metadata=False)), ValueError, "load",
     r"dataset_name='.*folder' has no metadata\.jsonl.*file_name"),
    ("metadata without file_name", lambda r: _name(_folder(r, rows=[{"name": "0.png", "text": "x"}])),
     ValueError, "load", r"dataset_name='.*folder': datasets could not read it: .*file_name"),
    ("caption column that does not exist", lambda r: _name(_folder(r)) + ["--caption_column", "prompt"],
     ValueError, "load",
     r"caption_column='prompt' is not a column of the dataset; available columns: \['image', 'text'\]"),
    ("no caption column to detect", lambda r: _name(_folder(r, rows=_rows(int, key="score"))), ValueError, "load",
     r"could not detect the caption column among the dataset columns \['image', 'score'\]; pass caption_column"),
    ("caption of the wrong type", lambda r: _name(_folder(r, rows=_rows(int))), ValueError, "load",
     r"caption_column='text' \(detected\) of dataset '.*folder' holds int64 values: expected strings"),
    ("image column of the wrong type", lambda r: _name(_csv(r)) + ["--image_column", "score"], ValueError, "load",
     r"image_column='score' of dataset '.*table\.csv' holds int64 values: expected images"),
    ("a missing caption", lambda r: _name(_folder(r, rows=_rows(lambda i: None if i == 2 else _caption(i)))),
     BadSampleError, "iterate", r"sample 2 \(image file '.*folder/2\.png'\): the caption is None: expected a string"),
    ("truncated tar shard", lambda r: _urls(_shards(r, _truncate)), BadShardError, "load",
     r"shard '.*shard-1\.tar' is damaged: ReadError: unexpected end of data"),
    ("non-tar shard", lambda r: _urls(_shards(r, lambda p: p.write_bytes(_png(9)))), BadShardError, "load",
     r"shard '.*shard-1\.tar' is not a tar archive \(it starts with b'\\x89PNG"),
    ("zero-byte shard", lambda r: _urls(_shards(r, lambda p: p.write_bytes(b""))), BadShardError, "load",
     r"shard '.*shard-1\.tar' is empty \(0 bytes\)"),
    ("corrupt png member in a shard, in a worker",
     lambda r: _urls(_shards(r, lambda p: _tar(p, _shard_samples(4, 4, _BAD_MEMBER)))) + WORKERS,
     BadSampleError, "iterate",
     r"webdataset sample 6 \(key 'k0006' in shard '.*shard-1\.tar'\): cannot read the image"),
    ("truncated streamed shard, in a worker", lambda r: _urls(_gz_shards(r, True)) + WORKERS, BadShardError, "iterate",
     r"shard '.*shard-1\.tar\.gz' cannot be read (past sample 'k\d+'|\(no sample of it was read\)): "
     r"ReadError: unexpected end of data$"),
    ("local shard caption that is not UTF-8",
     lambda r: _urls(_shards(r, lambda p: _tar(p, _shard_samples(4, 4, {"k0005": _NOT_UTF8["k1"]})))),
     BadSampleError, "load", r"webdataset sample 'k0005' in shard '.*shard-1\.tar': its 'txt' member cannot be "
                             r"decoded \(UnicodeDecodeError"),
    ("streamed caption that is not UTF-8", lambda r: _urls(_gz_one(r, _NOT_UTF8)), BadSampleError, "iterate",
     r"webdataset sample 'k1' in shard '.*one\.tar\.gz': 'utf-8' codec can't decode"),
    ("json caption without a caption key", lambda r: _urls(_tar(r / "j.tar", _JSON_SAMPLES)), BadSampleError,
     "iterate", r"webdataset sample 1 \(key 'k1' in shard '.*j\.tar'\): its 'json' member has no 'caption' caption"),
    ("bad brace pattern", lambda r: _urls(r / "shard-{0..1.tar"), ValueError, "load",
     r"train_shards_path_or_url pattern '.*shard-\{0\.\.1\.tar'"),
    ("shard pattern matching no file", lambda r: _urls(r / "none-{000..002}.tar"), ValueError, "load",
     r"none-\{000\.\.002\}\.tar': 3 of 3 shard file\(s\) do not exist"),
    ("wildcard shard pattern", lambda r: _urls(r / "*.tar"), ValueError, "load",
     r"do not exist \(only brace patterns are expanded, not \* or \?\)"),
    ("both data flags", lambda r: _name(_folder(r)) + _urls("x.tar"), ValueError, "validate",
     r"Exactly one of --dataset_name and --train_shards_path_or_url"),
    ("no data flag", lambda r: [], ValueError, "validate",
     r"Exactly one of --dataset_name and --train_shards_path_or_url"),
    ("config name with shards", lambda r: _urls(_shards(r)) + ["--dataset_config_name", "x"], ValueError,
     "validate", r"--dataset_config_name 'x' needs --dataset_name"),
    ("resolution not a multiple of 8", lambda r: _name(_folder(r)) + ["--resolution", "30"], ValueError, "validate",
     r"--resolution must be a multiple of 8, got 30"),
    ("resolution 0", lambda r: _name("x") + ["--resolution", "0"], SystemExit, "parse",
     r"argument --resolution: must be an integer >= 1, got '0'"),
    ("resolution nan", lambda r: _name("x") + ["--resolution", "nan"], SystemExit, "parse",
     r"argument --resolution: must be an integer >= 1, got 'nan'"),
    ("max_train_samples 0", lambda r: _name("x") + ["--max_train_samples", "0"], SystemExit, "parse",
     r"argument --max_train_samples: must be an integer >= 1, got '0'"),
    ("max_train_samples nan", lambda r: _name("x") + ["--max_train_samples", "nan"], SystemExit, "parse",
     r"argument --max_train_samples: must be an integer >= 1, got 'nan'"),
    ("max_train_samples inf", lambda r: _name("x") + ["--max_train_samples", "inf"], SystemExit, "parse",
     r"argument --max_train_samples: must be an integer >= 1, got 'inf'"),
    ("negative dataloader_num_workers", lambda r: _name("x") + ["--dataloader_num_workers", "-1"], SystemExit,
     "parse", r"argument --dataloader_num_workers: must be an integer >= 0, got '-1'"),
    ("fractional dataloader_num_workers", lambda r: _name("x") + ["--dataloader_num_workers", "1.5"], SystemExit,
     "parse", r"argument --dataloader_num_workers: must be an integer >= 0, got '1\.5'"),
    ("skip_bad_samples takes no value", lambda r: _name("x") + ["--skip_bad_samples=yes"], SystemExit, "parse",
     r"argument --skip_bad_samples: ignored explicit argument 'yes'"),
]


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _csv(root: Path, missing: int | None = None, truncated: int | None = None) -> Path:
    """A csv whose image column holds paths relative to it; row ``missing`` names a file that does not exist, the
    file of row ``truncated`` is cut short."""
    (root / "images").mkdir()
    lines = ["image_path,caption,score"]
    for i in range(4):
        name = "missing.png" if i == missing else f"{i}.png"
        if i != missing:
            (root / "images" / name).write_bytes(_png(i)[:60] if i == truncated else _png(i))
        lines.append(f"images/{name},{_caption(i)},{i}")
    (root / "table.csv").write_text("\n".join(lines) + "\n")
    return root / "table.csv"


def _gz_one(root: Path, samples: dict) -> str:
    plain = _tar(root / "one.tar", samples)
    (root / "one.tar.gz").write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
    plain.unlink()
    return str(root / "one.tar.gz")


# The library error each wrapped error keeps as its cause (in-process cases; a worker's comes back as text).
CAUSES = {"truncated png": OSError, "zero-byte png": Image.UnidentifiedImageError,
          "image path to a missing file": ValueError, "first image corrupt: at start-up": Image.UnidentifiedImageError}


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_data_is_refused_with_a_message_naming_it(case, tmp_path, capsys):
    name, build, error_type, stage, match = case
    argv = build(tmp_path)
    reached = []
    with pytest.raises(error_type) as caught:
        _run(argv, reached)
    assert reached[-1] == stage  # at start-up whenever a first look can tell
    message = capsys.readouterr().err if error_type is SystemExit else str(caught.value)
    if error_type is SystemExit:
        assert caught.value.code == 2
    assert re.search(match, message), message
    if name in CAUSES:
        assert isinstance(caught.value.__cause__, CAUSES[name]), repr(caught.value.__cause__)
    if "--dataloader_num_workers 2" in " ".join(argv):
        assert "in DataLoader worker process" in message  # it crossed the worker boundary, message intact


def _skip_folder_corrupt(root):
    return ["--dataset_name", str(_folder(root, n=6, images={1: b"junk", 4: _png(4)[:70]}))], [1, 4]


def _skip_folder_run_of_bad(root):
    # samples 2 and 3 both bad: 2 is replaced by 4 (the next good), 5 (the last) wraps round to 0.
    return ["--dataset_name", str(_folder(root, n=6, images={2: b"", 3: b"x", 5: b"y"}))], [2, 3, 5]


def _skip_missing_and_caption(root):
    rows = [{"file_name": f"{i}.png", "text": None if i == 3 else _caption(i)} for i in range(5)]
    rows.append({"file_name": "gone.png", "text": "never seen"})
    return ["--dataset_name", str(_folder(root, n=5, rows=rows))], [3, 5]


def _skip_small_first(root):
    return ["--dataset_name", str(_folder(root, n=4, images={0: _png(0, (1, 1))}))], [0]


def _skip_workers(root):
    flags, bad = _skip_folder_corrupt(root)
    return flags + ["--dataloader_num_workers", "2"], bad


def _skip_shard_member(root):
    pattern = _shards(root, lambda p: _tar(p, _shard_samples(4, 4, {"k0005": {"png": b"junk", "txt": b"x"}})))
    return ["--train_shards_path_or_url", pattern], [5]


def _skip_damaged_shard(root):
    return ["--train_shards_path_or_url", _shards(root, _truncate)], "shard-1"


def _skip_undecodable_member(root):
    damage = lambda p: _tar(p, _shard_samples(4, 4, {"k0005": {"png": _png(5), "txt": b"\xff"}}))  # noqa: E731
    return ["--train_shards_path_or_url", _shards(root, damage)], "shard-1"


def _skip_missing_shard(root):
    _shards(root)
    return ["--train_shards_path_or_url", str(root / "shard-{0..2}.tar")], "missing shard-2"


def _skip_non_tar_shard(root):
    return ["--train_shards_path_or_url", _shards(root, lambda p: p.write_bytes(b"not a tar"))], "shard-1"


def _skip_streamed_member(root):
    samples = {f"k{i}": {"png": _png(i) if i != 2 else b"junk", "txt": _caption(i).encode()} for i in range(5)}
    return ["--train_shards_path_or_url", _gz_one(root, samples), "--dataloader_num_workers", "2"], [2]


def _skip_truncated_stream(root):
    return ["--train_shards_path_or_url", _gz_shards(root, True)], "stream-tail"


# (id, build(root) -> (flags, bad sample indices or which shard is lost))
SKIP_CASES = [
    ("corrupt and truncated png", _skip_folder_corrupt),
    ("consecutive bad samples and wrap round", _skip_folder_run_of_bad),
    ("missing file and missing caption", _skip_missing_and_caption),
    ("first image too small", _skip_small_first),
    ("corrupt png, 2 workers", _skip_workers),
    ("corrupt member in a local shard", _skip_shard_member),
    ("truncated local shard", _skip_damaged_shard),
    ("non-tar local shard", _skip_non_tar_shard),
    ("missing local shard", _skip_missing_shard),
    ("local shard with a caption that is not UTF-8", _skip_undecodable_member),
    ("corrupt member streamed, 2 workers", _skip_streamed_member),
    ("truncated streamed shard", _skip_truncated_stream),
]


@pytest.mark.parametrize("build", [c[1] for c in SKIP_CASES], ids=[c[0] for c in SKIP_CASES])
def test_skip_bad_samples_trains_on_the_good_samples_and_reports_them(build, tmp_path, caplog):
    flags, bad = build(tmp_path)
    with pytest.raises(ValueError):  # without the flag the run stops at the first bad sample or shard
        _run(flags)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lcm_kit.training.data"):
        source, order, batches = _run(flags + ["--skip_bad_samples"])
    captions = [c for batch in batches for c in batch["captions"]]
    warnings = [r.getMessage() for r in caplog.records if "skip_bad_samples" in r.getMessage()]
    workers = "--dataloader_num_workers" in flags
    if source.is_map_style and isinstance(bad, list):
        total = len(source)
        good = [i for i in range(total) if i not in bad]
        # each bad index is replaced by the next good one (wrapping round): same length, same positions
        replacement = {i: next(j % total for j in range(i, i + total) if j % total in good) for i in range(total)}
        assert captions == [_caption(replacement[i]) for i in order]
        assert source.num_skipped_samples == len(bad)  # counted across the worker processes too
        if not workers:
            for i in bad:
                assert any(re.search(rf"skipped (webdataset )?sample {i} .*; sample {replacement[i]} takes its "
                                     r"place \(\d+ bad sample", w) for w in warnings), (i, warnings)
            assert re.search(rf"\({len(bad)} bad sample\(s\) skipped so far", warnings[-1]), warnings
    elif isinstance(bad, list):  # streamed: dropped from the stream
        assert sorted(captions) == sorted(_caption(i) for i in range(5) if i not in bad)
        assert source.num_skipped_samples == len(bad)
    elif bad == "shard-1":  # map-style shards: the damaged shard is left out, at start-up
        assert sorted(captions) == [_caption(i) for i in range(4)]
        assert len(source) == 4 and source.num_skipped_samples == 1
        assert any(re.search(r"shard '.*shard-1\.tar'.*; this shard is left out", w) for w in warnings), warnings
    elif bad == "missing shard-2":  # a shard the pattern names that does not exist: left out, the others read
        assert sorted(captions) == sorted(_caption(i) for i in range(8)) and source.num_skipped_samples == 1
        assert any(re.search(r"shard '.*shard-2\.tar' does not exist; this shard is left out", w) for w in warnings)
    else:  # a truncated streamed shard: the samples before the damage are kept, the rest of it skipped
        assert set(_caption(i) for i in range(4)) <= set(captions) < set(_caption(i) for i in range(8))
        assert source.num_skipped_samples == 1
        assert any(re.search(r"shard '.*shard-1\.tar\.gz' cannot be read .*the rest of this shard is skipped", w)
                   for w in warnings), warnings


def test_skipping_is_deterministic_regardless_of_workers_and_resumes_exactly(tmp_path):
    """The replacement of a bad sample depends on the data only: 0 or 2 workers, two epochs, a resumed epoch."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    flags = ["--dataset_name", str(_folder(tmp_path, n=7, images={1: b"junk", 2: b"", 5: _png(5)[:80]})),
             "--skip_bad_samples", "--random_flip", "--train_batch_size", "2", "--seed", "3"]

    def epoch_batches(workers, epoch, skip=0):
        args = _parse(["--resolution", str(RES), *flags, "--dataloader_num_workers", str(workers)])
        source = load_train_dataset_from_args(args)
        accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                                      data_seed=3))
        loader = accelerator.prepare(build_dataloader_from_args(args, source))
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        return [(b["captions"], b["pixel_values"]) for b in batches]

    first = epoch_batches(0, 1)
    assert len([c for captions, _ in first for c in captions]) == 7
    for other in (epoch_batches(2, 1), epoch_batches(0, 1)):
        assert [c for c, _ in other] == [c for c, _ in first]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(other, first))
    resumed = epoch_batches(2, 1, skip=2)
    assert [c for c, _ in resumed] == [c for c, _ in first[2:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, first[2:]))
    assert [c for c, _ in epoch_batches(0, 0)] != [c for c, _ in first]  # epochs still reshuffle
