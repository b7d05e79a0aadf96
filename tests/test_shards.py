"""Shard sets (data/shards.py, commands/shards.py): the digits written as shards to a directory and to a real S3 endpoint
on the loopback address (moto's server, from .venv/s3-server, which `make install` builds); training on 2 processes
from either gives the same weights, every row once per epoch and the same batches on each rank however the rows
divide; a SIGKILL in the middle of an epoch resumes bit for bit, and on 1 process with every row once; predictions
are the table's, byte for byte; the cache limit holds; damaged sets are one line."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import ROOT, assert_killed, config_path, read_jsonl, run_cli, run_env, tiny_overrides
from test_equivalence import EXACT, max_weight_diff
from test_mlflow import free_port
from test_ownership_and_elastic import epoch_rows

from dist_train.config import load_config
from dist_train.data.shards import ShardReader, ShardSet, ShardWindowSampler, cache_directory
from dist_train.data.table_cache import _locked
from dist_train.data.tables import read_split
from dist_train.errors import ConfigError, DataError
from dist_train.job.faults import FAULT_ENV

SERVER = ROOT / ".venv" / "s3-server" / "bin" / "moto_server"
ROWS = 100  # per shard: the 1,257 training rows in 13 shards, the last of 57
pytestmark = pytest.mark.xdist_group("shards")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The AWS variables of a fresh S3 endpoint with a bucket `data`; the server is stopped after the module."""
    assert SERVER.is_file(), f"no S3 server at {SERVER}: make install builds it (tests/s3-server.txt)"
    root, port = tmp_path_factory.mktemp("s3"), free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(SERVER), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=run_env())
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from pyarrow import fs

    store = fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True, region="us-east-1")
    deadline = time.monotonic() + 30
    while True:
        try:
            store.create_dir("data")
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(0.2)
    yield env
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def sets(digits_root, s3, tmp_path_factory):
    """The digits' train / val / test as shard sets in a directory, and the train set in the store (written by the
    command on 2 processes)."""
    from dist_train.commands.shards import write_shards

    root = tmp_path_factory.mktemp("shards")
    config = load_config(config_path("digits.yaml"), [f"data.root={digits_root}"])
    for split in ("train", "val", "test"):
        write_shards(config, split, str(root / split), rows=ROWS, workers=1, say=lambda line: None)
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "dist-train"), "shards", "--config", config_path("digits.yaml"),
                           "--split", "train", "--output", "s3://data/digits/train", "--rows-per-shard", str(ROWS),
                           "--workers", "2", f"data.root={digits_root}"], capture_output=True, text=True,
                          env=run_env(**s3), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "1257 train rows -> 13 shards of 100 rows at s3://data/digits/train (endpoint http://127.0.0.1:" in proc.stdout
    return root


def shard_args(digits_root, sets, out, train=None, **overrides):
    values = {**EXACT, "data.source": "shards", "data.train": train or str(sets / "train"), "data.val": str(sets / "val"),
              "data.test": str(sets / "test"), "data.batch_size": 32, "data.shard_window": 4,
              "data.cache_dir": str(out.parent / "cache"), **overrides}
    return ["--config", config_path("digits.yaml"), *tiny_overrides(digits_root, out, **values)]


