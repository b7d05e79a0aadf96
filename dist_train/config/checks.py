"""Cross-field validation and what a config leaves to be chosen (preprocessing, checkpoint.monitor and mode)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
from pathlib import Path
from typing import Any

from dist_train.config import pretrained  # (timm itself is imported only for a timm model's weights)
from dist_train.config.data import byte_count
from dist_train.config.sections import Config, DataConfig, SplitConfig, flatten, to_dict
from dist_train.errors import ConfigError

CLASSIFICATION_METRICS = ("val_loss", "val_accuracy", "val_f1_macro", "val_precision_macro", "val_recall_macro")
MULTILABEL_METRICS = ("val_loss", "val_map_macro", "val_map_micro", "val_f1_samples", "val_f1_macro", "val_f1_micro",
                      "val_precision_macro", "val_recall_macro", "val_hamming_loss", "val_exact_match")
LOWER_IS_BETTER = ("loss", "mae", "mse", "rmse")


def monitorable(config: Config) -> list[str]:
    """The val_* metrics the task reports that checkpoint.monitor may name; the second is the default monitor."""
    task = config.task
    if task.kind == "multihead":
        per_head = [f"val_{h.name}_{k}" for h in task.heads for k in ("accuracy", "f1_macro", "precision_macro", "recall_macro")]
        return [*CLASSIFICATION_METRICS, *per_head]
    if task.kind == "regression":
        return ["val_loss", "val_rmse", "val_mae", "val_mse"]
    if task.kind == "multilabel":
        return list(MULTILABEL_METRICS)
    if task.kind == "ranking":
        return ["val_loss", f"val_ndcg@{task.ndcg_k}", "val_mrr", "val_map"]
    return [*CLASSIFICATION_METRICS, *(["val_roc_auc"] if task.roc_auc else []), *[f"val_top{k}_accuracy" for k in task.top_k]]


def mode_of(metric: str) -> str:
    """min for losses and errors, max for everything else."""
    return "min" if metric.rsplit("_", 1)[-1] in LOWER_IS_BETTER else "max"


def resolve(config: Config) -> Config:
    """Fill in what the config left to be chosen (data.image_size/mean/std, checkpoint.monitor and mode), validate."""
    config = resolve_preprocessing(config)
    validate(config)
    names = monitorable(config)
    monitor = config.checkpoint.monitor or names[1]
    if monitor not in names:
        close = difflib.get_close_matches(monitor, names, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else f"; choose one of {', '.join(names)}"
        raise ConfigError(f"checkpoint.monitor: unknown metric {monitor!r} for task.kind={config.task.kind}{hint}")
    mode = config.checkpoint.mode or mode_of(monitor)
    config = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, monitor=monitor, mode=mode))
    validate_hpo(config)
    return config


DEFAULT_PREPROCESSING = {"image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
"""What data.image_size, mean and std are when neither the config nor timm's pretrained_cfg says (ImageNet's statistics)."""


def resolve_preprocessing(config: Config) -> Config:
    """data.image_size, mean and std that are None filled in: from the pretrained_cfg of the weights when
    model.pretrained holds a timm model's, else DEFAULT_PREPROCESSING; data.preprocessing_from says which for each."""
    data, model = config.data, config.model
    unset = [key for key in DEFAULT_PREPROCESSING if getattr(data, key) is None]
    values, sources = {}, {key: data.preprocessing_from.get(key, "config") for key in DEFAULT_PREPROCESSING if key not in unset}
    if unset:
        found = {}
        if model.name.startswith("timm/") and model.pretrained and model.file is None:
            found = pretrained.preprocessing(model.name[len("timm/"):], model.pretrained, data.channels)
        for key in unset:
            values[key] = copy.deepcopy(found.get(key, DEFAULT_PREPROCESSING[key]))
            sources[key] = found["source"] if key in found else "default"
    return dataclasses.replace(config, data=dataclasses.replace(
        data, **values, preprocessing_from={key: sources[key] for key in DEFAULT_PREPROCESSING}))


def preprocessing(data: DataConfig) -> dict[str, Any]:
    """What the model's input is made of (run_info.json, exports): channels, size, normalisation, and their sources."""
    return {"channels": data.channels, "image_size": data.image_size, "mean": list(data.mean), "std": list(data.std),
            "from": dict(data.preprocessing_from)}


