"""Errors every layer can raise."""


class DataError(ValueError):
    """Bad input data: the message names the file (and line, where there is one) or the config key."""
