"""predict(): shard the test set over all processes, gather, and write one submission in the input's order."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from dist_train.checkpoint import CLASSES_FILE, MANIFEST_FILE, WEIGHTS_FILE, verify
from dist_train.config import Config
from dist_train.custom import class_names, user_datasets
from dist_train.data import ModelInput, Records, build_dataset, build_loader, decodes_on_device, load_records, load_test_records
from dist_train.distributed import build_accelerator, main_print
from dist_train.engine import check_each_once, predict_gathered
from dist_train.errors import CheckpointError
from dist_train.losses import build_loss
from dist_train.metrics import classification_metrics
from dist_train.models import build_model, read_weights
from dist_train.submission import write_submission


def resolve_weights(checkpoint: str | Path) -> Path:
    """A checkpoint directory (its model.safetensors) or a weights file itself; inside a checkpoint
    written by dist_train, the weights are checked against its manifest first."""
    path = Path(checkpoint)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise CheckpointError(f"--checkpoint {checkpoint}: no weights at {weights}")
    if (weights.parent / MANIFEST_FILE).is_file():
        verify(weights.parent, only=[weights.name, CLASSES_FILE])
    return weights


def predict(config: Config, checkpoint: str | Path, output: str | Path | None = None, split: str = "test",
            limit: int | None = None, *, model: torch.nn.Module | None = None, loss: torch.nn.Module | None = None,
            dataset=None) -> Path | None:
    """Write the submission CSV; returns its path on the main process (None elsewhere).

    split="val" predicts the labelled validation split instead and also writes its metrics to
    `<output stem>.metrics.json`: the scores of a checkpoint, whatever the number of processes.
    `limit`: only the first that many samples (train.py --debug). `model` / `loss` / `dataset` (dist_train.Trainer)
    take the place of what the config builds; the checkpoint's weights are loaded into that model.
    """
    weights = resolve_weights(checkpoint)
    accelerator = build_accelerator(
        seed=config.seed, mixed_precision=config.train.mixed_precision, timeout_s=config.train.distributed_timeout_s
    )
    classes_file = weights.parent / CLASSES_FILE
    with accelerator.main_process_first():
        user_sets = user_datasets(config.data, {split: dataset})  # None: the built-in dataset
        if user_sets is None and split == "val":
            _, records, data_classes = load_records(config.data, config.seed)
        elif user_sets is None:
            records = load_test_records(config.data)
        if classes_file.is_file():
            classes = json.loads(classes_file.read_text())
        elif user_sets is not None:  # a bare weights file: the dataset's `classes`, else model.num_classes
            classes = class_names(user_sets[split], config.model.num_classes)
        else:  # a bare weights file: the classes come from the training data, as in training
            classes = data_classes if split == "val" else load_records(config.data, config.seed)[2]

    if limit is not None and user_sets is not None:
        user_sets[split] = user_sets[split].head(limit)
    elif limit is not None:
        records = Records(records.paths[:limit], records.targets[:limit], records.ids[:limit])
    # Inference needs no DDP wrapper: each process runs its own copy of the weights on its shard.
    model = build_model(replace(config.model, pretrained=None, freeze=[]), len(classes), config.data.channels,
                        config.data.image_size, given=model)
    model.load_state_dict(read_weights(weights))
    channels_last = config.train.channels_last if config.train.channels_last is not None else accelerator.device.type == "cuda"
    model.to(accelerator.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    if user_sets is None:
        on_device = decodes_on_device(config.data, accelerator.device, [records])
        dataset, row_ids = build_dataset(records, config.data, split, config.seed, on_device), records.ids
    else:
        on_device, dataset, row_ids = False, user_sets[split], user_sets[split].row_ids()
    loader = accelerator.prepare_data_loader(build_loader(dataset, config.data, train=False, seed=config.seed))
    loss_fn = build_loss(config.loss, len(classes), given=loss).to(accelerator.device) if split == "val" else None
    prepare_input = ModelInput(config.data, accelerator.device, on_device, torch.float32, channels_last)
    out = predict_gathered(accelerator, model, loader, "predict", loss_fn, prepare_input=prepare_input)
    check_each_once(out["indices"], len(dataset), "inference")

    path = Path(output or config.inference.output or Path(config.output_dir) / "submission.csv")
    if accelerator.is_main_process:
        order = torch.argsort(out["indices"])
        predicted = out["logits"].argmax(dim=1)[order].tolist()
        ids = [row_ids[i] for i in out["indices"][order].tolist()]
        write_submission(path, ids, [classes[p] for p in predicted], config.inference.id_column, config.inference.label_column)
        main_print(accelerator, f"wrote {len(ids)} predictions from {accelerator.num_processes} process(es) to {path}")
        if split == "val":
            metrics = classification_metrics(out["logits"], out["targets"], out["losses"])
            path.with_suffix(".metrics.json").write_text(json.dumps(metrics, indent=1))
            main_print(accelerator, " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_") and k != "val_samples"))
    accelerator.wait_for_everyone()
    return path if accelerator.is_main_process else None
