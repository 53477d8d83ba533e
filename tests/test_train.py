"""Ray Train + MLflow on a real local Ray instance (CPU, gloo): tracking, surviving a killed worker,
resume equality and bad input. (Sinkhorn codes gathered over two gloo processes equal one process's
codes of the whole batch: tests/test_sinkhorn.py; every two-worker run here gathers them.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from orchestration.checkpoints import STATE_FILE
from orchestration.config import ConfigError, from_dict
from orchestration.datasets import data_digest
from orchestration.failures import TrainingFailed
from orchestration.preflight import load_experiment
from orchestration.recipe import initial_model
from orchestration.train import run_training
from orchestration.worker import FAIL_AT_EPOCH, FAILURE_MARKER
from swav.model import SwAVModel

pytestmark = pytest.mark.slow  # Ray Train/Tune runs end to end (CI runs them all)

TINY = [
    "data.limit=256", "optim.epochs=4", "optim.batch_size=32", "model.width=8",
    "model.hidden_dim=32", "model.out_dim=16", "model.n_prototypes=20",
    "swav.freeze_prototypes_iters=2", "eval.knn_k=10", "optim.warmup_epochs=1",
    "eval.final_evaluation=false", "eval.explain_images=0",
]


def tiny(tmp: Path, *extra: str):
    return load_experiment(None, [*TINY, f"scaling.storage_path={tmp / 'runs'}",
                              f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *extra])


def final_weights(outcome) -> dict[str, torch.Tensor]:
    state = torch.load(Path(outcome.checkpoint_path) / STATE_FILE, weights_only=True)
    return state["engine"]["model"]


@pytest.fixture(scope="module")
def digits_parquet(tmp_path_factory) -> list[str]:
    """Overrides for a Parquet copy of the digits whose 4th training image (one every epoch of a
    `data.limit=256` run visits) does not decode: the runs that read it must skip it."""
    from swav.data import open_source

    data = tmp_path_factory.mktemp("parquet")
    _digits_parquet(data, corrupt_rows=set(), rows=10_000)  # all 1797
    train_rows = open_source("parquet", str(data), seed=0).train.rows
    _digits_parquet(data, corrupt_rows={int(train_rows[3])}, rows=10_000)
    return ["data.source=parquet", f"data.path={data}"]


@pytest.fixture(scope="module")
def straight(ray_local, tmp_path_factory, digits_parquet):
    tmp = tmp_path_factory.mktemp("straight")
    cfg = tiny(tmp, *digits_parquet, "scaling.run_name=straight", "tracking.system_metrics=true",
               "tracking.system_metrics_every_s=0.5")
    return tmp, cfg, run_training(cfg)


def test_two_worker_run_is_tracked_as_one_mlflow_run_with_a_loadable_model(straight):
    tmp, cfg, outcome = straight
    client = MlflowClient(outcome.tracking_uri)
    experiment = client.get_experiment_by_name("swav-ray")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [outcome.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.epochs"] == "4" and run.data.params["model.n_prototypes"] == "20"
    assert run.data.tags["world_size"] == "2" and run.data.tags["device"] == "cpu"
    # System metrics from the node, once (two workers, one monitor), under MLflow's names.
    node = socket.gethostname()
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {f"system/{node}/cpu_utilization_percentage",
            f"system/{node}/system_memory_usage_percentage"} <= system, system
    assert all(k.startswith(f"system/{node}/") for k in system)
    steps = [m.step for m in client.get_metric_history(
        outcome.run_id, f"system/{node}/cpu_utilization_percentage")]
    assert steps == list(range(len(steps))) and len(steps) >= 2  # one logger, not two
    for metric in ("loss", "lr", "images_per_s", "epoch_time_s", "training_s", "prototypes_used",
                   "code_entropy", "knn_top1"):
        steps = [m.step for m in client.get_metric_history(outcome.run_id, metric)]
        assert steps == [0, 1, 2, 3], metric
    # The image that does not decode is skipped and counted on every epoch; the run finished.
    corrupt = [m.value for m in client.get_metric_history(outcome.run_id, "corrupt_images")]
    assert corrupt == [1.0, 1.0, 1.0, 1.0]
    # 2 workers x 128 images/shard, batch 32: 256 images per epoch, in 8 global steps.
    images = client.get_metric_history(outcome.run_id, "prototypes_used")
    assert all(1 <= m.value <= 20 for m in images)
    losses = [m.value for m in client.get_metric_history(outcome.run_id, "loss")]
    assert losses[-1] < losses[0]
    knn = client.get_metric_history(outcome.run_id, "knn_top1")[-1].value
    assert 0.3 < knn <= 1.0  # 10 classes: chance is 0.1
    baseline = client.get_metric_history(outcome.run_id, "knn_top1_random_init")
    assert [m.step for m in baseline] == [0] and 0.1 < baseline[0].value <= 1.0
    setup = client.get_metric_history(outcome.run_id, "setup_s")  # once, with the first epoch
    assert [m.step for m in setup] == [0] and 0 < setup[0].value < 120

    # MLflow's model: the trained backbone, exported (no pickle), images -> features, with its
    # signature and an input example; any batch and image size.
    mlflow.set_tracking_uri(outcome.tracking_uri)
    exported = mlflow.pytorch.load_model(f"runs:/{outcome.run_id}/model")
    trained = initial_model(cfg)
    trained.load_state_dict(final_weights(outcome))
    images = torch.randn(5, 3, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(exported(images), trained.backbone.eval()(images))
    info = mlflow.models.get_model_info(f"runs:/{outcome.run_id}/model")
    (inputs,), (outputs,) = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert (str(inputs.type), inputs.shape) == ("float32", (-1, 3, -1, -1))
    assert (str(outputs.type), outputs.shape) == ("float32", (-1, trained.feat_dim))
    assert run.data.tags["model_format"] == "pt2"
    served = mlflow.pyfunc.load_model(f"runs:/{outcome.run_id}/model")
    assert served.predict(images.numpy()).shape == (5, trained.feat_dim)
    artifacts = [a.path for a in client.list_artifacts(outcome.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/state.pt"]
    config_file = client.download_artifacts(outcome.run_id, "config.yaml", str(tmp))
    assert from_dict(yaml.safe_load(Path(config_file).read_text())) == cfg
    # The data it trained and evaluated on (MLflow's Dataset column): the run's 256 images of
    # the Parquet copy, its held-out images, one digest.
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["evaluation", "training"]
    assert json.loads(inputs["training"].profile)["num_rows"] == 256
    assert json.loads(inputs["evaluation"].profile) == {"num_rows": 359,  # 20% of 1,797
                                                        "classes": DIGIT_NAMES}
    assert inputs["training"].digest == inputs["evaluation"].digest == data_digest(cfg)


def test_a_run_continued_from_another_runs_backbone_starts_where_that_one_ended(straight,
                                                                               digits_parquet):
    """model.init=runs:/ID: the backbone starts from the finished run's (the head and the
    prototypes afresh), said on the run; its kNN before training is the other run's final one,
    above the random-init run's after its first epoch."""
    tmp, _, finished = straight
    client = MlflowClient(finished.tracking_uri)
    outcome = run_training(tiny(tmp, *digits_parquet, f"model.init=runs:/{finished.run_id}",
                                "scaling.run_name=continued", "optim.epochs=1"))
    run = client.get_run(outcome.run_id)
    assert run.data.tags["init_report"] == (
        f"model.init: 18 of 18 backbone tensors from runs:/{finished.run_id}")
    assert run.data.params["model.init"] == f"runs:/{finished.run_id}"

    def knn(run_id, key):
        return [m.value for m in client.get_metric_history(run_id, key)]

    at_start = knn(outcome.run_id, "knn_top1_random_init")[0]  # (the backbone before training)
    # The same weights, bank and held-out images: equal up to a vote that float rounding in
    # another process order may flip (one held-out image in 358 seen).
    assert at_start == pytest.approx(knn(finished.run_id, "knn_top1")[-1], abs=0.01)
    assert knn(outcome.run_id, "knn_top1")[0] > knn(finished.run_id, "knn_top1")[0]


