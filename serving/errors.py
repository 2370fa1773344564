"""What can go wrong when serving, as exception types.

The HTTP app maps each type to a status code (`serving.http.STATUS`) and the CLI to an exit
code, so the library raises plain exceptions and never knows how it is being called.
"""
from __future__ import annotations


class ExportError(RuntimeError):
    """An export directory that is missing, incomplete, tampered with or not loadable."""


class IndexFileError(ExportError):
    """A search index that is missing, truncated, corrupt or made with another export's backbone and head."""


class SetupError(RuntimeError):
    """A server that cannot start as configured (an empty or unreadable token, two exports of one run)."""


class InputError(ValueError):
    """A request that cannot be answered as asked: the message says what was seen and what is expected."""


class UnknownClassError(InputError):
    """A class id outside the model's range."""


class UnknownRunError(InputError):
    """A run name that the server does not serve."""


class DecodeError(InputError):
    """Bytes that are not a PNG, JPEG or .npy file, or a corrupt one."""


class ImageShapeError(InputError):
    """Images of the wrong size, channel count, layout or dtype."""


class BatchSizeError(InputError):
    """A batch without images (or, as BatchTooLargeError, with too many)."""


class BatchTooLargeError(BatchSizeError):
    """More images than `serving.max_batch`."""


class NonFiniteLogitError(InputError):
    """Input that is finite but overflows inside the network: its logit is inf or NaN, which no
    threshold can decide on (a silent "no" would be a wrong answer)."""


class ThresholdError(InputError):
    """A recall target without calibrated thresholds, or a class whose threshold is undefined."""
