"""The three pancreas networks, kept small enough to train on 2 CPU cores and run on an edge box.

All use nnU-Net's building block (3x3x3 conv, instance norm, leaky ReLU, twice; strided conv to
downsample, transposed conv to upsample) because it is the architecture PANDA's stage 1 used and it
exports to plain ONNX ops (Conv, InstanceNormalization, LeakyRelu, ConvTranspose, Concat) that every
runtime backend of the appliance (ORT, OpenVINO, TensorRT) supports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Sequential):
    """Two conv-IN-LeakyReLU layers; the first may stride (nnU-Net downsampling)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False),
            nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UNet3D(nn.Module):
    """A plain nnU-Net-style 3D U-Net; spatial dims must be divisible by 2**(len(channels)-1)."""

    def __init__(self, in_channels: int, n_classes: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.channels = tuple(channels)
        self.enc = nn.ModuleList(
            ConvBlock(in_channels if i == 0 else channels[i - 1], c, 1 if i == 0 else 2) for i, c in enumerate(channels)
        )
        self.up = nn.ModuleList(nn.ConvTranspose3d(channels[i + 1], channels[i], 2, 2) for i in range(len(channels) - 1))
        self.dec = nn.ModuleList(ConvBlock(2 * channels[i], channels[i]) for i in range(len(channels) - 1))
        self.head = nn.Conv3d(channels[0], n_classes, 1)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder output at full resolution, bottleneck features)."""
        skips = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
        bottleneck = skips.pop()
        x = bottleneck
        for i in reversed(range(len(self.up))):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return x, bottleneck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)[0])


class LesionNet(nn.Module):
    """Stage 2: joint pancreas + lesion segmentation and abnormality classification (PANDA's stage 2 idea).

    The segmentation has three classes (background, pancreas, lesion) because a lesion is "the part of
    the gland that looks different": learning the gland gives dense supervision on every crop, normal or
    not, and the lesion class then only has to learn the difference. The abnormality logit combines
    (a) the strongest *smoothed* lesion-vs-rest logit in the crop, so the classifier and the segmentation
    agree and a single noisy voxel cannot fire it, and (b) the max-pooled bottleneck features (gland
    texture, duct dilation). Both are maxima, not means, so a net trained on sub-patches of the crop reads
    the full crop the same way.
    """

    SEG_CLASSES = ("background", "pancreas", "lesion")

    def __init__(self, in_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.unet = UNet3D(in_channels, len(self.SEG_CLASSES), channels)
        self.cls = nn.Linear(channels[-1] + 1, 1)

    @staticmethod
    def lesion_logit(seg: torch.Tensor) -> torch.Tensor:
        """log(p_lesion / (1 - p_lesion)) from the 3 logits, with plain ops (Max/Exp/Log) every runtime has."""
        a, b = seg[:, 0:1], seg[:, 1:2]
        m = torch.maximum(a, b)
        return seg[:, 2:3] - (m + torch.log(torch.exp(a - m) + torch.exp(b - m)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seg, cls, _ = self.with_features(x)
        return seg, cls

    def with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(segmentation, abnormal logit, average-pooled bottleneck features) from one pass."""
        dec, bott = self.unet.features(x)
        seg = self.unet.head(dec)
        smooth = F.avg_pool3d(self.lesion_logit(seg), kernel_size=5, stride=1, padding=2, count_include_pad=False)
        peak = torch.amax(smooth, dim=(2, 3, 4))
        pooled = torch.cat([torch.amax(bott, dim=(2, 3, 4)), peak], dim=1)
        return seg, self.cls(pooled), bott.mean(dim=(2, 3, 4))


class LesionClassifier(nn.Module):
    """Stage 3: a 3D CNN on a lesion-centred (ct, lesion_mask) crop, 8 subtype logits."""

    def __init__(self, in_channels: int, n_classes: int, channels: Sequence[int], dropout: float = 0.2) -> None:
        super().__init__()
        # every block strides, the first too: subtype cues (cyst vs solid, septa, calcifications) survive
        # a 2.5 mm first feature map, and it costs an eighth of a full-resolution first block
        blocks = [ConvBlock(in_channels if i == 0 else channels[i - 1], c, 2) for i, c in enumerate(channels)]
        self.encoder = nn.Sequential(*blocks)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * channels[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.encoder(x)
        pooled = torch.cat([f.mean(dim=(2, 3, 4)), torch.amax(f, dim=(2, 3, 4))], dim=1)
        return self.fc(self.drop(pooled))


class SegmentationWithFeatures(nn.Module):
    """Export view of a U-Net: (segmentation logits, globally average-pooled bottleneck features).

    The features output is what the appliance's domain gate measures a Mahalanobis distance on
    (card-contract.md section 1): the deepest encoder block, mean over every spatial axis.
    """

    def __init__(self, unet: UNet3D) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dec, bott = self.unet.features(x)
        return self.unet.head(dec), bott.mean(dim=(2, 3, 4))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def soft_dice_loss(probs: torch.Tensor, onehot: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Batch soft Dice over channels (nnU-Net's Dice term), 1 - mean Dice."""
    dims = (0, 2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup_frac: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """Short linear warm-up then cosine decay to zero: robust for the few hundred steps a CPU allows."""
    import math

    warm = max(1, int(steps * warmup_frac))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
