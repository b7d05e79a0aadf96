"""Datasets (CSV tables, class folders, the embedded digits), transforms, samplers and loaders."""
from __future__ import annotations

import atexit
import csv
import difflib
import functools
import multiprocessing
import os
import re
import shutil
import signal
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from dist_train.config import CVConfig, DataConfig, SplitConfig
from dist_train.decode import BAD_TARGET, JPEG_SUFFIXES, DeviceDecoder, center_crop_box, collate_encoded, random_resized_crop_box
from dist_train.errors import ConfigError, DataError, SampleError
from dist_train.faults import die_with_parent

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DIGITS_SPLIT_SEED = 0
DIGITS_MARKER = ".complete"


@dataclass
class Records:
    """One split as plain lists: image paths, targets (-1 when unlabelled) and row ids.

    A target is a class index, or a tuple (several heads, several values) or a float (tasks.py encodes
    them from `labels`, the raw label columns). `groups`: each row's query (ranking). `split_groups`: each row's
    data.group_column value (rows of a group stay on one side of a hold-out or a cv fold).
    """

    paths: list[Path]
    targets: list
    ids: list[str]
    labels: dict[str, list[str]] | None = None
    groups: list[str] | None = None
    split_groups: list[str] | None = None

    def __reduce__(self):
        """Pickled (to loader workers started by the fork server) with the paths as one string: see PathList. Made
        one the first time, here: a loader pickles its dataset once per worker."""
        self.paths = PathList.of(self.paths)
        return Records, (self.paths, self.targets, self.ids, self.labels, self.groups, self.split_groups)

    def take(self, idx) -> "Records":
        pick = lambda values: [values[i] for i in idx] if values is not None else None  # noqa: E731
        return Records(pick(self.paths), pick(self.targets) if self.targets else [], pick(self.ids),
                       {k: pick(v) for k, v in self.labels.items()} if self.labels is not None else None,
                       pick(self.groups), pick(self.split_groups))


class PathList(Sequence):
    """Paths held as one string, a Path made on each access: how Records travel to fork-server workers. ImageNet's
    1.28 M Path objects took 3.4 s to pickle (per worker, in the rank) and 8.4 s to unpickle; as one string, BENCHMARKS.md."""

    def __init__(self, text: str):
        self._text = text
        self._items = text.split("\0") if text else []

    @classmethod
    def of(cls, paths) -> "PathList":
        return paths if isinstance(paths, PathList) else cls("\0".join(map(str, paths)))  # NUL: in no path

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [Path(p) for p in self._items[index]]
        return Path(self._items[index])

    def __reduce__(self):
        return PathList, (self._text,)


def as_target(value):
    """A record's target as the loader collates it: ints stay ints, tuples and floats become tensors."""
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float32)
    return torch.tensor(value, dtype=torch.long if all(isinstance(v, int) for v in value) else torch.float32)


class ImageDataset(Dataset):
    """Loads `records` one image at a time; yields (image, target, index into the split).

    The random augmentation of a sample is a function of (seed, epoch, index) only, drawn from a
    private RNG: the same whatever the number of processes or workers, and after a resume in the
    middle of an epoch. The epoch lives in shared memory so that persistent workers see set_epoch.
    An unreadable image (truncated, empty, not an image) raises a SampleError naming the file, or
    with bad_samples="skip" becomes a blank image with target BAD_TARGET, which weighs nothing.
    """

    def __init__(self, records: Records, transform, channels: int, seed: int = 0, split: str = "train",
                 bad_samples: str = "error", image_size: int = 32):
        self.records = records
        self.transform = transform
        self.mode = "L" if channels == 1 else "RGB"
        self.seed = seed
        self.split = split
        self.bad_samples = bad_samples
        self.image_size = image_size
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.records.paths)

    def __getitem__(self, index: int):
        path, target = self.records.paths[index], as_target(self.records.targets[index])
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
        except (OSError, SyntaxError, ValueError) as exc:  # what Pillow raises for truncated or foreign bytes
            where = f"{self.split} sample {index}: cannot read image {path} ({type(exc).__name__}: {exc})"
            if self.bad_samples == "error":
                raise SampleError(f"{where}; fix or remove it, or set data.bad_samples=skip") from None
            print(f"warning: {where}; skipped (data.bad_samples=skip)", file=sys.stderr, flush=True)
            image, target = Image.new(self.mode, (self.image_size, self.image_size)), BAD_TARGET
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.sample_seed(index))  # torch.manual_seed costs ~70 us (all backends)
            return self.transform(image), target, index

    def sample_seed(self, index: int) -> int:
        return (self.seed * 1_000_003 + int(self.epoch)) * 10_000_019 + index


