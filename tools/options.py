"""The options the tools share, declared once in plain Python (a command line is parsed before
torch loads): the checkpoint they read, the device the model runs on, the data folder that
rebuilds a test split, and the CAM methods report offers (tools/cams.py makes the maps)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import SetupError
from loaders.options import data_dir_option

if TYPE_CHECKING:  # torch is imported when a device is picked, after parsing
    import torch

# --methods name -> pytorch-grad-cam's class, imported where a map is made: grad-cam pulls in
# torchvision, scikit-learn and scipy (seconds) that --help and a refused input need not wait for
METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "scorecam": "ScoreCAM",
           "eigencam": "EigenCAM", "layercam": "LayerCAM"}


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """The checkpoint positional of report, predict and export."""
    parser.add_argument("checkpoint", type=Path, help="ckpt.pt (or best.pt) of a training run")


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """--device, which pick_device resolves."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where the model runs (default: cuda when available)")


def add_data_dir_option(parser: argparse.ArgumentParser, purpose: str = "") -> None:
    """--data-dir of a tool that reads a checkpoint: where to rebuild its test split (for
    `purpose`, e.g. "for the check") instead of reading the .beton path the checkpoint
    records."""
    rebuild = " ".join(filter(None, ("rebuild the test split in DIR", purpose)))
    parser.add_argument("--data-dir", type=data_dir_option, default=None, metavar="DIR",
                        help=f"{rebuild} instead of reading the .beton path recorded in the "
                             "checkpoint")


def pick_device(name: str | None) -> torch.device:
    """The device asked for, or the best one here; refuse CUDA where there is none."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda: no CUDA GPU is available here; use --device cpu.")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
