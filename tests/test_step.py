"""engine.run.train_step on a real run: what reaches the compiled model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from conftest import SYNTHETIC_SIZE

from engine.config import TrainConfig, resolve
from engine.run import build, make_accelerator, train_step


def test_a_smaller_last_batch_runs_eager_and_compiles_no_second_graph(prepared, tmp_path):
    cfg = resolve(TrainConfig(dataset="synthetic", data_dir=str(prepared.source.parent),
                              synthetic_size=SYNTHETIC_SIZE, width=4, batch_size=64,
                              loader="resident", compile=False, workers=1,
                              out=str(tmp_path / "run")), cuda=False)
    run = build(cfg, make_accelerator(cfg))
    graphs = []

    def count_graphs(graph: torch.fx.GraphModule, example_inputs) -> Callable:
        graphs.append(graph)  # dynamo hands each new graph to its backend once
        return graph.forward

    # build's compilation, with a backend that records graphs instead of making kernels
    run.step_model = torch.compile(run.model, backend=count_graphs, dynamic=False)
    batches = list(run.train_loader)
    assert len(batches[-1][1]) < cfg.batch_size  # 605 images: a last batch of 29
    for images, labels in batches:
        loss, correct = train_step(run, images, labels)
        assert torch.isfinite(loss)
    assert len(graphs) == 1
