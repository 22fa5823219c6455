"""engine.evaluate against a count by hand over the whole test split at once: sums, not means,
so batches of any size (the last one short) count each image once; flip TTA averages the
mirror's scores; the model's mode is left as it was. Seconds, where the training runs that
also check it take tens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.checkpoint import model_from, model_input
from engine.evaluate import BATCH as PROBABILITY_BATCH
from engine.evaluate import evaluate, probabilities
from engine.model import build_model
from loaders import make_loader
from loaders.augment import Augment

BATCH = 7  # divides neither the 201 test images nor any power of two


@pytest.fixture(scope="module")
def batches(prepared) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = make_loader("resident", prepared.test, train=False, batch_size=BATCH, device="cpu",
                         mean=prepared.mean, std=prepared.std, workers=1)
    return list(loader)


@pytest.mark.parametrize("tta", [False, True])
def test_evaluate_sums_each_image_once_whatever_the_batches(batches, tta):
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=4)
    images, labels = (torch.cat(parts) for parts in zip(*batches, strict=True))
    model.eval()
    with torch.no_grad():
        plain = model(images)
        logits = (plain + model(images.flip(3))) / 2 if tta else plain
    model.train()
    loss, correct, count = evaluate(model, batches, tta=tta).tolist()
    assert len(batches[-1][1]) < BATCH and count == len(labels) == 201
    assert loss == pytest.approx(F.cross_entropy(logits, labels, reduction="sum").item(),
                                 rel=1e-5)
    assert correct == (logits.argmax(1) == labels).sum().item()
    assert model.training  # the caller's training mode, given back
    if tta:  # a model that is no mirror image of itself: TTA changed what was scored
        assert not torch.allclose(logits, plain)


def test_evaluate_scores_under_the_runs_autocast_and_averages_the_views_in_fp32(batches):
    """A bf16 run's batches fit its fp32 model only inside the autocast the run gives
    (Run.autocast): evaluation scores inside it, and averages TTA's two views in fp32."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=4).eval()
    few = [(images.bfloat16(), labels) for images, labels in batches[:3]]

    def autocast() -> torch.autocast:
        return torch.autocast("cpu", dtype=torch.bfloat16)

    with torch.no_grad(), autocast():
        logits = torch.cat([(model(x).float() + model(x.flip(3)).float()) / 2 for x, _ in few])
    labels = torch.cat([y for _, y in few])
    loss, correct, count = evaluate(model, few, tta=True, autocast=autocast).tolist()
    assert count == 3 * BATCH
    assert loss == pytest.approx(F.cross_entropy(logits, labels, reduction="sum").item(),
                                 rel=1e-6)
    assert correct == (logits.argmax(1) == labels).sum().item()


def test_an_empty_shard_still_reports_zeros():
    """A process dealt no test images takes part in the sum across processes all the same."""
    model = build_model("resnet18", 10, width=4)
    assert evaluate(model, []).tolist() == [0.0, 0.0, 0.0]


def test_probabilities_are_each_images_softmax_in_batches_of_any_last_size():
    """probabilities() gives every image, in order, the softmax over classes of the model's
    scores for that image alone, however its BATCH-image passes split them (the last one
    short), and reports each pass's true size."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=4).eval()
    n = PROBABILITY_BATCH + 44
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    to_input = Augment(None, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], torch.float32, "cpu")
    sizes: list[int] = []
    probs = probabilities(model, to_input, images, on_batch=sizes.append)
    assert sizes == [PROBABILITY_BATCH, 44] and probs.shape == (n, 10)
    with torch.no_grad():
        for index in (0, PROBABILITY_BATCH - 1, PROBABILITY_BATCH, n - 1):
            alone = model(to_input(torch.from_numpy(images[index:index + 1]))).softmax(1)[0]
            torch.testing.assert_close(probs[index], alone, rtol=1e-4, atol=1e-6)


def test_a_checkpoints_model_input_is_evaluations_normalization_laid_out_as_its_model():
    """report, predict and export feed model_from's fp32 model, whose weights are contiguous,
    the same values evaluation's loader makes (channels_last in training), laid out like the
    weights: mixed layouts make convolutions convert one of them each call."""
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3),
                                                                 dtype=np.uint8))
    got = model_input({"mean": mean, "std": std}, "cpu")(images)
    assert got.dtype == torch.float32 and got.is_contiguous()
    training = Augment(None, mean, std, torch.float32, "cpu")(images)
    assert training.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, training, rtol=0, atol=0)


def test_a_checkpoints_model_scores_each_image_by_its_running_statistics_alone():
    """model_from's model is in eval mode: BatchNorm normalizes with the statistics training
    saved, so a picture's scores do not depend on the pictures predicted beside it (report,
    predict and export all take this model)."""
    torch.manual_seed(0)
    trained = build_model("resnet18", 10, width=4).train()
    with torch.no_grad():
        trained(torch.randn(16, 3, 32, 32) * 3 + 1)  # running statistics far from 0 and 1
    model = model_from({"arch": "resnet18", "num_classes": 10, "width": 4,
                        "state_dict": trained.state_dict()})
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        together, alone = model(images), model(images[:1])
    torch.testing.assert_close(alone[0], together[0], rtol=1e-4, atol=1e-5)
