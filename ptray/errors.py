"""The one exception type for a user's mistake: the CLIs print its message in one line and exit 2."""


class PtrayError(ValueError):
    """A problem with the user's input or environment, stated with how to fix it."""
