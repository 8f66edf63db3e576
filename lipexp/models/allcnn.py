"""AllCNN-C (Springenberg et al. 2014) as the study's authors built it (docs/method.md,
"Models")."""

from torch import Tensor, nn

from lipexp.models.layers import conv_bn_relu


class AllCNN(nn.Module):
    """AllCNN-C with batch normalization, about 1.7M parameters.

    Eight 3x3 convolutions (padding 1) with 96, 96, 96 (stride 2), 192, 192, 192
    (stride 2), 192, 192 channels, then a 1x1 convolution to the classes, each followed by
    BatchNorm2d without affine parameters and ReLU; then global average pooling.
    32x32 inputs give 8x8 class maps. No dropout (the study's recipe has none).

    Input (B, in_channels, H, W), output logits (B, num_classes).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, class_bn_relu: bool = True) -> None:
        super().__init__()
        # (output channels, stride) of the eight 3x3 convolutions
        spec = [(96, 1), (96, 1), (96, 2), (192, 1), (192, 1), (192, 2), (192, 1), (192, 1)]
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out, stride in spec:
            layers += conv_bn_relu(c_in, c_out, 3, stride=stride, affine=False)
            c_in = c_out
        # The 1x1 class convolution. docs/method.md (and the authors' code, after Chaudhari's
        # AllCNN) follow it with BN without affine parameters and ReLU too, which makes the
        # logits non-negative and batch-normalised; `class_bn_relu=False` keeps plain
        # logits (a biased 1x1 convolution and pooling only) for comparison.
        if class_bn_relu:
            layers += conv_bn_relu(c_in, num_classes, 1, affine=False)
        else:
            layers.append(nn.Conv2d(c_in, num_classes, 1))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]  # (B, classes, 1, 1) -> (B, classes)
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
