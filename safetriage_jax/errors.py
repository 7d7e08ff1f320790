"""The one exception type for problems a user can cause and fix."""


class SafeTriageError(Exception):
    """A user-facing error: its message says what is wrong and how to fix it.

    The CLI prints the message alone (no traceback); library callers can catch it.
    """
