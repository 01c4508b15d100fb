"""Dead-codeword restarts for the VQ bottleneck (training only).

A VQ codebook initialised at random collapses when the encoder's outputs start far from most codewords: every
vector picks the same few rows, the others never receive a gradient, and the condition carries a fraction of its
bits (a tiny CoD trained on CPU used 1 of its 256 codewords). The standard remedy (Dhariwal et al. 2020,
"Jukebox"; Zeghidour et al. 2021) re-seeds codewords that went unused with encoder outputs of the current batch.
This changes only how the codebook is trained: the model, its state-dict layout and the bitstream are those of
the release, and `codebook_restarts: false` trains exactly the release's recipe.

Usage is counted over windows of `every` optimizer steps (the first window is the first step, which doubles as
a data-dependent initialisation). Counts are summed over ranks and candidates gathered and ordered by
(sample id, position), so 1 process and N data-parallel processes re-seed the same rows with the same vectors,
and a resumed run continues exactly (the counts are a buffer in the checkpoint; the draw is seeded by the step).
Observation stays on the model's device (no host copy or sync on the training path); candidates move to the host
only at the end of a window.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

CANDIDATES_PER_SAMPLE = 64


class CodebookRestarts(nn.Module):
    def __init__(self, num_codes: int, every: int = 100, seed: int = 0):
        super().__init__()
        self.every, self.seed = every, seed
        self.register_buffer("counts", torch.zeros(num_codes, dtype=torch.int64))  # uses in the current window
        self._candidates: tuple[torch.Tensor, torch.Tensor] | None = None
        self._step_counts: torch.Tensor | None = None  # this optimizer step's counts (all micro-batches)

    @torch.no_grad()
    def observe(self, z: torch.Tensor, indices: torch.Tensor, sample_ids: torch.Tensor) -> None:
        """One forward's encoder outputs z [B, dim, h, w], their indices and the batch's sample ids."""
        B, dim, h, w = z.shape
        counts = torch.bincount(indices.flatten(), minlength=self.counts.numel())
        self._step_counts = counts if self._step_counts is None else self._step_counts + counts
        positions = torch.arange(0, h * w, max(1, (h * w) // CANDIDATES_PER_SAMPLE), device=z.device)
        positions = positions[:CANDIDATES_PER_SAMPLE]
        vectors = z.detach().float().flatten(2).transpose(1, 2)[:, positions]  # [B, keep, dim]
        keys = sample_ids.to(z.device).long()[:, None] * (h * w) + positions[None]
        self._candidates = (vectors.reshape(-1, dim), keys.reshape(-1))

    @torch.no_grad()
    def step(self, codebooks: list[torch.Tensor], step: int) -> int:
        """After optimizer step number `step` (0-based): count its usage and, at the end of a window, re-seed the
        rows unused in it (in every given codebook: the trained one and its EMA). Returns the rows re-seeded."""
        counts, self._step_counts = self._step_counts, None
        if counts is None:
            return 0
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            dist.all_reduce(counts)
        self.counts += counts.to(self.counts.device)
        if step != 0 and (step + 1) % self.every:
            return 0
        dead = torch.nonzero(self.counts == 0).flatten().cpu()
        self.counts.zero_()
        candidates = [tuple(t.cpu() for t in self._candidates)]
        if distributed:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, candidates)
            candidates = [c for part in gathered for c in part]
        if dead.numel() == 0:
            return 0
        vectors = torch.cat([v for v, _ in candidates])
        keys = torch.cat([k for _, k in candidates])
        vectors = vectors[torch.argsort(keys)]  # the same order whatever the rank split
        g = torch.Generator().manual_seed(hash((self.seed, step, 0xC0DEB00C)) & 0x7FFFFFFFFFFF)
        pick = torch.randperm(vectors.shape[0], generator=g).repeat(-(-dead.numel() // vectors.shape[0]))
        new = vectors[pick[: dead.numel()]]
        for codebook in codebooks:
            _assign_rows(codebook, dead, new)
        return dead.numel()


def _assign_rows(param: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """param[rows] = values, for plain tensors and for FSDP2's row-sharded DTensors."""
    if hasattr(param, "to_local"):
        from torch.distributed.tensor import distribute_tensor

        full = param.full_tensor()
        full[rows.to(full.device)] = values.to(full)
        param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements).to_local())
    else:
        param.data[rows.to(param.device)] = values.to(param)
