"""Training posezoo models from DeepLabCut labelled frames (needs ``posezoo[train]``).

The package imports PyTorch; the rest of posezoo never imports it, so inference stays
torch-free. Entry point: :func:`train_model` (what ``posezoo train`` runs).
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised without torch only
    from ..errors import PosezooError

    raise PosezooError("training needs PyTorch: install posezoo[train] (pip install 'posezoo[train]')") from exc

from .loop import TrainConfig, fit
from .model import PoseNet
from .pipeline import ModelInfo, TopDownTarget, train_model

__all__ = ["ModelInfo", "PoseNet", "TopDownTarget", "TrainConfig", "fit", "train_model"]
