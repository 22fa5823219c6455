"""The three export formats as plain data: their packages, file suffixes and input contract, so
tools/export.py offers them before torch loads (tools/export_writers.py writes and runs them).

Input contract. ONNX and TorchScript carry the normalization in the graph: they take float32
N x 3 x 32 x 32 RGB images with values in 0..1 (uint8 pixels / 255, NCHW, any batch size) and
return N x C logits (softmax them for probabilities). safetensors holds the bare fp32 weights of
engine.model's network, which expects input already normalized with the stored mean/std.
Every format carries the class names, mean and std as JSON (see `metadata`).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from common.errors import ExportError

PACKAGES = {"onnx": ("onnx", "onnxruntime", "onnxscript"), "safetensors": ("safetensors",),
            "torchscript": ()}
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
EXTRA_FILE = "cifar10_engine.json"  # TorchScript's extra file holding the metadata
INPUT_01 = "float32 N x 3 x 32 x 32 RGB in 0..1 (pixels / 255); normalization is in the graph"
INPUT_NORMALIZED = "float32 N x 3 x 32 x 32 RGB, (pixels / 255 - mean) / std"


def require(fmt: str) -> None:
    """Refuse early, in one line, when the optional packages a format needs are missing."""
    missing = []
    for package in PACKAGES[fmt]:
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise ExportError(f"--format {fmt} needs {', '.join(missing)}, which is not installed: "
                          f"pip install 'cifar10-engine[export]' (or pip install "
                          f"{' '.join(PACKAGES[fmt])}).")


def metadata(ckpt: dict, fmt: str, source: Path) -> dict[str, str]:
    """What a user of the file needs besides the weights, as strings (all formats take those)."""
    return {"format": "cifar10-engine/export", "arch": ckpt["arch"], "width": str(ckpt["width"]),
            "num_classes": str(ckpt["num_classes"]), "classes": json.dumps(ckpt["classes"]),
            "mean": json.dumps(ckpt["mean"]), "std": json.dumps(ckpt["std"]),
            "input": INPUT_NORMALIZED if fmt == "safetensors" else INPUT_01,
            "output": "float32 N x num_classes logits", "checkpoint": str(source),
            "epoch": str(ckpt.get("epoch", len(ckpt["history"])))}
