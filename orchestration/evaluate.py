"""``swav-ray evaluate`` / ``swav-ray explain``: evaluate a tracked model and log into its run.

Both rebuild the model from the run's experiment config (``config.yaml``), load its weights from
the run's final checkpoint (``checkpoints/state.pt``, with ``weights_only``: nothing is
unpickled), rebuild the data source's training and held-out sets with the evaluation transform,
and log metrics and figures back into the *same* run:

* evaluate: kNN and linear top-1/top-5 of the trained encoder and of the same architecture at
  random initialisation (``*_random_init``), cluster quality of the prototype assignments on the
  held-out set (NMI, ARI, purity, used prototypes, assignment entropy); figures under
  ``evaluation/`` and ``clusters/``;
* explain: counterfactuals (``swav.counterfactual``) for held-out images, validity / L1 / L2 /
  steps as ``<method>_cf_*`` metrics; panels (every image, on pages) and per-image results under
  ``counterfactuals/<method>/``.

Artifact paths (stable): ``clusters/prototype_members.png`` (gallery of the most populated
prototypes), ``clusters/prototype_index.png`` (every used prototype), ``evaluation/embedding.png``,
``evaluation/metrics.json``, ``counterfactuals/<method>/panel_<page>.png`` and
``counterfactuals/<method>/results.json``; ``augmentations/multicrop.png`` is logged by training.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader, Dataset

from orchestration.checkpoints import STATE_FILE, CheckpointError, load_state
from orchestration.config import ConfigError, ExperimentConfig, from_dict
from orchestration.metrics import evaluation_metrics
from orchestration.recipe import eval_loaders, eval_sets, initial_model, open_splits
from orchestration.tracking import CONFIG_ARTIFACT, TrackedRun, resolve_tracking_uri
from swav.counterfactual import (
    TARGET_MODES,
    CounterfactualResult,
    explain,
    other_label_candidates,
    populated_prototypes,
    prototype_scores,
)
from swav.counterfactual_panel import PanelData, counterfactual_pages
from swav.evaluation import (
    assign_with_scores,
    cluster_quality,
    extract_features,
    knn_accuracy,
    linear_eval,
    majority_labels,
)
from swav.gallery import Cluster, clusters, prototype_grid, prototype_index
from swav.model import SwAVModel
from swav.viz import embedding_plot

__all__ = ["TrackedModel", "evaluate_run", "explain_run", "open_tracked_model"]

WEIGHTS_ARTIFACT = f"checkpoints/{STATE_FILE}"  # logged by run_training with the model


@dataclass
class TrackedModel:
    """A trained model and its config, loaded from the MLflow run they came from (``run``)."""

    run: TrackedRun
    model: SwAVModel
    cfg: ExperimentConfig


class HeldOut:
    """The run's evaluation sets and loaders, opened once, and the trained model's prototype
    assignments of the held-out images, computed once for evaluate and explain alike."""

    def __init__(self, tracked: TrackedModel, device: str | torch.device) -> None:
        self.tracked, self.device = tracked, device
        sets = eval_sets(tracked.cfg, open_splits(tracked.cfg))
        if sets is None:
            raise ConfigError(f"data.source: {tracked.cfg.data.source!r} has no labelled "
                              f"held-out set to evaluate on")
        self.sets = sets
        self.bank_loader, self.loader = eval_loaders(tracked.cfg, sets)
        self._assigned: tuple | None = None

    def assignments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(prototype index, scores, label) of every held-out image under the trained model."""
        if self._assigned is None:
            self._assigned = assign_with_scores(self.tracked.model, self.loader, self.device)
        return self._assigned


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def open_tracked_model(run_id: str, tracking_uri: str | None = None,
                       device: str | torch.device = "cpu") -> TrackedModel:
    """Model and config of an MLflow run, with clear errors for a missing run or model."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        # MLflow would create an empty store there and then not find the run.
        raise ConfigError(f"tracking_uri: no MLflow store at {uri[len('sqlite:///'):]}; run "
                          f"this where the training run's mlflow.db is, or pass --tracking-uri")
    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"run-id: no MLflow run {run_id!r} in {uri}") from None
    missing = ConfigError(f"run-id: run {run_id} has no logged model (did its training finish?)")
    if CONFIG_ARTIFACT not in {a.path for a in client.list_artifacts(run_id)}:
        raise missing
    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_dict(yaml.safe_load(Path(client.download_artifacts(
            run_id, CONFIG_ARTIFACT, tmp)).read_text()))
        try:
            weights = client.download_artifacts(run_id, WEIGHTS_ARTIFACT, tmp)
        except (MlflowException, OSError):
            raise missing from None
        # Rebuilt from the config and a state dict loaded with weights_only=True: nothing in the
        # run's artifacts is unpickled (MLflow's logged model stays for mlflow.pytorch users).
        artifact = f"runs:/{run_id}/{WEIGHTS_ARTIFACT}"
        try:  # named as the run holds it, not as downloaded here
            state = load_state(weights, artifact)
        except CheckpointError as err:
            raise ConfigError(str(err)) from None
    model = initial_model(cfg)
    try:
        model.load_state_dict(state["engine"]["model"])
    except (KeyError, TypeError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[-1].strip() if str(err).strip() else repr(err)
        raise ConfigError(f"run-id: {artifact} does not fit the model of the run's config.yaml "
                          f"({reason})") from None
    return TrackedModel(TrackedRun(uri, run_id), model.to(device).eval(), cfg)


def _features(model: SwAVModel, train: DataLoader, held: DataLoader, device) -> tuple:
    f_train, y_train = extract_features(model.backbone, train, device)
    f_held, y_held = extract_features(model.backbone, held, device)
    return f_train, y_train, f_held, y_held


def evaluate_run(run_id: str, tracking_uri: str | None = None, device: str | None = None,
                 prototypes: Sequence[int] | None = None) -> dict[str, float]:
    """Evaluate the run's encoder (and a random-init one) and log the results into the run;
    ``prototypes``: also a gallery of these (``clusters/prototype_members_chosen.png``)."""
    tracked = open_tracked_model(run_id, tracking_uri, _device(device))
    n_prototypes = tracked.model.prototypes.sizes[0]
    bad = [p for p in prototypes or () if not 0 <= p < n_prototypes]
    if bad:
        raise ConfigError(f"prototypes: {bad[0]} out of range for K={n_prototypes}")
    return evaluate_model(tracked, HeldOut(tracked, _device(device)), prototypes)


def evaluate_model(tracked: TrackedModel, held: HeldOut,
                   prototypes: Sequence[int] | None = None) -> dict[str, float]:
    """:func:`evaluate_run` on a model already loaded, its data already opened."""
    cfg, device = tracked.cfg, held.device
    held_set, n_classes, names = held.sets.heldout, held.sets.n_classes, held.sets.class_names
    train_loader, held_loader = held.bank_loader, held.loader
    e = cfg.eval
    random_model = initial_model(cfg).to(device).eval()
    metrics: dict[str, float] = {}
    held_features = None
    for suffix, model in (("", tracked.model), ("_random_init", random_model)):
        f_train, y_train, f_held, y_held = _features(model, train_loader, held_loader, device)
        held_features = f_held if held_features is None else held_features  # the trained one's
        found = {**knn_accuracy(f_train, y_train, f_held, y_held, e.knn_k, e.knn_temperature,
                                n_classes),
                 **linear_eval(f_train, y_train, f_held, y_held, method=e.linear_method,
                               n_classes=n_classes)}
        metrics.update({k + suffix: v for k, v in found.items()})
    assignments, scores, labels = held.assignments()
    quality = cluster_quality(assignments, labels, tracked.model.prototypes.sizes[0])
    metrics.update(quality)
    metrics = evaluation_metrics(metrics)
    run = tracked.run
    run.log_metrics(metrics, **_linked(run))
    # Member grid over (at most) the first 4096 held-out images; rows line up with the
    # assignments only when none of them is corrupt (the collate refills corrupt rows).
    shown = [held_set[i] for i in range(min(len(held_set), 4096))]
    if all(sample is not None for sample in shown):
        k = len(shown)
        images = torch.stack([sample[0] for sample in shown])
        args = (images, assignments[:k], scores[:k], None if labels is None else labels[:k])
        look = {"mean": cfg.crops.mean, "std": cfg.crops.std, "class_names": names}
        run.log_figure(prototype_grid(*args, **look), "clusters/prototype_members.png")
        run.log_figure(prototype_index(*args, **look), "clusters/prototype_index.png")
        if prototypes:
            try:
                chosen = prototype_grid(*args, prototypes=list(prototypes), **look)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            run.log_figure(chosen, "clusters/prototype_members_chosen.png")
    run.log_figure(embedding_plot(held_features, assignments, labels, class_names=names),
                   "evaluation/embedding.png")
    run.log_text(json.dumps(metrics, indent=2), "evaluation/metrics.json")
    return metrics


def explain_run(run_id: str, n: int = 16, methods: Sequence[str] = ("ce",),
                target: int | str = "other_label", tracking_uri: str | None = None,
                device: str | None = None) -> dict[str, float]:
    """Counterfactuals for the first ``n`` held-out images by each of ``methods``, logged into
    the run (the model, the images and the held-out clusters are loaded once for all).

    ``target``: ``"other_label"`` (default) aims each image at the nearest prototype (cosine, among
    those holding a held-out image) whose majority label differs from that of the image's own
    cluster, so the panel answers "what turns this 3 into an 8?"; ``"nearest"`` at the nearest
    such prototype whatever it holds (often another cluster of the same class); an int at that
    prototype for every image.  With a large K most prototypes are empty, and an empty one is a
    target no real image is assigned to: both modes choose among the populated ones.
    """
    if n < 1:
        raise ConfigError(f"n: must be >= 1, got {n}")
    if not isinstance(target, int) and target not in TARGET_MODES:
        raise ConfigError(f"target: expected {' or '.join(TARGET_MODES)} or a prototype index, "
                          f"got {target!r}")
    tracked = open_tracked_model(run_id, tracking_uri, _device(device))
    return explain_model(tracked, HeldOut(tracked, _device(device)), n, methods, target)


def explain_model(tracked: TrackedModel, held: HeldOut, n: int, methods: Sequence[str],
                  target: int | str) -> dict[str, float]:
    """:func:`explain_run` on a model already loaded, its data already opened."""
    heldout = held.sets.heldout
    images = torch.stack([sample[0] for sample in _good_samples(heldout, n)]).to(held.device)
    assignments, scores, labels = held.assignments()
    aims = _aims(tracked.model, images, target, assignments, labels)
    members = _HeldOutClusters(heldout, clusters(assignments, scores, labels,
                                                 held.sets.class_names))
    tracked.run.client.set_tag(tracked.run.run_id, "explain_target", str(target))
    metrics: dict[str, float] = {}
    for method in methods:
        metrics.update(_explain_and_log(tracked, images, method, aims, members))
    return metrics


def _aims(model: SwAVModel, images: torch.Tensor, target: int | str, assignments: torch.Tensor,
          labels: torch.Tensor | None) -> dict[str, Any]:
    """``explain``'s ``target`` / ``candidates`` arguments for the target mode."""
    if isinstance(target, int):
        return {"target": target}
    k = model.prototypes.sizes[0]
    populated = populated_prototypes(assignments, k).to(images.device)
    if target == "nearest":
        return {"candidates": populated}
    if labels is None:
        raise ConfigError("target: other_label needs a labelled held-out set; use nearest")
    with torch.no_grad():
        source = prototype_scores(model, images).argmax(dim=1)
    majority, _ = majority_labels(assignments, labels, k)
    return {"candidates": other_label_candidates(source, majority, populated)}


