"""The command line: the summary of a finished run; the resolved config."""

from __future__ import annotations

import os
from types import SimpleNamespace

import yaml

from orchestration.cli import _print_summary, main
from orchestration.preflight import load_experiment


def _outcome(metrics: dict) -> SimpleNamespace:
    return SimpleNamespace(run_name="r1", run_id="abc", checkpoint_path="/ckpt",
                           tracking_uri="sqlite:////tmp/m.db", metrics=metrics)


def test_summary_shows_evaluation_and_counterfactuals_when_they_ran(capsys):
    _print_summary(_outcome({
        "epoch": 31, "loss": 2.26, "knn_top1": 0.9861, "prototypes_used": 81.0,
        "eval_knn_top1": 0.9861, "eval_knn_top1_random_init": 0.93, "eval_linear_top1": 0.992,
        "eval_linear_top1_random_init": 0.953, "eval_nmi": 0.688, "eval_ari": 0.239,
        "ce_cf_validity": 1.0, "ce_cf_l2": 0.816, "ce_cf_steps": 13.25,
        "logit_cf_validity": 0.9375, "logit_cf_l2": 1.166, "logit_cf_steps": 100.0}))
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "run r1 finished after 32 epochs: loss 2.2600, knn_top1 0.9861, " \
                     "prototypes_used 81"
    assert "evaluation (held-out): kNN top-1 0.986 (random init 0.930), linear top-1 0.992 " \
           "(random init 0.953), NMI 0.688, ARI 0.239" in out
    assert "counterfactuals (ce): validity 1.000, mean L2 0.816, mean steps 13.2" in out
    assert "counterfactuals (logit): validity 0.938, mean L2 1.166, mean steps 100.0" in out
    assert "MLflow run id: abc" in out
    assert "view it: mlflow ui --backend-store-uri sqlite:////tmp/m.db" in out


def test_summary_without_evaluation_has_no_evaluation_lines(capsys):
    _print_summary(_outcome({"epoch": 1, "loss": 4.1}))
    out = capsys.readouterr().out
    assert "run r1 finished after 2 epochs: loss 4.1000\n" in out
    assert "evaluation" not in out and "counterfactuals" not in out


def test_sweep_summary_shows_the_table_the_best_trial_and_its_evaluation(capsys):
    from orchestration.cli import _print_sweep
    from orchestration.sweep import Dimension, SweepSpec
    from orchestration.sweep_report import TrialRow

    spec = SweepSpec(base={}, dimensions=[Dimension("swav.epsilon", "grid", [0.03, 0.05])])
    rows = [TrialRow("aaaaa_00000", "r0", {"swav.epsilon": 0.03}, 0.91, 12, 12, "finished", {}),
            TrialRow("aaaaa_00001", "r1", {"swav.epsilon": 0.05}, 0.85, 3, 12, "stopped", {}),
            TrialRow("aaaaa_00002", "r2", {"swav.epsilon": 0.04}, None, 0, 12, "error", {},
                     error="data: 3 of 256 images failed to decode")]
    outcome = SimpleNamespace(name="s", rows=rows, best=rows[0], parent_run_id="p1",
                              tracking_uri="sqlite:////tmp/m.db",
                              best_metrics={"knn_top1": 0.92, "eval_knn_top1": 0.92,
                                            "eval_knn_top1_random_init": 0.9,
                                            "eval_linear_top1": 0.95,
                                            "eval_linear_top1_random_init": 0.9,
                                            "eval_nmi": 0.7, "eval_ari": 0.4})
    _print_sweep(outcome, spec)
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.strip().startswith("trial"))
    assert out[header].split() == ["trial", "swav.epsilon", "knn_top1", "epochs", "status"]
    assert out[header + 1].split() == ["*", "aaaaa_00000", "0.03", "0.9100", "12/12", "finished"]
    assert out[header + 2].split() == ["aaaaa_00001", "0.05", "0.8500", "3/12", "stopped"]
    assert out[header + 3].split() == ["aaaaa_00002", "0.04", "-", "0/12", "error"]
    assert out[header + 4] == "trial aaaaa_00002 failed: data: 3 of 256 images failed to decode"
    assert any(line.startswith("best: trial aaaaa_00000 (MLflow run r0), knn_top1 0.9100")
               for line in out)
    assert "best trial evaluation (held-out): kNN top-1 0.920 (random init 0.900), linear " \
           "top-1 0.950 (random init 0.900), NMI 0.700, ARI 0.400" in out
    assert "MLflow parent run id: p1" in out




