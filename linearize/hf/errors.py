"""The one exception type for mistakes a user can fix.

It lives in `hf/` because saved checkpoints carry these files as remote code and must raise it too.
The message is one line: what is wrong, then what to do.
"""


class LinearizeError(ValueError):
    """A user-fixable problem; the CLI prints its message as one line instead of a traceback."""
