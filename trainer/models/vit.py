"""Plain-torch ViT backbones for the rgb branch: DINO ViT-B/8 (224) and DINOv2 ViT-B/14 (392).

Key names and shapes follow the official checkpoints (spec §3, §10), so they load with strict key checks.
`forward` returns the last layer's patch tokens after the final LayerNorm, CLS dropped: (B, 784, 768),
row-major 28×28. Forward has no data-dependent control flow, so it exports to ONNX with a dynamic batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError

__all__ = ["ViTConfig", "VisionTransformer", "build_rgb_backbone", "resample_pos_embed", "RGB_CONFIGS"]


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of one ViT. `input_size // patch_size` is the token grid side."""

    patch_size: int
    input_size: int
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    layer_scale: bool = False  # DINOv2: ls1/ls2 gammas, plus an (unused) mask_token to match its keys

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size


RGB_CONFIGS: dict[str, ViTConfig] = {
    "dino_vitb8": ViTConfig(patch_size=8, input_size=224),
    "dinov2_vitb14": ViTConfig(patch_size=14, input_size=392, layer_scale=True),
}


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B,3,S,S) -> (B, (S/p)², dim)."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.proj(image).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        # SDPA's default scale is head_dim**-0.5, as in DINO / Point-MAE; it exports to ONNX (opset 17).
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale (DINOv2 `ls1`/`ls2`, key `gamma`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block; optional LayerScale on both residual branches."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: int, qkv_bias: bool, eps: float, layer_scale: bool
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT with CLS token at a fixed input size; `pos_embed` is (1, 1 + grid², dim) for that size."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.grid**2, dim))
        if config.layer_scale:
            self.mask_token = nn.Parameter(torch.zeros(1, dim))  # only for masked training; kept for keys
        self.blocks = nn.ModuleList(
            Block(dim, config.heads, config.mlp_ratio, True, 1e-6, config.layer_scale)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Patch tokens of the last block after the final norm.

        Args:
            image: (B, 3, S, S) float32, ImageNet-normalised, S = config.input_size.

        Returns:
            (B, grid², dim) float32, row-major over the grid, CLS dropped.
        """
        x = self.patch_embed(image)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubic-resample the patch part of a (1, 1 + M², C) position table to (1, 1 + grid², C).

    Uses DINOv2's own rule (scale factor (grid + 0.1) / M, bicubic, no antialias), so tokens at 392 get
    the same positions DINOv2's forward would compute. Deterministic; the CLS entry is kept as is.
    """
    side = math.isqrt(pos_embed.shape[1] - 1)
    if side * side != pos_embed.shape[1] - 1:
        raise ConfigError(f"pos_embed has {pos_embed.shape[1] - 1} patch entries, not a square grid")
    if side == grid:
        return pos_embed.clone()
    dim = pos_embed.shape[-1]
    table = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / side
    table = F.interpolate(table, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat((pos_embed[:, :1].float(), table), dim=1).to(pos_embed.dtype)


def build_rgb_backbone(name: str) -> VisionTransformer:
    """The rgb network for `name` ("dino_vitb8" | "dinov2_vitb14"), untrained, in eval mode."""
    if name not in RGB_CONFIGS:
        raise ConfigError(f"unknown rgb backbone {name!r}; expected one of {sorted(RGB_CONFIGS)}")
    return VisionTransformer(RGB_CONFIGS[name]).eval()
