"""Point-MAE's mini-PointNet rewritten for export: pointwise Conv1d (kernel 1) as MatMul, channels last.

Why: ONNX Runtime quantises MatMul/Gemm to int8 with fast kernels (MatMulInteger, VNNI/AMX on x86) but has
no fast ConvInteger, so an exported Conv1d stayed fp32 and int8 bought Point-MAE nothing (BENCHMARKS.md,
issue 9). A kernel-1 Conv1d over (clouds*G, C, K) is the product W (O, C) with every point, so the same
layers written as Linear over (clouds*G, K, C) are exact up to fp32 summation order. Two more exact
rewrites make the graph cheaper in fp32 too:

- The second block's input is [max-pooled group feature (256), point feature (256)]: W @ [g; x] =
  W_g @ g + W_x @ x, so the pooled half is multiplied once per group instead of once per point (K = 128).
- Per-cloud BatchNorm statistics ("batch", the m3dm presets) are (1, GK) @ (clouds, GK, C) products:
  ONNX Runtime's ReduceMean over a middle axis cost ~6x more than these GEMVs here. They depend on the
  cloud, so they stay in the graph, in fp32 (ORT's dynamic quantisation only quantises MatMuls whose B
  input is a constant, and these B inputs are activations). The first block's come from the 3x3
  covariance of the input (lin1 is affine), and BN is then folded into lin1 per cloud.
- The groups run in chunks (`PointwiseEncoder`): 1.8x on the int8 graph at official size (BENCHMARKS.md).
- "stored" BatchNorm (checkpoint running statistics) is folded into the preceding Linear: exact.
"""

from __future__ import annotations

import copy
import functools
import operator
from collections.abc import Iterable

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


def _total(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of tensors without the leading `0 +` of builtin sum (one fewer node in the exported graph)."""
    return functools.reduce(operator.add, terms)


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
    """`Encoder` (mini-PointNet) on channels-last points; same weights, same outputs up to fp32 rounding.

    Runs the groups in chunks of `chunk_groups`: a whole official-size cloud's (1024 x 128, 512) activations
    are 268 MB per tensor, and ONNX Runtime without its arena (the station's setting, for memory) takes
    every such tensor as fresh pages from the OS, so the graph spent much of its time in page faults. A
    chunk's tensors (64 groups: 17 MB) are reused from the heap. Per-cloud BatchNorm statistics still cover
    the whole cloud: the first block's come from the 3x3 covariance of the input coordinates (the layer
    before it is linear), the second block's from per-chunk sums over its kept pre-norm activations.
    """

    def __init__(self, encoder: Encoder, chunk_groups: int = 64) -> None:
        super().__init__()
        if chunk_groups < 1:
            raise ValueError(f"chunk_groups must be >= 1, got {chunk_groups}")
        self.point_bn = encoder.point_bn
        self.chunk_groups = chunk_groups
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

    def _first_layer_per_cloud(self, flat_npc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """lin1 followed by per-cloud BatchNorm as one affine map per cloud: (n, 3, 128), (n, 1, 128).

        lin1 is affine, so its output's per-cloud mean is lin1(mean of x) and its biased variance per
        channel is w_o^T Cov(x) w_o: exact algebra over a 3x3 covariance instead of a (G*K, 128) pass.
        """
        average_1p = flat_npc.new_full((1, flat_npc.shape[1]), 1.0 / flat_npc.shape[1])
        mean_n13 = torch.matmul(average_1p, flat_npc)
        deviation = flat_npc - mean_n13
        cov_n33 = torch.matmul(deviation.transpose(1, 2) * (1.0 / flat_npc.shape[1]), deviation)
        weight_oc = self.lin1.weight
        var_no = (torch.matmul(weight_oc, cov_n33) * weight_oc).sum(-1)  # (n, 128): w_o^T C w_o
        gain_no = self.bn1.weight * torch.rsqrt(var_no + self.bn1.eps)
        # BN(x W^T + b) = x (W^T gain) + (beta - (mean_x W^T) gain): lin1's own bias cancels
        weight_nco = weight_oc.t().unsqueeze(0) * gain_no.unsqueeze(1)
        # weights as the left factor: a MatMul with a constant B would be int8-quantised, and the per-cloud
        # statistics stay fp32
        mean_out_n1o = torch.matmul(weight_oc, mean_n13.transpose(1, 2)).transpose(1, 2)
        bias_n1o = self.bn1.bias - mean_out_n1o * gain_no.unsqueeze(1)
        return weight_nco, bias_n1o

    def _second_block_input(
        self, chunk: torch.Tensor, first: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """(clouds, Gc, K, 3) -> (clouds*Gc, K, 512): the second block's pre-norm activations."""
        clouds, groups, points, _ = chunk.shape
        if first is None:  # stored BN, folded into lin1
            x = torch.relu(self.lin1(chunk.reshape(clouds * groups, points, 3)))
        else:
            weight_nco, bias_n1o = first
            x = torch.relu(torch.matmul(chunk.reshape(clouds, groups * points, 3), weight_nco) + bias_n1o)
            x = x.reshape(clouds * groups, points, -1)
        x = self.lin2(x)  # (clouds*Gc, K, 256)
        pooled = x.amax(dim=1, keepdim=True)
        return self.lin3_local(x) + self.lin3_global(pooled)

    def _output(self, x_gkc: torch.Tensor) -> torch.Tensor:
        return self.lin4(torch.relu(x_gkc)).amax(dim=1)

    def forward(self, neighborhood: torch.Tensor) -> torch.Tensor:
        clouds, groups, points, _ = neighborhood.shape
        chunks = neighborhood.split(self.chunk_groups, dim=1)
        if self.point_bn == "stored":
            outs = [self._output(self._second_block_input(c, None)) for c in chunks]
            return torch.cat([o.reshape(clouds, -1, o.shape[-1]) for o in outs], dim=1)
        first = self._first_layer_per_cloud(neighborhood.reshape(clouds, groups * points, 3))
        pre = [self._second_block_input(c, first) for c in chunks]  # kept: the statistics need all
        per_cloud = [p.reshape(clouds, -1, p.shape[-1]) for p in pre]  # (clouds, Gc*K, 512)
        inv_total = 1.0 / (groups * points)
        ones = [p.new_full((1, p.shape[1]), inv_total) for p in per_cloud]
        mean_n1c = _total(torch.matmul(o, p) for o, p in zip(ones, per_cloud, strict=True))
        deviations = (p - mean_n1c for p in per_cloud)  # two passes, as BN: no E[x²] - E[x]² cancellation
        var_n1c = _total(torch.matmul(o, d * d) for o, d in zip(ones, deviations, strict=True))
        gain_n1c = self.bn2.weight * torch.rsqrt(var_n1c + self.bn2.eps)  # biased var, as BN in training
        shift_n1c = self.bn2.bias - mean_n1c * gain_n1c
        outs = [
            self._output((p * gain_n1c + shift_n1c).reshape(clouds * (p.shape[1] // points), points, -1))
            for p in per_cloud
        ]
        return torch.cat([o.reshape(clouds, -1, o.shape[-1]) for o in outs], dim=1)


def pointwise_point_module(module: PointMAEEncoder, chunk_groups: int = 64) -> PointMAEEncoder:
    """A copy of `module` whose mini-PointNet is the MatMul form; the transformer is shared as is."""
    rewritten = copy.copy(module)  # shallow: blocks and embeddings are the same modules
    rewritten._modules = dict(module._modules)
    rewritten._modules["encoder"] = PointwiseEncoder(module.encoder, chunk_groups)
    return rewritten.eval()
