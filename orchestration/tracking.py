"""MLflow tracking: one run per training run, owned by the driver.

The driver creates the run (nested under a parent when Tune passes one), logs the config as
params and the environment as tags, and writes the run id next to the Ray run's checkpoints.  A
retry or a later ``swav-ray train`` with the same ``scaling.run_name`` finds that id and continues
the same MLflow run, never a duplicate.  Per-epoch metrics come from
:class:`orchestration.train_callbacks.EpochMetricsLogger`, a Ray Train callback that runs after
each report *once the checkpoint is persisted*: an epoch that is re-run after a failure was never
reported, so every epoch is logged exactly once.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestration.config import ConfigError, ExperimentConfig, resume_changes

__all__ = ["TrackedRun", "resolve_tracking_uri"]

RUN_ID_FILE = "mlflow_run_id"
CONFIG_ARTIFACT = "config.yaml"
CONTEXT_TAG = "mlflow.data.context"  # MLflow's tag for what a run used a dataset input for

def resolve_tracking_uri(configured: str | None) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db`` (absolute:
    Ray workers run in other directories)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    elif "://" not in uri:  # a bare path: MLflow's file store is refused by MLflow 3
        raise ConfigError(f"tracking.tracking_uri: {uri!r} is not a URI; use sqlite:///... or http://...")
    return uri


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store (``mlruns/`` next to
    the database file, not under whatever directory the process runs in); the server decides
    for other URIs."""
    if not uri.startswith("sqlite:///"):
        return None
    return str(Path(uri[len("sqlite:///"):]).parent / "mlruns")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (one line) when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(f"tracking.tracking_uri: MLflow server {uri} is unreachable ({reason})") from None


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_of_model(uri: str, tracking_uri: str) -> str:
    """The run behind a registered model, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``
    (its config and weights are then read from that run: nothing is unpickled)."""
    from mlflow.exceptions import MlflowException

    name, at, alias = uri[len("models:/"):].partition("@")
    client = MlflowClient(tracking_uri)
    try:
        if at:
            return client.get_model_version_by_alias(name, alias).run_id
        name, _, version = name.rpartition("/")
        return client.get_model_version(name, version).run_id
    except MlflowException:
        raise ConfigError(f"model: no registered model {uri} in {tracking_uri}") from None


def source_tags(command: str | None) -> dict[str, str]:
    """MLflow's own tags for what made a run (the UI's Source column): the command line."""
    return {} if not command else {"mlflow.source.name": command[:500],
                                   "mlflow.source.type": "LOCAL"}


def environment_tags(cfg: ExperimentConfig) -> dict[str, str]:
    import ray
    import torch

    commit = _git_commit()
    return {
        "git_commit": commit,
        **({"mlflow.source.git.commit": commit} if commit != "unknown" else {}),
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "world_size": str(cfg.scaling.num_workers),
        "device": "cuda" if cfg.scaling.use_gpu else "cpu",
        "data_source": cfg.data.source,
        "backbone": cfg.model.backbone,
    }


