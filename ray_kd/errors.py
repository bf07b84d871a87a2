"""The base of every error a user can fix: the CLI prints its one-line message and exits 2."""

import errno
import os


def first_line(err: BaseException) -> str:
    """An exception's first line, at most 200 characters (its type's name when it has no message), for one-line
    errors that quote a library's."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


class UserError(Exception):
    """Bad input or environment, reported as one line that names the problem and the fix."""


class DiskFullError(UserError, RuntimeError):
    """A disk the run writes ran out of space (ENOSPC) mid-run."""


def causes(err: BaseException):
    """`err` and every exception in its chain: its causes and contexts, and a Ray task error's worker exception
    (`.cause`)."""
    seen, todo = set(), [err]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]


def cause_of(err: BaseException, kind: type) -> BaseException | None:
    """The first exception of type `kind` in `err`'s chain (see `causes`); None when there is none."""
    return next((e for e in causes(err) if isinstance(e, kind)), None)


def disk_full(err: BaseException, where: str) -> DiskFullError | None:
    """The one line for a run that stopped on a full disk (ENOSPC anywhere in `err`'s chain, a worker's included),
    naming the file when the error does, else the run folder `where`; None for any other error."""
    full = next((e for e in causes(err) if isinstance(e, OSError) and e.errno == errno.ENOSPC), None)
    if full is None:
        return None
    return DiskFullError(f"the disk is full ({os.strerror(errno.ENOSPC)}, ENOSPC) writing "
                         f"{full.filename or 'the run folder ' + where}; free space on it (or point output_dir at "
                         "another disk) and run the same command to resume from the last checkpoint")
