"""User-facing errors: each becomes one line on stderr and a non-zero exit code."""


class UserError(Exception):
    """Bad input from the user (config, method id, out dir): exit code 2."""

    exit_code = 2