def test_a_set_holds_the_tables_rows_and_the_files_bytes(digits_root, sets, tmp_path):
    from dist_train.commands.shards import write_shards

    config = load_config(config_path("digits.yaml"), [f"data.root={digits_root}"])
    index = json.loads((sets / "train" / "index.json").read_text())
    assert [s["rows"] for s in index["shards"]] == [ROWS] * 12 + [57] and sum(index["counts_per_class"].values()) == 1257
    assert index["written_by"]["data"]["train"] == "train.csv" and index["image_column"] == "image"
    assert (sets / "train" / "rows.csv").read_bytes() == (digits_root / "train.csv").read_bytes()
    table = read_split(config.data, "train", True)
    shards = read_split(load_config(config_path("digits.yaml"), ["data.source=shards", f"data.train={sets / 'train'}",
                                                                    f"data.cache_dir={tmp_path}"]).data, "train", True)
    assert list(shards.ids) == list(table.ids) and list(shards.labels["label"]) == list(table.labels["label"])
    for row in (0, 99, 100, 1256):
        assert shards.shards.read(row) == table.paths[row].read_bytes()
    lines = []  # written again: the shards there are kept, the index rewritten
    write_shards(config, "train", str(sets / "train"), rows=ROWS, workers=1, say=lines.append)
    assert "(13 already written, kept)" in lines[0]
    (tmp_path / "half").mkdir()
    shutil.copy(sets / "train" / "shard-00000.arrow", tmp_path / "half")
    with pytest.raises(DataError, match=r"half: no index.json: not a shard set written by `dist-train shards`, or its "
                                        r"writing did not finish"):
        ShardSet.open(str(tmp_path / "half"))


def test_the_training_order_is_a_few_shards_at_a_time_and_the_same_on_any_layout():
    shards = np.repeat(np.arange(13), ROWS)[:1257]
    sampler = ShardWindowSampler(shards, window=4, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(1257)) and first == list(ShardWindowSampler(shards, 4, 3))
    counts, seen, pending, windows = np.bincount(shards), set(), 0, []
    for row in first:  # cut where the shards begun so far are all done: each stretch is 4 shards' rows (the last 1)
        if shards[row] not in seen:
            seen.add(shards[row])
            pending += counts[shards[row]]
        pending -= 1
        if pending == 0:
            windows.append(len(seen))
            seen = set()
    assert windows == [4, 4, 4, 1]
    sampler.set_epoch(1)
    assert list(sampler) != first
    fold = ShardWindowSampler(shards[::3], window=4, seed=3)  # some rows of the set (a fold): positions in them
    assert sorted(fold) == list(range(len(shards[::3])))


@pytest.fixture(scope="module")
def uninterrupted(digits_root, sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("shard-runs") / "whole"
    proc = run_cli("train.py", shard_args(digits_root, sets, out), processes=2, env={"DIST_TRAIN_ROWS_LOG": str(out.parent / "rows")})
    return out, proc


def test_two_processes_train_every_row_once_per_epoch_with_the_same_batches_on_each(uninterrupted):
    out, _ = uninterrupted
    for epoch in (1, 2):  # 1,257 rows = 19 x 64 + 41: the last batches padded, the padding weighed out
        assert sorted(epoch_rows(out.parent / "rows", epoch)) == list(range(1257))
    history = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())["history"]
    assert [e["rank_batches"] for e in history] == [[20, 20]] * 2, history  # the same on each rank: no rank waits alone


def test_training_from_the_store_gives_the_weights_of_the_directory(uninterrupted, digits_root, sets, s3, tmp_path):
    whole, _ = uninterrupted
    out = tmp_path / "from-s3"
    proc = run_cli("train.py", shard_args(digits_root, sets, out, train="s3://data/digits/train", **{"data.num_workers": 2}),
                   processes=2, env=s3)
    assert max_weight_diff(whole, out) == 0.0, proc.stdout[-2000:]
    assert len(list(cache_directory(tmp_path / "cache", "s3://data/digits/train").glob("*.arrow"))) == 13


def test_a_kill_in_the_middle_of_an_epoch_resumes_bit_for_bit_and_on_one_process_each_row_once(
        uninterrupted, digits_root, sets, tmp_path):
    whole, _ = uninterrupted
    out, overrides = tmp_path / "run", {"checkpoint.every_n_steps": 7, "checkpoint.keep_last": 5}
    proc = run_cli("train.py", shard_args(digits_root, sets, out, **overrides), processes=2, check=False,
                   env={FAULT_ENV: "kill@step:30", "DIST_TRAIN_ROWS_LOG": str(tmp_path / "killed")})
    assert_killed(proc)
    shutil.copytree(out, tmp_path / "elastic", symlinks=True)  # (best, last: relative links)
    run_cli("train.py", [*shard_args(digits_root, sets, out, **overrides), "--resume", "auto"], processes=2)
    assert max_weight_diff(whole, out) == 0.0
    proc = run_cli("train.py", [*shard_args(digits_root, sets, tmp_path / "elastic", **overrides), "--resume", "auto"],
                   processes=1, env={"DIST_TRAIN_ROWS_LOG": str(tmp_path / "resumed")})
    assert "epoch 2 goes on after its first 512 samples" in proc.stdout
    before, after = epoch_rows(tmp_path / "killed", 2, last_step=28), epoch_rows(tmp_path / "resumed", 2)
    assert len(before) == 512 and sorted(before + after) == list(range(1257))
    assert [m["step"] for m in read_jsonl(tmp_path / "elastic" / "metrics.jsonl")] == [20, 40]


