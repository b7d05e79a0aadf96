"""timm's pretrained_cfg of local weights: the input a timm backbone's weights expect (size, mean, std), read
from the config.json beside them or timm's registry; timm is imported only when asked. Config resolution needs it
before any model is built, so it lives below the models."""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path

from dist_train.config.locate import locate
from dist_train.errors import CheckpointError, ConfigError

PREFIX = "timm/"


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""What a weights folder holds (timm's Hugging Face hub cache snapshot, or timm's save_for_hf), in order of preference."""


def timm_name(name: str) -> str | None:
    """`timm/<name>` -> `<name>` (which may carry a pretrained tag: convnext_tiny.fb_in22k); None for other models."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else None


def check_name(arch: str) -> None:
    import timm

    base, tag = timm.models.split_model_name_tag(arch)
    if timm.is_model(base):
        if not tag or f"{base}.{tag}" in timm.list_pretrained(base):
            return
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(base) if "." in n]
        raise ConfigError(f"model.name: timm's {base} has no pretrained tag {tag!r} (it has: {', '.join(tags) or 'none'})")
    close = difflib.get_close_matches(base, timm.list_models(), n=1)
    hint = f"; did you mean {PREFIX}{close[0]}?" if close else " (see timm.list_models())"
    raise ConfigError(f"model.name: timm has no model {base!r}{hint}")


def weights_file(pretrained: str | Path) -> Path:
    """The weights file `model.pretrained` names: the file itself, or in a folder its model.safetensors (else
    pytorch_model.bin), as timm caches a Hugging Face hub model; one of our runs (or a study of them) stands for its
    best checkpoint's (config.locate), a cross-validation run is refused (which of its models?)."""
    path = Path(pretrained)
    if path.is_dir() and not any((path / name).is_file() for name in WEIGHT_FILES):
        found = locate(path, accept=("checkpoint", "run"), what="model.pretrained",
                       wants="weights (a file, or a folder holding model.safetensors), a checkpoint or a run directory "
                             "(its best); of a cross-validation run name one fold (<dir>/fold-0) or its soup (dist-train soup)")
        path = found.checkpoints[0]
    if path.is_dir():
        found = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
        if found is None:
            raise CheckpointError(f"model.pretrained {path}: a folder without {' or '.join(WEIGHT_FILES)}")
        return found
    return path


def describe_weights(pretrained: str | Path) -> str:
    """What a model.pretrained folder was read as (weights_file), one line for the run's start."""
    path, file = Path(pretrained), weights_file(pretrained)
    if file.parent == path:
        return f"the weights {file}"
    return f"{locate(path, accept=('checkpoint', 'run')).said}: its weights {file}"


def pretrained_cfg(arch: str, pretrained: str | Path | None) -> tuple[dict, str]:
    """timm's pretrained_cfg of the weights, and where it came from: the config.json beside the weights file (timm's
    hub cache and save_for_hf write one), else timm's own entry for `arch` (its tag, or the model's default tag)."""
    import timm

    check_name(arch)
    if pretrained is not None:
        folder = weights_file(pretrained).parent
        cfg, architecture = _read_config_json(folder / "config.json") if (folder / "config.json").is_file() else ({}, None)
        if architecture is not None:  # (a config.json without one is not timm's: the registry's entry then)
            if architecture != timm.models.split_model_name_tag(arch)[0]:
                raise ConfigError(f"model.pretrained {pretrained} holds timm's {architecture} (its config.json); "
                                  f"model.name is {PREFIX}{arch}")
            fields = {f.name for f in dataclasses.fields(timm.models.PretrainedCfg)}
            return {k: v for k, v in cfg.items() if k in fields}, str(folder / "config.json")
    cfg = timm.get_pretrained_cfg(arch).to_dict()
    return cfg, f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else cfg["architecture"]


def _read_config_json(path: Path) -> tuple[dict, str | None]:
    """(pretrained_cfg, architecture) of a timm config.json: the form timm writes (pretrained_cfg nested, num_classes at
    the top) or its older flat one."""
    try:
        raw = json.loads(path.read_text())
        cfg = dict(raw.get("pretrained_cfg", raw))
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a timm model config ({type(exc).__name__}: {exc})") from None
    if "num_classes" in raw:
        cfg["num_classes"] = raw["num_classes"]
    return cfg, raw.get("architecture", cfg.get("architecture"))


def preprocessing(arch: str, pretrained: str | Path, channels: int) -> dict:
    """image_size, mean, std as the weights expect them (their pretrained_cfg), and `source` saying so. For one
    channel the RGB values are averaged (timm sums the RGB filters of the first layer into one)."""
    cfg, where = pretrained_cfg(arch, pretrained)
    mean, std = [float(m) for m in cfg["mean"]], [float(s) for s in cfg["std"]]
    if channels == 1 and len(mean) == 3:
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    height, width = cfg["input_size"][-2:]
    # data.image_size is square: a non-square pretrained input keeps its larger side
    return {"image_size": int(max(height, width)), "mean": mean, "std": std, "source": f"timm pretrained_cfg {where}"}
