"""Vector-quantisation bottleneck of the condition codec (spec §3.3)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


DISTANCE_BUDGET_BYTES = 64 << 20


class VectorQuantizer(nn.Module):
    """Nearest-codeword quantiser with a straight-through estimator.

    Kept bit-compatible with the release (checkpoints and bitstreams depend on the index decisions):
    - distances use the expansion |z|^2 + |e|^2 - 2 z.e, argmin ties go to the lowest index;
    - the straight-through value is z + sg(zq - z), which can differ from zq by one rounding step;
    - the loss puts weight 1 on the encoder-moving term and beta on the codebook-moving term
      (reversed relative to VQ-VAE; see docs/compat.md).
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25):
        super().__init__()
        self.num_codes = num_codes
        self.dim = dim
        self.beta = beta
        # nn.Embedding's own init (normal_) costs over a second on the meta device the first time (it imports torch's
        # reference ops), and shape-only builds (load-time checks, FLOP counts) need no values: skip it there.
        weight = torch.empty(num_codes, dim)
        if weight.device.type != "meta":
            nn.init.normal_(weight)
        self.embedding = nn.Embedding(num_codes, dim, _weight=weight)

    @property
    def bits(self) -> int:
        return (self.num_codes - 1).bit_length()

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices [B, h, w] of the nearest codewords for z [B, dim, h, w]. The distance matrix (vectors x codes) is
        built in runs of rows that stay under DISTANCE_BUDGET_BYTES, since each row's argmin needs only its row:
        a 16-bit codebook on a fine grid would otherwise need tens of GB. Inputs that fit take the single call."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
        codebook = self.embedding.weight.to(flat.dtype)
        code_norms = codebook.pow(2).sum(1)[None]
        rows = max(1, DISTANCE_BUDGET_BYTES // (4 * self.num_codes))
        parts = [flat] if flat.shape[0] <= rows else flat.split(rows)
        out = [(part.pow(2).sum(1, keepdim=True) + code_norms - 2 * part @ codebook.t()).argmin(dim=1)
               for part in parts]
        return (out[0] if len(out) == 1 else torch.cat(out)).reshape(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Exact codebook rows for indices [B, h, w] -> [B, dim, h, w]."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (straight-through zq [B, dim, h, w], vq loss scalar, indices [B, h, w])."""
        indices = self.nearest(z)
        zq = self.lookup(indices).to(z.dtype)
        loss = F.mse_loss(zq.detach(), z) + self.beta * F.mse_loss(zq, z.detach())
        zq_st = z + (zq - z).detach()
        return zq_st, loss, indices
