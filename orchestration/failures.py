"""Which training failures a retry can cure, and the one line that names a failure's cause.

A worker that dies (killed, out of memory, a lost node) or a collective that breaks with it may
succeed on the next attempt from the last checkpoint. A bad config, data that do not fit the
schema, an unreadable checkpoint or a full disk fail the same way every time: the worker raises
:class:`NotRetryable` and the driver stops at once, with that cause as its last line.
"""

from __future__ import annotations

import errno

from orchestration.checkpoints import CheckpointError
from orchestration.config import ConfigError

__all__ = ["NotRetryable", "TrainingFailed", "as_not_retryable", "cause_of", "storage_unreachable"]

# Errors of the input (config, data, checkpoints): exit 2, like bad input found before Ray.
BAD_INPUT = (ConfigError, CheckpointError, ValueError, TypeError)
# Storage that cannot take the run's files: the same on every attempt, not the input's fault.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class NotRetryable(RuntimeError):
    """A worker error that fails the same way on every attempt; ``bad_input``: the config's or the
    data's fault (the CLI exits 2), else the machine's (a full disk: exit 1)."""

    def __init__(self, message: str, bad_input: bool = True) -> None:
        super().__init__(message)
        self.bad_input = bad_input

    def __reduce__(self):  # crosses process boundaries with its flag
        return (self.__class__, (str(self), self.bad_input))


def as_not_retryable(err: BaseException) -> NotRetryable | None:
    """``err`` as a :class:`NotRetryable` when it cannot succeed on a retry, else None."""
    if isinstance(err, NotRetryable):
        return err
    if isinstance(err, BAD_INPUT):
        return NotRetryable(first_line(err), bad_input=True)
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        return NotRetryable(first_line(err), bad_input=False)
    return None


def first_line(err: BaseException) -> str:
    """The error's first line; a line that only introduces the next (``...error:``) is joined
    with it, so the cause is not cut off."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def _chain(err: BaseException):
    """``err``, then what it wraps: ``__cause__``/``__context__`` and Ray's ``cause``."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__


def cause_of(failure: BaseException) -> tuple[str, NotRetryable | None]:
    """The line naming why training failed, and the :class:`NotRetryable` behind it if any.

    For Ray Train's ``WorkerGroupError`` the workers' own errors are read (lowest rank first),
    and a :class:`NotRetryable` on any rank wins over the collateral errors of the others.
    """
    worker_failures = getattr(failure, "worker_failures", None) or {}
    errors = [worker_failures[rank] for rank in sorted(worker_failures)] or [failure]
    for err in errors:
        for inner in _chain(err):
            if isinstance(inner, NotRetryable):
                return first_line(inner), inner
    rank = min(worker_failures) if worker_failures else None
    where = f"rank {rank}: " if rank is not None else ""
    inner = list(_chain(errors[0]))[-1]
    return f"{where}{type(inner).__name__}: {first_line(inner)}", None


def storage_unreachable(failure: BaseException) -> str | None:
    """The line naming why, when Ray Train's controller failed because the run's storage did not
    take a write (pyarrow's ``OSError``: a refused connection, a timeout); a full or read-only
    disk is not that (it fails the same way on a retry). None otherwise."""
    controller = getattr(failure, "controller_failure", None)
    for inner in _chain(controller):
        if isinstance(inner, OSError) and inner.errno not in STORAGE_ERRNOS:
            return first_line(inner)
    return None


class TrainingFailed(RuntimeError):
    """Training stopped for good after ``attempts`` attempts; ``cause``: the line naming why.
    ``run_dir``: the run's checkpoint folder, ``None`` when it holds no checkpoint to resume."""

    def __init__(self, cause: str, not_retryable: NotRetryable | None, attempts: int,
                 run_dir: str | None) -> None:
        super().__init__(cause)
        self.cause, self.attempts, self.run_dir = cause, attempts, run_dir
        self.not_retryable = not_retryable

    @property
    def bad_input(self) -> bool:
        return self.not_retryable is not None and self.not_retryable.bad_input

    def __reduce__(self):  # a Tune trial's error is copied and pickled: keep every field
        return (self.__class__, (self.cause, self.not_retryable, self.attempts, self.run_dir))
