"""The one exception type for errors a user can cause.

Anything raised as `SlmError` is printed by the CLI as a single line
(`slm: error: ...`) with exit code 2, no traceback. The message must name
what is wrong and where (file, field, tensor, value).
"""


class SlmError(Exception):
    """A user-facing error: bad input, missing file, mismatched shapes, bad parameter."""


class UnsupportedModel(SlmError):
    """A well-formed model config that slm's decoder does not implement (another architecture, or
    an option such as rope scaling): `transformers` may still run it (`slm.load.is_transformers_dir`),
    unlike a config with invalid values, which is plain bad input."""
