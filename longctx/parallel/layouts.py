"""Sequence layouts: which tokens of a row each CP rank holds.

A layout is defined by `token_index(seq_len, rank)`: the global indices of
the tokens that `rank` holds, in local order. `shard` and `unshard` follow
from it; subclasses (zigzag, striped, ...) only need to override
`token_index`, and may override `shard`/`unshard` with cheaper versions.
"""

from __future__ import annotations

import abc

import torch
import torch.distributed as dist

from .comm import resolve_group


class Layout(abc.ABC):
    name = "base"

    def __init__(self, group=None):
        self.group, self.cp_size, self.cp_rank = resolve_group(group)

    # -- the definition of the layout ---------------------------------------
    @abc.abstractmethod
    def token_index(self, seq_len: int, rank: int | None = None, device=None) -> torch.Tensor:
        """int64 global token indices held by `rank` (this rank by default)."""

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len % self.cp_size != 0:
            raise ValueError(
                f"{self.name} layout: seq_len={seq_len} is not divisible by cp_size={self.cp_size}"
            )

    # -- derived operations --------------------------------------------------
    def shard(self, full: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of `full` along `dim` (differentiable)."""
        idx = self.token_index(full.shape[dim], device=full.device)
        return full.index_select(dim, idx)

    def unshard(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """All-gather the shards of the CP group and restore global token order.

        Not differentiable: meant for outputs, logging and tests.
        """
        if self.cp_size == 1:
            return local
        dim = dim % local.dim()
        seq_len = local.shape[dim] * self.cp_size
        parts = self._all_gather(local)
        gathered = torch.cat(parts, dim=dim)
        # Position p of `gathered` holds global token order[p]; invert that.
        order = torch.cat([self.token_index(seq_len, r) for r in range(self.cp_size)])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(seq_len)
        return gathered.index_select(dim, inverse.to(local.device))

    def _all_gather(self, local: torch.Tensor) -> list[torch.Tensor]:
        local = local.detach().contiguous()  # gloo needs contiguous buffers
        parts = [torch.empty_like(local) for _ in range(self.cp_size)]
        dist.all_gather(parts, local, group=self.group)
        return parts


class ContiguousLayout(Layout):
    """Rank r holds tokens [r * S/N, (r+1) * S/N): simple, but causal work is unbalanced."""

    name = "contiguous"

    def token_index(self, seq_len: int, rank: int | None = None, device=None) -> torch.Tensor:
        self.check_seq_len(seq_len)
        rank = self.cp_rank if rank is None else rank
        n = seq_len // self.cp_size
        return torch.arange(rank * n, (rank + 1) * n, dtype=torch.int64, device=device)

    def shard(self, full: torch.Tensor, dim: int = 1) -> torch.Tensor:
        seq_len = full.shape[dim]
        self.check_seq_len(seq_len)
        n = seq_len // self.cp_size
        # A slice instead of index_select: no gather; contiguous so it can go to gloo.
        return full.narrow(dim, self.cp_rank * n, n).contiguous()

    def unshard(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        if self.cp_size == 1:
            return local
        # Shards are already in rank order: concatenating them is the inverse.
        return torch.cat(self._all_gather(local), dim=dim)


class ZigzagLayout(Layout):
    """The row in 2N equal chunks; rank r holds chunks r and 2N-1-r (in that order).

    Under causal masking every rank then owns one early and one late chunk, so
    each rank has exactly the same number of visible (query, key) pairs.
    Needs seq_len divisible by 2 * cp_size.
    """

    name = "zigzag"

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len % (2 * self.cp_size) != 0:
            raise ValueError(
                f"{self.name} layout: seq_len={seq_len} is not divisible by 2 * cp_size={2 * self.cp_size}"
            )

    def token_index(self, seq_len: int, rank: int | None = None, device=None) -> torch.Tensor:
        self.check_seq_len(seq_len)
        rank = self.cp_rank if rank is None else rank
        c = seq_len // (2 * self.cp_size)
        late = 2 * self.cp_size - 1 - rank
        return torch.cat(
            [
                torch.arange(rank * c, (rank + 1) * c, dtype=torch.int64, device=device),
                torch.arange(late * c, (late + 1) * c, dtype=torch.int64, device=device),
            ]
        )

    def shard(self, full: torch.Tensor, dim: int = 1) -> torch.Tensor:
        seq_len = full.shape[dim]
        self.check_seq_len(seq_len)
        c = seq_len // (2 * self.cp_size)
        late = 2 * self.cp_size - 1 - self.cp_rank
        # Two slices instead of a gather; cat makes the result contiguous.
        return torch.cat([full.narrow(dim, self.cp_rank * c, c), full.narrow(dim, late * c, c)], dim=dim)

    def unshard(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        if self.cp_size == 1:
            return local
        dim = dim % local.dim()
        parts = self._all_gather(local)
        c = local.shape[dim] // 2
        early = [p.narrow(dim, 0, c) for p in parts]
        late = [p.narrow(dim, c, c) for p in reversed(parts)]
        return torch.cat(early + late, dim=dim)


class StripedLayout(Layout):
    """Rank r holds tokens r, r+N, r+2N, ... (Striped Attention, Brandon et al. 2023).

    Every ring block is then a near-triangle under causal masking, so the
    work is balanced without special cases (rank r's row i sees keys up to
    token r + i*N). Needs seq_len divisible by cp_size (the strategies ask
    for 2 * cp_size, like the others).
    """

    name = "striped"

    def token_index(self, seq_len: int, rank: int | None = None, device=None) -> torch.Tensor:
        self.check_seq_len(seq_len)
        rank = self.cp_rank if rank is None else rank
        return torch.arange(rank, seq_len, self.cp_size, dtype=torch.int64, device=device)

    def shard(self, full: torch.Tensor, dim: int = 1) -> torch.Tensor:
        seq_len = full.shape[dim]
        self.check_seq_len(seq_len)
        dim = dim % full.dim()
        # [.., S, ..] -> [.., S/N, N, ..]: token t = i*N + r sits at (i, r).
        return full.unflatten(dim, (seq_len // self.cp_size, self.cp_size)).select(dim + 1, self.cp_rank).contiguous()

    def unshard(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        if self.cp_size == 1:
            return local
        dim = dim % local.dim()
        # Interleave: stack the shards as the new inner axis, then merge it into the sequence.
        return torch.stack(self._all_gather(local), dim=dim + 1).flatten(dim, dim + 1)


LAYOUTS = {"contiguous": ContiguousLayout, "zigzag": ZigzagLayout, "striped": StripedLayout}
