"""User-facing errors.

A :class:`MoelangError` is a problem with the user's input (config, files, languages) that the
user can fix. The CLI prints it as one line, naming the problem and the fix, with no traceback.
Anything else is a bug and keeps its traceback.
"""


class MoelangError(Exception):
    """Bad input: printed as one line by the CLI (``moelang: error: ...``)."""


class ConfigError(MoelangError):
    """A config key is missing, has the wrong type or an impossible value."""
