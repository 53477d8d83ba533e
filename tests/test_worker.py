"""The Ray Train worker's pieces that run without Ray: the per-epoch kNN."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from orchestration.preflight import load_experiment
from orchestration.recipe import build_training
from orchestration.worker import distributed_knn

TINY = ["data.limit=256", "optim.epochs=2", "optim.batch_size=32", "model.width=8",
        "model.hidden_dim=32", "model.out_dim=16", "model.n_prototypes=20"]


def test_the_per_epoch_knn_runs_a_compiled_backbone_eagerly():
    """``model.compile`` compiles the backbone for training's shapes; the kNN pass (eval mode,
    other batch sizes) must not compile it again: the same figure, no graph compiled."""
    cfg = load_experiment(None, TINY)
    training = build_training(cfg)
    device = torch.device("cpu")
    eager = distributed_knn(training.engine.net, training.evaluation, cfg, device)
    training.engine.net.backbone.compile(dynamic=False)  # as recipe.compile_model does on a GPU
    graphs = counters["stats"]["unique_graphs"]
    compiled = distributed_knn(training.engine.net, training.evaluation, cfg, device)
    assert counters["stats"]["unique_graphs"] == graphs  # (compiling would also take seconds)
    assert compiled == eager and 0 < eager <= 1
