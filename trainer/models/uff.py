"""UFF, the unsupervised feature fusion block of M3DM (spec §7): two per-modality MLPs plus loss-only heads.

Sits between patch feature extraction and the fusion memory bank. The forward pass has no cross-modal
operation; the modalities interact only through the contrastive training objective (trainer/train_uff.py).
State-dict key names match the official `FeatureFusionBlock` checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.models.vit import Mlp  # same fc1 -> GELU -> fc2 block, same state-dict keys

__all__ = ["FeatureFusionBlock", "UFFExport"]


class FeatureFusionBlock(nn.Module):
    """Per-modality LayerNorm + MLP (no residual) and 256-d projection heads used only by the loss."""

    def __init__(self, point_dim: int, rgb_dim: int, mlp_ratio: int = 4, head_dim: int = 256) -> None:
        super().__init__()
        self.point_dim = point_dim
        self.rgb_dim = rgb_dim
        self.mlp_ratio = mlp_ratio
        self.head_dim = head_dim
        self.xyz_norm = nn.LayerNorm(point_dim)
        self.xyz_mlp = Mlp(point_dim, point_dim * mlp_ratio)
        self.rgb_norm = nn.LayerNorm(rgb_dim)
        self.rgb_mlp = Mlp(rgb_dim, rgb_dim * mlp_ratio)
        self.xyz_head = nn.Linear(point_dim, head_dim)
        self.rgb_head = nn.Linear(rgb_dim, head_dim)

    @property
    def dims(self) -> dict[str, int]:
        """Constructor arguments, for the json written next to the weights."""
        return {
            "point_dim": self.point_dim,
            "rgb_dim": self.rgb_dim,
            "mlp_ratio": self.mlp_ratio,
            "head_dim": self.head_dim,
        }

    def branches(
        self, point_feats: torch.Tensor, rgb_feats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., Cp), (..., Cr) -> per-modality MLP outputs (..., Cp), (..., Cr)."""
        return self.xyz_mlp(self.xyz_norm(point_feats)), self.rgb_mlp(self.rgb_norm(rgb_feats))

    def fuse(self, point_feats: torch.Tensor, rgb_feats: torch.Tensor) -> torch.Tensor:
        """(B,P,Cp), (B,P,Cr) f32 -> fused (B,P,Cp+Cr) = concat(xyz_mlp(LN(x)), rgb_mlp(LN(r)))."""
        point_out, rgb_out = self.branches(point_feats, rgb_feats)
        return torch.cat([point_out, rgb_out], dim=-1)

    def forward(self, point_feats: torch.Tensor, rgb_feats: torch.Tensor) -> torch.Tensor:
        """Same as `fuse`; the heads are applied by the training loss only."""
        return self.fuse(point_feats, rgb_feats)


class UFFExport(nn.Module):
    """Export wrapper: ONNX inputs `point_feats`, `rgb_feats` -> `fused`; the heads are not exported."""

    input_names = ("point_feats", "rgb_feats")
    output_names = ("fused",)

    def __init__(self, block: FeatureFusionBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, point_feats: torch.Tensor, rgb_feats: torch.Tensor) -> torch.Tensor:
        """(B,P,Cp), (B,P,Cr) -> (B,P,Cp+Cr)."""
        return self.block.fuse(point_feats, rgb_feats)
