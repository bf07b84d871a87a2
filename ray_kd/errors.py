"""The base of every error a user can fix: the CLI prints its one-line message and exits 2."""


def first_line(err: BaseException) -> str:
    """An exception's first line, at most 200 characters (its type's name when it has no message), for one-line
    errors that quote a library's."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


class UserError(Exception):
    """Bad input or environment, reported as one line that names the problem and the fix."""
