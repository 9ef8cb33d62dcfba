"""Exceptions that callers (the CLI, the gRPC service) map to messages and status codes.

Every error a user can cause is one of these, so the service can answer INVALID_ARGUMENT with
the message instead of an internal error, and the CLI can print it and exit non-zero.
"""


class MetaPruneError(Exception):
    """Base class of every error MetaPrune raises on purpose."""


class UnsupportedModelError(MetaPruneError, ValueError):
    """The model holds an operator the graph converter or the pruner cannot represent.

    The message names the operator and where it sits (module path or graph node).
    """


class ModelFormatError(MetaPruneError, ValueError):
    """A model file is malformed, unsafe (e.g. carries pickled code), or inconsistent."""


class DatasetUnavailableError(MetaPruneError, FileNotFoundError):
    """A dataset is not in the cache; the message says how to provide it."""


class InvalidTargetError(MetaPruneError, ValueError):
    """A pruning target (speed-up, params ratio, policy) is malformed or cannot be reached."""


class MissingDataError(MetaPruneError):
    """The request is well-formed but its choices need data that was not given (the
    metanetwork path, a gradient criterion); the service answers FAILED_PRECONDITION."""
