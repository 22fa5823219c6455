"""How each export format is written, and how each is run back for export's check (the formats
and their input contract: tools/export_formats.py)."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.model import build_model
from tools.export_formats import EXTRA_FILE


class Normalized(nn.Module):
    """The trained network behind its own normalization, the mean and std that the export's
    metadata (`meta`, JSON values) records: 0..1 RGB in, logits out."""

    def __init__(self, model: nn.Module, meta: dict[str, str]):
        super().__init__()
        self.model = model
        for name in ("mean", "std"):
            self.register_buffer(name, torch.tensor(json.loads(meta[name]),
                                                    dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model((image - self.mean) / self.std)


def write_onnx(model: nn.Module, meta: dict[str, str], path: Path) -> None:
    """ONNX (torch.export-based exporter), batch dimension dynamic, metadata in metadata_props."""
    import onnx

    example = torch.rand(2, 3, 32, 32)
    with future_warnings_hidden(r".*LeafSpec"):
        program = torch.onnx.export(Normalized(model, meta).eval(), (example,), dynamo=True,
                                    input_names=["image"], output_names=["logits"],
                                    verbose=False, dynamic_shapes=({0: torch.export.Dim("batch")},))
    proto = program.model_proto
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(path))


def run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    """Logits of uint8 N x 32 x 32 x 3 images from the ONNX file, by onnxruntime on the CPU."""
    import onnxruntime

    # from the file's bytes, as for TorchScript: onnxruntime takes a name only if it is UTF-8
    session = onnxruntime.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": to_01(images).numpy()})[0]


@contextmanager
def future_warnings_hidden(message: str) -> Iterator[None]:
    """Hide torch's FutureWarnings whose text matches `message`: notices the user cannot act
    on (torch.jit is deprecated, and they asked for TorchScript; torch 2.11's ONNX exporter
    copying its own deprecated pytree LeafSpec)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=message)
        yield


def write_torchscript(model: nn.Module, meta: dict[str, str], path: Path) -> None:
    """A traced TorchScript module with the metadata as the extra file cifar10_engine.json."""
    wrapped = Normalized(model, meta).eval()
    with torch.no_grad(), future_warnings_hidden(r".*torch\.jit"):
        traced = torch.jit.trace(wrapped, torch.rand(2, 3, 32, 32))
        buffer = io.BytesIO()  # written by Python: torch.jit.save aborts the process on a full disk
        torch.jit.save(traced, buffer, _extra_files={EXTRA_FILE: json.dumps(meta)})
    path.write_bytes(buffer.getvalue())


def run_torchscript(path: Path, images: np.ndarray) -> np.ndarray:
    """Logits of uint8 N x 32 x 32 x 3 images from the TorchScript file, by torch.jit.load."""
    with future_warnings_hidden(r".*torch\.jit"):
        # from the file's bytes: torch's C++ takes a name only if it is UTF-8
        module = torch.jit.load(io.BytesIO(path.read_bytes()), map_location="cpu")
    with torch.no_grad():
        return module(to_01(images)).numpy()


def write_safetensors(model: nn.Module, meta: dict[str, str], path: Path) -> None:
    """The fp32 state_dict (contiguous CPU tensors) with the metadata dict."""
    from safetensors.torch import save

    weights = {k: v.detach().float().cpu().contiguous() if v.is_floating_point()
               else v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # written by Python, with the usual permissions: save_file makes its file 0600, and its
    # full-disk error is a SafetensorError, not an OSError naming the file
    path.write_bytes(save(weights, metadata=meta))


def run_safetensors(path: Path, images: np.ndarray) -> np.ndarray:
    """Logits from a fresh engine.model network loaded from the file, as a user would."""
    from safetensors.torch import load

    # from the file's bytes, as for TorchScript: safetensors takes a name only if it is UTF-8;
    # its header is 8 bytes of length, then JSON with the metadata under __metadata__
    data = path.read_bytes()
    meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    model = build_model(meta["arch"], int(meta["num_classes"]), int(meta["width"]))
    model.load_state_dict(load(data))
    wrapped = Normalized(model, meta).eval()
    with torch.no_grad():
        return wrapped(to_01(images)).numpy()


def to_01(images: np.ndarray) -> torch.Tensor:
    """uint8 N x 32 x 32 x 3 pixels as the exported input: float32 NCHW in 0..1."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).contiguous()


WRITERS: dict[str, Callable[[nn.Module, dict[str, str], Path], None]] = {
    "onnx": write_onnx, "torchscript": write_torchscript, "safetensors": write_safetensors}
RUNNERS: dict[str, Callable[[Path, np.ndarray], np.ndarray]] = {
    "onnx": run_onnx, "torchscript": run_torchscript, "safetensors": run_safetensors}
