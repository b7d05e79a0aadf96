"""dist-train export: a checkpoint's model as ONNX, its preprocessing in a JSON beside it, checked by onnxruntime.

The model is rebuilt from the checkpoint's own config.yaml with the weights `inference.weights` picks (the EMA
when the run kept one); DeepSpeed ZeRO-3 checkpoints hold their consolidated weights in model.safetensors too.
The graph has a dynamic batch axis. Before the file is put in place, onnxruntime runs it on validation images
prepared exactly as validation prepares them, against the PyTorch model: a max |logit difference| beyond the
tolerance, or a different predicted class, is an error and leaves no file behind.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from dist_train.commands.inference import FlipAverage, resolve_weights, saved_thresholds
from dist_train.config import Config, load_config, preprocessing
from dist_train.config.locate import Located, locate
from dist_train.custom import user_datasets
from dist_train.data.datasets import build_dataset
from dist_train.errors import CheckpointError, ConfigError, ExportError
from dist_train.models.networks import read_weights, trained_network
from dist_train.models.tasks import Task, build_task, label_names, load_task
from dist_train.rundir.checkpoint import CLASSES_FILE, sha256, verify
from dist_train.rundir.files import atomic_path

OPSET = 17
"""ONNX opset: LayerNormalization (ConvNeXt, ViT) needs 17; onnxruntime 1.16+ runs it."""
INPUT, OUTPUT, PROBABILITIES = "images", "logits", "probabilities"
"""The graph's input and output names (PROBABILITIES: multi-label exports' second output, the logits' sigmoids)."""


def missing_packages() -> list[str]:
    """What the export needs (the `export` extra) and this Python lacks."""
    return [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]


def export(checkpoint: str | Path, output: str | Path | None = None, overrides: list[str] = (), images: int = 32,
           tolerance: float = 1e-4, check_only: bool = False, *, model: nn.Module | None = None, dataset=None,
           log=print, last: bool = False) -> dict:
    """Write `output` (default <run>/export/<checkpoint name>.onnx; a cross-validation run's: <cv dir>/export/
    ensemble.onnx) and its .json, checked; returns the JSON's content.

    `checkpoint`: a checkpoint, a run (its best; `last`: its last), a cross-validation run (every fold's best, exported
    as one graph that averages them as predict.py does, with the flip TTA when inference.tta=hflip) or a study (its
    best trial): config.locate. `overrides`: config keys changed from the checkpoint's config.yaml (e.g. data.root where
    the data now is). `images`: how many validation images the check runs. `check_only`: check an existing export
    again (the file named by `output`) instead of writing one. `model` / `dataset` (as dist_train.Trainer's): your own
    network to load the weights into and your own validation dataset.
    """
    missing = missing_packages()
    if missing:
        raise ExportError(f"export needs {' and '.join(missing)}, not installed here: pip install -e '.[export]' "
                          f"(the versions in constraints.txt)")
    found = locate(checkpoint, last=last, accept=("checkpoint", "run", "cv"),
                   wants="a checkpoint, a run, a cross-validation run or a study directory (a weights file: export the "
                         "checkpoint directory holding it, with its config.yaml)")
    log(found.line())
    config, task, torch_model, source = exported_model(found, list(overrides), model)
    batch = validation_images(config, images, dataset)
    path = Path(output) if output is not None else default_output(found)
    sidecar = path.with_suffix(".json")
    if check_only:
        if not path.is_file():
            raise ExportError(f"--check-only: no export at {path}")
        check = compare(path, torch_model, batch, task, tolerance)
        recorded = json.loads(sidecar.read_text()).get("sha256") if sidecar.is_file() else None
        if recorded is not None and recorded != sha256(path):
            raise ExportError(f"{path} is not the file that was exported (its sha256 differs from {sidecar}'s), "
                              f"although onnxruntime agrees with PyTorch ({describe(check)})")
        log(f"checked {path}: {describe(check)}")
        return check
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write_onnx(WithProbabilities(torch_model).eval() if task.kind == "multilabel" else torch_model, batch[:2], tmp)
        check = compare(tmp, torch_model, batch, task, tolerance)
    info = {
        "format": "onnx",
        "file": path.name,
        "sha256": sha256(path),
        "opset": OPSET,
        "input": {"name": INPUT, "shape": ["batch", config.data.channels, config.data.image_size, config.data.image_size],
                  "dtype": "float32", "layout": "NCHW"},
        "preprocessing": {**preprocessing(config.data), **resize_recipe(config), "color": "L" if config.data.channels == 1 else "RGB",
                          "scale": "pixel values / 255, then (x - mean) / std per channel"},
        "output": {"name": OUTPUT, "shape": ["batch", task.num_outputs], **outputs(task),
                   **({"ensemble": source["ensemble"]} if "ensemble" in source else {})},
        "source": {**{k: v for k, v in source.items() if k != "ensemble"}, "model": config.model.name, "torch": torch.__version__},
        "check": check,
    }
    sidecar.write_text(json.dumps(info, indent=1))
    what = (f"the {len(found.checkpoints)} folds of {found.inner.home}" if found.inner.form == "cv"
            else f"{source['weights']} of {found.checkpoints[0]}")
    log(f"exported {path} ({path.stat().st_size / 2**20:.1f} MB, {what}) and {sidecar.name}; {describe(check)}")
    return info


