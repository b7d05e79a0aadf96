"""Tables read once (data/table_cache.py, data/columns.py): a 200,000-row table trains and predicts on two processes as
it does without the cache, the cache follows the table's edits, a build killed half-way is never trusted, two
processes starting at once build it once, and a missing image is named on every split."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, config_path, read_jsonl, run_cli, run_env, tiny_overrides

from dist_train.config import DataConfig
from dist_train.data.table_cache import open_table
from dist_train.data.tables import read_split
from dist_train.errors import DataError

ROWS = 200_000
TEST_ROWS = 20_000


@pytest.fixture(scope="module")
def big_tables(digits_root, tmp_path_factory) -> Path:
    """train_big.csv: 200,000 rows over the digits' 1,257 training images (each path repeated, unique ids, the image's
    label); test_big.csv: 20,000 rows over the test images; val.csv: the digits' own."""
    root = tmp_path_factory.mktemp("big")
    os.symlink(digits_root / "images", root / "images")
    for name in ("val.csv",):
        (root / name).write_text((digits_root / name).read_text())
    train = list(csv.DictReader(open(digits_root / "train.csv", newline="")))
    test = list(csv.DictReader(open(digits_root / "info.csv", newline="")))
    with open(root / "train_big.csv", "w", newline="") as f:
        f.write("id,image,label\n" + "".join(f"r{i},{train[i % len(train)]['image']},{train[i % len(train)]['label']}\n"
                                            for i in range(ROWS)))
    with open(root / "test_big.csv", "w", newline="") as f:
        f.write("id,image\n" + "".join(f"t{i},{test[i % len(test)]['image']}\n" for i in range(TEST_ROWS)))
    return root


def big_run(root: Path, out: Path, cache: str, predict: bool = True) -> tuple[dict, list[dict], str]:
    overrides = [*tiny_overrides(root, out, **{"data.source": "csv", "data.train": "train_big.csv", "data.test": "test_big.csv",
                                               "train.max_steps": 3, "train.epochs": 1, "data.cache_dir": cache})]
    run_cli("train.py", ["--config", config_path("digits.yaml"), *overrides], processes=2)
    submission = ""
    if predict:
        run_cli("predict.py", ["--config", config_path("digits.yaml"), *overrides, "--checkpoint", str(out / "checkpoints" / "last")],
                processes=2)
        submission = (out / "submission.csv").read_text()
    return json.loads((out / "run_info.json").read_text()), read_jsonl(out / "metrics.jsonl"), submission


def test_a_200k_row_table_trains_and_predicts_on_two_processes_as_without_the_cache(big_tables, tmp_path):
    """Through the cache (rank 0 or 1 builds it, the other and the loader workers map it) and without one (each process
    parses the table itself, as every process read it before the cache): the same weights on both ranks and in both
    runs, each rank a half of the batches, and one submission of the 20,000 test rows in the table's order."""
    cache = tmp_path / "cache"
    cached = big_run(big_tables, tmp_path / "cached", str(cache))
    assert len(list((cache / "tables").glob("*.arrow"))) == 3  # the training, validation and test tables
    unwritable = tmp_path / "not-a-dir"
    unwritable.write_text("")  # a cache directory that cannot be made: the tables are read in memory, with a warning
    plain = big_run(big_tables, tmp_path / "plain", str(unwritable), predict=False)
    for info, metrics, _ in (cached, plain):
        assert info["train_samples"] == ROWS and info["num_processes"] == 2
        digests = info["final_weights_sha256_per_rank"]
        assert len(digests) == 2 and digests[0] == digests[1]
        assert metrics[-1]["rank_batches"] == [3, 3]  # three steps, one batch per rank each
    assert cached[0]["final_weights_sha256_per_rank"] == plain[0]["final_weights_sha256_per_rank"]
    rows = cached[2].splitlines()
    assert rows[0] == "id,label" and len(rows) == TEST_ROWS + 1
    assert [row.split(",")[0] for row in rows[1:]] == [f"t{i}" for i in range(TEST_ROWS)]


