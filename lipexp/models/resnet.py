"""The study's CIFAR ResNet-34 and ResNeXt-34 (docs/method.md, "Models"), one class for both."""

from collections.abc import Sequence

from torch import Tensor, nn

from lipexp.models.layers import conv_bn_relu


class BranchBlock(nn.Module):
    """Residual block of `cardinality` k branches averaged together.

    Branch i: conv3x3 C -> C (sees all C input channels), BN, ReLU, conv3x3 C -> C, BN.
    The k first convolutions are one dense conv C -> k*C, the k second ones one grouped
    conv k*C -> k*C (groups=k, so group i sees only branch i). Output:
    ReLU(x + mean_i branch_i(x)). With k = 1 this is the plain basic block of ResNet.
    """

    def __init__(self, channels: int, cardinality: int = 1) -> None:
        super().__init__()
        c, k = channels, cardinality
        self.cardinality = k
        self.conv1 = nn.Conv2d(c, k * c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(k * c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(k * c, k * c, 3, padding=1, groups=k, bias=False)
        self.bn2 = nn.BatchNorm2d(k * c)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        b, kc, h, w = y.shape
        # (B, k*C, H, W) -> (B, k, C, H, W): channels [i*C, (i+1)*C) are group i = branch i;
        # the mean over branches (not a sum, not a 1x1 conv) aggregates them -> (B, C, H, W)
        y = y.reshape(b, self.cardinality, kc // self.cardinality, h, w).mean(dim=1)
        return self.relu2(x + y)


class ResNet(nn.Module):
    """CIFAR-style ResNet / ResNeXt of the study's code (batch norm after every conv).

    Stem: conv3x3 (in_channels -> widths[0]) + BN + ReLU. Then one stage per width, each
    of `blocks_per_stage` BranchBlocks; where the width changes, a 1x1 conv + BN + ReLU
    opens the stage's first block, and from the second stage on a 2x2 average pooling
    ends that first block (halving H and W). Global average pooling, linear layer.

    ResNet-34: widths (16, 32, 64), 5 blocks, cardinality 1 (about 0.5M parameters).
    ResNeXt-34 2x32d: widths (32, 64, 128), 5 blocks, cardinality 2 (about 3.9M; the
    study used 4 branches on CIFAR-100). Input (B, in_channels, H, W), logits (B, classes).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 5,
        cardinality: int = 1,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]  # also accepts an OmegaConf ListConfig
        if not widths or blocks_per_stage < 1 or cardinality < 1:
            raise ValueError(
                "ResNet needs at least one width, blocks_per_stage >= 1 and cardinality >= 1, "
                f"got widths={widths}, blocks_per_stage={blocks_per_stage}, "
                f"cardinality={cardinality}"
            )
        layers: list[nn.Module] = [nn.Sequential(*conv_bn_relu(in_channels, widths[0], 3))]
        c_in = widths[0]
        for stage, c in enumerate(widths):
            if c != c_in:
                layers.append(nn.Sequential(*conv_bn_relu(c_in, c, 1)))  # maps to the stage's width
            layers.append(BranchBlock(c, cardinality))
            if stage > 0:
                layers.append(nn.AvgPool2d(2))  # downsampling: H, W halved (rounded down)
            layers += [BranchBlock(c, cardinality) for _ in range(blocks_per_stage - 1)]
            c_in = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]  # (B, C, 1, 1) -> (B, C)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))