class _HeldOutClusters:
    """Member images and captions of the held-out clusters, for the panels' strips."""

    def __init__(self, dataset: Dataset, found: dict[int, Cluster], per_cluster: int = 4) -> None:
        self.dataset, self.found, self.per_cluster = dataset, found, per_cluster

    def members(self, k: int, like: torch.Tensor) -> torch.Tensor:
        cluster = self.found.get(k)
        picked = [] if cluster is None else [self.dataset[int(i)] for i in
                                             cluster.members[:self.per_cluster]]
        picked = [sample[0] for sample in picked if sample is not None]
        # A target no held-out image is assigned to: no members, a blank strip.
        return torch.stack(picked) if picked else like[:0]

    def caption(self, k: int) -> str:
        cluster = self.found.get(k)
        return "holds no held-out image" if cluster is None else cluster.contents()


def _panel_data(result: CounterfactualResult, held: _HeldOutClusters) -> PanelData:
    cpu = {f: getattr(result, f).detach().cpu() for f in (
        "original", "counterfactual", "source", "target", "assigned", "prob_source_before",
        "prob_target_after", "prob_runner_up_after", "valid")}
    shown = sorted({int(k) for k in torch.cat([cpu["source"], cpu["target"]])})
    return PanelData(cpu["original"], cpu["counterfactual"], cpu["source"], cpu["target"],
                     cpu["assigned"], cpu["prob_source_before"], cpu["prob_target_after"],
                     cpu["prob_runner_up_after"], cpu["valid"],
                     members={k: held.members(k, cpu["original"]) for k in shown},
                     captions={k: held.caption(k) for k in shown})


