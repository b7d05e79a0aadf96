"""The data section: where the images and labels come from (tables, folders, the digits or shards) and how they are
batched (config/sections.py holds the rest of the run's configuration)."""

from __future__ import annotations

from dataclasses import dataclass, field
import re
from typing import Any, Literal

from dist_train.errors import ConfigError


@dataclass
class SplitConfig:
    """One split's own table and images (data.train / data.val / data.test as a mapping); a key left out takes the
    data section's value, e.g. `test: {table: eval/info.csv, image_root: eval/images, image_column: ImageID,
    id_column: ImageID}`."""

    table: str | None = None
    """The CSV table (folder source: the directory), relative to data.root."""
    image_root: str | None = None
    """Directory this table's image paths are relative to, relative to data.root (default: data.image_root)."""
    image_column: str | None = None
    """The column holding the image paths (default: data.image_column)."""
    id_column: str | None = None
    """The column of row ids (default: data.id_column; see there)."""


@dataclass
class DataConfig:
    """Where the images and labels come from and how they are batched."""

    source: Literal["digits", "csv", "folder", "shards"] = "digits"
    """digits: scikit-learn's digits written once as PNGs + CSVs under `root`; csv: tables of image
    paths and labels; folder: `train/<class>/*` style directories; shards: sets written by `dist-train shards`
    (train / val / test each a directory or an s3:// prefix; docs/how-to/shards.md)."""
    root: str = "data/digits"
    """Base directory; relative `train`/`val`/`test`/`image_root` paths resolve against it."""
    train: str | SplitConfig = "train.csv"
    """csv: the training table; folder: the directory of class sub-folders. Or a mapping with this split's own
    table, image_root, image_column and id_column (SplitConfig)."""
    val: str | SplitConfig | None = "val.csv"
    """Validation table/directory (or a mapping, as `train`); None holds out `val_fraction` of `train` (stratified,
    seeded; grouped by `group_column` when set)."""
    test: str | SplitConfig | None = "info.csv"
    """Inference table (ids + image paths, no labels) or a flat directory of images (or a mapping, as `train`)."""
    image_root: str | None = None
    """Directory the CSV image paths are relative to, relative to `root` (default: `root`)."""
    image_column: str = "image"
    label_column: str = "label"
    id_column: str = "id"
    """test: the ids the submission echoes (required, unique); train/val: a row's id when the table has the
    column, else its image path relative to the image root."""
    group_column: str | None = None
    """Rows that must stay on one side of the validation split (e.g. the photos of one person): a column of the
    training table, or `parent_dir` (the image's folder) when the table has no such column. The hold-out and the
    cv folds are then grouped (and stratified by label where the task has classes). None: rows split freely."""
    classes: list[str] | None = None
    """Class names in output order; None: the sorted labels found in `train`."""
    cache_dir: str | None = None
    """Where CSV tables are kept once read (data/table_cache.py): parsed by one process per machine into an Arrow file
    keyed by the table's content, memory-mapped by every rank and loader worker, read again only when the table
    changes; their image files checked once. None: $DIST_TRAIN_CACHE, else ~/.cache/dist_train. A directory every
    machine of a job can write (a shared file system) lets one machine build what the others map. Shards read from
    s3:// are copied under its shards/ (keep that node-local: `cache_limit` is per machine)."""
    cache_limit: str | None = None
    """shards from s3://: the most the node's copies of shards may take in `cache_dir` (e.g. "20GB", "500MB"); the
    least recently read are deleted first. None: no limit (shards stay for later epochs and runs)."""
    shard_window: int = 8
    """shards: training shuffles the order of the shards each epoch, then the samples of `shard_window` shards at a
    time (so a rank reads a few shards at once, not the whole set); part of the run's sample order."""
    val_fraction: float = 0.1
    image_size: int | None = None
    """The model sees image_size x image_size images. None: the input size of the timm model's pretrained_cfg
    when model.pretrained holds timm weights, else 32 (what was used: `preprocessing_from`)."""
    train_crop: Literal["resize", "random_resized_crop"] = "resize"
    """resize: the whole image squashed to image_size (train and eval); random_resized_crop: training takes
    a random crop of `crop_scale` of the area and `crop_ratio` aspect (torchvision's RandomResizedCrop) and
    evaluation the centre `eval_crop_fraction` (Resize(image_size / fraction) + CenterCrop)."""
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    eval_crop_fraction: float = 0.875
    decode: Literal["auto", "workers", "device"] = "auto"
    """workers: the loader workers decode and augment (Pillow + torchvision); device: the workers only read
    the JPEG bytes and draw the crops, the accelerator decodes (nvJPEG on CUDA) and crops, flips and
    normalises whole batches (JPEG only; train_augment limited to RandomHorizontalFlip); auto: device on a
    GPU when the images are all JPEG and the augmentations allow it, else workers."""
    channels: Literal[1, 3] = 3
    """1: grayscale, 3: RGB (images are converted on load)."""
    mean: list[float] | None = None
    """Per-channel normalisation mean. None: the timm model's pretrained_cfg when model.pretrained holds timm
    weights (averaged over RGB for 1 channel), else ImageNet's [0.485, 0.456, 0.406]."""
    std: list[float] | None = None
    """Per-channel normalisation std. None: as `mean` (ImageNet's [0.229, 0.224, 0.225])."""
    preprocessing_from: dict[str, str] = field(default_factory=dict)
    """Written by dist_train, not set by hand: where image_size, mean and std came from (`config`, `default`, or
    `timm pretrained_cfg <model.tag>`); kept in the run's config.yaml, run_info.json and every export."""
    train_augment: list[dict[str, Any]] = field(default_factory=list)
    """torchvision.transforms.v2 transforms applied to training images, e.g.
    `[{name: RandomAffine, degrees: 10}]`; applied after the resize, before normalisation."""
    batch_size: int = 64
    """Per process: the global batch is batch_size x processes x grad_accum_steps."""
    eval_batch_size: int | None = None
    """Per process, for validation and inference (default: batch_size)."""
    num_workers: int = 2
    pin_memory: bool = True
    """Only takes effect on CUDA."""
    persistent_workers: bool = True
    prefetch_factor: int = 4
    """Batches each worker prepares ahead."""
    worker_start: Literal["auto", "forkserver", "fork"] = "auto"
    """How loader workers start. forkserver (Python 3.14's default): forked from a clean one-threaded process, so
    no worker inherits a glibc lock that another thread of the rank (gloo's, the watchdog) held at the fork and
    hangs on it; the dataset is pickled to each worker, and the script you run keeps its work under
    `if __name__ == "__main__":` (the server imports it). fork: workers are copies of the rank (any dataset;
    that rare hang possible). auto: forkserver for dist_train's own datasets, unless the script has no such guard
    (then fork, with a warning); fork for a dataset of your own (forkserver if its module imports by name)."""
    balanced_sampler: bool = False
    """Draw training samples with probability inversely proportional to their class frequency."""
    bad_samples: Literal["error", "skip"] = "error"
    """An unreadable image (truncated, empty file): error stops the run naming the file; skip warns,
    trains on the rest (the image weighs nothing, in loss and metrics) and counts them (classification)."""
    mixup_alpha: float = 0.0
    """Mixup (classification): training batches blended with the batch reversed, lambda ~ Beta(alpha, alpha),
    against soft targets; 0 turns it off (e.g. 0.2-0.8 to use it)."""
    cutmix_alpha: float = 0.0
    """CutMix (classification): a box of the reversed batch pasted in, area ~ Beta(alpha, alpha); 0: off (1.0 is usual)."""
    mix_prob: float = 1.0
    """Share of training batches that are mixed (when mixup or cutmix is on)."""
    mix_switch_prob: float = 0.5
    """With both on: the probability that a mixed batch uses CutMix rather than mixup."""
    pseudo_labels: str | None = None
    """Pseudo-labels: a predictions file of the test set with probabilities (predict.py ... inference.probabilities=true:
    id, label, prob_<class>...); its rows whose highest probability reaches `pseudo_threshold` join the training rows
    with their probabilities as soft targets (never a validation row, nor in any cv fold's). Classification only."""
    pseudo_threshold: float = 0.9
    """The confidence (highest class probability) a test row needs to join training as a pseudo-labelled row."""
    file: str | None = None
    """Your own datasets: a Python file defining `build_dataset(cfg: DataConfig, split: str) -> Dataset`
    (split: train, val or test), items (image tensor, target) or an image alone for test; optional
    attributes `classes` (train) and `ids` (test). Replaces `source`; balanced_sampler and decode=device
    need the built-in datasets. Relative to the config file's directory."""


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def byte_count(text: str | int, key: str = "data.cache_limit") -> int:
    """A size as written in a config ("20GB", "500 MiB", 1000000) in bytes; anything else is a ConfigError naming `key`."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ConfigError(f"{key}: {text!r} is not a size (e.g. 20GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
