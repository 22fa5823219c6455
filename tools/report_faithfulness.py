"""Which explanation can be trusted: a heat map alone proves nothing, so each (method, layer)
is scored with ROAD (Rong et al., "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022) through pytorch-grad-cam's own metric, ROADCombined.

ROAD removes the pixels a map ranks most relevant (and, separately, least relevant), fills them
in from their neighbours, and measures the model's confidence in the explained class. The
combined score is (confidence drop when the most relevant go - drop when the least relevant
go) / 2: higher is more faithful. Random maps are scored the same way, as the floor.

Each map is scored by the order of its pixels (removal_order), ties broken in one fixed random
order: pytorch-grad-cam removes the pixels at or above a percentile of the map, and a Grad-CAM
map is mostly exact zeros (the ReLU), so at every percentile it removed them all, not the
share it names.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tools.cams import CAM_BATCH
from tools.report_inputs import in_chunks

# pytorch-grad-cam's percentiles (its default: 10..90); at percentile p it keeps the p% of
# pixels ranked below it and removes the other 100 - p%: 80/60/40/20% removed
PERCENTILES = [20, 40, 60, 80]
RANDOM = "random"  # the baseline's method name in the table
TIE_SEED = 0  # the order in which tied pixels of a map are removed: one for every map
NOISE_SEED = 0  # torch's generator for the imputer's noise: one report, one score
FLOOR_SEED = 0  # the random maps of the floor: the same maps for every report


def removal_order(maps: np.ndarray) -> np.ndarray:
    """N x H x W maps as the ranks of their pixels scaled to [0, 1], distinct within each map:
    the order ROAD removes them in, with ties (the zeros of a Grad-CAM map, a box's inside)
    broken by a fixed random order of the positions. pytorch-grad-cam's threshold at percentile
    p then removes 100 - p% of the pixels, in the map's order (as Rong et al. remove a share of
    them); a map of tied values lost all of its pixels at every percentile."""
    flat = maps.reshape(len(maps), -1)
    tiebreak = np.broadcast_to(np.random.default_rng(TIE_SEED).random(flat.shape[1]),
                               flat.shape)
    order = np.lexsort((tiebreak, flat), axis=-1)  # by value, then by the tie-break
    ranks = np.empty(flat.shape, dtype=np.float32)
    np.put_along_axis(ranks, order, np.arange(flat.shape[1], dtype=np.float32)[None], axis=-1)
    return (ranks / max(flat.shape[1] - 1, 1)).reshape(maps.shape)


def road(model: nn.Module, inputs: torch.Tensor, targets: np.ndarray,
         maps: np.ndarray) -> np.ndarray:
    """ROADCombined score of each image's map for its target class (softmax confidence), the
    map taken as the order of its pixels (removal_order). Its imputer adds noise from torch's
    generator (a standard deviation of 0.01 in the normalized inputs): seeded here, so a
    report of one checkpoint scores the same each time, and the caller's generator is left as
    it was."""
    # imported here, as in tools.cams.cams: seconds that --help need not wait for
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    metric = ROADCombined(percentiles=PERCENTILES)
    classes = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    with torch.random.fork_rng(devices=[inputs.device] if inputs.is_cuda else []):
        torch.manual_seed(NOISE_SEED)
        return np.asarray(metric(inputs, removal_order(maps), classes, model),
                          dtype=np.float64)


def random_maps(like: np.ndarray) -> np.ndarray:
    """Uniform noise maps of the same shape, the same on every call: what an explanation must
    beat."""
    return np.random.default_rng(FLOOR_SEED).random(like.shape, dtype=np.float32)


def faithfulness(model: nn.Module, inputs: torch.Tensor, targets: np.ndarray,
                 maps: dict[tuple[str, str], np.ndarray], chunk: int = CAM_BATCH) -> list[dict]:
    """A row per (method, layer) and one for random maps, best first: mean and spread of the
    ROAD score over the images, scored `chunk` images at a time."""
    if not len(targets):
        return []

    def scores(of: np.ndarray) -> np.ndarray:
        return in_chunks(lambda part: road(model, inputs[part], targets[part], of[part]),
                         len(targets), chunk)

    scored = {key: scores(m) for key, m in maps.items()}
    scored[RANDOM, "-"] = scores(random_maps(next(iter(maps.values()))))
    rows = [dict(method=method, layer=layer, road=round(float(s.mean()), 4),
                 road_std=round(float(s.std()), 4), images=len(s))
            for (method, layer), s in scored.items()]
    return sorted(rows, key=lambda r: -r["road"])


def verdict(rows: list[dict]) -> str:
    """One line for the summary: the most faithful explanation, against the random floor."""
    if not rows:
        return "no images to score"
    best = next(r for r in rows if r["method"] != RANDOM)
    floor = next(r for r in rows if r["method"] == RANDOM)
    beats = "above" if best["road"] > floor["road"] else "NOT above"
    return (f"{best['method']} of {best['layer']}: ROAD {best['road']:+.3f}, {beats} random "
            f"maps ({floor['road']:+.3f}); higher is more faithful")
