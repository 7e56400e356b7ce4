"""User-facing errors. The CLI prints these as one line and exits with status 2, without a traceback."""


class LamraError(Exception):
    """Bad input or configuration: the message names the file, key or value at fault."""


class BadSampleError(LamraError):
    """A training or evaluation sample that cannot be used; the message names the shard and the sample key."""
