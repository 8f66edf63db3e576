"""A small CNN for 8x8 (scikit-learn digits) and 28x28 (MNIST) images."""

from torch import Tensor, nn

from lipexp.models.layers import conv_bn_relu


class SmallCNN(nn.Module):
    """conv3x3(w) BN ReLU, conv3x3(2w, stride 2) BN ReLU, conv3x3(2w) BN ReLU, global
    average pooling, linear. Not one of the study's models; any image side >= 8 works.

    Input (B, in_channels, H, W), output logits (B, num_classes).
    """

    def __init__(self, num_classes: int, in_channels: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(*conv_bn_relu(in_channels, width)),
            nn.Sequential(*conv_bn_relu(width, 2 * width, stride=2)),  # H, W halved (rounded up)
            nn.Sequential(*conv_bn_relu(2 * width, 2 * width)),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 2w, 1, 1) -> (B, 2w)
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))
