"""Building blocks shared by the models."""

from torch import nn


def conv_bn_relu(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1,
                 affine: bool = True) -> list[nn.Module]:
    """``[Conv2d, BatchNorm2d, ReLU]``: a convolution with "same" padding (kernel_size // 2)
    and no bias (the batch norm that follows would subtract it again), then batch norm
    (without learnable scale and shift if not ``affine``: AllCNN-C) and ReLU.

    A list, so that a model can splice it into its own ``nn.Sequential`` (AllCNN-C) or wrap
    it in one (``nn.Sequential(*conv_bn_relu(...))``) and keep its parameter names.
    """
    return [
        nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(c_out, affine=affine),
        nn.ReLU(),
    ]
