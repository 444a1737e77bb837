"""The dp x cp process mesh: the single source of truth for who is who.

Layout: rank = dp_rank * cp_size + cp_rank. The ranks of one context-parallel
group are consecutive, so with the usual "ranks fill a node first" placement a
CP group shares a node and its heavy K/V traffic stays on the fast links.

Gradient reduction goes over the whole world (dp x cp flattened, like
torchtitan's `dp_shard_cp`): the ranks of a CP group hold the same parameters
and each computes a partial gradient of the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Mesh:
    world_size: int
    rank: int
    dp_size: int
    cp_size: int
    # Process groups; None when torch.distributed is not initialised (one process).
    cp_group: object = field(default=None, repr=False)
    dp_group: object = field(default=None, repr=False)
    grad_group: object = field(default=None, repr=False)
    # The compute device: every tensor handed to a collective lives here (NCCL rejects CPU tensors).
    device: torch.device = field(default=torch.device("cpu"), repr=False)

    @property
    def dp_rank(self) -> int:
        """Rows are assigned by this: all ranks of a CP group read the same row and each
        keeps its own shard of it."""
        return self.rank // self.cp_size

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp_size

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    @property
    def loss_scale_for_grad_reduction(self) -> int:
        """cp: turns the engine's gradient average over dp x cp into sum-over-cp, mean-over-dp
        (why: `longctx.trainer.loss.cp_normalized_loss`)."""
        return self.cp_size

    # -- metric and evaluation collectives: the one place they are issued ------------------------
    def _group(self, group):
        """"world" / "dp" / "cp" or a ProcessGroup -> (group, its size)."""
        if isinstance(group, str):
            sizes = {"world": self.world_size, "dp": self.dp_size, "cp": self.cp_size}
            if group not in sizes:
                raise ValueError(f"unknown mesh group {group!r}; expected world, dp or cp")
            pg = {"world": self.grad_group, "dp": self.dp_group, "cp": self.cp_group}[group]
            return pg, sizes[group]
        return group, (dist.get_world_size(group) if group is not None and dist.is_initialized() else 1)

    def all_reduce(self, values: Sequence[float], group="world", op: str = "sum") -> list[float]:
        """`values` reduced (sum / max / min) over `group`, as Python floats. The fp64 tensor
        handed to the collective is made on `self.device`."""
        pg, size = self._group(group)
        if size == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(t, op=ops[op], group=pg)
        return t.tolist()

    def all_gather(self, value: float, group="cp") -> list[float]:
        """Every rank's `value` over `group`, in group-rank order (a tensor on `self.device`)."""
        pg, size = self._group(group)
        if size == 1:
            return [float(value)]
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        out = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(out, t, group=pg)
        return [float(x) for x in torch.cat(out).tolist()]

    def cp_ranks(self, dp_rank: int | None = None) -> list[int]:
        """Global ranks of a CP group (this rank's by default)."""
        d = self.dp_rank if dp_rank is None else dp_rank
        return [d * self.cp_size + c for c in range(self.cp_size)]

    def dp_ranks(self, cp_rank: int | None = None) -> list[int]:
        """Global ranks that share a cp_rank (this rank's by default)."""
        c = self.cp_rank if cp_rank is None else cp_rank
        return [d * self.cp_size + c for d in range(self.dp_size)]


def build_mesh(cp: int = 1, device=None) -> Mesh:
    """Build the mesh on the initialised default group (or a trivial one without dist).
    `device`: the compute device of this rank (None = CPU)."""
    device = torch.device(device if device is not None else "cpu")
    if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
        raise ValueError(f"parallel.cp must be a positive integer, got {cp!r}")
    if not (dist.is_available() and dist.is_initialized()):
        if cp != 1:
            raise ValueError(
                f"parallel.cp={cp} needs {cp} workers but torch.distributed is not "
                "initialised (a single process); use parallel.cp=1 or launch more workers"
            )
        return Mesh(world_size=1, rank=0, dp_size=1, cp_size=1, device=device)

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % cp != 0:
        raise ValueError(
            f"parallel.cp={cp} does not divide the {world} workers; "
            f"choose cp among the divisors of {world}: {[d for d in range(1, world + 1) if world % d == 0]}"
        )
    dp = world // cp

    # dist.new_group is collective: every rank creates every group, in the same
    # order, and keeps the ones it belongs to.
    cp_group = dp_group = None
    for d in range(dp):
        ranks = [d * cp + c for c in range(cp)]
        g = dist.new_group(ranks)
        if rank in ranks:
            cp_group = g
    for c in range(cp):
        ranks = [d * cp + c for d in range(dp)]
        g = dist.new_group(ranks)
        if rank in ranks:
            dp_group = g
    return Mesh(
        world_size=world,
        rank=rank,
        dp_size=dp,
        cp_size=cp,
        cp_group=cp_group,
        dp_group=dp_group,
        grad_group=dist.group.WORLD,
        device=device,
    )