class Ensemble(nn.Module):
    """A cross-validation run's folds as one network: each fold's output (its flip TTA averaged in, as predict.py does
    under inference.tta=hflip), the folds averaged by the task (classes: the log of the mean probabilities)."""

    def __init__(self, networks: list[nn.Module], task: Task, tta: bool):
        super().__init__()
        self.networks = nn.ModuleList(FlipAverage(n, task) if tta else n for n in networks)
        self.task = task

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.task.average([network(images) for network in self.networks])


def exported_model(found: Located, overrides: list[str], model: nn.Module | None) -> tuple[Config, Task, nn.Module, dict]:
    """(config, task, the PyTorch model the graph is made of -- one network, or the folds' Ensemble --, what it is made
    of for the JSON). A cross-validation run's config is its first fold's (whose held-out rows the check runs on)."""
    checkpoints = list(found.checkpoints)
    for directory in checkpoints:
        if not (directory / "config.yaml").is_file():
            raise CheckpointError(f"--checkpoint {directory}: not a checkpoint directory (no config.yaml)")
        verify(directory, only=["config.yaml", CLASSES_FILE])
    config = load_config(checkpoints[0] / "config.yaml", overrides)
    labels = [json.loads((c / CLASSES_FILE).read_text()) for c in checkpoints]
    if any(label_names(other) != label_names(labels[0]) for other in labels[1:]):
        raise CheckpointError(f"the folds of {found.inner.home} were trained on different labels")
    task = build_task(config, labels[0])
    if task.kind == "multilabel" and task.thresholds is None:  # task.threshold=tune: the run's own (CV: out of fold)
        task.use_thresholds(saved_thresholds([found], checkpoints, task.num_outputs)[0])
    weights = [resolve_weights(c, config.inference.weights) for c in checkpoints]
    networks = []
    for path in weights:
        network = trained_network(config.model, task.num_outputs, config.data.channels, config.data.image_size,
                                  read_weights(path), given=copy.deepcopy(model) if model is not None and len(weights) > 1 else model)
        networks.append(network.eval())
    if found.inner.form != "cv":
        return config, task, networks[0], {"checkpoint": str(checkpoints[0].resolve()), "weights": weights[0].name}
    tta = config.inference.tta == "hflip"
    source = {"checkpoint": str(found.inner.home.resolve()), "weights": weights[0].name,
              "ensemble": {"folds": [str(c.resolve()) for c in checkpoints], "tta": config.inference.tta,
                           "averaging": ("the folds' probabilities averaged (each fold's image and mirror image first, "
                                         "under tta hflip), as predict.py does; the output is their log"
                                         if task.class_names is not None else "the folds' outputs averaged")}}
    return config, task, Ensemble(networks, task, tta).eval(), source


def default_output(found: Located) -> Path:
    """<run>/export/<step>.onnx for <run>/checkpoints/<step> (`best`/`last` resolved), else beside the checkpoint; a
    cross-validation run's: <cv dir>/export/ensemble.onnx."""
    if found.inner.form == "cv":
        return found.inner.home / "export" / "ensemble.onnx"
    directory = found.checkpoints[0].resolve()
    run = directory.parent.parent if directory.parent.name == "checkpoints" else directory.parent
    return run / "export" / f"{directory.name}.onnx"


def validation_images(config: Config, count: int, dataset=None) -> torch.Tensor:
    """The first `count` validation images as the model sees them in validation (the same transform)."""
    if count < 1:
        raise ConfigError("--images must be at least 1")
    if dataset is None:
        user_sets = user_datasets(config.data, {"val": None})
        if user_sets is not None:
            dataset = user_sets["val"]
        else:
            _, val_records, _, _ = load_task(config)
            dataset = build_dataset(val_records, config.data, "val", config.seed)
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    return torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items]).float()


