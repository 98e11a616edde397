"""The one exception type the CLI turns into `error: ...` and a non-zero exit."""


class DataToolsError(Exception):
    """Bad input or configuration; the message names the file, line or key."""
