"""User-facing errors.

Anything a user can cause (a missing file, a malformed dataset, an unknown method) raises
``TernlmError`` with a one-line message; the CLI prints it and exits non-zero without a traceback.
"""


class TernlmError(Exception):
    """An error caused by input the user can fix. The message is one line."""
