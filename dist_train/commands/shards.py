"""`dist-train shards`: a split the config reads (a CSV table or class folders) written as a shard set (data/shards.py)
into a directory or an S3-compatible store, by several processes.

Each shard is written whole (locally under a temporary name, then renamed; to S3 as one upload, which the store
makes visible only when complete) with a small `<shard>.json` beside it; index.json comes last. An interrupted run
leaves no index.json, so nothing reads the set; run it again and the shards that are there (their .json says the
same rows of the same table) are kept.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from dist_train.config import Config, load_config, to_dict
from dist_train.data.shards import FORMAT, INDEX, ROWS, filesystem, is_remote, shard_name, where
from dist_train.data.digits import materialize_digits
from dist_train.data.table_cache import _write_atomically, open_table
from dist_train.data.tables import _check_images_exist, _folder_split, check_columns, split_source
from dist_train.errors import DataError, DistTrainError
from dist_train.job.distributed import fail
from dist_train.rundir.report import bars

SIZE_SAMPLE = 1000
"""Image files whose mean size sets the rows per shard (--shard-size)."""
READ_THREADS = 16
"""Image files a writing process reads at once."""
PROGRESS_S = 30.0
"""Seconds between progress lines where no bar is drawn."""


def split_table(config: Config, split: str) -> tuple[list[str], bytes, dict]:
    """(the split's image files in row order, rows.csv, what index.json says of its columns and classes)."""
    cfg = config.data
    if cfg.source == "shards":
        raise DataError("data.source is shards already: write shards from the tables or folders (data.source=csv, "
                        "folder or digits)")
    if cfg.source == "digits":
        materialize_digits(Path(cfg.root))
    source = split_source(cfg, split)
    if cfg.source == "folder":
        paths, labels, ids = _folder_split(cfg, source, labelled=split != "test")
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        columns = [cfg.image_column, cfg.id_column] + ([cfg.label_column] if labels else [])
        writer.writerow(columns)
        label_values = labels.get(cfg.label_column, [])
        for i, path in enumerate(paths):
            writer.writerow([str(path.relative_to(source.table)), ids[i]] + ([label_values[i]] if labels else []))
        files, raw, id_named = [str(p) for p in paths], out.getvalue().encode(), True
        counts = {label: label_values.count(label) for label in sorted(set(label_values))}
    else:
        table = open_table(source.table, cfg.cache_dir)
        check_columns(source.table, table.names, [source.image_column])
        if not table.num_rows:
            raise DataError(f"{source.table}: no rows")
        _check_images_exist(table, source.image_root, source.image_column)
        root = source.image_root
        files = [str(root / p) for p in table.column(source.image_column)]
        raw, id_named = source.table.read_bytes(), source.id_column in table.names
        counts = {}
        if split != "test" and cfg.label_column in table.names:
            counted = pc.value_counts(table.column(cfg.label_column).arrow())
            counts = dict(sorted(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())))
    columns = {"image_column": source.image_column if cfg.source != "folder" else cfg.image_column,
               "id_column": source.id_column if cfg.source != "folder" else cfg.id_column, "id_named": id_named,
               "counts_per_class": counts}
    return files, raw, columns