class EncodedImageDataset(ImageDataset):
    """For data.decode=device: yields the file's bytes with the sample's crop box and flip (drawn from the
    same per-sample RNG as ImageDataset); decode.DeviceDecoder does the rest on the accelerator.

    `crop`: "resize" (the whole image), "random_resized_crop" (training) or "center" (evaluation after a
    random-resized-crop training); `flip_p`: probability of a left-right flip.
    """

    def __init__(self, records: Records, cfg: DataConfig, crop: str, flip_p: float, seed: int = 0, split: str = "train"):
        super().__init__(records, None, cfg.channels, seed, split, cfg.bad_samples, cfg.image_size)
        self.crop, self.flip_p = crop, flip_p
        self.scale, self.ratio, self.center_fraction = tuple(cfg.crop_scale), tuple(cfg.crop_ratio), cfg.eval_crop_fraction

    def __getitem__(self, index: int):
        path, target = self.records.paths[index], as_target(self.records.targets[index])
        try:
            with Image.open(path) as image:  # reads the header only: the size, and a first check of the file
                width, height = image.size
            data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        except (OSError, SyntaxError, ValueError) as exc:
            where = f"{self.split} sample {index}: cannot read image {path} ({type(exc).__name__}: {exc})"
            if self.bad_samples == "error":
                raise SampleError(f"{where}; fix or remove it, or set data.bad_samples=skip") from None
            print(f"warning: {where}; skipped (data.bad_samples=skip)", file=sys.stderr, flush=True)
            data, width, height, target = torch.empty(0, dtype=torch.uint8), self.image_size, self.image_size, BAD_TARGET
        generator = torch.Generator().manual_seed(self.sample_seed(index))
        if self.crop == "random_resized_crop":
            box = random_resized_crop_box(width, height, self.scale, self.ratio, generator)
        elif self.crop == "center":
            box = center_crop_box(width, height, self.center_fraction)
        else:
            box = (0.0, 0.0, float(width), float(height))
        flip = self.flip_p > 0 and bool(torch.rand((), generator=generator) < self.flip_p)
        return {"data": data, "box": box, "flip": flip, "path": str(path)}, target, index


# ----------------------------------------------------------------------------------------------
# sources


