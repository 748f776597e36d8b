"""The pose network: EfficientNet-Lite0 up to stride 16 and a light up-sampling head.

Head: the stride-16 features (112 channels) are up-sampled twice by transposed
convolutions, each time added to a 1x1 projection of the backbone's features at that
stride (stride 8: 40 channels, stride 4: 24 channels), then refined by a depthwise-
separable 3x3 convolution. One 1x1 convolution gives ``K`` heatmap logits and ``2K``
location-refinement maps at stride 4, in the channel order the posezoo decoder reads
(``dx0, dy0, dx1, dy1, ...``). The stride-32 stages and the classifier of the
ImageNet network are not used (their weights load, then are dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import BN_EPS, EfficientNetLite0, load_imagenet

#: Last backbone block used (block 10 ends the stride-16 stage, 112 channels).
LAST_BLOCK = 10
STRIDE = 4


class UpBlock(nn.Module):
    """x2 transposed conv of the coarse map + 1x1 lateral of the skip, then a
    depthwise-separable 3x3 refinement (BatchNorm + ReLU after each step)."""

    def __init__(self, c_in: int, c_skip: int, c_out: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False)
        self.lateral = nn.Conv2d(c_skip, c_out, 1, bias=False)
        self.bn_up = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.dw = nn.Conv2d(c_out, c_out, 3, padding=1, groups=c_out, bias=False)
        self.pw = nn.Conv2d(c_out, c_out, 1, bias=False)
        self.bn_out = nn.BatchNorm2d(c_out, eps=BN_EPS)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        if up.shape[-2:] != skip.shape[-2:]:  # odd sizes: crop the up-sampled map
            up = up[..., : skip.shape[-2], : skip.shape[-1]]
        y = F.relu(self.bn_up(up + self.lateral(skip)))
        return F.relu(self.bn_out(self.pw(self.dw(y))))


class PoseNet(nn.Module):
    """Heatmaps and location refinement at stride 4.

    Parameters
    ----------
    n_keypoints : int
    pretrained : bool
        Start the backbone from the ImageNet weights (loaded strictly).
    width : int
        Channels of the stride-8 head stage (the stride-4 stage has half).
    sigmoid : bool
        Apply the logistic to the heatmaps inside the network (the exported graph
        then returns probabilities: card ``heatmap_activation: none``).

    Notes
    -----
    ``forward`` takes ``(N, 3, H, W)`` normalised input and returns ``heatmaps``
    ``(N, K, H/4, W/4)`` and ``locref`` ``(N, 2K, H/4, W/4)``.
    """

    def __init__(self, n_keypoints: int, *, pretrained: bool = True, width: int = 64, sigmoid: bool = False):
        super().__init__()
        backbone = EfficientNetLite0()
        if pretrained:
            load_imagenet(backbone)
        self.n_keypoints = n_keypoints
        self.sigmoid = sigmoid
        self.stem = nn.Sequential(backbone._conv_stem, backbone._bn0, nn.ReLU6())
        self.blocks = nn.ModuleList(backbone._blocks[: LAST_BLOCK + 1])
        self.up8 = UpBlock(112, 40, width)
        self.up4 = UpBlock(width, 24, width // 2)
        self.out = nn.Conv2d(width // 2, 3 * n_keypoints, 1)
        nn.init.normal_(self.out.weight, std=0.01)
        nn.init.zeros_(self.out.bias)
        with torch.no_grad():  # heatmaps start near 0 (sigmoid(-4) ~ 0.018)
            self.out.bias[:n_keypoints] = -4.0

    def freeze_early(self, n_blocks: int) -> "PoseNet":
        """Freeze the stem and the first ``n_blocks`` backbone blocks (weights and
        BatchNorm statistics): the high-resolution layers then cost no backward pass."""
        self.frozen = [self.stem, *self.blocks[:n_blocks]] if n_blocks > 0 else []
        for module in self.frozen:
            module.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "PoseNet":
        super().train(mode)
        for module in getattr(self, "frozen", []):
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.stem(x)
        feats = {}
        stride = 2
        for block in self.blocks:
            if block.spec.stride == 2:
                feats[stride] = y
                stride *= 2
            y = block(y)
        y = self.up8(y, feats[8])
        y = self.up4(y, feats[4])
        out = self.out(y)
        k = self.n_keypoints
        heat, locref = out[:, :k], out[:, k:]
        if self.sigmoid:
            heat = torch.sigmoid(heat)
        return heat, locref
