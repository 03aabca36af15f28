"""Errors a user of shards can act on: each message says what went wrong and what to do next."""


class ShardsError(Exception):
    """Base class of every error raised by shards."""


class UnknownFamilyError(ShardsError):
    pass


class SpanOutOfRangeError(ShardsError, ValueError):
    pass


class MissingWeightsError(ShardsError, FileNotFoundError):
    pass


class UnsupportedPrecisionError(ShardsError):
    """A dtype or quantization that this device (or this install) cannot run."""


class CheckpointNotFoundError(MissingWeightsError):
    """The path or repo id names no checkpoint at all."""


class HubUnreachableError(MissingWeightsError):
    """A repo id whose files are not in the local hub cache, on a machine that cannot reach the hub."""