def check_resume(client: MlflowClient, run_id: str, cfg: ExperimentConfig,
                 run_name: str) -> list[str]:
    """Refuse to resume a run under a config that trains something else (ConfigError listing
    the keys); returns the permitted changes (``RESUMABLE``) to record on the run."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)
        except (MlflowException, OSError):
            return []  # a run from before configs were stored: nothing to compare with
        stored = yaml.safe_load(Path(path).read_text())
    refused, allowed = resume_changes(stored, cfg.to_dict())
    if refused:
        raise ConfigError(
            f"scaling.run_name: run {run_name!r} exists with another config, so it cannot be "
            f"resumed with this one ({'; '.join(refused)}); choose another scaling.run_name, or "
            f"resume with the stored values")
    return allowed


class TrackedRun:
    """The MLflow run of one training run (created, or resumed from ``run_dir``)."""

    def __init__(self, uri: str, run_id: str, resumed: bool = False) -> None:
        self.uri, self.run_id, self.resumed = uri, run_id, resumed
        self.client = MlflowClient(uri)

    @classmethod
    def start(
        cls,
        cfg: ExperimentConfig,
        run_dir: str,
        run_name: str,
        parent_run_id: str | None = None,
        extra_tags: dict[str, str] | None = None,
        uri: str | None = None,
    ) -> TrackedRun:
        """Create the run, or continue the one whose id is stored in ``run_dir``; ``uri``
        overrides the config's tracking URI (a sweep's private server)."""
        uri = uri or resolve_tracking_uri(cfg.tracking.tracking_uri)
        client = MlflowClient(uri)
        run_id = read_text(f"{run_dir}/{RUN_ID_FILE}")
        if run_id:
            changed = check_resume(client, run_id, cfg, run_name)
            client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            client.set_tag(run_id, "resumed", "true")
            if "failure_cause" in client.get_run(run_id).data.tags:  # the last attempt's
                client.delete_tag(run_id, "failure_cause")
            if changed:
                client.set_tag(run_id, "resume_changes", "; ".join(changed)[:5000])
            return cls(uri, run_id, resumed=True)
        experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else client.create_experiment(cfg.tracking.experiment_name,
                                                       artifact_location=artifact_root(uri)))
        tags = {"mlflow.runName": run_name, **environment_tags(cfg), **(extra_tags or {})}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id, tags=tags, run_name=run_name)
        run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in cfg.flat().items()]
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start:start + 100])
        # The whole tree, reloadable by `swav-ray evaluate/explain` (params are flat strings).
        client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), CONFIG_ARTIFACT)
        write_text(f"{run_dir}/{RUN_ID_FILE}", run_id)
        return cls(uri, run_id, resumed=False)

    def log_metrics(self, metrics: dict[str, float], step: int = 0, model_id: str | None = None,
                    dataset: tuple[str, str] | None = None) -> None:
        """One batch of metrics at ``step`` (an epoch; 0 for figures logged once); linked to
        a logged model and to a dataset input ``(name, digest)`` where given (MLflow shows
        them on the model's page and beside the dataset)."""
        now = int(time.time() * 1000)
        name, digest = dataset or (None, None)
        batch = [Metric(k, float(v), now, step, model_id=model_id, dataset_name=name,
                        dataset_digest=digest) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_figure(self, figure: Any, path: str) -> None:
        """A matplotlib figure as an artifact at ``path``; the figure is closed."""
        import matplotlib.pyplot as plt

        try:
            self.client.log_figure(self.run_id, figure, path)
        finally:
            plt.close(figure)

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def add_to_tag(self, key: str, item: str) -> None:
        """Tag ``key`` as a comma-separated list, with ``item`` added once."""
        items = [i for i in self.client.get_run(self.run_id).data.tags.get(key, "").split(",")
                 if i]
        if item not in items:
            self.client.set_tag(self.run_id, key, ",".join([*items, item]))

    def log_model(self, model: Any, image_size: int) -> None:
        """The trained backbone as MLflow's model of this run: images ``[N, 3, H, W]``
        (normalised as the run's crops) to features ``[N, D]``, with that signature and an input
        example of 2 images at ``image_size`` (at most 64 px).  Saved as a ``torch.export``
        program (no pickle: ``mlflow.pytorch.load_model`` gives a module that runs it, and
        MLflow's pyfunc serves it); a backbone torch cannot export is pickled instead (tag
        ``model_format``)."""
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        backbone = model.backbone.eval()
        side = min(image_size, 64)  # (64: no layer of a 32x-downsampling net traced at 1 px)
        example = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            dim = backbone(example).shape[1]
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),  # (unnamed:
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]))  # pyfunc takes arrays)
        mlflow.set_tracking_uri(self.uri)
        args = {"name": "model", "signature": signature, "input_example": example.numpy(),
                "pip_requirements": []}
        with mlflow.start_run(run_id=self.run_id):
            try:
                mlflow.pytorch.log_model(backbone, serialization_format="pt2", **args)
                kept = "pt2"
            except Exception as err:  # noqa: BLE001  (torch.export's refusals have many types)
                print(f"swav-ray: the backbone does not export ({type(err).__name__}); MLflow's "
                      f"model is pickled (load only runs you trust)", file=sys.stderr)
                mlflow.pytorch.log_model(backbone, serialization_format="pickle", **args)
                kept = "pickle"
        self.client.set_tag(self.run_id, "model_format", kept)

    def dataset_input(self, context: str) -> tuple[str, str] | None:
        """(name, digest) of the run's dataset input used for ``context`` (``training`` or
        ``evaluation``), if it recorded one."""
        for found in self.client.get_run(self.run_id).inputs.dataset_inputs:
            if any(t.key == CONTEXT_TAG and t.value == context for t in found.tags):
                return found.dataset.name, found.dataset.digest
        return None

    def logged_model_id(self) -> str | None:
        """The id of the model this run logged (MLflow 3's LoggedModel), if any."""
        outputs = self.client.get_run(self.run_id).outputs
        found = [] if outputs is None else outputs.model_outputs
        return found[-1].model_id if found else None

    def register_model(self, name: str, alias: str | None = None) -> str:
        """This run's logged model as a version of registered model ``name`` (created if new;
        a run registered before keeps its version: a resumed sweep adds none), with ``alias``
        if given; returns ``models:/NAME/VERSION``."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        known = [v.version for v in self.client.search_model_versions(
            f"name = '{name}'") if v.run_id == self.run_id]
        if known:
            version = max(known, key=int)
        else:
            model_id = self.logged_model_id()
            # A models:/ source links the version to its LoggedModel (signature, metrics); a
            # SQLite registry looks that up through the process's tracking URI.
            mlflow.set_tracking_uri(self.uri)
            source = f"models:/{model_id}" if model_id else f"runs:/{self.run_id}/model"
            version = self.client.create_model_version(name, source, run_id=self.run_id,
                                                       model_id=model_id).version
        if alias:
            self.client.set_registered_model_alias(name, alias, version)
        return f"models:/{name}/{version}"

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def end_if_running(self, status: str) -> None:
        """End the run unless something else ended it first (a sweep marks a trial it stopped
        early KILLED; a failure seen afterwards must not turn that into FAILED)."""
        if self.client.get_run(self.run_id).info.status == "RUNNING":
            self.end(status)


def _filesystem(path: str):
    """pyarrow file system and path for a local path or a URI (s3://, gs://, ...), as Ray uses."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(path if "://" in path else str(Path(path).resolve()))


def read_text(path: str) -> str | None:
    import pyarrow.fs as pafs

    fs, p = _filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode().strip() or None


def write_text(path: str, text: str) -> None:
    fs, p = _filesystem(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def remove_file(path: str) -> None:
    """Delete a file (local or a URI) if it is there."""
    fs, p = _filesystem(path)
    try:
        fs.delete_file(p)
    except OSError:  # (FileNotFoundError included: nothing to remove)
        pass
