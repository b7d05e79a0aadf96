"""timm backbones (`model.name: timm/<name>`): built by timm.create_model, local weights loaded by timm's own loader.

timm is imported only when a timm model is asked for (it takes a second to import). Nothing is ever downloaded:
the weights come from the file `model.pretrained` names, read by models.read_weights (which refuses pickled
code), and are handed to timm as a state dict, so that timm's per-model filter (position embeddings resampled
to another input size, say), its input-channel adaptation and its head replacement all apply.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path

import torch
from torch import nn

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
    pytorch_model.bin), as timm caches a Hugging Face hub model."""
    path = Path(pretrained)
    if path.is_dir():
        found = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
        if found is None:
            raise CheckpointError(f"model.pretrained {path}: a folder without {' or '.join(WEIGHT_FILES)}")
        return found
    return path


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


def create(arch: str, num_classes: int, in_channels: int, image_size: int, drop_rate: float = 0.0,
           drop_path_rate: float | None = None, pretrained: str | Path | None = None,
           state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """timm.create_model(arch) with our head size and input channels; `state` (read from `pretrained`) loaded by
    timm's loader. A head of another size is replaced; any other tensor that does not fit is an error."""
    import timm

    cfg, _ = pretrained_cfg(arch, pretrained if state is not None else None)
    kwargs = {"num_classes": num_classes, "in_chans": in_channels, "drop_rate": drop_rate}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if cfg.get("fixed_input_size"):  # ViT-like models are built for one input size (timm resamples the weights to it)
        kwargs["img_size"] = image_size
    overlay, head = {}, _classifier_prefixes(cfg)
    if state is not None:
        rows = next((state[f"{p}weight"].shape[0] for p in head if f"{p}weight" in state), 0)
        # the state dict is the only source (never the hub); its head rows tell timm whether to replace the head
        overlay = {"state_dict": state, "num_classes": rows, "source": None}
    where = f"model.pretrained {pretrained}"
    file_keys = set(state or {})
    try:
        model = timm.create_model(arch, pretrained=state is not None, pretrained_cfg=cfg,
                                  pretrained_cfg_overlay=overlay, **kwargs)
    except TypeError as exc:  # e.g. drop_path_rate for a model without stochastic depth
        raise ConfigError(f"model.name={PREFIX}{arch}: timm.create_model refused {sorted(kwargs)}: {exc}") from None
    except RuntimeError as exc:  # load_state_dict: a tensor of another shape
        raise CheckpointError(f"{where} does not fit {PREFIX}{arch}: {str(exc).strip().splitlines()[-1].strip()}") from None
    if state is not None:
        # timm loads non-strictly once it replaced the head: check that everything else was in the file
        own = model.state_dict()
        missing = [k for k in own if k not in file_keys and not k.startswith(head)]
        unexpected = [k for k in file_keys if k not in own and not k.startswith(head)]
        if missing or unexpected:
            raise CheckpointError(f"{where} does not fit {PREFIX}{arch}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                                  f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}); dist_train loads timm's own "
                                  f"state dicts (timm.create_model(...).state_dict(), timm's cached model.safetensors)")
    return model


def _classifier_prefixes(cfg: dict) -> tuple[str, ...]:
    names = cfg.get("classifier") or ()
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))
