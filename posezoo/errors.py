"""Exception classes a user can catch.

Every error posezoo raises on purpose derives from :class:`PosezooError`, and its
message is one line a user can act on (the CLI prints it as is, without a traceback).
"""

from __future__ import annotations


class PosezooError(Exception):
    """Base class of all posezoo errors."""


# -- zoo ---------------------------------------------------------------------------------
class ZooError(PosezooError):
    """A model could not be resolved to a verified local file."""


class UnknownModelError(ZooError, KeyError):
    """No card in the catalog has this name (or version)."""

    def __init__(self, message: str, suggestions: list[str] | None = None):
        super().__init__(message)
        self.suggestions = suggestions or []

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ArtefactNotPublishedError(ZooError):
    """The card exists but its ONNX artefact has not been converted/published yet."""


class ModelNotCachedError(ZooError):
    """Offline (or the store is unreachable) and the artefact is not in the local cache."""


class ChecksumMismatchError(ZooError):
    """The artefact's sha256 differs from the card's: it is refused."""


class InvalidCardError(ZooError, ValueError):
    """A model card file does not validate."""


# -- inputs ------------------------------------------------------------------------------
class VideoError(PosezooError):
    """A video cannot be read (missing, empty, not a video, no video stream)."""


class TruncatedVideoError(VideoError):
    """Decoding stopped early; ``frames_read`` frames were decoded before the damage."""

    def __init__(self, message: str, frames_read: int):
        super().__init__(message)
        self.frames_read = frames_read


class InputError(PosezooError, ValueError):
    """An argument or array has the wrong shape, type or value."""


class PrecisionError(ZooError, InputError):
    """An unknown precision, or a model with no variant of the precision asked for (the
    message names the model and the precisions it has)."""


class UnsafeFileError(InputError):
    """A file holds something that would run code when read (e.g. a pickled Python object in
    an h5 table): it is refused, and nothing in it was executed."""
