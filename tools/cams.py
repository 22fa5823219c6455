"""Class activation maps of a checkpoint's model, shared by report and predict: the layers a
map can explain, the maps themselves and their overlay on a picture. pytorch-grad-cam is
imported only when a map is made."""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from common.errors import ReportError
from tools.options import METHODS

CLASS_AGNOSTIC = {"eigencam"}  # a principal component of the activations: no target class
# images per CAM (or ROAD) pass, for report and predict: what sets the memory a pass takes,
# however many images are explained
CAM_BATCH = 256


def has_map(module: nn.Module) -> bool:
    """Whether `module` holds a convolution: its output is then a spatial feature map."""
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def modules_with_maps(model: nn.Module) -> list[str]:
    """Top-level layers whose output is a spatial feature map, the ones CAMs can explain."""
    return [name for name, m in model.named_children() if has_map(m)]


def layer_of(model: nn.Module, name: str, option: str = "--layers") -> nn.Module:
    """A submodule holding a convolution, by its name (layer3, layer3.1, ...); ReportError
    naming `option` (the command's) and the valid layers."""
    modules = dict(model.named_modules())
    known = bool(name) and name in modules  # "" names the whole model
    if known and has_map(modules[name]):
        return modules[name]
    # only layers holding a convolution: fc and pool have no spatial map, and a BatchNorm's or
    # a ReLU's map is the convolution's before it, rescaled or clipped
    why = ("that layer holds no convolution, whose feature map a CAM explains" if known
           else "the model has no such layer")
    raise ReportError(f"{option} {name}: {why}; choose from "
                      f"{', '.join(modules_with_maps(model))} (or a block such as layer3.1).")


def cams(model: nn.Module, inputs: torch.Tensor, targets: np.ndarray, layer: str,
         method: str = "gradcam") -> np.ndarray:
    """Class activation maps of `layer` for each input's target class: N x H x W in [0, 1]."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    method_class = getattr(pytorch_grad_cam, METHODS[method])
    with method_class(model=model, target_layers=[layer_of(model, layer)]) as cam, \
            _without_progress_bars():
        cam.batch_size = CAM_BATCH  # ScoreCAM's masked copies of an image per pass (its own: 16)
        return cam(input_tensor=inputs, targets=[ClassifierOutputTarget(int(t)) for t in targets])


@contextmanager
def _without_progress_bars() -> Iterator[None]:
    """pytorch-grad-cam's ScoreCAM draws a tqdm bar for each image it explains (a report of 20
    images, two classes and three layers: 120 bars) and has no option to hide them: for the
    block, the tqdm its module calls draws none."""
    import tqdm
    from pytorch_grad_cam import score_cam

    drawn = score_cam.tqdm
    score_cam.tqdm = types.SimpleNamespace(tqdm=functools.partial(tqdm.tqdm, disable=True))
    try:
        yield
    finally:
        score_cam.tqdm = drawn


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """A uint8 HxWx3 image with its map blended in half and half, as pytorch-grad-cam draws it."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255, cam, use_rgb=True, image_weight=0.5)
