"""Model math: load and run spans of decoder blocks and the client's own pieces of a checkpoint."""
from shards.checkpoint import Checkpoint
from shards.client_modules import ClientModules
from shards.errors import (CheckpointNotFoundError, MissingWeightsError, ShardsError, SpanOutOfRangeError, UnknownFamilyError,
                           UnsupportedPrecisionError)
from shards.families import FAMILIES, get_family
from shards.precision import DTYPES, QUANTS
from shards.span import BlockSpan

__all__ = ["BlockSpan", "Checkpoint", "ClientModules", "FAMILIES", "get_family", "DTYPES", "QUANTS",
           "ShardsError", "CheckpointNotFoundError", "MissingWeightsError", "SpanOutOfRangeError", "UnknownFamilyError",
           "UnsupportedPrecisionError"]
