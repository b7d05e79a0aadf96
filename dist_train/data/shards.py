"""Shard sets: a split's images packed into a few large Arrow files, read from a directory or an S3-compatible store.

A set written by `dist-train shards` (commands/shards.py) at DIR or s3://bucket/prefix holds:
    index.json          what it is: its shards (rows, bytes, sha256), columns, counts per class, what wrote it
    rows.csv            the split's table, row for row (the CSV it was written from, or a folder source's rows)
    shard-00000.arrow   Arrow IPC files, one record batch each: `row` (int64: the sample's row in rows.csv) and `image`
                        (the image file's bytes as they were on disk: nothing decoded or encoded again)
index.json is written last: a set without it is unfinished and refused.

Reading: rows.csv goes through the table cache like any table, so labels, ids, groups and folds are the table path's;
the images come from a ShardReader: local shards memory-mapped where they are; an S3 store's shards copied once per
machine into the cache directory (data.cache_dir/shards), at most data.cache_limit bytes of them, the least recently
used deleted first. The training order (ShardWindowSampler) shuffles the shards, then the samples of
data.shard_window shards at a time: a function of (seed, epoch) only, whatever the number of processes, as the table
path's shuffle is, so resumes (exact, or elastic with the global batch kept) work as they do there.

Why Arrow files and not litdata's chunks (docs/how-to/shards.md, BENCHMARKS.md): litdata's order depends on the
number of processes and workers, its reader deletes a chunk once a worker moves past it (random access within a
window re-downloads), and its datasets are iterable, which Accelerate's loader would dispatch from rank 0. pyarrow, a
dependency already, reads and writes the files, memory-maps them and speaks S3.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from torch.utils.data import Sampler

from dist_train.data.table_cache import _locked, _write_atomically
from dist_train.errors import DataError

FORMAT = "dist_train shards 1"
INDEX, ROWS = "index.json", "rows.csv"
ATTEMPTS = 4
"""Tries of one S3 request (the SDK's retries) and of one shard's download (ours, with a pause), before the error."""


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.arrow"


def is_remote(location: str) -> bool:
    return str(location).startswith("s3://")


def endpoint() -> str:
    """The S3 endpoint the AWS variables name (as boto3 reads them), else AWS's own."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def filesystem(location: str):
    """(pyarrow filesystem, path in it) of a directory or an s3://bucket/prefix. S3: credentials, region and endpoint
    from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, ...) or
    ~/.aws, so that MinIO, Ceph and other S3-compatible stores work as AWS does."""
    from pyarrow import fs

    if not is_remote(location):
        return fs.LocalFileSystem(), str(Path(location).absolute())
    options = {"retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=ATTEMPTS), "connect_timeout": 10,
               "request_timeout": 120}
    if endpoint() != "AWS S3":
        options["endpoint_override"] = endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    return fs.S3FileSystem(**options), str(location)[len("s3://"):].rstrip("/")


def where(location: str) -> str:
    """A location as messages name it: an s3:// one with its endpoint."""
    return f"{location} (endpoint {endpoint()})" if is_remote(location) else str(location)


def read_bytes(location: str, name: str) -> bytes:
    """One small file of a set (index.json, rows.csv), retried; a missing or unreachable one is one DataError line."""
    store, root = filesystem(location)
    try:  # (retried by the S3 client itself: ATTEMPTS tries)
        with store.open_input_stream(f"{root}/{name}") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{where(location)}: no {name}: not a shard set written by `dist-train shards`, or its "
                        f"writing did not finish (run it again: finished shards are kept)") from None
    except OSError as exc:
        raise DataError(f"cannot read {name} of {where(location)}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@dataclass
class ShardSet:
    """A set's index.json as read, and where the set is."""

    location: str
    index: dict

    @classmethod
    def open(cls, location: str) -> ShardSet:
        try:
            index = json.loads(read_bytes(location, INDEX))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{where(location)}: {INDEX} is not JSON: the set is damaged; write it again") from None
        if index.get("format") != FORMAT:
            raise DataError(f"{where(location)}: {INDEX} says format {index.get('format')!r}, not {FORMAT!r}: write the "
                            f"set again with this version of dist_train")
        return cls(str(location), index)

    @property
    def shards(self) -> list[dict]:
        return self.index["shards"]

    def rows_table(self, cache: Path) -> Path:
        """rows.csv as a local file: in place, or (S3) copied into `cache` once, checked against the index and named by
        its sha256 (so a start trusts a copy without hashing it again)."""
        if not is_remote(self.location):
            return Path(self.location) / ROWS
        path = cache / f"rows-{self.index['rows_sha256'][:32]}.csv"
        if path.is_file():
            return path
        data = read_bytes(self.location, ROWS)
        if hashlib.sha256(data).hexdigest() != self.index["rows_sha256"]:
            raise DataError(f"{where(self.location)}: {ROWS} does not match {INDEX} (sha256): the set is damaged; write "
                            f"it again")
        cache.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, lambda tmp: tmp.write_bytes(data))
        return path


