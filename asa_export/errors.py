"""The one user-facing error type: the CLI prints its message and exits 1, without a traceback."""


class AsaExportError(Exception):
    """A problem with the user's input or environment, with an actionable message."""
