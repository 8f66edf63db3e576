"""Batched, on-device data augmentation with independent random parameters per image."""

import torch
import torch.nn.functional as F
from torch import Tensor


def augment(x: Tensor, crop_padding: int, flip: bool, cutout: int) -> Tensor:
    """Randomly crop, flip and cut out each image of a float batch x (B, C, H, W).

    - crop: pad with `crop_padding` px of zeros on every side, take a random H x W window
      (i.e. shift by (dy, dx) uniform in [-p, p]^2, zeros entering); 0 = off.
    - flip: mirror left-right with probability 1/2.
    - cutout (DeVries & Taylor 2017): zero one square of side `cutout` px whose centre is
      uniform over the image, clipped at the borders; 0 = off.

    Recipe (docs/method.md, "Training recipe"): CIFAR-10 crop_padding=4, flip, cutout=16;
    CIFAR-100 crop_padding=4, flip, cutout=8.

    torchvision's transforms draw one set of random parameters per call (the same crop
    for a whole batch), hence this hand-written, vectorized version. Random numbers come
    from torch's global RNG of x's device, so torch.manual_seed makes it reproducible.
    """
    b, _, h, w = x.shape
    dev = x.device
    p = crop_padding
    if p > 0 or flip:
        # One gather does both: window rows/cols in the padded image, cols reversed if flipped.
        rows = torch.arange(h, device=dev).expand(b, h)
        cols = torch.arange(w, device=dev).expand(b, w)
        if flip:
            mirrored = torch.rand(b, device=dev) < 0.5
            cols = torch.where(mirrored[:, None], cols.flip(1), cols)
        if p > 0:
            x = F.pad(x, (p, p, p, p))  # zeros
            rows = rows + torch.randint(0, 2 * p + 1, (b, 1), device=dev)
            cols = cols + torch.randint(0, 2 * p + 1, (b, 1), device=dev)
        idx = torch.arange(b, device=dev)[:, None, None]
        # Advanced indices around a slice: result is (B, H, W, C).
        x = x[idx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    if cutout > 0:
        # Square [cy - s//2, cy - s//2 + s) x [same for x], clipped by the comparisons.
        top = torch.randint(0, h, (b, 1, 1, 1), device=dev) - cutout // 2
        left = torch.randint(0, w, (b, 1, 1, 1), device=dev) - cutout // 2
        r = torch.arange(h, device=dev)[:, None]
        c = torch.arange(w, device=dev)[None, :]
        inside = (r >= top) & (r < top + cutout) & (c >= left) & (c < left + cutout)
        x = x.masked_fill(inside, 0.0)
    return x
