"""A small CNN for 8x8 (scikit-learn digits) and 28x28 (MNIST) images."""

from torch import Tensor, nn


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution (no bias: the batch norm that follows removes it), BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class SmallCNN(nn.Module):
    """conv3x3(w) BN ReLU, conv3x3(2w, stride 2) BN ReLU, conv3x3(2w) BN ReLU, global
    average pooling, linear. Not one of the study's models; any image side >= 8 works.

    Input (B, in_channels, H, W), output logits (B, num_classes).
    """

    def __init__(self, num_classes: int, in_channels: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width),
            _conv_bn_relu(width, 2 * width, stride=2),  # H, W halved (rounded up)
            _conv_bn_relu(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 2w, 1, 1) -> (B, 2w)
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))
