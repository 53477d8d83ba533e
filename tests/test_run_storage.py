"""The run's storage seen from the driver: a storage that does not answer is recognised, waited
for, and found again when it comes back (a real S3 server on 127.0.0.1 that starts late). A
probe of a port nothing listens on takes ~6 s: pyarrow's S3 client retries a refused connection."""

from __future__ import annotations

import errno
import threading

import pyarrow.fs as pafs
import pytest
from ray.train import ControllerError, WorkerGroupError

from conftest import S3_CLIENT, local_cluster
from orchestration import run_storage
from orchestration.failures import storage_unreachable


@pytest.fixture
def nothing_at(monkeypatch) -> int:
    """A free port of 127.0.0.1 that S3 clients are pointed at, nothing listening there yet."""
    port = local_cluster.free_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", **S3_CLIENT}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(run_storage, "PROBE_EVERY_S", 0.2)
    return port


def _refused(port: int) -> OSError:
    fs = pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}", access_key="a",
                           secret_key="b")
    with pytest.raises(OSError) as caught:
        fs.get_file_info(pafs.FileSelector("bucket/runs", allow_not_found=True))
    return caught.value


def test_a_controller_that_could_not_write_to_the_storage_is_told_apart(nothing_at):
    refused = _refused(nothing_at)
    assert "Could not connect" in storage_unreachable(ControllerError(refused))
    full = OSError(errno.ENOSPC, "No space left on device")  # fails the same way on a retry
    assert storage_unreachable(ControllerError(full)) is None
    assert storage_unreachable(WorkerGroupError("rank 0 died", {0: refused})) is None
    assert storage_unreachable(ControllerError(RuntimeError("a bug"))) is None


def test_a_storage_that_does_not_answer_is_waited_for_a_limited_time(nothing_at, capsys,
                                                                     tmp_path):
    assert run_storage.answers(str(tmp_path / "runs"))
    assert not run_storage.wait_until_it_answers("s3://bucket/runs/r", "refused", limit_s=1)
    err = capsys.readouterr().err.splitlines()
    assert err == ["swav-ray: the run's storage s3://bucket/runs/r does not answer (refused); "
                   "waiting up to 0 min for it"]
    assert run_storage.has_checkpoints("s3://bucket/runs/r")  # cannot look: say where they'd be


def test_a_storage_that_comes_back_is_found_and_its_checkpoints_seen(nothing_at, tmp_path):
    started, done = threading.Event(), threading.Event()

    def serve_late():
        with local_cluster.s3_server(tmp_path, port=nothing_at) as endpoint:
            fs = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
            fs.create_dir("bucket/runs/r/checkpoint_epoch000003")
            fs.open_output_stream("bucket/runs/r/checkpoint_epoch000003/state.pt").close()
            started.set()
            done.wait(120)

    server = threading.Thread(target=serve_late, daemon=True)
    server.start()
    try:
        assert run_storage.wait_until_it_answers("s3://bucket/runs/r", "refused", limit_s=120)
        started.wait(30)
        assert run_storage.has_checkpoints("s3://bucket/runs/r")
        assert not run_storage.has_checkpoints("s3://bucket/runs/other")
    finally:
        done.set()
        server.join(60)
