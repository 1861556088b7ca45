"""The `m3dm-site` rgb network: a small residual CNN whose stride-8 output is the 28x28 rgb token grid.

`SiteEncoder` is what ships: image (B, 3, 224, 224), ImageNet-normalised -> tokens (B, 784, SITE_RGB_DIM), the
same contract as the DINO backbone, so core.features, the banks, UFF and DLF need nothing new. `SiteNet` adds
the loss-only heads (anomaly segmentation, clean-image reconstruction) used while training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.config import SITE_WIDTH

__all__ = ["SiteEncoder", "SiteNet", "PATCH_PX", "TOKEN_GRID"]

TOKEN_GRID = 28  # 224 / stride 8: the rgb grid every bank and UFF expects
PATCH_PX = 8  # input pixels per token side


def _norm(channels: int) -> nn.BatchNorm2d:
    # BatchNorm: at inference a fixed per-channel affine map, so features of a full 224 image match those of
    # the 96 px crops it is trained on (GroupNorm's per-image statistics would not), and ONNX is exact.
    return nn.BatchNorm2d(channels)


class ConvNormAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            _norm(c_out),
            nn.ReLU(inplace=True),
        )


class ResBlock(nn.Module):
    """Two 3x3 convolutions with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = _norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.norm2(self.conv2(self.conv1(x))))


class SiteEncoder(nn.Module):
    """A 4x4 patchify stem (stride 4: full-resolution 3x3 convolutions would cost most of a CPU budget), then
    strides 8 and 16. Tokens are the stride-4 (pooled), stride-8 and stride-16 (upsampled) maps concatenated,
    averaged over each 3x3 token neighbourhood (PatchCore's local aggregation: a token sees its context).

    Channels: width + 2 width + 4 width = SITE_RGB_DIM (width 32: 224 dims, ~0.5 M parameters).
    """

    def __init__(self, width: int = SITE_WIDTH) -> None:
        super().__init__()
        self.width = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 4, stride=4, bias=False), _norm(width), nn.ReLU(inplace=True), ResBlock(width)
        )  # 56
        self.layer2 = nn.Sequential(
            ConvNormAct(width, 2 * width, stride=2), ResBlock(2 * width), ResBlock(2 * width)
        )  # 28
        self.layer3 = nn.Sequential(ConvNormAct(2 * width, 4 * width, stride=2), ResBlock(4 * width))  # 14

    @property
    def out_dim(self) -> int:
        return 7 * self.width

    def feature_map(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, out_dim, S/8, S/8); S a multiple of 16."""
        f4 = self.stem(image)
        f8 = self.layer2(f4)
        f16 = self.layer3(f8)
        grid = f8.shape[-2:]
        feats = torch.cat(
            [F.avg_pool2d(f4, 2), f8, F.interpolate(f16, size=grid, mode="bilinear", align_corners=False)],
            dim=1,
        )
        return F.avg_pool2d(feats, 3, stride=1, padding=1, count_include_pad=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) -> tokens (B, 784, out_dim), row-major over the 28x28 grid like ViT tokens."""
        return self.feature_map(image).flatten(2).transpose(1, 2)


class SiteNet(nn.Module):
    """Encoder plus the heads of the training objective (never exported).

    seg: per-token logit that the token's patch holds a synthetic anomaly. recon: the clean 8x8 patch
    (3 x 8 x 8 pixels) under each token, so the features keep describing normal appearance rather than only
    "pasted or not" (a pure discrimination objective can collapse everything normal to one point).
    """

    def __init__(self, width: int = SITE_WIDTH) -> None:
        super().__init__()
        self.encoder = SiteEncoder(width)
        dim = self.encoder.out_dim
        self.seg = nn.Sequential(nn.Conv2d(dim, 64, 1), nn.ReLU(inplace=True), nn.Conv2d(64, 1, 1))
        self.recon = nn.Conv2d(dim, 3 * PATCH_PX * PATCH_PX, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> seg logits (B, S/8, S/8), reconstructed image (B, 3, S, S)."""
        feats = self.encoder.feature_map(image)
        seg = self.seg(feats)[:, 0]
        recon = F.pixel_shuffle(self.recon(feats), PATCH_PX)
        return seg, recon