def test_print_config_prints_every_key_as_a_file_train_takes_and_trains_nothing(
        capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a run would put its mlflow.db and runs/
    assert main(["train", "cifar10_wallclock", "optim.lr=1.2", "data.path=/tmp",
                 "--print-config"]) == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    assert printed["optim"]["lr"] == 1.2 and printed["model"]["backbone"] == "resnet18"
    assert printed["model"]["cudnn_benchmark"] is True  # defaults included, not only the file's
    (tmp_path / "resolved.yaml").write_text(text)
    again = load_experiment(str(tmp_path / "resolved.yaml"), [])
    assert again == load_experiment("cifar10_wallclock", ["optim.lr=1.2", "data.path=/tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resolved.yaml"]  # nothing else


def test_print_config_refuses_bad_input_like_train(capsys):
    assert main(["train", "optim.lr=-1", "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == "swav-ray: error: optim.lr: must be > 0, got -1.0"


def test_a_sweep_whose_trials_need_more_cpus_than_the_machine_is_refused_like_train(
        capsys, tmp_path, monkeypatch):
    """Without RAY_ADDRESS a sweep starts Ray here: a trial (the largest the search makes) with
    more workers than the machine's CPUs is refused before Ray starts, as `train` refuses it
    (it ran oversubscribed)."""
    import os

    from orchestration import cli

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a sweep it should refuse")

    monkeypatch.setattr(cli, "connect_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    cpus = os.cpu_count()
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "experiment": "default", "overrides": {"scaling.storage_path": str(tmp_path / "runs")},
        "search": {"scaling.num_workers": {"grid": [1, cpus + 1]}}}))
    assert main(["tune", str(sweep)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"swav-ray: error: scaling.num_workers: {cpus + 1} workers x 1 CPU need {cpus + 1} "
        f"CPUs, this machine has {cpus} (set RAY_ADDRESS to train on a cluster)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


def test_a_ray_address_nothing_answers_at_is_one_line_at_once(tmp_path, monkeypatch, capsys):
    """``ray.init`` would retry it for minutes; the run says so before Ray starts."""
    import socket
    import time

    import ray

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{free.getsockname()[1]}"  # closed again: nothing listens
    monkeypatch.setenv("RAY_ADDRESS", address)
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    assert main(["train", "optim.epochs=1"]) == 2
    assert time.monotonic() - started < 60 and not ray.is_initialized()
    assert capsys.readouterr().err.strip() == (
        f"swav-ray: error: RAY_ADDRESS: no Ray cluster answers at {address} (start its head with "
        "`ray start --head`, or unset RAY_ADDRESS to train on this machine alone)")


def test_a_cluster_on_loopback_only_is_joined_on_loopback(monkeypatch):
    """Ray rewrites a loopback RAY_ADDRESS to the machine's own address; a head that listens on
    127.0.0.1 alone is then never reached. Where it answers on 127.0.0.1 and not on the
    machine's address, Ray is told to keep loopback (before it is imported)."""
    import socket

    from orchestration.cli import _own_address, loopback_only

    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{head.getsockname()[1]}")
        monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
        loopback_only()
        expected = "0" if _own_address() != "127.0.0.1" else None
        assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == expected
    with socket.socket() as head:  # a head on every interface: Ray's own rewrite reaches it
        head.bind(("0.0.0.0", 0))
        head.listen()
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{head.getsockname()[1]}")
        monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
        loopback_only()
        assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