def test_a_time_budget_ends_the_run_with_its_schedule_in_whole_epochs(ray_local, tmp_path):
    """optim.time_budget_s: the epochs planned from the last one's time (the slower worker's),
    the cosine fitted to end with the budget, the last epoch evaluated, the run FINISHED."""
    budget = 4.0
    outcome = run_training(tiny(tmp_path, "optim.epochs=60", f"optim.time_budget_s={budget}",
                                "eval.knn_every=0", "optim.lr=1.0", "optim.final_lr=0.001",
                                "scaling.run_name=budget"))
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    seconds = [m.value for m in client.get_metric_history(outcome.run_id, "epoch_time_s")]
    epochs = len(seconds)
    assert 2 <= epochs < 60 and outcome.metrics["epochs_planned"] == epochs, seconds
    # The run's clock (logged as training_s) ends within about an epoch of the budget.
    clock = [m.value for m in client.get_metric_history(outcome.run_id, "training_s")]
    assert len(clock) == epochs and clock == sorted(clock) and clock[0] >= seconds[0]
    assert abs(clock[-1] - budget) <= 1.5 * max(seconds) + 0.5, (clock, seconds)
    lrs = [m.value for m in client.get_metric_history(outcome.run_id, "lr")]
    assert lrs[-1] < 0.1 * max(lrs), lrs  # annealed by the end (over 60 epochs: near 1.0)
    knn = client.get_metric_history(outcome.run_id, "knn_top1")
    assert [m.step for m in knn] == [epochs - 1]  # the planned last epoch is evaluated
    # The checkpoint carries the clock and the plan: a resume goes on with them.
    state = torch.load(Path(outcome.checkpoint_path) / STATE_FILE, weights_only=True)
    assert state["clock"]["epochs"] == state["clock"]["planned"] == epochs
    assert state["clock"]["budget_s"] == budget
    assert state["clock"]["trained_s"] == pytest.approx(clock[-1])


