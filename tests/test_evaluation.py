"""kNN and linear evaluation on synthetic features, cluster metrics, prototype assignment."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import swav.evaluation as evaluation
from swav.data import Batch
from swav.evaluation import (
    assign_with_scores,
    cluster_quality,
    knn_accuracy,
    knn_predict,
    linear_eval,
    majority_labels,
)
from swav.model import build_model

N_CLASSES, DIM = 10, 64
CHANCE_MARGIN = 0.1 + 1 / N_CLASSES  # "near chance": top-1 at most this


def gaussian_clusters(n: int, noise: float, generator: torch.Generator,
                      centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % centres.shape[0]
    return centres[labels] + noise * torch.randn(n, centres.shape[1], generator=generator), labels


@pytest.fixture(autouse=True)
def single_torch_thread():
    """The SGD probe's tiny matmuls run 5x slower with 2 intra-op threads on a shared 2-core
    machine (thread contention); one thread keeps these tests fast.  Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def separable():
    """10 well-separated Gaussian classes in 64-D: 2000 train / 500 test, plus shuffled labels."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(N_CLASSES, DIM, generator=g)
    x_train, y_train = gaussian_clusters(2000, 0.5, g, centres)
    x_test, y_test = gaussian_clusters(500, 0.5, g, centres)
    shuffled = y_train[torch.randperm(len(y_train), generator=g)]
    return x_train, y_train, x_test, y_test, shuffled


@pytest.fixture(scope="module")
def noisy():
    """Overlapping classes (accuracy well below 1), small enough for quick SGD runs."""
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(N_CLASSES, DIM, generator=g)
    x_train, y_train = gaussian_clusters(500, 3.0, g, centres)
    x_test, y_test = gaussian_clusters(200, 3.0, g, centres)
    return x_train, y_train, x_test, y_test


# -- kNN ---------------------------------------------------------------------------------------

def test_knn_separates_clusters(separable):
    x_train, y_train, x_test, y_test, _ = separable
    result = knn_accuracy(x_train, y_train, x_test, y_test)
    assert set(result) == {"knn_top1", "knn_top5"}
    assert result["knn_top1"] >= 0.98
    assert result["knn_top5"] >= result["knn_top1"]


def test_knn_near_chance_on_shuffled_labels(separable):
    x_train, _, x_test, y_test, shuffled = separable
    result = knn_accuracy(x_train, shuffled, x_test, y_test)
    assert result["knn_top1"] <= CHANCE_MARGIN
    assert result["knn_top5"] >= result["knn_top1"]


def test_knn_accuracy_is_knn_predict_argmax(noisy):
    x_train, y_train, x_test, y_test = noisy
    result = knn_accuracy(x_train, y_train, x_test, y_test, k=20, temperature=0.1)
    scores = knn_predict(torch.nn.functional.normalize(x_train, dim=1), y_train,
                         torch.nn.functional.normalize(x_test, dim=1), N_CLASSES, 20, 0.1)
    expected = (scores.argmax(1) == y_test).float().mean().item()
    assert result["knn_top1"] == pytest.approx(expected)
    assert 0.3 < result["knn_top1"] < 0.98  # the noisy set is neither trivial nor chance


def test_knn_top5_needs_five_classes(separable):
    x_train, y_train, x_test, y_test, _ = separable
    train, test = y_train < 3, y_test < 3
    result = knn_accuracy(x_train[train], y_train[train], x_test[test], y_test[test])
    assert set(result) == {"knn_top1"}
    with_classes = knn_accuracy(x_train[train], y_train[train], x_test[test], y_test[test],
                                n_classes=N_CLASSES)
    assert "knn_top5" in with_classes and with_classes["knn_top5"] == 1.0


# -- linear evaluation -------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["sgd", "sklearn"])
def test_linear_eval_separates_clusters(separable, method):
    x_train, y_train, x_test, y_test, _ = separable
    result = linear_eval(x_train, y_train, x_test, y_test, method=method)
    assert set(result) == {"linear_top1", "linear_top5"}
    assert result["linear_top1"] >= 0.98
    assert result["linear_top5"] >= result["linear_top1"]


@pytest.mark.parametrize("method", ["sgd", "sklearn"])
def test_linear_eval_near_chance_on_shuffled_labels(separable, method):
    x_train, _, x_test, y_test, shuffled = separable
    result = linear_eval(x_train, shuffled, x_test, y_test, method=method)
    assert result["linear_top1"] <= CHANCE_MARGIN


def test_linear_sgd_is_seeded(noisy):
    x_train, y_train, x_test, y_test = noisy
    first = linear_eval(x_train, y_train, x_test, y_test, method="sgd", epochs=5, seed=3)
    again = linear_eval(x_train, y_train, x_test, y_test, method="sgd", epochs=5, seed=3)
    assert first == again
    assert 0.3 < first["linear_top1"] < 0.98


def test_linear_auto_picks_sklearn_for_small_data(separable, monkeypatch):
    x_train, y_train, x_test, y_test, _ = separable
    calls = []
    real_sgd, real_sklearn = evaluation._linear_sgd, evaluation._linear_sklearn
    monkeypatch.setattr(evaluation, "_linear_sgd",
                        lambda *a, **k: calls.append("sgd") or real_sgd(*a, **k))
    monkeypatch.setattr(evaluation, "_linear_sklearn",
                        lambda *a, **k: calls.append("sklearn") or real_sklearn(*a, **k))
    linear_eval(x_train, y_train, x_test, y_test)  # 2000 <= 20000
    monkeypatch.setattr(evaluation, "SKLEARN_MAX_TRAIN", 1999)
    linear_eval(x_train, y_train, x_test, y_test, epochs=1)
    assert calls == ["sklearn", "sgd"]


def test_linear_top5_needs_five_classes(separable):
    x_train, y_train, x_test, y_test, _ = separable
    train, test = y_train < 4, y_test < 4
    result = linear_eval(x_train[train], y_train[train], x_test[test], y_test[test],
                         method="sklearn")
    assert set(result) == {"linear_top1"} and result["linear_top1"] >= 0.98


def test_sklearn_handles_classes_missing_from_training(separable):
    x_train, y_train, x_test, y_test, _ = separable
    train = y_train != 9
    result = linear_eval(x_train[train], y_train[train], x_test, y_test, method="sklearn")
    # class 9 (10% of the test set) can never be predicted; every other class is
    assert result["linear_top1"] == pytest.approx(0.9, abs=0.02)


@pytest.mark.parametrize("kwargs,name", [
    ({"method": "adam"}, "method"), ({"lr": 0.0}, "lr"), ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch_size"), ({"C": -1.0}, "C"), ({"n_classes": 3}, "n_classes"),
])
def test_linear_eval_rejects_bad_arguments(separable, kwargs, name):
    x_train, y_train, x_test, y_test, _ = separable
    with pytest.raises(ValueError, match=f"^{name}:"):
        linear_eval(x_train, y_train, x_test, y_test, **kwargs)


def test_evaluations_reject_bad_shapes(separable):
    x_train, y_train, x_test, y_test, _ = separable
    for fn in (knn_accuracy, linear_eval):
        with pytest.raises(ValueError, match="^train_features:"):
            fn(x_train[0], y_train, x_test, y_test)
        with pytest.raises(ValueError, match="^train_labels:"):
            fn(x_train, y_train[:-1], x_test, y_test)
        with pytest.raises(ValueError, match="^test_features:"):
            fn(x_train, y_train, x_test[:, :10], y_test)
        with pytest.raises(ValueError, match="^test_labels:"):
            fn(x_train, y_train, x_test, y_test.float())


# -- cluster quality ---------------------------------------------------------------------------

def test_cluster_quality_matches_sklearn_on_random_assignments():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (500,), generator=g)
    assignments = torch.randint(0, 12, (500,), generator=g)
    result = cluster_quality(assignments, labels, 12)
    assert result["nmi"] == pytest.approx(normalized_mutual_info_score(labels, assignments))
    assert result["ari"] == pytest.approx(adjusted_rand_score(labels, assignments))
    assert result["nmi"] < 0.1 and abs(result["ari"]) < 0.05


def test_cluster_quality_of_a_relabelled_perfect_clustering():
    labels = torch.arange(60) % 6
    assignments = torch.tensor([17, 3, 0, 9, 12, 5])[labels]  # a bijection label -> prototype
    result = cluster_quality(assignments, labels, 20)
    assert result["nmi"] == pytest.approx(1.0)
    assert result["ari"] == pytest.approx(1.0)
    assert result["purity"] == 1.0
    assert result["prototypes_used"] == 6
    assert result["code_entropy"] == pytest.approx(math.log(6))


def test_cluster_quality_hand_computed():
    assignments = torch.tensor([0, 0, 0, 1, 1, 3])
    labels = torch.tensor([5, 5, 7, 7, 7, 5])  # non-contiguous label values
    result = cluster_quality(assignments, labels, 4)
    # majorities: prototype 0 -> two 5s, prototype 1 -> two 7s, prototype 3 -> one 5
    assert result["purity"] == pytest.approx(5 / 6)
    assert result["prototypes_used"] == 3
    p = torch.tensor([3 / 6, 2 / 6, 1 / 6], dtype=torch.float64)
    assert result["code_entropy"] == pytest.approx(float(-(p * p.log()).sum()))


def test_cluster_quality_rejects_bad_input():
    with pytest.raises(ValueError, match="^assignments:"):
        cluster_quality(torch.tensor([0, 5]), torch.tensor([0, 1]), 5)
    with pytest.raises(ValueError, match="^assignments:"):
        cluster_quality(torch.zeros(2, 2, dtype=torch.long), torch.tensor([0, 1]), 5)
    with pytest.raises(ValueError, match="^labels:"):
        cluster_quality(torch.tensor([0, 1]), torch.tensor([0, 1, 1]), 5)
    with pytest.raises(ValueError, match="^n_prototypes:"):
        cluster_quality(torch.tensor([0, 1]), torch.tensor([0, 1]), 0)


# -- prototype assignment ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("convnet", width=4, depth=2, hidden_dim=8, out_dim=8, n_prototypes=5)
    images = torch.randn(10, 3, 8, 8)
    labels = torch.arange(10) % 3
    return model, images, labels


def direct_scores(model, images):
    model.eval()
    with torch.no_grad():
        return model.prototypes.heads[0](model.projection_head(model.backbone(images)))


def test_assign_with_scores_matches_direct_computation(tiny):
    model, images, labels = tiny
    model.train()
    loader = [(images[:4], labels[:4]), Batch(images[4:], labels[4:], 0)]
    assignments, scores, got_labels = assign_with_scores(model, loader)
    assert model.training  # mode restored
    expected = direct_scores(model, images)
    assert assignments.dtype == torch.long and assignments.shape == (10,)
    assert ((assignments >= 0) & (assignments < 5)).all()
    assert torch.equal(assignments, expected.argmax(1))
    assert torch.equal(got_labels, labels)
    torch.testing.assert_close(scores, expected.max(1).values)
    assert (scores.abs() <= 1 + 1e-5).all()  # cosines between unit vectors


def test_assign_with_scores_without_labels_and_bad_head(tiny):
    model, images, _ = tiny
    assignments, _, labels = assign_with_scores(model, [Batch(images, None, 0)])
    assert labels is None and assignments.shape == (10,)
    with pytest.raises(ValueError, match="^head:"):
        assign_with_scores(model, [(images, None)], head=1)
    with pytest.raises(ValueError, match="^loader:"):
        assign_with_scores(model, [])


def test_majority_labels_per_prototype_with_ties_and_empty_ones():
    assignments = torch.tensor([0, 0, 0, 2, 2, 4, 4, 4, 4])
    labels = torch.tensor([7, 7, 1, 3, 5, 2, 2, 2, 9])
    majority, share = majority_labels(assignments, labels, 5)
    assert majority.tolist() == [7, -1, 3, -1, 2]  # a tie goes to the smaller label
    torch.testing.assert_close(share, torch.tensor([2 / 3, 0.0, 0.5, 0.0, 0.75],
                                                   dtype=torch.float64))
    with pytest.raises(ValueError, match="^labels:"):
        majority_labels(assignments, labels[:-1], 5)
    with pytest.raises(ValueError, match="^assignments:"):
        majority_labels(assignments, labels, 4)