def _explain_and_log(tracked: TrackedModel, images: torch.Tensor, method: str,
                     aims: dict[str, Any], held: _HeldOutClusters) -> dict[str, float]:
    cfg = tracked.cfg
    try:
        # Assignment probabilities at the training temperature (the model's own softmax).
        result = explain(tracked.model, images, method=method, mean=cfg.crops.mean,
                         std=cfg.crops.std, temperature=cfg.swav.temperature, **aims)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    metrics = {f"{method}_cf_{key}": float(value) for key, value in result.summary().items()}
    tracked.run.log_metrics(metrics, **_linked(tracked.run))
    pages = counterfactual_pages(_panel_data(result, held), method, result.margin,
                                 mean=cfg.crops.mean, std=cfg.crops.std)
    for page, figure in enumerate(pages, start=1):
        tracked.run.log_figure(figure, f"counterfactuals/{method}/panel_{page}.png")
    tracked.run.log_text(json.dumps(_per_image(result, held.found), indent=1),
                            f"counterfactuals/{method}/results.json")
    return metrics


def _linked(run: TrackedRun) -> dict[str, Any]:
    """Evaluation metrics belong to the run's logged model and its evaluation data (MLflow
    shows them on the model's page, and a registered version carries them)."""
    return {"model_id": run.logged_model_id(), "dataset": run.dataset_input("evaluation")}