def test_an_interrupted_run_resumes_and_a_killed_worker_is_replaced(straight, tmp_path,
                                                                   digits_parquet, monkeypatch):
    """A run that dies for good (no retries left) is resumed by a new run_training with the same
    scaling.run_name: it continues the same MLflow run and ends with the uninterrupted weights,
    even when its newest checkpoint was torn (a kill or a full disk mid-upload): the resume
    takes the previous checkpoint that Ray kept. On the way the resumed run loses a worker,
    which Ray replaces: the group restarts from the last checkpoint (the same restore as a
    resume) and that epoch is logged once. A resume may change what does not change the
    experiment (here the retries; longer optim.epochs too: tests/test_config.py), recorded on
    the run, and nothing else."""
    _, _, uninterrupted = straight
    monkeypatch.setenv(FAIL_AT_EPOCH, "3")  # a worker dies once (per marker) at epoch 3
    dying = tiny(tmp_path, *digits_parquet, "scaling.run_name=interrupted",
                 "scaling.max_failures=0")
    with pytest.raises(Exception):
        run_training(dying)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("swav-ray").experiment_id])
    assert run.info.status == "FAILED"
    # Epochs are logged when their checkpoint is registered; the report of epoch 2 may or may
    # not have been registered before the controller saw the dead worker.
    before = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert before in ([0, 1], [0, 1, 2])
    assert "failure_cause" in run.data.tags
    run_dir = tmp_path / "runs" / "interrupted"
    kept = sorted(run_dir.glob("checkpoint_epoch*"))
    assert len(kept) == 2, kept  # epochs 1 and 2, or 0 and 1
    torn = int(kept[-1].name[-6:])
    newest = kept[-1] / STATE_FILE
    newest.write_bytes(newest.read_bytes()[:200])
    # A folder Ray never registered (an upload cut short after the last report): removed.
    orphan = tmp_path / "runs" / "interrupted" / "checkpoint_epoch000099"
    orphan.mkdir()
    (orphan / STATE_FILE).write_bytes(b"partial")

    # The same name with another experiment is refused before anything runs.
    with pytest.raises(ConfigError, match=r"^scaling.run_name: run 'interrupted' exists with "
                                          r"another config.*model.n_prototypes: 20 -> 30"):
        run_training(tiny(tmp_path, *digits_parquet, "scaling.run_name=interrupted",
                          "model.n_prototypes=30"))
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    marker = tmp_path / "runs" / "interrupted" / FAILURE_MARKER
    marker.unlink()  # (left by the first death: a worker dies once per marker)
    again = run_training(tiny(tmp_path, *digits_parquet, "scaling.run_name=interrupted",
                              "scaling.max_failures=1"))
    assert marker.exists()  # a worker really died again, at the start of epoch 3
    assert again.run_id == run.info.run_id
    assert not orphan.exists()
    finished = client.get_run(again.run_id)
    assert finished.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(again.run_id, "loss")]
    assert sorted(set(steps)) == [0, 1, 2, 3]  # no epoch lost
    assert steps.count(torn) == 1 + before.count(torn)  # trained twice, logged once a time
    assert finished.data.tags["retrained_epochs"] == str(torn)
    assert steps.count(3) == 1  # the epoch the replaced worker restarted: once
    assert "failure_cause" not in finished.data.tags  # (the first attempt's)
    # The retrained epoch went into a folder of its own: Ray, which still listed the torn one,
    # deleted that and never the new one (it did, and the controller then failed on the missing
    # path one report later, or the next resume on Ray's list of checkpoints).
    assert Path(again.checkpoint_path).name == "checkpoint_epoch000003"
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch*")) == (
        ["checkpoint_epoch000002-1", "checkpoint_epoch000003"] if torn == 2 else
        ["checkpoint_epoch000002", "checkpoint_epoch000003"])
    assert not list(run_dir.glob(".staging-*"))
    resumed, straight_weights = final_weights(again), final_weights(uninterrupted)
    for name in straight_weights:
        torch.testing.assert_close(resumed[name], straight_weights[name], rtol=0, atol=0, msg=name)
    tags = client.get_run(again.run_id).data.tags
    assert "scaling.max_failures: 0 -> 1" in tags["resume_changes"]

    # Every kept checkpoint unreadable: the resume is refused in one line, nothing deleted.
    for folder in run_dir.glob("checkpoint_epoch*"):
        (folder / STATE_FILE).write_bytes(b"torn")
    with pytest.raises(TrainingFailed, match=r"^checkpoint: no kept checkpoint of the run loads "
                                             r"\(checkpoint: cannot load .*checkpoint_epoch000003"
                                             r"/state.pt: .*; checkpoint: cannot load .*/state.pt"
                                             ) as refused:
        run_training(tiny(tmp_path, *digits_parquet, "scaling.run_name=interrupted",
                          "scaling.max_failures=1", "optim.epochs=6"))
    assert "\n" not in refused.value.cause and refused.value.bad_input
    assert len(list(run_dir.glob("checkpoint_epoch*"))) == 2
    assert len(client.get_metric_history(again.run_id, "loss")) == len(steps)


