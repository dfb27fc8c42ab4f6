"""Errors that mean "the user gave us something wrong", as opposed to bugs.

The CLI turns every `LoryError` into a one-line message and a non-zero exit code, never a
traceback. `lorytrain` derives its own errors from `LoryError` too.
"""


class LoryError(Exception):
    """Base class of every user-facing error of lory."""


class LoryDataError(LoryError):
    """Bad input to the data half: wrong paths, bad options, broken or mismatched files."""


class InputNotFoundError(LoryDataError):
    """An input path or glob matched nothing."""


class ShardError(LoryDataError):
    """A shard folder is missing, corrupted, truncated or does not match its manifest."""


class MismatchError(LoryDataError):
    """Shards were made with another tokenizer or sequence length than the consumer expects."""
