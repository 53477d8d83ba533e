"""Ray Train + MLflow on a real local Ray instance (CPU, gloo): tracking, gathered Sinkhorn inside
a 2-worker run, surviving a killed worker, resume equality and bad input."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import ray.train
import ray.train.torch
import torch
import yaml
from mlflow.tracking import MlflowClient

from orchestration.config import ConfigError, from_dict, load_config
from orchestration.checkpoints import STATE_FILE
from orchestration.failures import TrainingFailed
from orchestration.train import FAILURE_MARKER, run_training
from swav.model import SwAVModel
from swav.sinkhorn import sinkhorn

pytestmark = pytest.mark.slow  # Ray Train/Tune runs end to end (CI runs them all)

TINY = [
    "data.limit=256", "optim.epochs=4", "optim.batch_size=32", "model.width=8",
    "model.hidden_dim=32", "model.out_dim=16", "model.n_prototypes=20",
    "swav.freeze_prototypes_iters=2", "eval.knn_k=10", "optim.warmup_epochs=1",
    "eval.final_evaluation=false", "eval.explain_images=0",
]


def tiny(tmp: Path, *extra: str):
    return load_config(None, [*TINY, f"scaling.storage_path={tmp / 'runs'}",
                              f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", *extra])


def final_weights(outcome) -> dict[str, torch.Tensor]:
    state = torch.load(Path(outcome.checkpoint_path) / STATE_FILE, weights_only=True)
    return state["engine"]["model"]


@pytest.fixture(scope="module")
def straight(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    cfg = tiny(tmp, "scaling.run_name=straight", "tracking.system_metrics=true",
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
    for metric in ("loss", "lr", "images_per_s", "epoch_time_s", "prototypes_used",
                   "code_entropy", "knn_top1"):
        steps = [m.step for m in client.get_metric_history(outcome.run_id, metric)]
        assert steps == [0, 1, 2, 3], metric
    # 2 workers x 128 images/shard, batch 32: 256 images per epoch, in 8 global steps.
    images = client.get_metric_history(outcome.run_id, "prototypes_used")
    assert all(1 <= m.value <= 20 for m in images)
    losses = [m.value for m in client.get_metric_history(outcome.run_id, "loss")]
    assert losses[-1] < losses[0]
    knn = client.get_metric_history(outcome.run_id, "knn_top1")[-1].value
    assert 0.3 < knn <= 1.0  # 10 classes: chance is 0.1
    baseline = client.get_metric_history(outcome.run_id, "knn_top1_random_init")
    assert [m.step for m in baseline] == [0] and 0.1 < baseline[0].value <= 1.0

    mlflow.set_tracking_uri(outcome.tracking_uri)
    model = mlflow.pytorch.load_model(f"runs:/{outcome.run_id}/model")
    assert isinstance(model, SwAVModel)
    weights = final_weights(outcome)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    artifacts = [a.path for a in client.list_artifacts(outcome.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/state.pt"]
    config_file = client.download_artifacts(outcome.run_id, "config.yaml", str(tmp))
    assert from_dict(yaml.safe_load(Path(config_file).read_text())) == cfg


def test_a_killed_worker_is_replaced_and_training_resumes_from_the_last_checkpoint(
    straight, tmp_path
):
    _, _, uninterrupted = straight
    cfg = tiny(tmp_path, "scaling.run_name=flaky", "fail_at_epoch=2")
    outcome = run_training(cfg)
    assert (tmp_path / "runs" / "flaky" / FAILURE_MARKER).exists()  # the worker really died
    client = MlflowClient(outcome.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("swav-ray").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # Every epoch logged exactly once: a restart from epoch 0 would log epochs 0 and 1 twice.
    assert [m.step for m in client.get_metric_history(outcome.run_id, "loss")] == [0, 1, 2, 3]
    # Resumed from the epoch-1 checkpoint with its RNG state: the same weights as no failure.
    resumed, straight_weights = final_weights(outcome), final_weights(uninterrupted)
    for name in straight_weights:
        torch.testing.assert_close(resumed[name], straight_weights[name], rtol=0, atol=0, msg=name)


def test_an_interrupted_run_resumes_when_started_again_with_the_same_name(straight, tmp_path):
    """A run that dies for good (no retries left) is resumed by a new run_training with the same
    scaling.run_name: it continues the same MLflow run and ends with the uninterrupted weights,
    even when its newest checkpoint was torn (a kill or a full disk mid-upload): the resume
    takes the previous checkpoint that Ray kept."""
    _, _, uninterrupted = straight
    dying = tiny(tmp_path, "scaling.run_name=interrupted", "fail_at_epoch=3",
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
    kept = sorted((tmp_path / "runs" / "interrupted").glob("checkpoint_epoch*"))
    assert len(kept) >= 2, kept
    newest = kept[-1] / STATE_FILE
    newest.write_bytes(newest.read_bytes()[:200])
    # A folder Ray never registered (an upload cut short after the last report): removed.
    orphan = tmp_path / "runs" / "interrupted" / "checkpoint_epoch000099"
    orphan.mkdir()
    (orphan / STATE_FILE).write_bytes(b"partial")

    again = run_training(tiny(tmp_path, "scaling.run_name=interrupted"))
    assert again.run_id == run.info.run_id
    assert not orphan.exists()
    assert client.get_run(again.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(again.run_id, "loss")]
    assert sorted(set(steps)) == [0, 1, 2, 3]  # the epoch after the fallback is logged again
    resumed, straight_weights = final_weights(again), final_weights(uninterrupted)
    for name in straight_weights:
        torch.testing.assert_close(resumed[name], straight_weights[name], rtol=0, atol=0, msg=name)

    # The same name with another experiment is refused before anything runs; a longer
    # optim.epochs continues the run and is recorded on it.
    with pytest.raises(ConfigError, match=r"^scaling.run_name: run 'interrupted' exists with "
                                          r"another config.*model.n_prototypes: 20 -> 30"):
        run_training(tiny(tmp_path, "scaling.run_name=interrupted", "model.n_prototypes=30"))
    assert client.get_run(again.run_id).info.status == "FINISHED"
    longer = run_training(tiny(tmp_path, "scaling.run_name=interrupted", "optim.epochs=5"))
    assert longer.run_id == again.run_id
    assert [m.step for m in client.get_metric_history(again.run_id, "loss")] == [*steps, 4]
    tags = client.get_run(again.run_id).data.tags
    assert "optim.epochs: 4 -> 5" in tags["resume_changes"]


def test_a_run_held_by_another_process_is_refused_before_its_mlflow_run_is_touched(
        ray_local, tmp_path):
    from orchestration.run_lock import RunLock

    cfg = tiny(tmp_path, "scaling.run_name=busy")
    with RunLock(str(tmp_path / "runs" / "busy")):  # as another swav-ray train would hold it
        with pytest.raises(ConfigError, match=r"^scaling.run_name: run 'busy' is in use by "
                                              r"process \d+ on "):
            run_training(cfg)
    assert not (tmp_path / "mlflow.db").exists()  # no run was created or resumed


def _codes_loop(config):
    """Worker: scores of its half of a fixed batch -> gathered Sinkhorn codes (gloo)."""
    ctx = ray.train.get_context()
    scores = torch.load(config["scores"])
    half = scores.chunk(ctx.get_world_size())[ctx.get_world_rank()]
    codes = sinkhorn(half, epsilon=0.05, iterations=3, gather=True)
    torch.save(codes, Path(config["out"]) / f"codes{ctx.get_world_rank()}.pt")
    ray.train.report({"rows": half.shape[0]})


def test_gathered_codes_inside_a_two_worker_ray_run_equal_single_process_codes(ray_local, tmp_path):
    torch.manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(2 * 40, 16), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(25, 16), dim=1).t()
    torch.save(scores, tmp_path / "scores.pt")
    # Workers cannot import this test module: ship the loop function by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = ray.train.torch.TorchTrainer(
        _codes_loop, train_loop_config={"scores": str(tmp_path / "scores.pt"), "out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "runs"), name="codes"),
    )
    trainer.fit()
    gathered = torch.cat([torch.load(tmp_path / f"codes{r}.pt") for r in range(2)])
    torch.testing.assert_close(gathered, sinkhorn(scores, 0.05, 3), atol=1e-6, rtol=1e-5)


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


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return subprocess.run([sys.executable, "-m", "orchestration.cli", "train", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)


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
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_nothing_behind(tmp_path, args, message):
    result = _cli(tmp_path, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns/, no Ray run directory


def test_the_embedded_default_experiment_learns(ray_local, tmp_path):
    """`swav-ray train` with no arguments: held-out kNN well above the same encoder at random
    initialisation, loss far below ln K, no collapse (measured figures: BENCHMARKS.md)."""
    cfg = load_config(None, [f"scaling.storage_path={tmp_path / 'runs'}",
                             f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    outcome = run_training(cfg)
    client = MlflowClient(outcome.tracking_uri)
    knn = client.get_metric_history(outcome.run_id, "knn_top1")[-1].value
    init = client.get_metric_history(outcome.run_id, "knn_top1_random_init")[-1].value
    loss = [m.value for m in client.get_metric_history(outcome.run_id, "loss")]
    used = client.get_metric_history(outcome.run_id, "prototypes_used")[-1].value
    assert knn >= init + 0.03, (knn, init)
    assert knn >= 0.95
    assert loss[-1] < 0.6 * math.log(100) < loss[0]
    assert used >= 90
    # The default asks for the final evaluation and explanations: they are in the same run.
    final = client.get_run(outcome.run_id).data.metrics
    assert final["eval_linear_top1"] > final["eval_linear_top1_random_init"]
    assert final["eval_knn_top1"] == pytest.approx(knn, abs=0.02)  # same protocol, one process
    assert final["eval_nmi"] > 0.5 and 0 < final["eval_ari"] <= 1
    # The evaluation never lands on the per-epoch curves: knn_top1 is logged once per epoch.
    assert [m.step for m in client.get_metric_history(outcome.run_id, "knn_top1")] == \
        list(range(cfg.optim.epochs))
    assert final["knn_top1"] == knn
    # 16 held-out digits; on 3 x 256 digits of the trained default ce reaches 99.2-100%.
    assert final["ce_cf_validity"] >= 0.9
    assert 0 < final["ce_cf_l2"] < final["logit_cf_l2"]
    paths = {a.path for folder in ("clusters", "evaluation", "counterfactuals")
             for a in client.list_artifacts(outcome.run_id, folder)}
    assert {"clusters/prototype_members.png", "evaluation/embedding.png",
            "counterfactuals/ce_panel.png", "counterfactuals/logit_panel.png"} <= paths


def test_data_that_cannot_train_is_refused_before_ray_starts(tmp_path):
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
    cases = [
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
        result = _cli(run, *args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), result.stderr
        assert time.perf_counter() - start < 20
    assert list(run.iterdir()) == []


def test_ctrl_c_says_how_to_resume_and_marks_the_run_killed(tmp_path):
    """The real CLI, interrupted as a user would (SIGINT) after its first epoch line."""
    import signal

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
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


def _digits_parquet(directory: Path, corrupt_rows: set[int]) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from swav.data import load_digits_arrays

    images, labels = load_digits_arrays()
    blobs = []
    for i in range(160):
        buf = io.BytesIO()
        Image.fromarray(images[i]).convert("RGB").save(buf, format="PNG")
        blobs.append(b"not an image" if i in corrupt_rows else buf.getvalue())
    table = pa.table({"image": pa.array(blobs, pa.binary()), "label": labels[:160].tolist()})
    pq.write_table(table, directory / "digits.parquet", row_group_size=40)


def test_parquet_run_skips_a_corrupt_image_and_stops_past_the_allowed_share(ray_local, tmp_path):
    from swav.data import open_source

    data = tmp_path / "data"
    data.mkdir()
    _digits_parquet(data, corrupt_rows=set())
    train_rows = open_source("parquet", str(data), seed=0).train.rows
    _digits_parquet(data, corrupt_rows={int(train_rows[3])})  # a row every epoch visits
    common = ["data.source=parquet", f"data.path={data}", "data.limit=null", "optim.epochs=2",
              "optim.batch_size=16"]
    outcome = run_training(tiny(tmp_path, *common, "scaling.run_name=tolerant"))
    client = MlflowClient(outcome.tracking_uri)
    corrupt = [m.value for m in client.get_metric_history(outcome.run_id, "corrupt_images")]
    assert corrupt == [1.0, 1.0]  # counted on every epoch, and the run finished
    # Past the allowed share every attempt fails the same way: not retried (max_failures=2).
    with pytest.raises(TrainingFailed, match=r"^data: 1 of \d+ images failed to decode") as err:
        run_training(tiny(tmp_path, *common, "scaling.run_name=strict",
                          "data.max_corrupt_fraction=0.0", "scaling.max_failures=2"))
    assert err.value.attempts == 1 and err.value.bad_input and err.value.run_dir is None
    strict = client.search_runs([client.get_experiment_by_name("swav-ray").experiment_id],
                                "attributes.run_name = 'strict'")[0]
    assert strict.info.status == "FAILED"
    assert strict.data.tags["failure_cause"].startswith("data: 1 of ")


def test_evaluate_and_explain_log_into_the_run_and_reject_bad_input(straight, tmp_path,
                                                                   monkeypatch):
    from orchestration.evaluate import evaluate_run, explain_run, open_tracked_model
    from orchestration.recipe import eval_loaders, eval_sets, open_splits
    from swav.counterfactual import nearest_other_prototype, populated_prototypes
    from swav.evaluation import assign_with_scores

    _, _, outcome = straight
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
    cf = explain_run(outcome.run_id, n=8, methods=["ce"], tracking_uri=outcome.tracking_uri,
                     device="cpu")
    assert 0 <= cf["ce_cf_validity"] <= 1 and cf["ce_cf_steps"] >= 1
    client = MlflowClient(outcome.tracking_uri)
    logged = client.get_run(outcome.run_id).data.metrics
    assert logged["eval_linear_top1"] == pytest.approx(metrics["eval_linear_top1"])
    assert [m.step for m in client.get_metric_history(outcome.run_id, "knn_top1")] == [0, 1, 2, 3]
    assert logged["ce_cf_validity"] == pytest.approx(cf["ce_cf_validity"])
    results = client.download_artifacts(outcome.run_id, "counterfactuals/ce_results.json", str(tmp_path))
    rows = json.loads(Path(results).read_text())
    assert len(rows) == 8 and all(r["source"] != r["target"] for r in rows)
    # default targets: the nearest other prototype among those holding a held-out image
    tracked = open_tracked_model(outcome.run_id, outcome.tracking_uri)
    _, held_loader = eval_loaders(tracked.cfg, eval_sets(tracked.cfg, open_splits(tracked.cfg)))
    assigned, _, _ = assign_with_scores(tracked.model, held_loader)
    populated = populated_prototypes(assigned, 20)
    expected = nearest_other_prototype(tracked.model, torch.tensor([r["source"] for r in rows]),
                                       candidates=populated)
    assert [r["target"] for r in rows] == expected.tolist()

    with pytest.raises(ConfigError, match="^run-id: no MLflow run 'deadbeef'"):
        evaluate_run("deadbeef", outcome.tracking_uri)
    empty = client.create_run(client.get_experiment_by_name("swav-ray").experiment_id)
    with pytest.raises(ConfigError, match="has no logged model"):
        explain_run(empty.info.run_id, tracking_uri=outcome.tracking_uri)
    client.delete_run(empty.info.run_id)
    with pytest.raises(ConfigError, match="^target: prototype 99 out of range for K=20"):
        explain_run(outcome.run_id, n=2, target=99, tracking_uri=outcome.tracking_uri)
    env = {**os.environ, "MLFLOW_TRACKING_URI": outcome.tracking_uri}
    result = subprocess.run([sys.executable, "-m", "orchestration.cli", "explain", "--run-id",
                             "deadbeef"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("swav-ray: error: run-id: no MLflow run 'deadbeef'")
    # Where no store is, it says so and leaves no empty mlflow.db behind.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env.pop("MLFLOW_TRACKING_URI")
    result = subprocess.run([sys.executable, "-m", "orchestration.cli", "evaluate", "--run-id",
                             outcome.run_id], capture_output=True, text=True, env=env,
                            timeout=120, cwd=elsewhere)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"swav-ray: error: tracking_uri: no MLflow store at "
                                     f"{elsewhere / 'mlflow.db'}; run this where the training "
                                     f"run's mlflow.db is, or pass --tracking-uri")
    assert list(elsewhere.iterdir()) == []
