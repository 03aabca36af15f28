"""Model math: load and run spans of decoder blocks and the client's own pieces of a checkpoint.

The names below are imported on first use: a process that needs only a light part of this package (a command
explaining its error with shards.errors, whatever the command) does not pay for transformers' modelling code (2-3 s
of CPU; the DHT paid it at every start while the client's event loop imported shards.openmp)."""
from importlib import import_module

_HOMES = {"BlockSpan": "span", "Checkpoint": "checkpoint", "ClientModules": "client_modules",
          "FAMILIES": "families", "get_family": "families", "DTYPES": "precision", "QUANTS": "precision",
          **{name: "errors" for name in ("ShardsError", "CheckpointNotFoundError", "MissingWeightsError",
                                         "SpanOutOfRangeError", "UnknownFamilyError", "UnsupportedPrecisionError")}}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'shards' has no attribute {name!r}")
    value = getattr(import_module(f"shards.{_HOMES[name]}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value
