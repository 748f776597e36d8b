"""posezoo: animal pose estimation from a model zoo, with ONNX Runtime.

Quick use::

    import posezoo
    predictor = posezoo.load("posezoo_mouse")               # or "default", "mouse", a card.yaml ...
    table = predictor.predict_video("video.mp4")            # PoseTable
    table.save("out/", formats=["h5", "csv"])               # DeepLabCut-compatible
    df = table.to_dataframe()
"""

from .cards import ModelCard
from .errors import (
    ArtefactNotPublishedError,
    ChecksumMismatchError,
    InputError,
    ModelNotCachedError,
    PosezooError,
    PrecisionError,
    TruncatedVideoError,
    UnknownModelError,
    UnsafeFileError,
    VideoError,
    ZooError,
)
from .predictor import DEFAULT_MODEL, PosePredictor, load
from .table import PoseTable
from .zoo import ResolvedModel, Zoo

__version__ = "0.1.0"

__all__ = [
    "ArtefactNotPublishedError",
    "ChecksumMismatchError",
    "DEFAULT_MODEL",
    "InputError",
    "ModelCard",
    "ModelNotCachedError",
    "PosePredictor",
    "PoseTable",
    "PosezooError",
    "PrecisionError",
    "ResolvedModel",
    "TruncatedVideoError",
    "UnknownModelError",
    "UnsafeFileError",
    "VideoError",
    "Zoo",
    "ZooError",
    "load",
]
