"""The tanh logit layer of the study (docs/method.md, "The tanh logit layer")."""

import torch
from torch import Tensor, nn


class TanhHead(nn.Module):
    """Bounded logits: ``|t| * tanh(BN(z) / |t|)``.

    ``BN`` is ``BatchNorm1d(num_classes, affine=False)`` (batch statistics in train mode,
    running ones in eval mode); ``t`` is one learnable scalar shared by all logits,
    initially ``t_init``. Every output lies in (-|t|, |t|), and near 0 the map is the
    identity on the normalised logits. (The paper's text writes ``t * tanh(z)``; this is
    what the authors' code ran.) Input and output (B, num_classes); train mode needs B > 1.
    """

    def __init__(self, num_classes: int, t_init: float = 1.0) -> None:
        super().__init__()
        if t_init == 0:
            raise ValueError("TanhHead: t_init must be non-zero (the output is |t| tanh(z/|t|))")
        self.bn = nn.BatchNorm1d(num_classes, affine=False)
        self.t = nn.Parameter(torch.tensor(float(t_init)))

    def forward(self, z: Tensor) -> Tensor:
        scale = self.t.abs()  # |t|: the bound on every output
        return scale * torch.tanh(self.bn(z) / scale)
