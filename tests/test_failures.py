"""Tests for orchestration.failures and the driver's retry loop: which errors are retried, which
line names the cause, and what the CLI prints last."""

from __future__ import annotations

import errno
import pickle

import pytest
import ray.train

from orchestration.checkpoints import CheckpointError
from orchestration.cli import _failure_report
from orchestration.config import ConfigError
from orchestration.failures import NotRetryable, TrainingFailed, as_not_retryable, cause_of
from orchestration.train import _fit


@pytest.mark.parametrize("err, bad_input", [
    (ConfigError("optim.lr: must be > 0"), True),
    (CheckpointError("state.pt: truncated"), True),
    (ValueError("data.image_column: 'image' not in x.parquet"), True),
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (PermissionError(errno.EACCES, "Permission denied"), False),
])
def test_errors_that_fail_the_same_way_every_time_are_not_retryable(err, bad_input):
    fatal = as_not_retryable(err)
    assert isinstance(fatal, NotRetryable) and fatal.bad_input is bad_input
    assert str(fatal) == str(err).splitlines()[0]
    copy = pickle.loads(pickle.dumps(fatal))  # as it crosses from a worker to the driver
    assert str(copy) == str(fatal) and copy.bad_input is bad_input


@pytest.mark.parametrize("err", [RuntimeError("NCCL error: unhandled system error"),
                                 OSError(errno.ECONNRESET, "Connection reset by peer"),
                                 MemoryError()])
def test_errors_a_retry_may_cure_stay_retryable(err):
    assert as_not_retryable(err) is None


def test_the_cause_is_the_not_retryable_error_of_any_rank_over_collateral_ones():
    failure = ray.train.WorkerGroupError("...", {
        0: RuntimeError("gloo: Connection closed by peer\ntraceback ..."),
        1: NotRetryable("data.label_column: 'label' has 3 missing labels")})
    cause, fatal = cause_of(failure)
    assert cause == "data.label_column: 'label' has 3 missing labels" and fatal is not None
    cause, fatal = cause_of(ray.train.WorkerGroupError("...", {
        1: RuntimeError("boom\nmore"), 0: ValueError("first rank's")}))
    assert (cause, fatal) == ("rank 0: ValueError: first rank's", None)


class _Trainer:
    """A trainer whose fit raises the next of ``outcomes`` (or returns it)."""

    def __init__(self, outcomes: list) -> None:
        self.outcomes, self.fits = outcomes, 0

    def make(self) -> _Trainer:
        return self

    def fit(self):
        self.fits += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def _worker_error(err: Exception) -> ray.train.WorkerGroupError:
    return ray.train.WorkerGroupError(str(err), {0: err})


def test_fit_retries_worker_failures_up_to_max_failures_then_names_the_cause(tmp_path, capsys):
    died = _worker_error(RuntimeError("worker died"))
    trainer = _Trainer([died, died, "result"])
    assert _fit(trainer.make, 2, str(tmp_path)) == "result" and trainer.fits == 3
    assert capsys.readouterr().err.count("resuming from the last checkpoint") == 2

    trainer = _Trainer([died, died, died])
    (tmp_path / "checkpoint_epoch000001").mkdir()
    with pytest.raises(TrainingFailed) as err:
        _fit(trainer.make, 2, str(tmp_path))
    assert trainer.fits == 3 and err.value.attempts == 3
    assert err.value.cause == "rank 0: RuntimeError: worker died"
    assert err.value.run_dir == str(tmp_path) and not err.value.bad_input


def test_fit_does_not_retry_what_fails_the_same_way(tmp_path):
    trainer = _Trainer([_worker_error(NotRetryable("data.image_column: 'image' not in x")),
                        "never reached"])
    with pytest.raises(TrainingFailed) as err:
        _fit(trainer.make, 5, str(tmp_path / "run"))
    assert trainer.fits == 1 and err.value.bad_input and err.value.run_dir is None


def test_the_cli_report_ends_with_the_cause_and_offers_a_resume_only_with_checkpoints():
    fatal = NotRetryable("data: 7 of 64 images failed to decode")
    lines = _failure_report(TrainingFailed(fatal.args[0], fatal, 1, None)).splitlines()
    assert lines == [
        "swav-ray: the MLflow run is marked FAILED; it wrote no checkpoint",
        "swav-ray: error: training failed (not retried: it fails the same way on every "
        "attempt): data: 7 of 64 images failed to decode"]
    lines = _failure_report(TrainingFailed("rank 1: RuntimeError: worker died", None, 3,
                                           "/r/runs/exp-1")).splitlines()
    assert lines == [
        "swav-ray: the MLflow run is marked FAILED after 3 attempts; its checkpoints are kept "
        "under /r/runs/exp-1; once the cause is fixed, run again with scaling.run_name=exp-1 "
        "to resume",
        "swav-ray: error: training failed: rank 1: RuntimeError: worker died"]


def test_a_training_failure_survives_copy_and_pickle_with_its_fields():
    """Ray Tune copies a trial's error (``copy.copy``) and pickles it to the driver: a failure
    that cannot be rebuilt from its args turns into a TypeError about its constructor."""
    import copy

    fatal = NotRetryable("data: 1 of 256 images failed to decode", bad_input=True)
    failed = TrainingFailed("data: 1 of 256 images failed to decode", fatal, 1, "/runs/a")
    for again in (copy.copy(failed), pickle.loads(pickle.dumps(failed))):
        assert (again.cause, again.attempts, again.run_dir, again.bad_input, str(again)) == (
            failed.cause, 1, "/runs/a", True, str(failed))


def test_a_cause_whose_first_line_only_introduces_it_is_not_cut_off():
    """Ray's controller error puts its cause on the line after "...controller error:"; the one
    line keeps both (the console's last line was "training failed: ControllerError: Training
    failed due to controller error:")."""
    class ControllerError(RuntimeError):
        pass

    err = ControllerError("Training failed due to controller error:\n"
                          "Path not found: /runs/x/checkpoint_epoch000005\n  at somewhere")
    assert cause_of(err) == ("ControllerError: Training failed due to controller error: Path "
                             "not found: /runs/x/checkpoint_epoch000005", None)
    assert cause_of(ValueError("data: bad\nmore"))[0] == "ValueError: data: bad"
