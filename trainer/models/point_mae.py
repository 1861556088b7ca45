"""Point-MAE encoder as M3DM configures it (spec §4): mini-PointNet group tokens + 12 pre-norm blocks.

Input is already grouped (core.grouping, numpy, shared with stations): neighbourhoods in local coordinates
and their centres. Output is one 1152-d feature per group: the shared final norm of blocks 3, 7, 11.
Key names match `module.MAE_encoder.*` of Point-MAE's `pretrain.pth` with that prefix stripped.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.models.vit import Attention, Mlp

__all__ = [
    "OUTPUT_BLOCKS",
    "POINT_MAE_DIM",
    "POINT_MAE_PARAMETERS",
    "PointMAEEncoder",
    "build_point_backbone",
    "per_cloud_batch_norm",
]

OUTPUT_BLOCKS = (3, 7, 11)  # 0-based blocks whose normed outputs are concatenated (the original's)
POINT_MAE_DIM = 384  # channels of one block's output
POINT_MAE_PARAMETERS = 21_825_024  # spec §4, equals the pretrain checkpoint's encoder


def per_cloud_batch_norm(bn: nn.BatchNorm1d, x: torch.Tensor, clouds: int) -> torch.Tensor:
    """BatchNorm with each cloud's own statistics: (clouds*G, C, K) normalised over that cloud's G x K points.

    Equals nn.BatchNorm1d in training mode on a batch of one cloud (biased variance, bn.eps, affine), which
    is what the original M3DM computes, because it never calls eval(). Running statistics are neither used
    nor updated, so features stay deterministic and the module stays export-friendly (mean/var ops only).
    """
    _, channels, points = x.shape
    per_cloud = x.reshape(clouds, -1, channels, points)
    mean = per_cloud.mean(dim=(1, 3), keepdim=True)
    var = per_cloud.var(dim=(1, 3), keepdim=True, unbiased=False)
    normed = (per_cloud - mean) / torch.sqrt(var + bn.eps)
    normed = normed * bn.weight.reshape(1, 1, channels, 1) + bn.bias.reshape(1, 1, channels, 1)
    return normed.reshape(x.shape)


class Encoder(nn.Module):
    """Mini-PointNet: (B, G, K, 3) local coordinates -> (B, G, 384), one token per group.

    point_bn "stored" runs BatchNorm on the checkpoint's running statistics; "batch" on each cloud's own.
    """

    def __init__(self, out_dim: int = 384, point_bn: str = "stored") -> None:
        super().__init__()
        if point_bn not in ("batch", "stored"):
            raise ValueError(f"point_bn must be 'batch' or 'stored', got {point_bn!r}")
        self.point_bn = point_bn
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, out_dim, 1)
        )

    def _conv_bn_relu_conv(self, seq: nn.Sequential, x: torch.Tensor, clouds: int) -> torch.Tensor:
        conv_in, bn, relu, conv_out = seq
        x = conv_in(x)
        x = per_cloud_batch_norm(bn, x, clouds) if self.point_bn == "batch" else bn(x)
        return conv_out(relu(x))

    def forward(self, neighborhood: torch.Tensor) -> torch.Tensor:
        B, G, K, _ = neighborhood.shape
        x = neighborhood.reshape(B * G, K, 3).transpose(1, 2)
        x = self._conv_bn_relu_conv(self.first_conv, x, B)  # (BG, 256, K)
        pooled = x.amax(dim=2, keepdim=True)
        x = torch.cat((pooled.expand(-1, -1, K), x), dim=1)  # global first, as Point-MAE orders it
        return self._conv_bn_relu_conv(self.second_conv, x, B).amax(dim=2).reshape(B, G, -1)


class Block(nn.Module):
    """Pre-norm block without qkv bias, LayerNorm eps 1e-5 (Point-MAE's defaults)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    """Holds the blocks so keys read `blocks.blocks.{i}` as in the checkpoint."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))


class PointMAEEncoder(nn.Module):
    """Point-MAE encoder returning per-group features from blocks 3, 7, 11 (B, G, 1152).

    Always run in eval mode, so there is no drop-path. The public M3DM code never calls .eval(): its
    drop-path (up to 0.1) is active, which makes its point features random (we do not copy that), and its
    BatchNorm normalises each cloud by its own statistics, which `point_bn="batch"` reproduces exactly
    (the default of the m3dm presets). `point_bn="stored"` uses the checkpoint's running statistics.
    """

    def __init__(
        self,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: int = 4,
        point_bn: str = "stored",
        output_blocks: tuple[int, ...] = OUTPUT_BLOCKS,
    ) -> None:
        super().__init__()
        if not output_blocks or list(output_blocks) != sorted(set(output_blocks)):
            raise ValueError(f"output_blocks must be ascending and distinct, got {output_blocks}")
        if not all(0 <= b < depth for b in output_blocks):
            raise ValueError(f"output_blocks {output_blocks} must lie in 0..{depth - 1}")
        self.output_blocks = tuple(output_blocks)
        self.encoder = Encoder(dim, point_bn)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        self.blocks = TransformerEncoder(dim, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim)

    def forward(self, neighborhood: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """Group features.

        Args:
            neighborhood: (B, G, K, 3) float32, neighbour minus centre, metres.
            centers: (B, G, 3) float32, absolute centre coordinates, metres.

        Returns:
            (B, G, len(output_blocks)·dim) float32, e.g. [norm(x3), norm(x7), norm(x11)] along channels.
        """
        x = self.encoder(neighborhood)
        pos = self.pos_embed(centers)
        outputs = []
        for index, block in enumerate(self.blocks.blocks):
            x = block(x + pos)  # Point-MAE adds the position embedding before every block
            if index in self.output_blocks:
                outputs.append(self.norm(x))
        return torch.cat(outputs, dim=-1)


def build_point_backbone(
    point_bn: str = "stored", output_blocks: tuple[int, ...] = OUTPUT_BLOCKS
) -> PointMAEEncoder:
    """The M3DM point network (dim 384, depth 12, 6 heads), untrained, in eval mode.

    output_blocks: the blocks whose normed outputs make the feature (FeaturePreset.point_layers; the
    original takes 3, 7, 11).
    """
    return PointMAEEncoder(point_bn=point_bn, output_blocks=output_blocks).eval()