def _table(tmp_path: Path, rows: list[tuple[str, str, str]]) -> Path:
    (tmp_path / "a.png").write_bytes(b"png")
    path = tmp_path / "t.csv"
    path.write_text("id,image,label\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def test_an_edited_table_is_read_again_even_with_its_size_and_mtime_kept(tmp_path):
    path = _table(tmp_path, [("r0", "a.png", "cat"), ("r1", "a.png", "dog")])
    first = open_table(path, str(tmp_path / "cache"))
    assert first.column("label").to_list() == ["cat", "dog"]
    stat = path.stat()
    path.write_text(path.read_text().replace("dog", "cow"))  # a row edited, the same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and its mtime put back
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    again = open_table(path, str(tmp_path / "cache"))
    assert again.column("label").to_list() == ["cat", "cow"] and again.data != first.data
    assert open_table(path, str(tmp_path / "cache")).data == again.data  # unchanged since: the same file, mapped


OPEN = "import sys, os; from pathlib import Path; from dist_train.data.table_cache import open_table; " \
       "t = open_table(Path(sys.argv[1]), sys.argv[2]); " \
       "print(os.getpid(), t.table.schema.metadata[b'built_by'].decode(), os.stat(t.data).st_ino, t.num_rows)"


def test_a_build_killed_half_way_is_never_trusted_and_the_next_start_builds_it(tmp_path):
    path = _table(tmp_path, [(f"r{i}", "a.png", str(i % 3)) for i in range(1000)])
    cache = tmp_path / "cache"
    killed = subprocess.run([sys.executable, "-c", OPEN, str(path), str(cache)], cwd=ROOT, capture_output=True, text=True,
                            env=run_env(DIST_TRAIN_FAULT="kill@table-cache-written"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = list((cache / "tables").iterdir())
    assert [p.name for p in left if p.suffix == ".arrow"] == [] and any(".tmp-" in p.name for p in left), left
    done = subprocess.run([sys.executable, "-c", OPEN, str(path), str(cache)], cwd=ROOT, capture_output=True, text=True,
                          env=run_env(), check=True)
    pid, built_by, _, rows = done.stdout.split()
    assert built_by.endswith(f":{pid}") and rows == "1000"
    assert not [p for p in (cache / "tables").iterdir() if ".tmp-" in p.name]  # the half-written file is gone


def test_two_processes_starting_at_once_on_one_table_build_it_once(tmp_path):
    path = _table(tmp_path, [(f"r{i}", "a.png", str(i % 7)) for i in range(300_000)])
    procs = [subprocess.Popen([sys.executable, "-c", OPEN, str(path), str(tmp_path / "cache")], cwd=ROOT, env=run_env(),
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    said = [proc.communicate(timeout=120)[0].split() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    builders = {words[1] for words in said}
    assert len(builders) == 1 and builders.pop().split(":")[1] in {words[0] for words in said}  # one of them built it
    assert said[0][2] == said[1][2] and said[0][3] == said[1][3] == "300000"  # and both mapped that same file


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_missing_image_is_named_on_every_split_and_found_once_it_is_back(tmp_path, split):
    path = _table(tmp_path, [("r0", "a.png", "cat"), ("r1", "gone.png", "dog"), ("r2", "gone.png", "cat")])
    cfg = DataConfig(source="csv", root=str(tmp_path), **{split: path.name}, cache_dir=str(tmp_path / "cache"))
    for _ in range(2):  # checked when the table is first read, and remembered
        with pytest.raises(DataError, match=rf"^{re.escape(f'{path}: image file not found: {tmp_path}/gone.png')} and 1 more$"):
            read_split(cfg, split, labelled=split != "test")
    (tmp_path / "gone.png").write_bytes(b"png")  # put back: the next start finds it
    assert len(read_split(cfg, split, labelled=split != "test").paths) == 3


def test_a_missing_image_ends_a_run_with_one_line(big_tables, tmp_path):
    table = tmp_path / "train.csv"
    table.write_text((big_tables / "val.csv").read_text().replace("images/", "missing/", 1))
    proc = run_cli("train.py", ["--config", config_path("digits.yaml"),
                                *tiny_overrides(big_tables, tmp_path / "run", **{"data.source": "csv", "data.train": str(table)})],
                   processes=2, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(said) == 1 and said[0].startswith(f"error: {table}: image file not found: {big_tables}/missing/"), said


@pytest.mark.parametrize("grouped", [True, False])
def test_folds_from_codes_are_the_folds_of_the_strings_and_a_large_grouped_split_is_computed_once(tmp_path, monkeypatch,
                                                                                                   grouped):
    """assign_folds hands scikit-learn integer codes instead of a string per row: the folds are those the strings give
    (values that sort differently as numbers, prefixes, two label columns joined); a large grouped split is kept in the
    cache and read back, not computed again."""
    import numpy as np
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    from dist_train.data import splits
    from dist_train.data.tables import Records

    rng = np.random.default_rng(0)
    n = 600
    first = [["9", "10", "a", "ab", "b\x1f"][i] for i in rng.integers(0, 5, n)]
    second = [["x", "", "xy"][i] for i in rng.integers(0, 3, n)]
    groups = [f"g{i}" for i in rng.integers(0, 40, n)]
    records = Records([f"{i}.png" for i in range(n)], [], [str(i) for i in range(n)], {"a": first, "b": second},
                      split_groups=groups if grouped else None)
    for stratify in (True, False):
        strata = ["\x1f".join(v) for v in zip(first, second)] if stratify else None
        splitter = ((StratifiedGroupKFold if stratify else GroupKFold) if grouped else (StratifiedKFold if stratify else KFold))
        expected = np.full(n, -1)
        for fold, (_, held) in enumerate(splitter(4, shuffle=True, random_state=3).split(np.zeros(n), strata,
                                                                                         groups if grouped else None)):
            expected[held] = fold
        got = splits.assign_folds(records, 4, 3, stratify, "t", str(tmp_path / "cache"))
        assert got.tolist() == expected.tolist()
    monkeypatch.setattr(splits, "CACHED_SPLIT_ROWS", 100)
    computed = splits.assign_folds(records, 4, 3, True, "t", str(tmp_path / "cache"))
    kept = list((tmp_path / "cache" / "tables").glob("folds-*.npy"))
    assert len(kept) == (1 if grouped else 0)
    monkeypatch.setattr(splits, "_split", lambda *args: pytest.fail("computed again"))
    if grouped:
        assert splits.assign_folds(records, 4, 3, True, "t", str(tmp_path / "cache")).tolist() == computed.tolist()


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "in_memory"])
def test_a_column_of_picked_rows_reads_the_same_after_a_loader_worker_was_sent_it(tmp_path, mapped):
    """Sending a column to a loader worker (torch's pickler) moves its row tensor into shared memory; the column (and any
    other sharing those rows) must go on reading the same rows. It once kept a numpy view of the old memory: garbage
    indices after the first worker started (an ArrowIndexError in a 5-fold run with data.num_workers=1)."""
    from multiprocessing.reduction import ForkingPickler

    import pyarrow as pa
    import torch.multiprocessing  # noqa: F401 (registers torch's reductions with the ForkingPickler)

    from dist_train.data.columns import Column

    values = [f"row{i}" for i in range(1000)]
    if mapped:
        path = tmp_path / "table.arrow"
        with pa.ipc.new_file(str(path), pa.schema([("name", pa.string())])) as writer:
            writer.write_table(pa.table({"name": values}))
        column = Column.mapped(str(path), "name").take(range(100, 900, 3))
    else:
        column = Column.of(values).take(range(100, 900, 3))
    other = Column(column.array, column.rows, column.source)  # (the ids and paths of a split share their rows)
    expected = values[100:900:3]
    sent = ForkingPickler.loads(ForkingPickler.dumps(column))
    for _ in range(3):  # what the allocator does with the freed pages varies
        torch_garbage = [bytearray(1 << 16) for _ in range(64)]
        assert column.to_list() == other.to_list() == expected and column[5] == expected[5]
        del torch_garbage
    assert list(sent) == expected