def _good_samples(dataset: Dataset, limit: int) -> list:
    """The first ``limit`` decodable samples (corrupt images come back as None)."""
    out = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        if len(out) == limit:
            break
        sample = dataset[i]
        if sample is not None:
            out.append(sample)
    return out


def after_training(run_id: str, tracking_uri: str, cfg: ExperimentConfig) -> dict[str, float]:
    """What ``eval.final_evaluation`` / ``eval.explain_images`` ask for, on a finished run: the
    model loaded and the held-out images assigned once for both."""
    metrics: dict[str, float] = {}
    e = cfg.eval
    if not (e.final_evaluation or e.explain_images):
        return metrics
    device = _device(None)
    tracked = open_tracked_model(run_id, tracking_uri, device)
    held = HeldOut(tracked, device)
    if e.final_evaluation:
        metrics.update(evaluate_model(tracked, held))
    if e.explain_images:
        metrics.update(explain_model(tracked, held, e.explain_images, e.explain_methods,
                                     e.explain_target))
    return metrics


def _per_image(result, found: dict[int, Cluster]) -> list[dict[str, Any]]:
    """One row per explained image; with labels, the majority label (by name) of its source
    and target clusters too."""
    fields = ("source", "target", "assigned", "prob_source_before", "prob_target_after",
              "prob_runner_up_after", "steps", "valid", "l1", "l2")
    columns = {f: getattr(result, f).detach().cpu().tolist() for f in fields}
    rows = [{f: columns[f][i] for f in fields} for i in range(len(columns["source"]))]
    if any(cluster.name is not None for cluster in found.values()):
        for row in rows:
            for end in ("source", "target"):
                cluster = found.get(row[end])
                row[f"{end}_majority"] = None if cluster is None else cluster.name
    return rows