def cache_directory(cache_root: Path, location: str) -> Path:
    """Where one S3 set's copies live on this machine: under the cache root's shards/, keyed by store and prefix."""
    key = hashlib.sha256(f"{endpoint()} {location}".encode()).hexdigest()[:20]
    return cache_root / "shards" / key


class ShardCache:
    """Local copies of an S3 set's shards in `directory`, named by their sha256 (a set written again at the same place
    is never read from an older copy); every set's copies under `directory.parent` together hold at most `limit`
    bytes (None: no limit). Room is made before a download, the least recently opened copies deleted first, and a
    download reserves its full size first (a file of that length), so that processes downloading at once do not pass
    the limit together (one waits while the others' downloads fill it); a partial download whose process died (its
    lock free) is deleted. A copy deleted while a
    loader worker still maps it frees its disk when the worker moves on. Downloads are checked against the sha256."""

    def __init__(self, directory: Path, limit: int | None):
        self.directory, self.limit = directory, limit

    def fetch(self, location: str, shard: dict) -> Path:
        key, size = shard["sha256"][:32], shard["bytes"]
        target = self.directory / f"{key}.arrow"
        if _touch(target, size):
            return target
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with _locked(self.directory / f".{key}.lock"):
                if _touch(target, size):
                    return target
                for stale in self.directory.glob(f".{key}.part-*"):  # (this lock's holder downloads: others died)
                    stale.unlink(missing_ok=True)
                part = self.directory / f".{key}.part-{os.getpid()}"
                self._reserve(part, size, shard["name"])
                try:
                    self._download(location, shard, part)
                    part.replace(target)
                finally:
                    part.unlink(missing_ok=True)
        except OSError as exc:
            raise DataError(f"cannot keep a copy of shard {shard['name']} of {where(location)} in {self.directory}: "
                            f"{exc.strerror or exc}", rank_local=True) from None
        return target

    def _reserve(self, part: Path, size: int, name: str) -> None:
        root = self.directory.parent
        while True:
            with _locked(root / ".room.lock"):
                room = True if self.limit is None else self._make_room(root, size)
                if room:
                    with open(part, "wb") as f:
                        f.truncate(size)
                    return
            if room is None:
                raise DataError(f"shard {name} ({size / 1e6:.1f} MB) is larger than data.cache_limit "
                                f"({self.limit / 1e6:.1f} MB): raise the limit", rank_local=True)
            time.sleep(0.2)  # other processes' downloads hold the room: wait for them to finish (or die)

    def _make_room(self, root: Path, size: int) -> bool | None:
        """Delete the least recently opened copies until `size` more bytes fit: True; False while downloads of other
        processes in flight hold the room (nothing deleted then); None if it can never fit."""
        if size > self.limit:
            return None
        files, copies, in_flight = [], 0, 0
        for path in root.glob("*/*"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if path.name.startswith(".") and ".part-" in path.name:
                if _lock_free(path.with_name(path.name.split(".part-")[0] + ".lock")):
                    path.unlink(missing_ok=True)  # its process died mid-download
                else:
                    in_flight += stat.st_size
            elif path.suffix == ".arrow":
                files.append((stat.st_mtime, path, stat.st_size))
                copies += stat.st_size
        if in_flight + size > self.limit:
            return False
        for _, path, length in sorted(files):
            if in_flight + copies + size <= self.limit:
                break
            path.unlink(missing_ok=True)
            copies -= length
        return True

    def _download(self, location: str, shard: dict, part: Path) -> None:
        store, root = filesystem(location)
        for attempt in range(ATTEMPTS):
            digest = hashlib.sha256()
            try:
                with store.open_input_stream(f"{root}/{shard['name']}") as source, open(part, "r+b") as out:
                    for block in iter(lambda: source.read(8 << 20), b""):
                        digest.update(block)
                        out.write(block)
                    out.truncate()
                break
            except FileNotFoundError:
                raise DataError(f"shard {shard['name']} of {where(location)} is missing: the set is damaged; write it "
                                f"again", rank_local=True) from None
            except OSError as exc:
                if attempt == ATTEMPTS - 1:
                    raise DataError(f"cannot download shard {shard['name']} of {where(location)} after {ATTEMPTS} tries: "
                                    f"{_first_line(exc)}", rank_local=True) from None
                time.sleep(0.5 * 2 ** attempt)
        if digest.hexdigest() != shard["sha256"]:
            raise DataError(f"shard {shard['name']} of {where(location)} does not match {INDEX} (sha256): the set is "
                            f"damaged; write it again", rank_local=True)


def _lock_free(lock: Path) -> bool:
    """Nobody holds `lock` (flock: a dead holder's lock is free)."""
    try:
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(f, fcntl.LOCK_UN)
            return True
    except OSError:
        return False


def _touch(path: Path, size: int) -> bool:
    """The complete copy is there: marked as just used (the cache deletes the least recently used first)."""
    try:
        if path.stat().st_size != size:
            return False
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


class ShardReader:
    """The image bytes of a set's rows, for a dataset (pickled to loader workers: what it sends is the set's index,
    never open files). Keeps `keep_open` shards mapped, the least recently read closed first."""

    def __init__(self, shard_set: ShardSet, cache_root: Path, limit: int | None, keep_open: int = 8):
        self.location = shard_set.location
        self.shards = shard_set.shards
        self.starts = np.cumsum([0] + [s["rows"] for s in self.shards])
        self.cache = ShardCache(cache_directory(cache_root, self.location), limit) if is_remote(self.location) else None
        self.keep_open = max(1, keep_open)
        self._open: OrderedDict[int, pa.Array] = OrderedDict()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard_of(self, rows) -> np.ndarray:
        """Each row's shard number."""
        return np.searchsorted(self.starts, np.asarray(rows, dtype=np.int64), side="right") - 1

    def describe(self, row: int) -> str:
        shard = int(self.shard_of([row])[0])
        return f"{self.location}/{self.shards[shard]['name']} (row {row})"

    def read(self, row: int) -> bytes:
        shard = int(self.shard_of([row])[0])
        return self._images(shard)[row - int(self.starts[shard])].as_py()

    def _images(self, shard: int) -> pa.Array:
        images = self._open.get(shard)
        if images is not None:
            self._open.move_to_end(shard)
            return images
        info = self.shards[shard]
        for attempt in range(2):
            path = self.cache.fetch(self.location, info) if self.cache else Path(self.location) / info["name"]
            try:
                if path.stat().st_size != info["bytes"]:
                    raise DataError(f"shard {info['name']} of {where(self.location)} has {path.stat().st_size} bytes, "
                                    f"its {INDEX} says {info['bytes']}: the set is damaged; write it again", rank_local=True)
                batch = pa.ipc.open_file(pa.memory_map(str(path), "r")).get_batch(0)
                first = batch.column(0)[0].as_py() if batch.num_rows else None
                break
            except FileNotFoundError:
                if self.cache and attempt == 0:
                    continue  # a copy deleted by another process making room since it was fetched: fetched again
                raise DataError(f"shard {info['name']} of {where(self.location)} is missing ({path}): the set is "
                                f"damaged; write it again", rank_local=True) from None
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(f"shard {info['name']} of {where(self.location)} cannot be read ({_first_line(exc)}): "
                                f"the set is damaged; write it again", rank_local=True) from None
        if batch.num_rows != info["rows"] or first != int(self.starts[shard]):
            raise DataError(f"shard {info['name']} of {where(self.location)} holds other rows than its {INDEX} says: the "
                            f"set is damaged; write it again", rank_local=True)
        self._open[shard] = images = batch.column(1)
        while len(self._open) > self.keep_open:
            self._open.popitem(last=False)
        return images


class ShardWindowSampler(Sampler[int]):
    """A shard set's training order: each epoch the shards in a seeded random order, then the rows of `window` shards
    at a time shuffled together, so that all ranks read a few shards at once. `shards`: each position's shard (the
    split may be some rows of the set: a fold, a hold-out). A function of (seed, epoch) only."""

    def __init__(self, shards: np.ndarray, window: int, seed: int):
        self.by_shard = np.argsort(shards, kind="stable")
        self.present, self.first = np.unique(shards[self.by_shard], return_index=True)
        self.last = np.append(self.first[1:], len(shards))
        self.window, self.seed, self.epoch = window, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.by_shard)

    def __iter__(self):
        rng = np.random.default_rng([self.seed % 2**63, self.epoch])
        order = rng.permutation(len(self.present))
        for start in range(0, len(order), self.window):
            chosen = order[start:start + self.window]
            rows = np.concatenate([self.by_shard[self.first[k]:self.last[k]] for k in chosen])
            yield from rows[rng.permutation(len(rows))].tolist()
