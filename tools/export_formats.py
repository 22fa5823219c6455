"""The three export formats as plain data: their packages, file suffixes and input contract, so
tools/export.py offers them before torch loads (tools/export_writers.py writes and runs them,
tools/export_model.py checks their packages and makes their metadata).

Input contract. ONNX and TorchScript carry the normalization in the graph: they take float32
N x 3 x 32 x 32 RGB images with values in 0..1 (uint8 pixels / 255, NCHW, any batch size) and
return N x C logits (softmax them for probabilities). safetensors holds the bare fp32 weights of
engine.model's network, which expects input already normalized with the stored mean/std.
Every format carries the class names, mean and std as JSON (tools/export_model.metadata).
"""

from __future__ import annotations

PACKAGES = {"onnx": ("onnx", "onnxruntime", "onnxscript"), "safetensors": ("safetensors",),
            "torchscript": ()}
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
EXTRA_FILE = "cifar10_engine.json"  # TorchScript's extra file holding the metadata
INPUT_01 = "float32 N x 3 x 32 x 32 RGB in 0..1 (pixels / 255); normalization is in the graph"
INPUT_NORMALIZED = "float32 N x 3 x 32 x 32 RGB, (pixels / 255 - mean) / std"
