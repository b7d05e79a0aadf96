"""Data: from a table's rows to batches on the device.

    tables.py    a split's rows (CSV table, class folders or a shard set's table) read into Records
    shards.py    shard sets: images packed in large files, in a directory or S3; their cache, reader and order
    splits.py    which rows train and which validate: hold-out, groups, k folds
    digits.py    the built-in example data: scikit-learn's digits written as PNGs and tables (no torch)
    datasets.py  images decoded and transformed (or left encoded for the device), targets, the model's input
    decode.py    JPEGs decoded on the device (nvJPEG) and their crops
    mixing.py    mixup / CutMix of a batch
    pseudo.py    pseudo-labelled test rows joining the training rows with soft targets
    loaders.py   DataLoaders: balanced sampling, seeded shuffles, clean-up
    workers.py   loader workers started from a fork server, bound to their rank
    synthetic.py example sets made offline (`python -m dist_train.data.synthetic ...`)

May import: config, errors, custom, job. Never models, rundir, loop or commands.
"""
from dist_train.compat import moved_names

OLD_NAMES = {
    "BAD_TARGET": "decode",
    "ClassBalancedSampler": "loaders",
    "DEVICE_AUGMENTATIONS": "datasets",
    "DIGITS_MARKER": "digits",
    "DIGITS_SPLIT_SEED": "digits",
    "DeviceDecoder": "decode",
    "EncodedImageDataset": "datasets",
    "IMAGE_SUFFIXES": "tables",
    "ImageDataset": "datasets",
    "JPEG_SUFFIXES": "decode",
    "ModelInput": "datasets",
    "Records": "tables",
    "SplitSource": "tables",
    "as_target": "datasets",
    "assign_folds": "splits",
    "bind_to_parent": "workers",
    "build_dataset": "datasets",
    "build_loader": "loaders",
    "build_transform": "datasets",
    "center_crop_box": "decode",
    "check_groups_apart": "splits",
    "collate_encoded": "decode",
    "decodes_on_device": "datasets",
    "encode_classes": "tables",
    "load_splits": "splits",
    "load_test_records": "splits",
    "load_training": "splits",
    "loader_worker_init": "workers",
    "main_is_guarded": "workers",
    "materialize_digits": "digits",
    "prestart_worker_server": "workers",
    "random_resized_crop_box": "decode",
    "read_csv": "tables",
    "read_split": "tables",
    "resolve": "tables",
    "resolve_worker_start": "workers",
    "sorted_labels": "tables",
    "split_source": "tables",
    "worker_context": "workers",
}
"""What `from dist_train.data import X` found when data was one module (users' files may still say it)."""


def __getattr__(name: str):
    return moved_names(__name__, OLD_NAMES, name)
