"""dist-train export: ONNX of a trained checkpoint (small CNN, torchvision resnet18; timm's in test_timm.py, ZeRO-3's in
test_deepspeed.py) run by onnxruntime against PyTorch, its preprocessing JSON, and broken exports reported."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the export extra (pip install -e '.[export]') is not installed")
onnxruntime = pytest.importorskip("onnxruntime", reason="the export extra (pip install -e '.[export]') is not installed")

from conftest import ROOT, config_path, run_cli, run_env, tiny_overrides

from dist_train.commands.cli import export_main
from dist_train.commands.export import export
from dist_train.config import load_config
from dist_train.data.datasets import build_dataset
from dist_train.errors import ExportError
from dist_train.models.networks import build_model, read_weights
from dist_train.models.tasks import load_task


def short_run(digits_root, out, **extra):
    """One process, three optimizer steps: a real checkpoint in seconds."""
    run_cli("train.py", ["--config", config_path("digits.yaml"),
                         *tiny_overrides(digits_root, out, **{"train.max_steps": 3, **extra})])
    return out / "checkpoints" / "best"


@pytest.fixture(scope="module")
def small_cnn(digits_root, tmp_path_factory):
    return short_run(digits_root, tmp_path_factory.mktemp("cnn"))


def onnxruntime_vs_torch(onnx_file, checkpoint, batch_size: int):
    """Independently of export.py: the checkpoint's model and the .onnx on the validation images, `batch_size` at a time."""
    config = load_config(checkpoint / "config.yaml")
    model = build_model(config.model, 10, config.data.channels, config.data.image_size)
    model.load_state_dict(read_weights(checkpoint / "model.safetensors"))
    model.eval()
    _, val, _, _ = load_task(config)
    dataset = build_dataset(val, config.data, "val", config.seed)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    ours = torch.cat([torch.from_numpy(session.run(None, {"images": b.numpy()})[0]) for b in images.split(batch_size)])
    with torch.no_grad():
        theirs = model(images)
    return ours, theirs


def test_small_cnn_export_matches_pytorch_on_every_validation_image_and_records_its_preprocessing(small_cnn, tmp_path, capsys):
    export_main(["--checkpoint", str(small_cnn), "--output", str(tmp_path / "cnn.onnx"), "--images", "40"])
    printed = capsys.readouterr().out
    assert "onnxruntime vs PyTorch on 40 validation images: max |logit difference|" in printed
    assert "argmax agreement 40/40" in printed
    ours, theirs = onnxruntime_vs_torch(tmp_path / "cnn.onnx", small_cnn, batch_size=7)  # a batch size never exported
    assert len(ours) == 270
    print(f"small_cnn: max |logit difference| {(ours - theirs).abs().max().item():.3g} over 270 images")
    assert (ours - theirs).abs().max().item() <= 1e-4 and torch.equal(ours.argmax(1), theirs.argmax(1))
    info = json.loads((tmp_path / "cnn.json").read_text())
    assert info["input"] == {"name": "images", "shape": ["batch", 1, 8, 8], "dtype": "float32", "layout": "NCHW"}
    assert {k: info["preprocessing"][k] for k in ("channels", "image_size", "mean", "std", "color", "resize")} == {
        "channels": 1, "image_size": 8, "mean": [0.5], "std": [0.5], "color": "L", "resize": [8, 8]}
    assert info["output"] == {"name": "logits", "shape": ["batch", 10], "task": "classification",
                              "classes": [str(d) for d in range(10)]}
    assert info["source"]["weights"] == "model.safetensors" and info["check"]["argmax_agreement"] == 40
    # the default place: <run>/export/<step>.onnx, also through `python -m dist_train export`
    proc = subprocess.run([sys.executable, "-m", "dist_train", "export", "--checkpoint", str(small_cnn)], cwd=ROOT,
                          env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (small_cnn.parent.parent / "export" / f"{small_cnn.resolve().name}.onnx").is_file()


def test_a_tampered_or_truncated_export_is_reported(small_cnn, tmp_path, capsys):
    path = tmp_path / "cnn.onnx"
    export(small_cnn, path, log=lambda _: None)
    export_main(["--checkpoint", str(small_cnn), "--output", str(path), "--check-only"])
    assert "checked" in capsys.readouterr().out
    graph = onnx.load(str(path))
    weight = next(t for t in graph.graph.initializer if len(t.dims) == 4)  # the first convolution's filters
    values = onnx.numpy_helper.to_array(weight).copy()
    values[0, 0, 0, 0] += 0.5
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(graph, str(path))
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--checkpoint", str(small_cnn), "--output", str(path), "--check-only"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert error.startswith(f"error: {path} disagrees with the PyTorch model: onnxruntime vs PyTorch on 32 validation "
                            f"images: max |logit difference|")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(small_cnn), "--output", str(path), "--check-only"])
    assert capsys.readouterr().err.startswith(f"error: {path}: onnx/onnxruntime cannot run it")
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(tmp_path), "--output", str(path)])
    assert capsys.readouterr().err == (f"error: --checkpoint {tmp_path}: not a checkpoint, a run, a cross-validation run or a "
                                       f"study directory (no manifest.json, checkpoints/, config.yaml with cv.folds, or "
                                       f"hpo_summary.json)\n")


def test_torchvision_resnet18_export_matches_pytorch(digits_root, tmp_path):
    checkpoint = short_run(digits_root, tmp_path / "run", **{"model.name": "resnet18", "data.channels": 3,
                                                             "data.image_size": 32, "data.mean": "[0.5,0.5,0.5]",
                                                             "data.std": "[0.5,0.5,0.5]", "train.max_steps": 2})
    info = export(checkpoint, tmp_path / "resnet18.onnx", images=64)
    print(f"resnet18: {info['check']}")
    assert info["check"]["max_abs_logit_difference"] <= 1e-4 and info["check"]["argmax_agreement"] == 64
    assert info["input"]["shape"] == ["batch", 3, 32, 32]


def test_timm_attention_exports_through_its_unfused_path(tmp_path):
    """EVA's fused attention call is mistraced by the TorchScript exporter (is_causal becomes a tensor); export.py
    traces timm's attention layers through their plain path, and puts the fused one back."""
    import timm

    from dist_train.commands.export import compare, write_onnx
    from dist_train.models.tasks import build_task

    model = timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=2, embed_dim=32, num_heads=2, num_classes=10)
    model.eval()
    images = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    write_onnx(model, images[:2], tmp_path / "eva.onnx")
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attention and all(m.fused_attn for m in attention)  # as they were
    check = compare(tmp_path / "eva.onnx", model, images, build_task(load_config(None), [str(i) for i in range(10)]), 1e-4)
    assert check["max_abs_logit_difference"] <= 1e-4 and check["argmax_agreement"] == 3


def test_without_the_export_extra_the_error_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    with pytest.raises(ExportError, match=r"^export needs onnxruntime, not installed here: pip install -e '\.\[export\]'"):
        export(tmp_path / "no-checkpoint")
