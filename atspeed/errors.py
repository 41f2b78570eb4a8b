"""Errors every layer can raise."""

# the exit status of a run stopped by SIGTERM (128 + the signal), what schedulers read as a failure to requeue
SIGTERM_EXIT = 128 + 15


class DataError(ValueError):
    """Bad input data: the message names the file (and line, where there is one) or the config key."""
