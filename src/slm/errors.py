"""The one exception type for errors a user can cause.

Anything raised as `SlmError` is printed by the CLI as a single line
(`slm: error: ...`) with exit code 2, no traceback. The message must name
what is wrong and where (file, field, tensor, value).
"""


class SlmError(Exception):
    """A user-facing error: bad input, missing file, mismatched shapes, bad parameter."""
