"""The extra of docs/method.md, "Models": torchvision's wider ImageNet-style ResNet-18/34
for small images."""

from torch import nn
from torchvision.models import resnet18, resnet34

_BUILDERS = {18: resnet18, 34: resnet34}


def imagenet_resnet(num_classes: int, in_channels: int = 3, depth: int = 18) -> nn.Module:
    """torchvision's ResNet-18 or -34 (64-128-256-512 channels, about 11M / 21M parameters),
    randomly initialised, adapted to 32x32 images as in common robustness work: the
    7x7 stride-2 stem conv becomes a 3x3 stride-1 conv with `in_channels` inputs and the
    max-pool is removed, so the four stages see 32, 16, 8 and 4 pixels per side.

    Input (B, in_channels, H, W), output logits (B, num_classes).
    """
    if depth not in _BUILDERS:
        raise ValueError(f"imagenet_resnet: depth must be one of {sorted(_BUILDERS)}, got {depth}")
    model = _BUILDERS[depth](weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    # the initialisation torchvision gives its own convolutions
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    # torchvision's ReLUs work in place; out-of-place ones keep double backpropagation
    # (the Lipschitz penalty) clear of "modified by an inplace operation" errors
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model