def resolve(cfg: DataConfig, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(cfg.root) / p


@dataclass(frozen=True)
class SplitSource:
    """Where one split's rows and images are: data.<split>, its own keys first, then the data section's."""

    name: str
    """train, val or test."""
    table: Path
    image_root: Path
    image_column: str
    id_column: str
    id_named: bool
    """The split names its id column itself (so the table must have it)."""


def split_source(cfg: DataConfig, name: str) -> SplitSource:
    """data.<name> (a table path, or a mapping of its own table, image root, image and id columns) resolved: relative
    paths against data.root, keys left out from the data section."""
    value = getattr(cfg, name)
    own = value if isinstance(value, SplitConfig) else SplitConfig(table=value)
    image_root = own.image_root or cfg.image_root
    return SplitSource(name, resolve(cfg, own.table), resolve(cfg, image_root) if image_root else Path(cfg.root),
                       own.image_column or cfg.image_column, own.id_column or cfg.id_column, own.id_column is not None)


def read_csv(path: Path, required: list[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"CSV file not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for column in required:
            if column not in columns:
                close = difflib.get_close_matches(column, columns, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise DataError(f"{path}: missing column {column!r}{hint}; columns found: {', '.join(columns) or 'none'}")
        return list(reader)


def _check_images_exist(paths: list[Path], where: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"{where}: image file not found: {missing[0]}{more}")


def encode_classes(labels: list[str], classes: list[str], where: str) -> list[int]:
    """Class indices of `labels`; a label outside `classes` is a DataError naming its row."""
    index = {c: i for i, c in enumerate(classes)}
    for row, label in enumerate(labels):
        if label not in index:
            raise DataError(
                f"{where}: row {row + 1} has label {label!r}, which is not one of the "
                f"{len(classes)} classes ({', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''})"
            )
    return [index[label] for label in labels]


def sorted_labels(labels: list[str]) -> list[str]:
    """Unique labels, numerically sorted when all are integers (so "10" comes after "9")."""
    unique = set(labels)
    if all(label.lstrip("-").isdigit() for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _csv_split(cfg: DataConfig, source: SplitSource, labelled: bool, columns: list[str] | None = None,
               query: str | None = None):
    """(image paths, label columns, ids, groups) of one table. The test split's ids are its id column (the submission
    echoes them: unique); a labelled row's id is its id column when the table has one, else its image path relative to
    the image root. Groups: data.group_column of a labelled table (None without it)."""
    path = source.table
    columns = columns or [cfg.label_column]
    named_id = [source.id_column] if not labelled or source.id_named else []
    required = [source.image_column] + (columns if labelled else []) + named_id + ([query] if query else [])
    rows = read_csv(path, required)
    if not rows:
        raise DataError(f"{path}: no rows")
    paths = [source.image_root / row[source.image_column] for row in rows]
    _check_images_exist(paths, str(path))
    labels = {c: [row[c] for row in rows] for c in columns} if labelled else {}
    if query:
        labels[query] = [row[query] for row in rows]
    if source.id_column in rows[0]:
        ids = [row[source.id_column] for row in rows]
    else:
        ids = [row[source.image_column] for row in rows]
    if not labelled:
        _check_unique(ids, f"{path}: column {source.id_column!r}")
    groups = _groups(cfg, rows, source, path) if labelled and cfg.group_column else None
    return paths, labels, ids, groups


def _check_unique(ids: list[str], where: str) -> None:
    seen: dict[str, int] = {}
    for row, value in enumerate(ids, 1):
        if value in seen:
            raise DataError(f"{where} has duplicate ids: {value!r} on rows {seen[value]} and {row}; the submission needs "
                            f"one row per id")
        seen[value] = row


def _groups(cfg: DataConfig, rows: list[dict[str, str]], source: SplitSource, path: Path) -> list[str]:
    """Each row's data.group_column value: the column's, or (`parent_dir`) the folder of its image path."""
    column = cfg.group_column
    if column in rows[0]:
        return [row[column] for row in rows]
    if column == "parent_dir":
        return [str(Path(row[source.image_column]).parent) for row in rows]
    close = difflib.get_close_matches(column, list(rows[0]), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DataError(f"{path}: data.group_column {column!r} is not a column{hint}; columns found: {', '.join(rows[0])} "
                    f"(or set data.group_column: parent_dir to group the images by their folder)")


def _folder_split(cfg: DataConfig, source: SplitSource, labelled: bool) -> tuple[list[Path], list[str], list[str]]:
    root = source.table
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    paths, labels = [], []
    columns = {cfg.label_column: labels}
    if labelled:
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
        if not class_dirs:
            raise DataError(f"{root}: no class sub-folders (expected {root}/<class>/<image>)")
        for class_dir in class_dirs:
            files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            paths += files
            labels += [class_dir.name] * len(files)
    else:
        paths = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    ids = [str(p.relative_to(root).with_suffix("")) for p in paths]
    return paths, columns if labelled else {}, ids


def _split(cfg: DataConfig, name: str, labelled: bool, columns: list[str] | None = None, query: str | None = None) -> Records:
    source = split_source(cfg, name)
    groups = None
    if cfg.source == "folder":
        paths, labels, ids = _folder_split(cfg, source, labelled)
    else:
        paths, labels, ids, groups = _csv_split(cfg, source, labelled, columns, query)
    return Records(paths, [], ids, labels if labelled else None, labels.pop(query) if query else None, groups)


def load_training(cfg: DataConfig, label, columns: list[str] | None = None, query: str | None = None):
    """The whole training table with its targets, and what its labels define (see load_splits)."""
    if cfg.source == "digits":
        materialize_digits(Path(cfg.root))
    train = _split(cfg, "train", True, columns, query)
    train.targets, defined = label(train.labels, str(split_source(cfg, "train").table), None)
    return train, defined


def load_splits(cfg: DataConfig, seed: int, label, columns: list[str] | None = None, query: str | None = None,
                stratify: bool = True, cv: CVConfig | None = None):
    """The training and validation splits, and what their labels define (e.g. the class names).

    `label(labels, where, defined)` turns a split's raw label columns into its targets and returns
    (targets, defined); it sees the whole training table first (defined=None: it decides, e.g. the classes),
    then the validation table. `query` becomes `Records.groups`. With cv.folds: fold cv.fold of the training
    table is the validation split (assign_folds). Without data.val: a seeded hold-out of the training table,
    stratified by its first label column; with data.group_column, the first of round(1 / val_fraction) grouped
    folds (assign_folds).
    """
    train, defined = load_training(cfg, label, columns, query)
    where = str(split_source(cfg, "train").table)
    if cv is not None and cv.folds > 0:
        if cv.fold is None:
            raise ConfigError(f"cv.folds={cv.folds}: train.py trains every fold in turn (dist_train.cv); one run trains one "
                              f"fold: set cv.fold")
        folds = assign_folds(train, cv.folds, seed if cv.seed is None else cv.seed, stratify, where)
        return train.take(np.flatnonzero(folds != cv.fold)), train.take(np.flatnonzero(folds == cv.fold)), defined
    if cfg.val is not None:
        val = _split(cfg, "val", True, columns, query)
        val.targets, _ = label(val.labels, str(split_source(cfg, "val").table), defined)
        check_groups_apart(train, val, cfg)
    elif train.split_groups is not None:
        folds = assign_folds(train, max(2, round(1 / cfg.val_fraction)), seed, stratify, where)
        train, val = train.take(np.flatnonzero(folds != 0)), train.take(np.flatnonzero(folds == 0))
    else:
        first = next(iter(train.labels.values()))
        train, val = _holdout(train, cfg.val_fraction, seed, first if stratify else None)
    return train, val, defined


def check_groups_apart(train: Records, val: Records, cfg: DataConfig) -> None:
    """A validation table of its own, with data.group_column: no group may be on both sides (the validation score
    would count, e.g., photos of people the model trained on: the 6-point optimism grouping is there to remove)."""
    if train.split_groups is None or val.split_groups is None:
        return
    shared = sorted(set(train.split_groups) & set(val.split_groups))
    if shared:
        examples = ", ".join(repr(g) for g in shared[:3]) + (", ..." if len(shared) > 3 else "")
        raise DataError(f"data.group_column {cfg.group_column!r}: {len(shared)} of the {len(set(val.split_groups))} groups of "
                        f"{split_source(cfg, 'val').table} are in {split_source(cfg, 'train').table} too ({examples}): the "
                        f"validation score would count rows of groups the model trained on; take them out of one table, "
                        f"or leave data.val unset for a grouped hold-out (or cv.folds)")


def load_test_records(cfg: DataConfig) -> Records:
    if cfg.test is None:
        raise ConfigError("data.test is not set: nothing to predict")
    if cfg.source == "digits":
        materialize_digits(Path(cfg.root))
    records = _split(cfg, "test", labelled=False)
    records.targets = [-1] * len(records.paths)
    return records


def _holdout(records: Records, fraction: float, seed: int, stratify: list[str] | None) -> tuple[Records, Records]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(records.paths))
    if stratify is not None and min(Counter(stratify).values()) < 2:
        stratify = None  # a class with a single row cannot be on both sides: stratified where possible means not here
    train_idx, val_idx = train_test_split(index, test_size=fraction, random_state=seed, stratify=stratify)
    return records.take(sorted(train_idx)), records.take(sorted(val_idx))


def assign_folds(records: Records, folds: int, seed: int, stratify: bool, where: str) -> np.ndarray:
    """Each row's fold, 0 .. folds - 1, seeded: grouped by `records.split_groups` (no group in two folds) and, when
    `stratify`, stratified by the label columns together, as far as the groups allow (scikit-learn's
    StratifiedGroupKFold, GroupKFold, StratifiedKFold or KFold, shuffled)."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    count = len(records.paths)
    strata = ["\x1f".join(values) for values in zip(*records.labels.values())] if stratify else None
    groups = records.split_groups
    units = len(set(groups)) if groups is not None else count
    if units < folds:
        what = "groups (data.group_column)" if groups is not None else "rows"
        raise DataError(f"{where}: {units} {what} for {folds} folds (or a hold-out of 1/{folds}, data.val_fraction); "
                        f"every fold needs at least one")
    if groups is not None:
        splitter = (StratifiedGroupKFold if stratify else GroupKFold)(folds, shuffle=True, random_state=seed)
    else:
        splitter = (StratifiedKFold if stratify else KFold)(folds, shuffle=True, random_state=seed)
    assigned = np.full(count, -1)
    with warnings.catch_warnings():  # a class rarer than the folds: stratified as far as it goes, said in the docs
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        try:
            for fold, (_, held) in enumerate(splitter.split(np.zeros(count), strata, groups)):
                assigned[held] = fold
        except ValueError as exc:
            raise DataError(f"{where}: cannot split into {folds} folds: {exc}") from None
    return assigned


def materialize_digits(root: Path) -> None:
    """Write scikit-learn's 1,797 digits once as 8x8 PNGs + train/val CSVs + an unlabelled info.csv.

    The split is fixed (stratified 70/15/15, seed 0). Written into a temporary directory and renamed,
    so concurrent processes or an interrupted run never see a half-written data set.
    """
    if (root / DIGITS_MARKER).is_file():
        return
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    labels = digits.target
    index = np.arange(len(labels))
    train_idx, rest = train_test_split(index, test_size=0.3, random_state=DIGITS_SPLIT_SEED, stratify=labels)
    val_idx, test_idx = train_test_split(rest, test_size=0.5, random_state=DIGITS_SPLIT_SEED, stratify=labels[rest])

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image, mode="L").save(tmp / "images" / f"{i:04d}.png")

    def write(name: str, idx, header: list[str], row) -> None:
        with open(tmp / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(row(i) for i in sorted(idx))

    write("train.csv", train_idx, ["id", "image", "label"], lambda i: [f"digit_{i:04d}", f"images/{i:04d}.png", labels[i]])
    write("val.csv", val_idx, ["id", "image", "label"], lambda i: [f"digit_{i:04d}", f"images/{i:04d}.png", labels[i]])
    write("info.csv", test_idx, ["id", "image"], lambda i: [f"digit_{i:04d}", f"images/{i:04d}.png"])
    write("test_labels.csv", test_idx, ["id", "label"], lambda i: [f"digit_{i:04d}", labels[i]])
    (tmp / DIGITS_MARKER).write_text("scikit-learn digits, stratified 70/15/15 split, seed 0\n")
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process finished first (the target now exists) or `root` holds something else.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / DIGITS_MARKER).is_file():
            raise DataError(f"cannot write the digits data set to {root}: the directory exists and is not a complete digits set") from None


# ----------------------------------------------------------------------------------------------
# transforms, samplers, loaders


def build_transform(cfg: DataConfig, train: bool):
    size = cfg.image_size
    if cfg.train_crop == "resize":
        steps = [v2.ToImage(), v2.Resize((size, size), antialias=True)]
    elif train:
        steps = [v2.ToImage(), v2.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio), antialias=True)]
    else:
        steps = [v2.ToImage(), v2.Resize(round(size / cfg.eval_crop_fraction), antialias=True), v2.CenterCrop(size)]
    if train:
        steps += [_augmentation(spec, i) for i, spec in enumerate(cfg.train_augment)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
    return v2.Compose(steps)


def _augmentation(spec: dict, i: int):
    kwargs = dict(spec)
    name = kwargs.pop("name")
    cls = getattr(v2, str(name), None)
    if not isinstance(cls, type):
        names = [n for n in dir(v2) if n[:1].isupper()]
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"data.train_augment[{i}]: {name!r} is not a torchvision.transforms.v2 transform{hint}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"data.train_augment[{i}] ({name}): {exc}") from None


class ClassBalancedSampler(Sampler[int]):
    """Draws len(targets) indices per epoch with replacement, each class equally likely.

    The draw is a function of (seed, epoch) only, so every process draws the same sequence and the
    distributed loader's batch sharding splits it without overlap.
    """

    def __init__(self, targets: list[int], seed: int):
        counts = np.bincount(targets)
        self.weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.double)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator).tolist()


def loader_worker_init(worker_id: int) -> None:
    """Loader workers share their rank's process group, so SLURM's SIGTERM/SIGUSR1 reach them too: they
    must live on until the rank, which acts on the signal at the next step boundary, is done with them.
    And they die with their rank at once (not at torch's next 5 s liveness check), so that a crashed rank
    leaves no orphans holding the job's output open. (worker_context's processes do this before torch's
    own start-up too.)"""
    bind_to_parent(os.getppid())


def bind_to_parent(parent: int) -> None:
    """loader_worker_init's binding, for a worker whose parent should be `parent`: one already gone ends it now."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL, parent)


class _ForkedWorker(multiprocessing.context.ForkProcess):
    def run(self) -> None:
        bind_to_parent(self._parent_pid)  # before torch's start-up, which may hang (worker_context)
        super().run()


class _ForkServerWorker(multiprocessing.context.ForkServerProcess):
    def run(self) -> None:
        # The server gives each child its "a client is alive" pipe, so that it outlives them; a worker does not
        # start processes of its own, so it lets go: the server then ends with its rank, and takes the workers.
        # Bound first, while the pipe still keeps the server (this worker's parent) alive.
        from multiprocessing import forkserver

        bind_to_parent(os.getppid())
        if forkserver._forkserver._forkserver_alive_fd is not None:
            os.close(forkserver._forkserver._forkserver_alive_fd)
            forkserver._forkserver._forkserver_alive_fd = None
        super().run()


class _ForkContext(multiprocessing.context.ForkContext):
    Process = _ForkedWorker


class _ForkServerContext(multiprocessing.context.ForkServerContext):
    Process = _ForkServerWorker


def worker_context(start: str, dataset=None) -> multiprocessing.context.BaseContext:
    """How loader workers start (data.worker_start), each bound to its rank from its first instruction.

    A worker forked from the rank itself (fork) copies a process with other threads (gloo's, the watchdog);
    the first time a process runs a piece of C++ with a static or a thread-local (torch.set_num_threads and
    torch.Generator at the worker's start-up, a collate or transform op's first call) it takes a glibc lock
    (the exit-handler lock, the dynamic loader's) that one of those threads may have held at the fork, and
    waits forever: seen once in CI, a worker stuck before its worker_init_fn, its rank hung and the orphan
    held the job's output open. forkserver forks workers from a one-threaded server instead (started with
    SLURM's warning signals blocked: it shares the rank's process group); fork keeps the hazard, but never
    leaves an orphan. (Doing torch's start-up calls once in the rank first was tried: the wait moved to the
    worker's next first-time call, a collate op's.) auto takes forkserver for dist_train's own datasets when the script
    run may be imported; a dataset of your own (data.file, the Trainer's) keeps fork, since its module (loaded
    from a file, or the script) may not import by name in a fresh process: data.worker_start=forkserver if it does.
    """
    # custom.IndexedDataset (data.file) wraps a user's dataset: not one of ours
    if resolve_worker_start(start, ours=dataset is None or isinstance(dataset, ImageDataset)) == "fork":
        return _ForkContext()
    _start_fork_server()
    return _ForkServerContext()


def resolve_worker_start(start: str, ours: bool) -> str:
    """data.worker_start with auto decided: the fork server for one of dist_train's datasets (`ours`) when the
    script run may be imported, else fork. worker_context and prestart_worker_server both ask here."""
    if start != "auto":
        return start
    return "forkserver" if ours and main_is_guarded() else "fork"


@functools.cache
def main_is_guarded() -> bool:
    """Whether the fork server may import the script being run: it has an `if __name__ == "__main__":`
    (or there is no script: an interactive session). Said once, on the main process, when not."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or getattr(getattr(main, "__spec__", None), "name", "").endswith("__main__"):
        return True  # no script, or `python -m package`: multiprocessing never imports those again
    try:
        guarded = re.search(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", Path(path).read_text(), re.MULTILINE) is not None
    except (OSError, UnicodeDecodeError):
        guarded = False
    if not guarded and os.environ.get("RANK", "0") == "0":
        print(f"warning: {path} has no `if __name__ == \"__main__\":`; loader workers start by fork, which can "
              f"hang on a rare lock (docs/faults.md); put the script's work under that guard, or set "
              f"data.worker_start=fork to say so", file=sys.stderr, flush=True)
    return guarded


def prestart_worker_server(cfg: DataConfig) -> None:
    """Start the fork server at once when the workers will use it, so that its imports (about 3 s on 2 CPU
    cores) run beside the rank's own start-up instead of before its first batch."""
    if cfg.num_workers > 0 and resolve_worker_start(cfg.worker_start, ours=cfg.file is None) == "forkserver":
        _start_fork_server()


@functools.cache
def _start_fork_server() -> None:
    from multiprocessing import forkserver, resource_tracker

    forkserver.set_forkserver_preload(["__main__", "dist_train.data"])  # workers start with torch imported
    warnings = {signal.SIGTERM, signal.SIGUSR1}  # SLURM's, and torchrun's to the rank's group: blocked in the server
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, warnings)
    path = os.environ.get("PYTHONPATH")  # the server may not get our sys.path (CPython < 3.13.1): where we come from
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), path]))
    try:
        # The server starts its resource tracker first, and that start unblocks SIGTERM on its way out: a server
        # started after it died of the launcher's SIGTERM and took the workers with it. So the tracker first.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, warnings)
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = path


