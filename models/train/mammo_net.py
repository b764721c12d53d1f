"""A compact fully convolutional ResNet for mammograms: two heatmaps, and image scores pooled from them.

Why this shape: about 200 training images and no pretrained weights (offline) call for a small net
(~0.6 M parameters) trained on patches around the labelled findings, where the signal is, rather than
on whole images where a finding is a few cells out of a thousand. Being fully convolutional, the same
weights then run on the whole 512 x 512 image and give a heatmap per class at 1/16 resolution; an
image's abnormal (malignant) score is the mean of its k strongest abnormal (malignant) cells, so the
score is explained by the heatmap. BatchNorm folds into the convolutions at export.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

HEATMAP_STRIDE = 16


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity shortcut (ResNet v1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(self.conv1(x))))


def stage(cin: int, cout: int, blocks: int) -> nn.Sequential:
    """Downsample by 2 then refine: the spatial size halves at every stage."""
    return nn.Sequential(conv_bn(cin, cout, 3, 2), *[BasicBlock(cout) for _ in range(blocks)])


class MammoNet(nn.Module):
    """Input (B, 1, H, W) in [0, 1], H and W multiples of 32.

    forward -> (scores (B, 2) logits [abnormal, malignant], heatmap (B, 1, H/16, W/16) abnormal logits).
    """

    def __init__(self, widths: tuple[int, ...] = (16, 24, 40, 64, 96), top_k: int = 4) -> None:
        super().__init__()
        w0, w1, w2, w3, w4 = widths
        self.top_k = top_k
        self.stem = nn.Sequential(conv_bn(1, w0, 5, 2), conv_bn(w0, w1, 3, 2), BasicBlock(w1))  # stride 4
        self.stage8 = stage(w1, w2, 1)
        self.stage16 = stage(w2, w3, 2)
        self.stage32 = stage(w3, w4, 2)  # context: a stride-32 cell sees most of a large mass
        self.lateral = nn.Conv2d(w4, w3, 1)
        self.heat_body = conv_bn(w3, w3)
        self.heat_out = nn.Conv2d(w3, 2, 1)  # channel 0 abnormal, channel 1 malignant
        nn.init.constant_(self.heat_out.bias, -3.0)  # findings are rare cells: start near p = 0.05

    def heatmaps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2, H/16, W/16) logits: abnormal and malignant evidence per cell."""
        f16 = self.stage16(self.stage8(self.stem(x)))
        up = F.interpolate(self.lateral(self.stage32(f16)), size=f16.shape[-2:], mode="nearest")
        return self.heat_out(self.heat_body(f16 + up))

    def pool(self, heat: torch.Tensor) -> torch.Tensor:
        """Image-level logits (B, 2): mean of the k strongest cells per channel (a soft max)."""
        return heat.flatten(2).topk(self.top_k, dim=2).values.mean(dim=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heat = self.heatmaps(x)
        return self.pool(heat), heat[:, :1]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