class WithProbabilities(nn.Module):
    """A multi-label model exported with two outputs: its logits and their sigmoids (each class's probability)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
        return logits, torch.sigmoid(logits)


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    # The TorchScript-based exporter (dynamo=False): the dynamo one needs onnxscript, which is not on every machine
    # (the GPU machines lack it). It is deprecated in torch 2.9+ but present through 2.14; its warning says so.
    # timm's attention layers are traced through their plain matmul + softmax path (opset 17 has no attention op,
    # so the graph is the same), because the tracer mishandles some fused calls (EVA's is_causal).
    fused = [module for module in model.modules() if getattr(module, "fused_attn", None) is True]
    for module in fused:
        module.fused_attn = False
    try:
        _export(model, example, path)
    finally:
        for module in fused:
            module.fused_attn = True


def _export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        # its deprecation notice, and the tracer's notes on Python-level branches (timm's asserts on input sizes)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        names = [OUTPUT, PROBABILITIES] if isinstance(model, WithProbabilities) else [OUTPUT]
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET, input_names=[INPUT],
                              output_names=names, dynamic_axes={name: {0: "batch"} for name in [INPUT, *names]},
                              do_constant_folding=True)
        except Exception as exc:  # an operator ONNX cannot express, a model too large for one protobuf file, ...
            raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None


def compare(path: Path, model: nn.Module, batch: torch.Tensor, task: Task, tolerance: float) -> dict:
    """onnxruntime (CPU) against PyTorch on `batch` (a batch size the export never saw: the batch axis is dynamic)."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(f"the export check needs onnx and onnxruntime ({exc}): pip install -c constraints.txt "
                          f"'.[export]'") from None
    try:
        onnx.checker.check_model(str(path))
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        results = [torch.from_numpy(r) for r in session.run(names, {INPUT: batch.numpy()})]
        exported = results[names.index(OUTPUT)]
    except Exception as exc:  # a truncated or altered file: onnx and onnxruntime raise their own kinds
        raise ExportError(f"{path}: onnx/onnxruntime cannot run it ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    with torch.inference_mode():
        expected = model(batch).float()
    if exported.shape != expected.shape:
        raise ExportError(f"{path}: onnxruntime returned {tuple(exported.shape)} for {len(batch)} images, PyTorch "
                          f"{tuple(expected.shape)}")
    difference = (exported - expected).abs().max().item()
    check = {"images": len(batch), "max_abs_logit_difference": difference, "tolerance": tolerance,
             "onnxruntime": onnxruntime.__version__}
    agreement = "label_set_agreement" if task.kind == "multilabel" else "argmax_agreement"
    if task.class_names is not None:  # classes (combined, for multihead; the thresholded set, multilabel) of each image
        check[agreement] = sum(a == b for a, b in zip(task.predictions(exported), task.predictions(expected)))
    if PROBABILITIES in names:
        check["max_abs_probability_difference"] = (results[names.index(PROBABILITIES)] - expected.sigmoid()).abs().max().item()
        difference = max(difference, check["max_abs_probability_difference"])
    if not difference <= tolerance or check.get(agreement, len(batch)) != len(batch):
        raise ExportError(f"{path} disagrees with the PyTorch model: {describe(check)}")
    return check


def describe(check: dict) -> str:
    agreement = "".join(f", {key.replace('_', ' ')} {check[key]}/{check['images']}"
                        for key in ("argmax_agreement", "label_set_agreement") if key in check)
    return (f"onnxruntime vs PyTorch on {check['images']} validation images: max |logit difference| "
            f"{check['max_abs_logit_difference']:.3g} (tolerance {check['tolerance']:g}){agreement}")


def resize_recipe(config: Config) -> dict:
    """How an image becomes image_size x image_size before normalisation, as validation does it (data.build_transform)."""
    size = config.data.image_size
    if config.data.train_crop == "resize":
        return {"resize": [size, size], "center_crop": None, "interpolation": "bilinear, antialiased"}
    return {"resize": round(size / config.data.eval_crop_fraction), "center_crop": [size, size],
            "interpolation": "bilinear, antialiased", "resize_note": "the shorter side to `resize`, then the centre crop"}


def outputs(task: Task) -> dict:
    """What the output's columns mean, per task."""
    if task.kind == "classification":
        return {"task": task.kind, "classes": task.class_names}
    if task.kind == "multihead":
        starts = [sum(task.sizes[:i]) for i in range(len(task.sizes))]
        return {"task": task.kind, "heads": [{"name": h.name, "columns": [s, s + n], "classes": c}
                                             for h, s, n, c in zip(task.heads, starts, task.sizes, task.head_classes)],
                "combined_class": "mixed-radix number of the head classes, heads in this order"}
    if task.kind == "multilabel":
        return {"task": task.kind, "classes": task.class_names, "probabilities": f"the second output, {PROBABILITIES}: "
                "sigmoid of each logit", "thresholds": dict(zip(task.class_names, task.thresholds.tolist())),
                "decision": "a class is present where its probability >= its threshold"}
    if task.kind == "regression":
        return {"task": task.kind, "targets": task.columns}
    return {"task": task.kind, "score": "higher ranks first within a query"}