@pytest.fixture
def small_disk(tmp_path):
    """A file system of its own with room for a few checkpoints (tmpfs, 4 MiB), and a way to
    fill it up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"needs a tmpfs of its own (mount as root): {mounted.stderr.strip()}")

    def fill() -> Path:
        """Every byte taken (down to the last one a page still had)."""
        filler = disk / "filler"
        with open(filler, "ab", buffering=0) as f:
            for size in (1 << 16, 1 << 12, 1 << 8, 1):
                try:
                    while True:
                        f.write(bytes(size))
                except OSError:
                    continue
        return filler

    try:
        yield disk, fill
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_disk_that_fills_mid_run_leaves_no_partial_checkpoint_and_a_full_one_is_refused(
        ray_local, tmp_path, small_disk):
    """Storage full after a checkpoint: the next upload fails, the run stops at once (not
    retried) naming the cause, and no empty or partial state.pt is left where a resume could
    pick it (Ray's copy to storage is not atomic: it left a 0-byte one; resuming from what is
    kept: test_an_interrupted_run_resumes_...). Storage full from the start is refused before
    Ray is needed, and leaves no lock file."""
    import threading

    from orchestration.checkpoints import load_state
    from orchestration.preflight import check_storage
    from orchestration.run_lock import RunLock

    disk, fill = small_disk
    run_dir = disk / "runs" / "full"
    args = ["scaling.num_workers=1", "optim.epochs=5", "scaling.run_name=full",
            f"scaling.storage_path={disk / 'runs'}", "data.limit=1024"]  # epochs of ~1 s
    filled: list[tuple[Path, list[str]]] = []

    def fill_after_second_checkpoint() -> None:
        """Once epoch 1's checkpoint is in place, before epoch 2's upload: Ray deletes an old
        checkpoint only when it registers a third, so no room comes back meanwhile."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (run_dir / "checkpoint_epoch000001").exists():
                later = sorted(p.name for p in run_dir.glob("*checkpoint_epoch00000[2-9]*"))
                filled.append((fill(), later))
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=fill_after_second_checkpoint, daemon=True)
    watcher.start()
    failed = None
    try:
        run_training(tiny(tmp_path, *args))
    except TrainingFailed as err:
        failed = err
    watcher.join()
    assert filled and filled[0][1] == [], filled  # (in time)
    assert failed is not None, "the run did not fail"
    assert failed.not_retryable is not None and not failed.bad_input
    assert failed.attempts == 1 and "No space left on device" in failed.cause
    states = sorted(run_dir.rglob(STATE_FILE))
    assert [p.parent.name for p in states] == ["checkpoint_epoch000000",
                                              "checkpoint_epoch000001"]
    assert all(load_state(p) for p in states)  # each one whole
    assert not list(run_dir.glob(".staging-*"))

    filled[0][0].unlink()
    filler = fill()
    with pytest.raises(ConfigError, match=r"^scaling.storage_path: .* has no room left "
                                          r"\(No space left on device\)$"):
        check_storage(str(disk / "runs"))
    with pytest.raises(ConfigError, match=r"^scaling.storage_path: cannot write the run's lock"):
        with RunLock(str(disk / "runs" / "other")):
            pass
    assert [p for p in (disk / "runs").rglob("*") if p.is_file() and "other" in p.parts] == []
    filler.unlink()


def test_a_run_held_by_another_process_is_refused_before_its_mlflow_run_is_touched(
        ray_local, tmp_path):
    from orchestration.run_lock import RunLock

    cfg = tiny(tmp_path, "scaling.run_name=busy")
    with RunLock(str(tmp_path / "runs" / "busy")):  # as another swav-ray train would hold it
        with pytest.raises(ConfigError, match=r"^scaling.run_name: run 'busy' is in use by "
                                              r"process \d+ on "):
            run_training(cfg)
    assert not (tmp_path / "mlflow.db").exists()  # no run was created or resumed


def test_more_workers_than_the_cluster_has_fail_before_any_run_is_created(ray_local, tmp_path):
    cfg = tiny(tmp_path, "scaling.num_workers=8")
    with pytest.raises(ConfigError, match=r"^scaling.num_workers: 8 workers of 1 CPU each; the Ray "
                                           r"cluster places at most 3$"):
        run_training(cfg)
    assert not (tmp_path / "mlflow.db").exists()
    cfg = tiny(tmp_path, "scaling.use_gpu=true")
    with pytest.raises(ConfigError, match="^scaling.use_gpu"):
        run_training(cfg)
    assert not (tmp_path / "mlflow.db").exists()


@dataclass
class CliResult:
    returncode: int
    stderr: str


