"""Errors of the training half that mean "the user asked for something that cannot work".

They derive from `lorydata.errors.LoryError`, so the CLI reports them as one line and a
non-zero exit code, never a traceback.
"""

from lorydata.errors import LoryError


class LoryTrainError(LoryError):
    """Bad model or training configuration: unknown preset or key, incompatible options."""