def _write_shard(job: tuple) -> dict:
    """One shard: its rows' image files into an Arrow file at the output (a pool worker's task)."""
    output, i, start, files, plan = job
    store, root = filesystem(output)
    pool = ThreadPoolExecutor(READ_THREADS)  # a shared file system answers each open with a round trip
    try:
        images = list(pool.map(_read_image, files))
    finally:
        pool.shutdown(cancel_futures=True)
    table = pa.table({"row": pa.array(range(start, start + len(files)), pa.int64()), "image": pa.array(images, pa.large_binary())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=len(files) or None)
    data = sink.getvalue()
    info = {"name": shard_name(i), "rows": len(files), "bytes": data.size,
            "sha256": hashlib.sha256(memoryview(data)).hexdigest(), "plan": plan}
    try:
        _put(store, f"{root}/{info['name']}", data)
        _put(store, f"{root}/{info['name']}.json", json.dumps(info).encode())
    except OSError as exc:
        raise DataError(f"cannot write {info['name']} to {where(output)}: {str(exc).strip().splitlines()[0]}") from None
    return info


def _read_image(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None


def _put(store, path: str, data) -> None:
    """A whole file: locally written beside and renamed, to S3 one upload (visible only once complete)."""
    from pyarrow import fs

    if isinstance(store, fs.LocalFileSystem):
        _write_atomically(Path(path), lambda tmp: tmp.write_bytes(data))
        return
    for attempt in range(3):
        try:
            with store.open_output_stream(path) as f:
                f.write(data)
            return
        except OSError:
            if attempt == 2:
                raise
            time.sleep(1 + attempt)


def _done(store, root: str, name: str, plan: str) -> dict | None:
    """The shard's .json when the shard is there and was written for the same rows of the same table."""
    try:
        with store.open_input_stream(f"{root}/{name}.json") as f:
            info = json.loads(f.read())
        size = store.get_file_info(f"{root}/{name}").size
    except (OSError, ValueError):
        return None
    return info if info.get("plan") == plan and size == info.get("bytes") else None


class Progress:
    """A line every PROGRESS_S seconds where no bar is drawn (a batch job's log): shards and images done, the rate,
    the time left."""

    def __init__(self, shards: int, images: int, say):
        self.shards, self.images, self.say = shards, images, say
        self.done_shards = self.done_images = 0
        self.started = self.last = time.monotonic()

    def update(self, rows: int) -> None:
        self.done_shards, self.done_images = self.done_shards + 1, self.done_images + rows
        now = time.monotonic()
        if bars() or now - self.last < PROGRESS_S or self.done_shards == self.shards:
            return
        self.last, rate = now, self.done_images / max(now - self.started, 1e-9)
        left = (self.images - self.done_images) / max(rate, 1e-9)
        self.say(f"shards: {self.done_shards}/{self.shards} written, {self.done_images:,} images, {rate:,.0f} images/s, "
                 f"{left / 60:.0f} min left")


def rows_per_shard(files: list[str], shard_mb: float) -> int:
    """Rows that make shards of about `shard_mb` MB, from the mean size of the first SIZE_SAMPLE files."""
    sample = files[:SIZE_SAMPLE]
    mean = sum(os.path.getsize(p) for p in sample) / max(1, len(sample))
    return max(1, int(shard_mb * 1e6 / max(mean, 1.0)))


def write_shards(config: Config, split: str, output: str, shard_mb: float = 256.0, rows: int | None = None,
                 workers: int | None = None, say=print) -> dict:
    """Write the split as a shard set at `output`; returns its index."""
    started = time.monotonic()
    files, raw, columns = split_table(config, split)
    per_shard = rows or rows_per_shard(files, shard_mb)
    table_sha = hashlib.sha256(raw).hexdigest()
    store, root = filesystem(output)
    try:
        if not is_remote(output):
            Path(root).mkdir(parents=True, exist_ok=True)
        if _exists(store, f"{root}/{INDEX}"):  # the set is being rewritten: unfinished until its index is back
            store.delete_file(f"{root}/{INDEX}")
        if not is_remote(output):  # what an interrupted run was writing
            for tmp in Path(root).glob("*.tmp-*"):
                tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise DataError(f"cannot write to {where(output)}: {exc}") from None
    jobs, kept = [], []
    for i, start in enumerate(range(0, len(files), per_shard)):  # (a shard is kept for the same files of the same table)
        chosen = "\n".join(files[start:start + per_shard])
        plan = hashlib.sha256(f"{table_sha} {start} {per_shard} {chosen}".encode()).hexdigest()[:32]
        done = _done(store, root, shard_name(i), plan)
        if done:
            kept.append(done)
        else:
            jobs.append((output, i, start, files[start:start + per_shard], plan))
    count = len(jobs) + len(kept)
    say(f"shards: {len(files)} {split} rows -> {count} shards of {per_shard} rows at {where(output)}"
        + (f" ({len(kept)} already written, kept)" if kept else ""))
    infos = list(kept)
    workers = max(1, min(workers or min(8, os.cpu_count() or 1), len(jobs) or 1))
    progress = Progress(len(jobs), sum(len(job[3]) for job in jobs), say)
    with tqdm(total=len(jobs), desc="shards", unit="shard", disable=not bars(), dynamic_ncols=True) as bar:
        if workers == 1:
            done = map(_write_shard, jobs)
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers)
            done = pool.imap_unordered(_write_shard, jobs)
        try:
            for info in done:
                infos.append(info)
                bar.update()
                progress.update(info["rows"])
        finally:
            if workers > 1:
                pool.terminate()
    infos.sort(key=lambda info: int(info["name"].split("-")[1].split(".")[0]))
    from dist_train import __version__


    data = to_dict(config)["data"]
    index = {"format": FORMAT, "split": split, "rows": len(files), "rows_sha256": table_sha, **columns,
             "shards": [{k: info[k] for k in ("name", "rows", "bytes", "sha256")} for info in infos],
             "written_by": {"dist_train": __version__, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "data": {k: data[k] for k in ("source", "root", split, "image_root", "image_column",
                                                          "label_column", "id_column", "group_column")}}}
    try:
        _put(store, f"{root}/{ROWS}", raw)
        _put(store, f"{root}/{INDEX}", json.dumps(index, indent=1).encode())
    except OSError as exc:
        raise DataError(f"cannot write {INDEX} to {where(output)}: {str(exc).strip().splitlines()[0]}") from None
    total = sum(info["bytes"] for info in infos)
    say(f"shards: wrote {where(output)}: {len(files)} rows in {count} shards, {total / 1e6:.1f} MB, "
        f"{time.monotonic() - started:.1f} s")
    return index


def _exists(store, path: str) -> bool:
    from pyarrow import fs

    return store.get_file_info(path).type != fs.FileType.NotFound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dist-train shards",
        description="Write a split the config reads (CSV table or class folders, with its ids, labels and groups) as a "
                    "shard set: a few large Arrow files of the images' bytes as they are on disk, their table and an "
                    "index, into a directory or s3://bucket/prefix (the AWS variables name the store). Train from it "
                    "with data.source=shards data.train=OUTPUT (docs/how-to/shards.md).")
    parser.add_argument("--config", help="the YAML config whose data section reads the split")
    parser.add_argument("--split", choices=["train", "val", "test"], required=True)
    parser.add_argument("--output", required=True, help="a directory or s3://bucket/prefix")
    parser.add_argument("--shard-size", type=float, default=256.0, metavar="MB", help="about this many MB per shard (default 256)")
    parser.add_argument("--rows-per-shard", type=int, help="this many rows per shard (instead of --shard-size)")
    parser.add_argument("--workers", type=int, help="processes writing shards (default: the CPUs, at most 8)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="changes to the config, e.g. data.root=/data")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.rows_per_shard is not None and args.rows_per_shard < 1:
            raise DataError("--rows-per-shard must be at least 1")
        config = load_config(args.config, args.overrides)
        write_shards(config, args.split, args.output.rstrip("/"), args.shard_size, args.rows_per_shard, args.workers)
    except DistTrainError as exc:
        fail(exc)
    return 0
