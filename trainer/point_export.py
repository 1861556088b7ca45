"""Point-MAE's mini-PointNet rewritten for export: pointwise Conv1d (kernel 1) as MatMul, channels last.

Why: ONNX Runtime quantises MatMul/Gemm to int8 with fast kernels (MatMulInteger, VNNI/AMX on x86) but has
no fast ConvInteger, so an exported Conv1d stayed fp32 and int8 bought Point-MAE nothing (BENCHMARKS.md,
issue 9). A kernel-1 Conv1d over (clouds*G, C, K) is the product W (O, C) with every point, so the same
layers written as Linear over (clouds*G, K, C) are exact up to fp32 summation order. Two more exact
rewrites make the graph cheaper in fp32 too:

- The second block's input is [max-pooled group feature (256), point feature (256)]: W @ [g; x] =
  W_g @ g + W_x @ x, so the pooled half is multiplied once per group instead of once per point (K = 128).
- Per-cloud BatchNorm statistics ("batch", the m3dm presets) are (1, GK) @ (clouds, GK, C) products:
  ONNX Runtime's ReduceMean over a middle axis cost ~6x more than these GEMVs here. They cannot be folded
  into the weights (they depend on the cloud), so they stay in the graph, in fp32 (ORT's dynamic
  quantisation only quantises MatMuls whose B input is a constant, and these B inputs are activations).
- "stored" BatchNorm (checkpoint running statistics) is folded into the preceding Linear: exact.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from trainer.models.point_mae import Encoder, PointMAEEncoder

__all__ = ["PointwiseEncoder", "pointwise_point_module"]


def _linear_from_conv(conv: nn.Conv1d) -> nn.Linear:
    if conv.kernel_size != (1,) or conv.groups != 1 or conv.stride != (1,) or conv.padding != (0,):
        raise ValueError(f"only a plain kernel-1 Conv1d is a MatMul, got {conv}")
    linear = nn.Linear(
        conv.in_channels, conv.out_channels, bias=conv.bias is not None, dtype=conv.weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(conv.weight[:, :, 0])
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def _fold_stored_bn(linear: nn.Linear, bn: nn.BatchNorm1d) -> nn.Linear:
    """Linear followed by BatchNorm on running statistics, as one Linear (exact: both are affine)."""
    scale_o = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias_o = linear.bias if linear.bias is not None else torch.zeros_like(scale_o)
    folded = nn.Linear(linear.in_features, linear.out_features, dtype=linear.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(linear.weight * scale_o[:, None])
        folded.bias.copy_((bias_o - bn.running_mean) * scale_o + bn.bias)
    return folded


class PointwiseEncoder(nn.Module):
    """`Encoder` (mini-PointNet) on channels-last points; same weights, same outputs up to fp32 rounding."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.point_bn = encoder.point_bn
        conv1, bn1, _, conv2 = encoder.first_conv
        conv3, bn2, _, conv4 = encoder.second_conv
        lin1, lin3 = _linear_from_conv(conv1), _linear_from_conv(conv3)
        if self.point_bn == "stored":
            lin1, lin3 = _fold_stored_bn(lin1, bn1), _fold_stored_bn(lin3, bn2)
        self.bn1, self.bn2 = bn1, bn2
        self.lin1, self.lin2, self.lin4 = lin1, _linear_from_conv(conv2), _linear_from_conv(conv4)
        half = conv2.out_channels  # the second block's input is [global (half), local (half)]
        dtype = conv3.weight.dtype
        self.lin3_global = nn.Linear(half, conv3.out_channels, dtype=dtype)
        self.lin3_local = nn.Linear(half, conv3.out_channels, bias=False, dtype=dtype)
        with torch.no_grad():
            self.lin3_global.weight.copy_(lin3.weight[:, :half])
            self.lin3_global.bias.copy_(lin3.bias)
            self.lin3_local.weight.copy_(lin3.weight[:, half:])

    def _norm(self, bn: nn.BatchNorm1d, x_nkc: torch.Tensor, clouds: int) -> torch.Tensor:
        if self.point_bn == "stored":
            return x_nkc  # folded into the Linear before it
        groups, points, channels = x_nkc.shape
        per_cloud = x_nkc.reshape(clouds, -1, channels)  # (clouds, G*K, C)
        average_1p = per_cloud.new_full((1, per_cloud.shape[1]), 1.0 / per_cloud.shape[1])
        mean = torch.matmul(average_1p, per_cloud)
        deviation = per_cloud - mean
        var = torch.matmul(average_1p, deviation * deviation)  # biased, as nn.BatchNorm1d in training
        gain = bn.weight * torch.rsqrt(var + bn.eps)
        return (deviation * gain + bn.bias).reshape(groups, points, channels)

    def forward(self, neighborhood: torch.Tensor) -> torch.Tensor:
        clouds, groups, points, _ = neighborhood.shape
        x = neighborhood.reshape(clouds * groups, points, 3)
        x = self.lin2(torch.relu(self._norm(self.bn1, self.lin1(x), clouds)))  # (clouds*G, K, 256)
        pooled = x.amax(dim=1, keepdim=True)
        x = self.lin3_local(x) + self.lin3_global(pooled)
        x = self.lin4(torch.relu(self._norm(self.bn2, x, clouds)))
        return x.amax(dim=1).reshape(clouds, groups, -1)


def pointwise_point_module(module: PointMAEEncoder) -> PointMAEEncoder:
    """A copy of `module` whose mini-PointNet is the MatMul form; the transformer is shared as is."""
    rewritten = copy.copy(module)  # shallow: blocks and embeddings are the same modules
    rewritten._modules = dict(module._modules)
    rewritten._modules["encoder"] = PointwiseEncoder(module.encoder)
    return rewritten.eval()
