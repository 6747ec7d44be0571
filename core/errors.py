"""User-facing error types.

Every error the engine raises on purpose derives from :class:`EnergyLensError` and carries a
message written for the person using the dashboard or CLI: what went wrong and, where possible,
what to do about it. The dashboard shows ``str(err)`` and never a traceback.
"""


class EnergyLensError(Exception):
    """Base class for errors whose message is meant for the user."""


class InputError(EnergyLensError, ValueError):
    """A parameter or tensor given by the user is invalid (shape, range, NaN, ...)."""


class DataError(EnergyLensError):
    """A dataset is missing, malformed or cannot be downloaded."""


class CheckpointError(EnergyLensError):
    """A checkpoint file is missing, corrupt, unsafe or does not match the model."""


class ZooError(EnergyLensError):
    """A RobustBench zoo model is unknown, not downloaded, or failed to load."""


class JobError(EnergyLensError):
    """A background job could not be launched, found or controlled."""


class Cancelled(EnergyLensError):
    """The user cancelled the work (a background task's Cancel button, a stop request)."""
