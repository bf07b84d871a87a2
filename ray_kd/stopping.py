"""Ctrl-C and SIGTERM on the driver: a clean stop, one line saying where the run stopped and how to resume.

SIGTERM is turned into `Terminated` (a KeyboardInterrupt) so both signals unwind the same way:
the MLflow run is marked KILLED, and the CLI prints the stop line and exits 128 + the signal.
Ray installs its own SIGTERM handler in `ray.init` (`ray_executor.connect` puts ours back). Ray also
turns an exception a handler raises inside its blocking calls (`ray.get`, `ray.wait`, where a Ray run's
driver spends its time) into a plain KeyboardInterrupt, so `signal_of` goes by the signal the handler
last raised, not by the exception's type alone.

A signal that arrives inside `held()` (a checkpoint being written, an MLflow write) is raised when
the block ends: cut halfway, SQLAlchemy's session is left half-flushed (its clean-up then prints
tracebacks) and the epoch's metrics half-logged. A second signal inside the block raises at once,
so a stuck write (an unreachable store retrying) can still be interrupted.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


class RunStopped(Exception):
    """The run was stopped by a signal; `str()` is the line to print, `exit_code` 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


_depth = 0  # how many `held()` blocks the main thread is inside
_pending: int | None = None  # the signal that arrived inside one
_raised: int | None = None  # the stop signal the handler last raised


def _interrupt(signum: int) -> None:
    global _raised
    _raised = signum
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _on_signal(signum, frame):
    global _pending
    if _depth and _pending is None:
        _pending = signum
        return
    _pending = None
    _interrupt(signum)


def install_handlers() -> None:
    """SIGTERM -> Terminated, SIGINT -> KeyboardInterrupt, both held inside `held()` (replacing Ray's)."""
    global _raised
    _raised = None
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


@contextmanager
def held():
    """Finish this block before a stop signal is raised (main thread only: signals are handled there)."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    except BaseException:
        _pending = None  # the block's own error (or a forced stop) is what unwinds
        raise
    finally:
        _depth -= 1
    if not _depth and _pending is not None:
        signum, _pending = _pending, None
        _interrupt(signum)


def signal_of(err: KeyboardInterrupt) -> int:
    """The signal that stopped the run: a Terminated's SIGTERM, else the one the handler last raised (Ray
    re-raises a Terminated caught in its calls as a plain KeyboardInterrupt), else Ctrl-C's SIGINT."""
    return signal.SIGTERM if isinstance(err, Terminated) else _raised or signal.SIGINT