DEVICE_AUGMENTATIONS = {"RandomHorizontalFlip"}
"""The train_augment transforms data.decode=device does itself."""


def decodes_on_device(cfg: DataConfig, device: torch.device, splits: list[Records]) -> bool:
    """data.decode resolved: auto decodes on the device when it is a GPU, every image is a JPEG and the
    augmentations are ones the device path does; otherwise the loader workers decode (Pillow)."""
    if cfg.decode == "workers":
        return False
    unsupported = [str(spec.get("name")) for spec in cfg.train_augment if spec.get("name") not in DEVICE_AUGMENTATIONS]
    other = next((p for records in splits for p in records.paths if p.suffix.lower() not in JPEG_SUFFIXES), None)
    if cfg.decode == "device":
        if unsupported:
            raise ConfigError(f"data.decode=device does the crop, {', '.join(sorted(DEVICE_AUGMENTATIONS))} and normalisation "
                              f"itself; data.train_augment {', '.join(unsupported)} needs data.decode=workers")
        if other is not None:
            raise ConfigError(f"data.decode=device decodes JPEG files only; {other} is not one (use data.decode=workers)")
        return True
    return device.type == "cuda" and not unsupported and other is None


def build_dataset(records: Records, cfg: DataConfig, split: str, seed: int, on_device: bool = False) -> ImageDataset:
    """The split's dataset: decoded and augmented by the loader workers, or (on_device) bytes + crop boxes."""
    train = split == "train"
    if not on_device:
        return ImageDataset(records, build_transform(cfg, train), cfg.channels, seed, split, cfg.bad_samples, cfg.image_size)
    crop = cfg.train_crop if train or cfg.train_crop == "resize" else "center"
    flips = [spec.get("p", 0.5) for spec in cfg.train_augment if spec.get("name") == "RandomHorizontalFlip"] if train else []
    return EncodedImageDataset(records, cfg, crop, float(flips[0]) if flips else 0.0, seed, split)