def preprocessing_summary(data: DataConfig) -> str:
    """One line: the input the model sees and where each part came from (the start-up line, train.py --debug)."""
    groups: dict[str, list[str]] = {}
    for key, source in data.preprocessing_from.items():
        groups.setdefault(source, []).append(key)
    where = "; ".join(f"{', '.join(keys)} from {source}" for source, keys in groups.items())
    return (f"input {data.channels}x{data.image_size}x{data.image_size}, mean {[round(m, 4) for m in data.mean]}, "
            f"std {[round(v, 4) for v in data.std]} ({where})")


def validate(config: Config) -> None:
    """Cross-field checks that must hold before any process starts."""
    checks = [
        (config.data.batch_size > 0, "data.batch_size must be positive"),
        (config.data.eval_batch_size is None or config.data.eval_batch_size > 0, "data.eval_batch_size must be positive"),
        (config.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (config.data.image_size > 0, "data.image_size must be positive"),
        (len(config.data.mean) == config.data.channels, f"data.mean needs {config.data.channels} values (data.channels)"),
        (len(config.data.std) == config.data.channels, f"data.std needs {config.data.channels} values (data.channels)"),
        (all(s > 0 for s in config.data.std), "data.std values must be positive"),
        (0.0 < config.data.val_fraction < 1.0, "data.val_fraction must be in (0, 1)"),
        (config.data.prefetch_factor >= 1, "data.prefetch_factor must be at least 1"),
        (len(config.data.crop_scale) == 2 and 0 < config.data.crop_scale[0] <= config.data.crop_scale[1] <= 1,
         "data.crop_scale needs two values with 0 < min <= max <= 1"),
        (len(config.data.crop_ratio) == 2 and 0 < config.data.crop_ratio[0] <= config.data.crop_ratio[1],
         "data.crop_ratio needs two values with 0 < min <= max"),
        (0 < config.data.eval_crop_fraction <= 1, "data.eval_crop_fraction must be in (0, 1]"),
        (config.train.epochs > 0, "train.epochs must be positive"),
        (config.train.max_steps is None or config.train.max_steps > 0, "train.max_steps must be positive or null"),
        (config.train.grad_accum_steps > 0, "train.grad_accum_steps must be positive"),
        (config.train.max_grad_norm is None or config.train.max_grad_norm > 0, "train.max_grad_norm must be positive or null"),
        (config.train.log_every_n_steps > 0, "train.log_every_n_steps must be positive"),
        (config.train.early_stopping_patience >= 0, "train.early_stopping_patience must be >= 0"),
        (config.train.max_bad_steps >= 1, "train.max_bad_steps must be at least 1"),
        (config.train.distributed_timeout_s > 0, "train.distributed_timeout_s must be positive"),
        (config.optim.lr > 0, "optim.lr must be positive"),
        (config.optim.layer_decay is None or 0 < config.optim.layer_decay <= 1, "optim.layer_decay must be in (0, 1] or null"),
        (config.model.drop_path_rate is None or 0 <= config.model.drop_path_rate < 1, "model.drop_path_rate must be in [0, 1) or null"),
        (len(config.optim.betas) == 2, "optim.betas needs two values"),
        (0.0 <= config.loss.label_smoothing < 1.0, "loss.label_smoothing must be in [0, 1)"),
        (config.scheduler.warmup_epochs >= 0, "scheduler.warmup_epochs must be >= 0"),
        (0.0 < config.scheduler.warmup_start_factor <= 1.0, "scheduler.warmup_start_factor must be in (0, 1]"),
        (config.scheduler.step_size_epochs > 0, "scheduler.step_size_epochs must be positive"),
        (config.model.width > 0, "model.width must be positive"),
        (config.tracking.num_images > 0, "tracking.num_images must be positive"),
        (config.checkpoint.keep_last >= 1, "checkpoint.keep_last must be at least 1"),
        (config.checkpoint.every_n_steps is None or config.checkpoint.every_n_steps > 0, "checkpoint.every_n_steps must be positive or null"),
        (config.checkpoint.every_n_minutes is None or config.checkpoint.every_n_minutes > 0, "checkpoint.every_n_minutes must be positive or null"),
        (config.checkpoint.check_every_n_steps > 0, "checkpoint.check_every_n_steps must be positive"),
        (config.model.num_classes is None or config.model.num_classes > 1, "model.num_classes must be at least 2"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    validate_task(config)
    for head in config.task.heads:
        if head.classes is not None and len(set(head.classes)) != len(head.classes):
            raise ConfigError(f"task.heads {head.name}: classes contain duplicates")
    if config.data.classes is not None and len(set(config.data.classes)) != len(config.data.classes):
        raise ConfigError("data.classes contains duplicates")
    for i, spec in enumerate(config.data.train_augment):
        if "name" not in spec:
            raise ConfigError(f"data.train_augment[{i}] needs a `name` (a torchvision.transforms.v2 class)")
    for key, path in (("model.file", config.model.file), ("loss.file", config.loss.file), ("data.file", config.data.file)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{key}: file not found: {path}")
    validate_splits(config)
    validate_teacher_and_pseudo_labels(config)
    validate_trackers(config)


def validate_task(config: Config) -> None:
    """What the task (task.kind and its keys) can run with: mixing, bad samples, sources, samplers, losses, thresholds."""
    task = config.task
    mixing = config.data.mixup_alpha > 0 or config.data.cutmix_alpha > 0
    task_checks = [
        (config.data.mixup_alpha >= 0 and config.data.cutmix_alpha >= 0, "data.mixup_alpha and data.cutmix_alpha must be >= 0"),
        (0 <= config.data.mix_prob <= 1 and 0 <= config.data.mix_switch_prob <= 1, "data.mix_prob and data.mix_switch_prob must be in [0, 1]"),
        (config.train.ema_decay is None or 0 < config.train.ema_decay < 1, "train.ema_decay must be in (0, 1) or null"),
        (task.kind != "multihead" or len(task.heads) >= 2, "task.kind=multihead needs at least two task.heads"),
        (len({h.name for h in task.heads}) == len(task.heads), "task.heads: head names must be unique"),
        (all(h.weight >= 0 for h in task.heads), "task.heads: weights must be >= 0"),
        (task.ndcg_k > 0 and task.huber_delta > 0 and all(k > 0 for k in task.top_k), "task.ndcg_k, task.huber_delta and task.top_k must be positive"),
        (task.kind in ("classification", "multilabel") or not mixing,
         f"data.mixup_alpha/cutmix_alpha: mixing needs task.kind=classification or multilabel (not {task.kind})"),
        (task.kind == "classification" or config.data.bad_samples == "error", f"data.bad_samples=skip is for task.kind=classification (not {task.kind})"),
        (task.kind == "classification" or config.data.source in ("csv", "shards"),
         f"task.kind={task.kind} reads its labels from CSV tables: set data.source=csv (or shards written from one)"),
        (task.kind == "classification" or not config.data.balanced_sampler, "data.balanced_sampler is for task.kind=classification"),
        (task.kind in ("classification", "multihead", "multilabel") or config.loss.class_weights is None,
         "loss.class_weights is for classification"),
        (task.kind == "multilabel" or (config.loss.pos_weight is None and config.loss.name not in ("bce", "asl")),
         f"loss.name={config.loss.name} / loss.pos_weight are multi-label losses: set task.kind=multilabel (it is {task.kind})"),
        (task.kind != "multilabel" or config.loss.name != "f1", "loss.name=f1 is a soft macro-F1 of one class per row; "
                                                                "task.kind=multilabel takes bce, focal or asl"),
        (not isinstance(task.threshold, float) or 0.0 < task.threshold < 1.0, f"task.threshold must be in (0, 1) or tune, not {task.threshold}"),
        (task.threshold_beta > 0, f"task.threshold_beta must be positive, not {task.threshold_beta}"),
        (task.kind != "multilabel" or bool(task.label_separator), "task.label_separator must not be empty"),
    ]
    for ok, message in task_checks:
        if not ok:
            raise ConfigError(message)


TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny"), "wandb": ("wandb", "wandb"),
            "comet_ml": ("comet_ml", "comet-ml"), "aim": ("aim", "aim"), "clearml": ("clearml", "clearml"),
            "dvclive": ("dvclive", "dvclive")}
"""tracking.trackers' names (Accelerate's) -> (the module it imports, the package that has it)."""


def validate_trackers(config: Config) -> None:
    """Each tracker named is known and installed: Accelerate alone leaves out one that is not, without a word."""
    import importlib.util

    for name in config.tracking.trackers:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, list(TRACKERS), n=1)
            raise ConfigError(f"tracking.trackers: unknown tracker {name!r}{f'; did you mean {close[0]}?' if close else ''} "
                              f"(choose from {', '.join(TRACKERS)})")
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"tracking.trackers: {name} is not installed here: pip install {package}")


def validate_splits(config: Config) -> None:
    """The per-split mappings, the grouped split and cross-validation (cv)."""
    data, cv = config.data, config.cv
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        if isinstance(split, SplitConfig) and not split.table:
            raise ConfigError(f"data.{name}: a mapping needs `table` (the CSV, or the folder source's directory)")
    checks = [
        (cv.folds == 0 or cv.folds >= 2, f"cv.folds must be 0 (off) or at least 2, not {cv.folds}"),
        (cv.fold is None or cv.folds > 0, f"cv.fold={cv.fold} needs cv.folds (the number of folds)"),
        (cv.fold is None or 0 <= cv.fold < cv.folds, f"cv.fold must be in 0 .. {cv.folds - 1} (cv.folds={cv.folds}), not {cv.fold}"),
        (cv.folds == 0 or data.val is None, f"cv.folds={cv.folds} validates each fold on the training rows it holds out: "
                                            f"set data.val: null (it is {_split_name(data.val)})"),
        (cv.folds == 0 or data.file is None, "cv.folds splits the built-in training table; data.file's datasets "
                                             "cannot be split into folds"),
        (data.group_column is None or data.source != "folder", "data.group_column needs tables (data.source=csv): a folder "
                                                               "source's image folders are its classes"),
    ]
    if data.source == "shards":
        checks += [(data.shard_window >= 1, f"data.shard_window must be at least 1, not {data.shard_window}"),
                   (data.file is None, "data.file's datasets replace data.source; leave data.source=shards out")]
        if data.cache_limit is not None:
            byte_count(data.cache_limit)
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def validate_teacher_and_pseudo_labels(config: Config) -> None:
    """distill (a teacher's outputs) and data.pseudo_labels (test rows with soft targets): what they can run with."""
    distill, data, kind = config.distill, config.data, config.task.kind
    mixing = data.mixup_alpha > 0 or data.cutmix_alpha > 0
    checks = [
        (0.0 <= distill.alpha <= 1.0, f"distill.alpha must be in [0, 1], not {distill.alpha}"),
        (distill.temperature > 0, f"distill.temperature must be positive, not {distill.temperature}"),
        (0.0 <= data.pseudo_threshold <= 1.0, f"data.pseudo_threshold must be in [0, 1], not {data.pseudo_threshold}"),
    ]
    if distill.teacher is not None:
        checks += [
            (kind in ("classification", "multihead", "multilabel"), f"distill.teacher: distillation matches class distributions; "
                                                      f"task.kind={kind} has none"),
            (data.file is None, "distill.teacher reads the built-in training table (its rows' ids key the teacher's "
                                "outputs); data.file's datasets have none"),
            (distill.live or not mixing, "distill.teacher with mixup/CutMix: the cached teacher outputs are of the "
                                         "unmixed images; set distill.live=true (the teacher runs on each mixed batch)"),
            (data.pseudo_labels is None, "distill.teacher and data.pseudo_labels together are not supported yet: the "
                                         "teacher's outputs cover the training table, not the pseudo-labelled test rows"),
        ]
    if data.pseudo_labels is not None:
        checks += [
            (kind in ("classification", "multilabel"), f"data.pseudo_labels: soft targets of classes; task.kind={kind} "
                                                       f"is not classification or multilabel"),
            (data.file is None, "data.pseudo_labels joins the built-in test table's images; data.file's datasets have none"),
            (not mixing, "data.pseudo_labels with mixup/CutMix is not supported (both make soft targets)"),
            (not data.balanced_sampler, "data.pseudo_labels: data.balanced_sampler needs one class per row"),
            (data.bad_samples == "error", "data.pseudo_labels: data.bad_samples=skip needs one class per row"),
            (data.source != "shards", "data.pseudo_labels joins test images to the training set's; with data.source=shards "
                                      "they are two shard sets: not supported yet (train from the tables)"),
        ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _split_name(split: str | SplitConfig | None) -> str:
    return repr(split.table if isinstance(split, SplitConfig) else split)


MODEL_SHAPING = ("model.", "task.", "data.channels", "data.image_size")
"""Config keys (prefixes) whose value the trained weights depend on; model.pretrained and model.freeze do not."""
NOT_SHAPING = ("model.pretrained", "model.freeze", "task.threshold", "task.threshold_beta", "task.label_separator")
"""Keys under MODEL_SHAPING that leave the weights alone (a multi-label decision threshold, and how the submission
joins the class names, are applied after them)."""


def model_shaping_differences(saved: dict[str, Any], config: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, config's value) for each key that shapes the model (MODEL_SHAPING) and differs between a
    checkpoint's config (its config.yaml, read) and `config`; keys the saved config lacks (older versions) are skipped."""
    ours, theirs = flatten(to_dict(config)), flatten(saved)
    return [(key, theirs[key], value) for key, value in ours.items()
            if key.startswith(MODEL_SHAPING) and key not in NOT_SHAPING
            and key in theirs and theirs[key] != value]


# ----------------------------------------------------------------------------------------------
# hpo: the search's own keys, and its space checked value by value through the checks above


def hpo_objective(config: Config) -> tuple[str, str]:
    """The metric a study optimises and its direction (min or max): hpo.objective, else checkpoint.monitor and its mode."""
    objective = config.hpo.objective or config.checkpoint.monitor
    mode = config.checkpoint.mode if objective == config.checkpoint.monitor and config.checkpoint.mode else mode_of(objective)
    return objective, mode


def validate_hpo(config: Config) -> None:
    """The hpo section of a study (hpo.trials > 0): its objective, sampler, pruner, and the shape of hpo.space (each
    key's values are checked by check_space, which builds the config with them)."""
    hpo = config.hpo
    if hpo.trials < 0:
        raise ConfigError(f"hpo.trials must be >= 0 (0: no search), not {hpo.trials}")
    if hpo.trials == 0:
        return
    names = monitorable(config)
    objective = hpo.objective or config.checkpoint.monitor
    if objective not in names:
        close = difflib.get_close_matches(objective, names, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else f"; choose one of {', '.join(names)}"
        raise ConfigError(f"hpo.objective: unknown metric {objective!r} for task.kind={config.task.kind}{hint}")
    checks = [
        (bool(hpo.space), f"hpo.trials={hpo.trials} needs hpo.space: the config keys to search, e.g. "
                          f"{{optim.lr: {{type: float, low: 1e-4, high: 1e-2, log: true}}}}"),
        (config.cv.fold is None, f"cv.fold={config.cv.fold} with hpo.trials: a trial's objective needs all its folds "
                                 f"(leave cv.fold out; several workers share a study by themselves)"),
        (hpo.pruner != "median" or not config.cv.folds, "hpo.pruner=median judges the epochs of a hold-out run; with "
                                                        "cv.folds use hpo.pruner=wilcoxon (it judges the folds)"),
        (hpo.pruner != "wilcoxon" or config.cv.folds >= 3, f"hpo.pruner=wilcoxon judges a trial between its folds: it needs "
                                                           f"cv.folds >= 3 (it is {config.cv.folds})"),
        (0 < hpo.prune_p < 1, f"hpo.prune_p must be in (0, 1), not {hpo.prune_p}"),
        (min(hpo.startup_trials, hpo.prune_startup_trials, hpo.prune_warmup_epochs) >= 0,
         "hpo.startup_trials, hpo.prune_startup_trials and hpo.prune_warmup_epochs must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for key, dimension in hpo.space.items():
        _check_dimension(key, dimension)
    for i, values in enumerate(hpo.enqueue):
        for key, value in values.items():
            if key not in hpo.space:
                raise ConfigError(f"hpo.enqueue[{i}]: {key} is not a key of hpo.space ({', '.join(hpo.space)})")
            if not in_space(hpo.space[key], value):
                raise ConfigError(f"hpo.enqueue[{i}]: {key}={value!r} is outside hpo.space.{key}")


SEARCH_REFUSED = ("hpo.", "cv.", "output_dir")
"""Keys no trial may set: the study's own, the folds its objective is scored on, and where it runs."""


def _check_dimension(key: str, dim) -> None:
    where = f"hpo.space.{key}"
    if key.startswith(SEARCH_REFUSED):
        raise ConfigError(f"{where}: {key} cannot be searched (hpo.*, cv.* and output_dir are the study's own)")
    if dim.type == "categorical":
        checks = [(bool(dim.choices), f"{where}: type categorical needs choices, e.g. choices: [small_cnn, mlp]"),
                  (dim.low is None and dim.high is None and not dim.log and dim.step is None,
                   f"{where}: low, high, log and step are for type float and int; categorical takes choices"),
                  (all(c is None or isinstance(c, (bool, int, float, str)) for c in dim.choices or []),
                   f"{where}: choices must be numbers, strings, booleans or null (not lists or mappings)")]
    else:
        whole = dim.type == "int"
        numbers = [v for v in (dim.low, dim.high, dim.step) if v is not None]
        checks = [(dim.low is not None and dim.high is not None, f"{where}: type {dim.type} needs low and high"),
                  (dim.choices is None, f"{where}: choices are for type categorical; {dim.type} takes low and high"),
                  (not whole or all(float(v).is_integer() for v in numbers), f"{where}: type int needs whole numbers "
                                                                             f"for low, high and step"),
                  (dim.low is None or dim.high is None or dim.low <= dim.high, f"{where}: low ({dim.low}) is above high ({dim.high})"),
                  (not dim.log or (dim.low is not None and dim.low > 0), f"{where}: log needs low > 0 (it is {dim.low})"),
                  (not dim.log or dim.step is None, f"{where}: step and log cannot be combined"),
                  (dim.step is None or dim.step > 0, f"{where}: step must be positive")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def space_value(dim, value):
    """`value` as `dim` takes it: a number written as text (PyYAML reads `1e-5` as a string) made a number."""
    if dim.type != "categorical" and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if dim.type == "int" and number.is_integer() else number
    return value


def in_space(dim, value) -> bool:
    """Whether `value` is one `dim` can take."""
    value = space_value(dim, value)
    if dim.type == "categorical":
        return value in dim.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return dim.low <= value <= dim.high and (dim.type == "float" or float(value).is_integer())


def space_values(dim) -> list:
    """The values of `dim` the config is checked with: both ends of a range, every choice."""
    if dim.type == "categorical":
        return list(dim.choices)
    return [int(dim.low), int(dim.high)] if dim.type == "int" else [float(dim.low), float(dim.high)]


def check_space(config: Config, build) -> None:
    """Each value of hpo.space (both ends of a range, each choice) through the config's own checks before anything
    trains: `build({key: value})` builds the config with it (parse.config_from_dict) and raises what it refuses; a
    model.name choice must name a model that exists."""
    for key, dim in config.hpo.space.items():
        for value in space_values(dim):
            what = "choice" if dim.type == "categorical" else ("low" if value == dim.low else "high")
            try:
                built = build({key: value})
                if key == "model.name" and built.model.file is None:
                    check_model_name(value)
            except ConfigError as exc:
                if dim.type == "float" and f"{key}: expected int" in str(exc):
                    raise ConfigError(f"hpo.space.{key}: {key} takes whole numbers: use type: int") from None
                raise ConfigError(f"hpo.space.{key}: {what} {value!r}: {exc}") from None


def check_model_name(name: str) -> None:
    """`name` names a model dist_train can build (models.networks.build_model): small_cnn, mlp, torchvision's, timm/<name>."""
    if name in ("small_cnn", "mlp"):
        return
    arch = pretrained.timm_name(name)
    if arch is not None:
        pretrained.check_name(arch)
        return
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = difflib.get_close_matches(name, available + ["small_cnn", "mlp"], n=1)
        hint = f"; did you mean {close[0]}?" if close else "; timm's models are named timm/<name>"
        raise ConfigError(f"model.name: unknown model {name!r}{hint}")
