"""The one exception type a user can cause; the CLI prints its message and exits non-zero."""


class CwaError(Exception):
    """A problem with the user's input or environment, stated in one sentence."""