class ModelInput:
    """What the loop does to a batch's images before the model: decode them on the device (data.decode=device),
    cast to the dtype DeepSpeed keeps the weights in, and lay them out channels_last."""

    def __init__(self, cfg: DataConfig, device: torch.device, on_device: bool, dtype: torch.dtype, channels_last: bool):
        self.decoder = DeviceDecoder(device, cfg.image_size, cfg.channels, cfg.mean, cfg.std, cfg.bad_samples) if on_device else None
        self.dtype, self.channels_last = dtype, channels_last

    def __call__(self, images, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.decoder is not None:
            images, targets = self.decoder(images, targets)
        images = images.to(self.dtype)
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets


def _kill_loader_workers() -> None:
    """At exit, before multiprocessing's own handler: that one ends daemonic children with SIGTERM, which
    loader workers ignore (loader_worker_init), and then joins them, forever when a failure left a loader
    running. Registered after multiprocessing's handler, so it runs first."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kill as a worker crash
        for child in children:
            child.kill()


def build_loader(dataset: ImageDataset, cfg: DataConfig, train: bool, seed: int) -> DataLoader:
    """A loader for one process; `accelerator.prepare` shards it. Training order is seeded."""
    workers = cfg.num_workers
    if workers > 0:
        atexit.unregister(_kill_loader_workers)
        atexit.register(_kill_loader_workers)
    sampler = None
    if train and cfg.balanced_sampler:
        sampler = ClassBalancedSampler(dataset.records.targets, seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size if train else (cfg.eval_batch_size or cfg.batch_size),
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        persistent_workers=cfg.persistent_workers and workers > 0,
        # A loader-owned generator: creating an iterator never draws from the global RNG.
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=loader_worker_init,
        multiprocessing_context=worker_context(cfg.worker_start, dataset) if workers > 0 else None,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        collate_fn=collate_encoded if isinstance(dataset, EncodedImageDataset) else None,
        drop_last=False,
    )