def test_predictions_from_shards_on_two_processes_are_the_tables_byte_for_byte(uninterrupted, digits_root, sets, tmp_path):
    whole, _ = uninterrupted
    run_cli("predict.py", ["--checkpoint", str(whole), "--output", str(tmp_path / "shards.csv")], processes=2)
    run_cli("predict.py", ["--checkpoint", str(whole), "--output", str(tmp_path / "table.csv"), "data.source=csv",
                           "data.train=train.csv", "data.val=val.csv", "data.test=info.csv"])
    assert (tmp_path / "shards.csv").read_bytes() == (tmp_path / "table.csv").read_bytes()


def test_the_cache_limit_holds_while_a_set_three_times_larger_streams(sets, s3, tmp_path):
    shard_set = ShardSet.open("s3://data/digits/train")
    total = sum(s["bytes"] for s in shard_set.shards)
    limit = total // 3
    reader = ShardReader(shard_set, tmp_path, limit, keep_open=2)
    cache = cache_directory(tmp_path, "s3://data/digits/train")
    local = ShardReader(ShardSet.open(str(sets / "train")), tmp_path, None)
    sampler = ShardWindowSampler(reader.shard_of(np.arange(1257)), window=2, seed=0)
    cache.mkdir(parents=True)
    stale = cache / f".{shard_set.shards[0]['sha256'][:32]}.part-999999"  # a download whose process died
    stale.write_bytes(b"x" * (limit // 2))
    largest = 0
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for row in sampler:
            assert reader.read(row) == local.read(row)
            largest = max(largest, sum(p.stat().st_size for p in cache.iterdir()))
    assert largest <= limit and not stale.exists()
    live = cache / f".{shard_set.shards[1]['sha256'][:32]}.part-1"  # a download in flight: its lock held
    with _locked(cache / f".{shard_set.shards[1]['sha256'][:32]}.lock"):
        live.write_bytes(b"x" * (limit - 100))
        assert reader.cache._make_room(cache.parent, 200) is False and live.exists()  # kept, counted: wait, delete nothing
        assert len(list(cache.glob("*.arrow"))) > 0
        live.unlink()
    assert reader.cache._make_room(cache.parent, limit + 1) is None  # never fits: said at once
    assert len(list(cache.glob("*.arrow"))) < 13  # shards were deleted to keep to it (and fetched again)
    config = load_config(config_path("digits.yaml"), ["data.source=shards", "data.train=s3://data/digits/train",
                                                      f"data.cache_dir={tmp_path}", "data.cache_limit=20KB"])
    with pytest.raises(ConfigError, match=r"data.cache_limit 20KB is below what reading s3://data/digits/train takes: "
                                          r"2 x data.shard_window \(8\) shards"):
        read_split(config.data, "train", True)


def test_a_damaged_set_or_a_store_not_there_is_one_line_naming_the_shard_or_the_endpoint(sets, s3, tmp_path, monkeypatch):
    broken = tmp_path / "train"
    shutil.copytree(sets / "train", broken)
    (broken / "shard-00003.arrow").unlink()
    with open(broken / "shard-00005.arrow", "r+b") as f:
        f.truncate(100)
    reader = ShardReader(ShardSet.open(str(broken)), tmp_path, None)
    with pytest.raises(DataError, match=r"shard shard-00003.arrow of .*train is missing .*: the set is damaged; write it again"):
        reader.read(300)
    with pytest.raises(DataError, match=r"shard shard-00005.arrow of .*train has 100 bytes, its index.json says \d+"):
        reader.read(500)
    from pyarrow import fs

    store = fs.S3FileSystem(endpoint_override=s3["AWS_ENDPOINT_URL"], region="us-east-1")
    fs.copy_files("data/digits/train", "data/broken", source_filesystem=store, destination_filesystem=store)
    with store.open_output_stream("data/broken/shard-00002.arrow") as f:
        f.write((sets / "train" / "shard-00003.arrow").read_bytes())  # another shard's bytes under its name
    remote = ShardReader(ShardSet.open("s3://data/broken"), tmp_path, None)
    with pytest.raises(DataError, match=r"shard shard-00002.arrow of s3://data/broken \(endpoint http://127.0.0.1:\d+\) "
                                        r"does not match index.json \(sha256\)"):
        remote.read(250)
    store.delete_file("data/broken/shard-00004.arrow")
    with pytest.raises(DataError, match=r"shard shard-00004.arrow of s3://data/broken .* is missing"):
        remote.read(450)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens: retried, then named
    with pytest.raises(DataError, match=r"cannot read index.json of s3://data/digits/train \(endpoint http://127.0.0.1:\d+\): "
                                        r".*NETWORK_CONNECTION"):
        ShardSet.open("s3://data/digits/train")


def test_both_decode_paths_see_the_same_samples_from_shards_as_from_the_files(tmp_path, monkeypatch):
    """The loader workers' decode + augmentation, and data.decode=device's bytes and crop boxes, from a shard set of
    JPEGs are the files' own, sample for sample. (And the writer's progress lines, where no bar is drawn.)"""
    import torch
    from PIL import Image

    from dist_train.commands import shards as command
    from dist_train.commands.shards import write_shards
    from dist_train.data.datasets import build_dataset

    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    with open(tmp_path / "train.csv", "w") as f:
        f.write("id,image,label\n")
        for i in range(12):
            pixels = rng.integers(0, 256, size=(30 + i, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.jpg", quality=85)
            f.write(f"r{i},images/{i}.jpg,{i % 3}\n")
    common = [f"data.root={tmp_path}", "data.val=null", f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=16",
              "data.train_crop=random_resized_crop", "data.train_augment=[{name: RandomHorizontalFlip}]"]
    files = load_config(config_path("digits.yaml"), ["data.source=csv", *common])
    monkeypatch.setattr(command, "PROGRESS_S", 0.0)
    monkeypatch.setattr(command, "bars", lambda: False)  # (as in a batch job's log, also under pytest -s)
    lines = []
    write_shards(files, "train", str(tmp_path / "set"), rows=5, workers=1, say=lines.append)
    assert re.fullmatch(r"shards: 1/3 written, 5 images, [\d,]+ images/s, \d+ min left", lines[1]), lines
    assert len(lines) == 4 and lines[-1].startswith(f"shards: wrote {tmp_path / 'set'}: 12 rows in 3 shards")
    shards = load_config(config_path("digits.yaml"), ["data.source=shards", f"data.train={tmp_path / 'set'}", *common])
    table, packed = read_split(files.data, "train", True), read_split(shards.data, "train", True)
    table.targets = packed.targets = torch.arange(12)  # (the task encodes the labels; here any targets will do)
    for on_device in (False, True):
        ours, theirs = (build_dataset(r, c.data, "train", seed=5, on_device=on_device) for r, c in ((packed, shards), (table, files)))
        ours.set_epoch(2), theirs.set_epoch(2)
        for i in range(12):
            (a, ta, ia), (b, tb, ib) = ours[i], theirs[i]
            if on_device:
                assert torch.equal(a["data"], b["data"]) and a["box"] == b["box"] and a["flip"] == b["flip"]
            else:
                assert torch.equal(a, b)
            assert (ta, ia) == (tb, ib)
