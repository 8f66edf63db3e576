"""Full float32 arithmetic inside a block: autocast off, and no TensorFloat-32 or bf16
shortcuts in matrix products and convolutions.

Used where rounding decides the result: the finite-difference penalty (a difference of two
nearly equal losses, and of two nearly equal parameter gradients) and the data set's
Lipschitz constant (a margin that bounds float32 rounding, not TF32's 10-bit mantissa).
"""

from contextlib import contextmanager

import torch
from torch import Tensor


@contextmanager
def float32(x: Tensor):
    """Autocast off on ``x``'s device type, and ``tf32_off`` there: the enclosed passes run in
    full float32."""
    with torch.autocast(device_type=x.device.type, enabled=False), tf32_off(x.device):
        yield


@contextmanager
def tf32_off(device: torch.device | str):
    """Full float32 products on ``device`` inside the block, the user's settings put back after.

    On CUDA, TensorFloat-32 off (cuDNN's convolutions and matmuls would otherwise keep 10
    mantissa bits): the two CUDA switches only, since ``torch.set_float32_matmul_precision``
    would also rewrite other backends' settings on the way back. On other devices, float32
    matmul precision ``highest`` where the user lowered it (oneDNN may then use bf16 on the
    CPU); nothing otherwise. The fd step's backward pass runs inside it too
    (RobustClassifier.backward): the penalty's parameter gradient is a difference of two
    nearly equal gradients.
    """
    if torch.device(device).type != "cuda":
        precision = torch.get_float32_matmul_precision()
        if precision == "highest":
            yield
            return
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(precision)
        return
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