@pytest.fixture
def cli_train(monkeypatch, capsys):
    """`swav-ray train ARGS` in this process, in a given directory, as a user without
    RAY_ADDRESS or MLFLOW_TRACKING_URI would run it; Ray must not start (the subprocess form, the
    real command's exit code: test_ctrl_c_... and the explain test)."""
    from orchestration import cli

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for input it should refuse")

    monkeypatch.setattr(cli, "connect_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def run(where: Path, *args: str) -> CliResult:
        monkeypatch.chdir(where)
        capsys.readouterr()
        code = cli.main(["train", *args])
        return CliResult(code, capsys.readouterr().err)

    return run


@pytest.mark.parametrize(
    "args,message",
    [
        (["optim.lrr=0.1"], "swav-ray: error: optim.lrr: unknown key"),
        (["optim.epochs=two"], "swav-ray: error: optim.epochs: expected int, got 'two'"),
        (["data.source=parquet", "data.path=/no/such/dir"],
         "swav-ray: error: data.path: '/no/such/dir' does not exist"),
        (["swav.epsilon=0"], "swav-ray: error: swav.epsilon: must be > 0"),
        (["tracking.tracking_uri=http://127.0.0.1:9"],
         "swav-ray: error: tracking.tracking_uri: MLflow server http://127.0.0.1:9 is unreachable"),
        (["no-such-experiment.yaml"], "swav-ray: error: config: no such experiment file"),
        (["scaling.storage_path=/proc/swav-ray-runs"],
         "swav-ray: error: scaling.storage_path: /proc/swav-ray-runs is not writable"),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_nothing_behind(cli_train, tmp_path, args,
                                                               message):
    result = cli_train(tmp_path, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns/, no Ray run directory


def test_data_that_cannot_train_is_refused_before_ray_starts(cli_train, tmp_path):
    """A missing image column, text labels, a shard smaller than one step, more workers than
    the machine's CPUs: one line naming the key, exit 2, in seconds, nothing written (in the
    workers: retries, then a traceback)."""
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir(), run.mkdir()
    _digits_parquet(data, set())
    table = pq.read_table(data / "digits.parquet")
    pq.write_table(table.rename_columns(["img", "label"]), data / "renamed.parquet")
    pq.write_table(table.set_column(1, "label", pa.array([str(v) for v in
                                                           table.column(1).to_pylist()])),
                   data / "text_labels.parquet")
    (data / "notes.parquet").write_text("not Parquet at all")
    cases = [
        (["data.source=parquet", f"data.path={data / 'notes.parquet'}"],
         f"swav-ray: error: data.path: '{data / 'notes.parquet'}' is not a readable Parquet "
         f"file (Parquet magic bytes not found"),
        (["data.source=parquet", f"data.path={data / 'renamed.parquet'}"],
         "swav-ray: error: data.image_column: 'image' not in renamed.parquet"),
        (["data.source=parquet", f"data.path={data / 'text_labels.parquet'}"],
         "swav-ray: error: data.label_column: 'label' in text_labels.parquet holds string, "
         "expected integer class ids"),
        (["data.source=parquet", f"data.path={data / 'digits.parquet'}", "optim.batch_size=65"],
         "swav-ray: error: optim.batch_size: 65 images per step exceed the 64 images of each "
         "worker's shard (128 training images over 2 workers)"),
        (["scaling.num_workers=64"], "swav-ray: error: scaling.num_workers: 64 workers x 1 CPU "
                                     f"need 64 CPUs, this machine has {os.cpu_count()}"),
    ]
    for args, message in cases:
        start = time.perf_counter()
        result = cli_train(run, *args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), result.stderr
        assert time.perf_counter() - start < 20
    assert list(run.iterdir()) == []


def test_a_resume_under_another_config_is_refused_before_ray_starts(cli_train, tmp_path):
    """The run exists (its MLflow run id beside its checkpoints, its config.yaml logged): the
    same name with another experiment is one line listing the change, before Ray starts (it
    took 18-29 s when Ray started first), and the run is left as it was."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny(tmp_path, "scaling.run_name=kept")
    client = MlflowClient(uri)
    experiment = client.create_experiment("swav-ray", str(tmp_path / "mlruns"))
    run_id = client.create_run(experiment).info.run_id
    client.log_text(run_id, yaml.safe_dump(cfg.to_dict()), "config.yaml")
    client.set_terminated(run_id, "KILLED")
    (tmp_path / "runs" / "kept").mkdir(parents=True)
    (tmp_path / "runs" / "kept" / "mlflow_run_id").write_text(run_id)
    result = cli_train(tmp_path, *TINY, f"scaling.storage_path={tmp_path / 'runs'}",
                       f"tracking.tracking_uri={uri}", "scaling.run_name=kept",
                       "model.n_prototypes=30")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "swav-ray: error: scaling.run_name: run 'kept' exists with another config, so it cannot "
        "be resumed with this one (model.n_prototypes: 20 -> 30); choose another "
        "scaling.run_name, or resume with the stored values"]
    assert client.get_run(run_id).info.status == "KILLED"


def _listening(pid: int) -> list[tuple[str, str]]:
    """``(process name, address)`` of every TCP listener of ``pid`` and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    found = []
    for process in [root, *root.children(recursive=True)]:
        try:
            found += [(" ".join(process.cmdline()).strip()[:40], c.laddr.ip)
                      for c in process.net_connections("tcp") if c.status == "LISTEN"]
        except psutil.NoSuchProcess:
            continue
    return found


def test_ctrl_c_says_how_to_resume_and_marks_the_run_killed(tmp_path):
    """The real CLI, interrupted as a user would (SIGINT) after its first epoch line. The Ray
    instance it started listens on the loopback interface only (GCS, raylet, dashboard, agents,
    workers: the processes it started, the training's torch.distributed store among them)."""
    import signal

    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_LOGGING_LEVEL")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestration.cli", "train", *TINY, "optim.epochs=200",
         "scaling.run_name=stopped"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stderr:  # the console's per-epoch lines go to stderr
            seen.append(line)
            if line.startswith("epoch 1/200"):
                break
        assert seen and seen[-1].startswith("epoch 1/200  loss "), "".join(seen)
        # A quiet console: not even MLflow's notes on creating the new store's tables.
        assert not [line for line in seen if " INFO " in line], "".join(seen)
        listening = _listening(proc.pid)
        assert len(listening) >= 3  # GCS, raylet, agents at least
        # torch.distributed's store (rank 0's, the process group's rendezvous) too: torch binds
        # it to every interface unless given a socket (orchestration/ray_compat.py).
        assert any(name.startswith("ray::RayTrainWorker") for name, _ in listening), listening
        wide = [(name, ip) for name, ip in listening
                if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
        assert wide == [], listening
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=120) == 130, rest
    finally:
        proc.kill()
    assert rest.strip().splitlines()[-1] == (
        "swav-ray: interrupted; the MLflow run is marked KILLED and its checkpoints are kept: "
        "run again with scaling.run_name=stopped to resume")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("swav-ray").experiment_id])
    assert run.info.status == "KILLED"
    assert not (tmp_path / "runs" / "stopped" / "run.lock").exists()  # released


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _digits_parquet(directory: Path, corrupt_rows: set[int], rows: int = 160) -> None:
    """The first ``rows`` digits as RGB PNGs in a Parquet file, their class names in its schema
    metadata (``classes``); ``corrupt_rows`` do not decode."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from swav.data import load_digits_arrays

    images, labels = load_digits_arrays()
    blobs = []
    for i in range(min(rows, len(images))):
        buf = io.BytesIO()
        Image.fromarray(images[i]).convert("RGB").save(buf, format="PNG")
        blobs.append(b"not an image" if i in corrupt_rows else buf.getvalue())
    table = pa.table({"image": pa.array(blobs, pa.binary()), "label": labels[:len(blobs)].tolist()})
    table = table.replace_schema_metadata({"classes": ",".join(DIGIT_NAMES)})
    pq.write_table(table, directory / "digits.parquet", row_group_size=40)


def test_past_the_allowed_share_of_corrupt_images_a_run_fails_once_naming_the_cause(
        ray_local, tmp_path, digits_parquet):
    """Below the share, the image is skipped and counted (the straight run reads the same
    Parquet); past it, every attempt would fail the same way: not retried (max_failures=2)."""
    with pytest.raises(TrainingFailed, match=r"^data: 1 of \d+ images failed to decode") as err:
        run_training(tiny(tmp_path, *digits_parquet, "optim.epochs=2", "scaling.run_name=strict",
                          "data.max_corrupt_fraction=0.0", "scaling.max_failures=2"))
    assert err.value.attempts == 1 and err.value.bad_input and err.value.run_dir is None
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    strict = client.search_runs([client.get_experiment_by_name("swav-ray").experiment_id],
                                "attributes.run_name = 'strict'")[0]
    assert strict.info.status == "FAILED"
    assert strict.data.tags["failure_cause"].startswith("data: 1 of ")


def test_evaluate_and_explain_log_into_the_run_and_reject_bad_input(straight, tmp_path,
                                                                   monkeypatch, capsys):
    import orchestration.evaluate as evaluate_module
    import swav.counterfactual as counterfactual_module
    from orchestration.evaluate import evaluate_run, explain_run, open_tracked_model
    from orchestration.recipe import eval_loaders, eval_sets, open_splits
    from swav.counterfactual import (
        nearest_other_prototype,
        other_label_candidates,
        populated_prototypes,
        prototype_scores,
    )
    from swav.evaluation import assign_with_scores, majority_labels

    _, cfg, outcome = straight
    # Nothing the run stores is unpickled: every torch.load is weights_only, MLflow's pickled
    # model is never loaded.
    real_load, loads = torch.load, []

    def checked_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    def no_pickles(*args, **kwargs):
        raise AssertionError("mlflow.pytorch.load_model unpickles a module")

    monkeypatch.setattr(torch, "load", checked_load)
    monkeypatch.setattr(mlflow.pytorch, "load_model", no_pickles)
    metrics = evaluate_run(outcome.run_id, outcome.tracking_uri, "cpu")
    assert loads and all(w is True for w in loads)
    assert set(metrics) == {f"eval_{k}" for k in (
        "knn_top1", "knn_top5", "linear_top1", "linear_top5", "knn_top1_random_init",
        "knn_top5_random_init", "linear_top1_random_init", "linear_top5_random_init", "nmi",
        "ari", "purity", "prototypes_used", "code_entropy")}
    assert 0.1 < metrics["eval_linear_top1"] <= 1
    assert metrics["eval_knn_top5"] >= metrics["eval_knn_top1"]
    # ... linked to the run's logged model and to its evaluation data (the model's page).
    client = MlflowClient(outcome.tracking_uri)
    model_id = client.get_run(outcome.run_id).outputs.model_outputs[-1].model_id
    linked = {m.key: m for m in client.get_logged_model(model_id).metrics}
    assert linked["eval_linear_top1"].value == pytest.approx(metrics["eval_linear_top1"])
    assert linked["eval_knn_top1"].dataset_name == f"parquet:{Path(cfg.data.path).name} " \
        "(evaluation)"
    assert linked["eval_knn_top1"].dataset_digest == data_digest(cfg)
    # Success is one function: the per-image results, the metric (which the console prints)
    # and the panels all follow swav.counterfactual.success.
    pattern = torch.tensor([True, False, True, True, False, False, True, False, True, True])
    real_success, panels = counterfactual_module.success, []

    def patterned(probs, target, margin=0.0):  # (also the search's stop rule: it stops early)
        return pattern[:len(target)].to(target.device)

    def captured_pages(data, *args, **kwargs):
        panels.append(data)
        return real_pages(data, *args, **kwargs)

    real_pages = evaluate_module.counterfactual_pages
    monkeypatch.setattr(counterfactual_module, "success", patterned)
    monkeypatch.setattr(evaluate_module, "counterfactual_pages", captured_pages)
    cf = explain_run(outcome.run_id, n=10, methods=["ce"], tracking_uri=outcome.tracking_uri,
                     device="cpu")
    monkeypatch.setattr(counterfactual_module, "success", real_success)
    assert cf["ce_cf_validity"] == pytest.approx(0.6)
    assert panels[0].success.tolist() == pattern.tolist()
    client = MlflowClient(outcome.tracking_uri)
    logged = client.get_run(outcome.run_id).data.metrics
    assert logged["eval_linear_top1"] == pytest.approx(metrics["eval_linear_top1"])
    assert [m.step for m in client.get_metric_history(outcome.run_id, "knn_top1")] == [0, 1, 2, 3]
    assert logged["ce_cf_validity"] == pytest.approx(0.6)
    results = client.download_artifacts(outcome.run_id, "counterfactuals/ce/results.json",
                                        str(tmp_path))
    rows = json.loads(Path(results).read_text())
    assert [r["valid"] for r in rows] == pattern.tolist()
    assert len(rows) == 10 and all(r["source"] != r["target"] for r in rows)
    # Every explained image is drawn: 10 images, 8 a page.
    drawn = {a.path for a in client.list_artifacts(outcome.run_id, "counterfactuals/ce")}
    assert drawn == {"counterfactuals/ce/panel_1.png", "counterfactuals/ce/panel_2.png",
                     "counterfactuals/ce/results.json"}
    assert client.get_run(outcome.run_id).data.tags["explain_target"] == "other_label"
    # Default targets: the nearest prototype, among those holding a held-out image, whose
    # majority label differs from that of the image's own cluster.
    tracked = open_tracked_model(outcome.run_id, outcome.tracking_uri)
    sets = eval_sets(tracked.cfg, open_splits(tracked.cfg))
    _, held_loader = eval_loaders(tracked.cfg, sets)
    assigned, _, labels = assign_with_scores(tracked.model, held_loader)
    populated = populated_prototypes(assigned, 20)
    majority, _ = majority_labels(assigned, labels, 20)
    source = torch.tensor([r["source"] for r in rows])
    images = torch.stack([sets.heldout[i][0] for i in range(10)])
    with torch.no_grad():
        assert prototype_scores(tracked.model, images).argmax(1).tolist() == source.tolist()
    expected = nearest_other_prototype(tracked.model, source, candidates=other_label_candidates(
        source, majority, populated))
    assert [r["target"] for r in rows] == expected.tolist()
    assert (majority[expected] != majority[source]).all()
    # Clusters named by the classes the Parquet file names, in the table and on the panels.
    assert [r["source_majority"] for r in rows] == [DIGIT_NAMES[majority[s]] for s in source]
    assert [r["target_majority"] for r in rows] == [DIGIT_NAMES[majority[t]] for t in expected]
    caption = panels[0].captions[int(source[0])]
    assert f"'{DIGIT_NAMES[majority[source[0]]]}'" in caption, caption
    # A gallery of chosen prototypes, on request (one holding no image: test_gallery).
    evaluate_run(outcome.run_id, outcome.tracking_uri, "cpu", prototypes=[int(assigned[0])])
    assert "clusters/prototype_members_chosen.png" in {
        a.path for a in client.list_artifacts(outcome.run_id, "clusters")}
    with pytest.raises(ConfigError, match="^prototypes: 99 out of range for K=20"):
        evaluate_run(outcome.run_id, outcome.tracking_uri, "cpu", prototypes=[3, 99])
    nearest = explain_run(outcome.run_id, n=4, methods=["logit"], target="nearest",
                          tracking_uri=outcome.tracking_uri)
    rows = json.loads(Path(client.download_artifacts(
        outcome.run_id, "counterfactuals/logit/results.json", str(tmp_path))).read_text())
    assert [r["target"] for r in rows] == nearest_other_prototype(
        tracked.model, source[:4], candidates=populated).tolist()
    assert 0 <= nearest["logit_cf_validity"] <= 1
    # The galleries and the crops the run trained on.
    paths = {a.path for folder in ("clusters", "augmentations")
             for a in client.list_artifacts(outcome.run_id, folder)}
    assert {"clusters/prototype_members.png", "clusters/prototype_index.png",
            "augmentations/multicrop.png"} <= paths

    with pytest.raises(ConfigError, match="^run-id: no MLflow run 'deadbeef'"):
        evaluate_run("deadbeef", outcome.tracking_uri)
    empty = client.create_run(client.get_experiment_by_name("swav-ray").experiment_id)
    with pytest.raises(ConfigError, match="has no logged model"):
        explain_run(empty.info.run_id, tracking_uri=outcome.tracking_uri)
    client.delete_run(empty.info.run_id)
    # Weights that are plain tensors but of another model, and a pickle: one line each, naming
    # the artifact as the run holds it (not a temporary download).
    from orchestration.recipe import initial_model

    config = client.download_artifacts(outcome.run_id, "config.yaml", str(tmp_path))
    for name, state in (("other", {"engine": {"model": initial_model(
            from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"],
                                                  "n_prototypes": 30}})).state_dict()}}),
                        ("pickle", {"engine": {"model": SwAVModel}})):
        bad = client.create_run(client.get_experiment_by_name("swav-ray").experiment_id)
        client.log_artifact(bad.info.run_id, config)
        (tmp_path / name).mkdir()
        torch.save(state, tmp_path / name / STATE_FILE)
        client.log_artifact(bad.info.run_id, str(tmp_path / name / STATE_FILE), "checkpoints")
        said = (r"does not fit the model of the run's config.yaml \(size mismatch for "
                r"prototypes" if name == "other" else r"holds objects other than tensors")
        with pytest.raises(ConfigError, match=rf"runs:/{bad.info.run_id}/checkpoints/state.pt"
                                              rf".*{said}"):
            evaluate_run(bad.info.run_id, outcome.tracking_uri, "cpu")
        client.delete_run(bad.info.run_id)
    with pytest.raises(ConfigError, match="^target: prototype 99 out of range for K=20"):
        explain_run(outcome.run_id, n=2, target=99, tracking_uri=outcome.tracking_uri)
    with pytest.raises(ConfigError, match="^target: expected other_label or nearest or a "):
        explain_run(outcome.run_id, n=2, target="farthest", tracking_uri=outcome.tracking_uri)
    from orchestration import cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", outcome.tracking_uri)
    capsys.readouterr()
    assert cli.main(["explain", "--run-id", "deadbeef"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        "swav-ray: error: run-id: no MLflow run 'deadbeef'")
    # Where no store is, it says so and leaves no empty mlflow.db behind.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(elsewhere)
    assert cli.main(["evaluate", "--run-id", outcome.run_id]) == 2
    assert capsys.readouterr().err.strip() == (
        f"swav-ray: error: tracking_uri: no MLflow store at {elsewhere / 'mlflow.db'}; run this "
        f"where the training run's mlflow.db is, or pass --tracking-uri")
    assert list(elsewhere.iterdir()) == []


def test_after_training_loads_the_model_and_assigns_the_held_out_images_once(straight,
                                                                            monkeypatch):
    """``eval.final_evaluation`` and ``eval.explain_images`` together: one model load from
    MLflow and one pass of prototype assignments serve both."""
    import dataclasses

    import orchestration.evaluate as evaluate_module

    _, cfg, outcome = straight
    calls = {"open": 0, "assign": 0}

    def counted(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(evaluate_module, "open_tracked_model",
                        counted("open", evaluate_module.open_tracked_model))
    monkeypatch.setattr(evaluate_module, "assign_with_scores",
                        counted("assign", evaluate_module.assign_with_scores))
    both = dataclasses.replace(cfg, eval=dataclasses.replace(
        cfg.eval, final_evaluation=True, explain_images=2))
    metrics = evaluate_module.after_training(outcome.run_id, outcome.tracking_uri, both)
    assert calls == {"open": 1, "assign": 1}
    assert "eval_knn_top1" in metrics and "ce_cf_validity" in metrics
