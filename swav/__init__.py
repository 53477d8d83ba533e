"""SwAV in pure PyTorch (Caron et al., 2020, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments"). Nothing in this package imports Ray or MLflow."""

from swav.engine import EpochStats, SwAVEngine
from swav.loss import SwAVLoss
from swav.model import SwAVModel, build_model
from swav.queue import FeatureQueue
from swav.sinkhorn import sinkhorn

__all__ = [
    "EpochStats",
    "FeatureQueue",
    "SwAVEngine",
    "SwAVLoss",
    "SwAVModel",
    "build_model",
    "sinkhorn",
]
