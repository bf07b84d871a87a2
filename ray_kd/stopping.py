"""Ctrl-C and SIGTERM on the driver: a clean stop, one line saying where the run stopped and how to resume.

SIGTERM is turned into `Terminated` (a KeyboardInterrupt) so both signals unwind the same way:
the MLflow run is marked KILLED, and the CLI prints the stop line and exits 128 + the signal.
Ray installs its own SIGTERM handler (a C++ stack dump) in `ray.init`, so ours goes in after.
"""

from __future__ import annotations

import signal


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


class RunStopped(Exception):
    """The run was stopped by a signal; `str()` is the line to print, `exit_code` 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def _raise_terminated(signum, frame):
    raise Terminated()


def install_handlers() -> None:
    """SIGTERM -> Terminated, SIGINT -> KeyboardInterrupt (Python's default, restored if Ray replaced it)."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def signal_of(err: KeyboardInterrupt) -> int:
    return signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
