"""The base of every error a user can fix: the CLI prints its one-line message and exits 2."""


class UserError(Exception):
    """Bad input or environment, reported as one line that names the problem and the fix."""
