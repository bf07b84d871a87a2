"""Why a role worker's process died, in one line a user can act on.

Ray reports a dead actor as "died unexpectedly" plus generic guesses (OOM killer, `ray stop`, a segfault). The
worker's own stderr, which Ray keeps in `<session>/logs/worker-<id>-<job>-<pid>.err` on its node, usually says
which: a C++ exception's `what()`, a `Fatal Python error`, the signal it received. A process killed with SIGKILL
(the kernel's OOM killer) writes nothing, and Ray's memory monitor names itself in the error.
"""

from __future__ import annotations

import re
from pathlib import Path

CLUES = (re.compile(r"what\(\):\s*(.+)"), re.compile(r"(Fatal Python error: .+)"),
         re.compile(r"\*\*\* (SIG[A-Z]+) received"), re.compile(r"^(\w*(?:Error|Exception): .+)"))
"""What a worker's stderr says of its end, most telling first."""


def worker_pid(error_text: str) -> int | None:
    found = re.search(r"\bpid: (\d+)", error_text)
    return int(found.group(1)) if found else None


def worker_log(logs_dir: Path | None, pid: int | None) -> Path | None:
    """The dead worker's stderr file, when its node's logs are on this machine."""
    if logs_dir is None or pid is None:
        return None
    return next(iter(sorted(Path(logs_dir).glob(f"worker-*-{pid}.err"))), None)


def last_clue(log: Path, tail_bytes: int = 64_000) -> str | None:
    """The most telling line near the end of a worker's stderr, or None."""
    with open(log, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - tail_bytes))
        lines = f.read().decode(errors="replace").splitlines()
    for pattern in CLUES:
        for line in reversed(lines):
            found = pattern.search(line.strip())
            if found:
                return found.group(1).strip()[:300]
    return None


def death_cause(error_text: str, logs_dir: Path | None) -> str:
    """One line: what killed the worker, as far as its log and Ray's verdict say."""
    pid = worker_pid(error_text)
    if "low on memory" in error_text or "OutOfMemoryError" in error_text:
        return f"Ray's memory monitor killed worker pid {pid}: the node ran low on memory"
    log = worker_log(logs_dir, pid)
    clue = last_clue(log) if log is not None else None
    if clue:
        return f"{clue} (worker pid {pid}; its log: {log})"
    if log is not None:
        return (f"worker pid {pid} ended without a word (killed by a signal, e.g. the kernel's OOM killer: see "
                f"`dmesg`; its log: {log})")
    return f"worker pid {pid} died; its log (worker-*-{pid}.err in Ray's session logs on its node) says why"
