"""Communication helpers shared by the CP strategies.

Gloo silently corrupts non-contiguous tensors, so every helper here makes its
inputs contiguous before handing them to torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ByteCounter:
    """Bytes this rank sent and received (what `last_stats` reports)."""

    sent: int = 0
    recv: int = 0

    def add_sent(self, *tensors: torch.Tensor | None) -> None:
        self.sent += sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def add_recv(self, *tensors: torch.Tensor | None) -> None:
        self.recv += sum(t.numel() * t.element_size() for t in tensors if t is not None)


def resolve_group(group):
    """(group, size, rank) for `group`; None means WORLD, or a trivial group without dist."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return None, 1, 0
    if group is None:
        group = dist.group.WORLD
    return group, dist.get_world_size(group), dist.get_rank(group)


class PeerExchange:
    """One posted exchange: send `tensors` to group rank `dst`, receive the same shapes from `src`.

    Posted at construction and returns at once, so the caller can compute on the
    current buffers while the next ones travel (double buffering)::

        ex = ring_exchange([k, v, doc], group, counter)
        ...compute on k, v, doc...
        k, v, doc = ex.wait()          # the previous rank's tensors

    None entries (e.g. no doc ids) are not sent and come back as None.
    """

    def __init__(self, tensors, group, dst: int, src: int, counter: ByteCounter | None = None, tag_base: int = 0):
        gdst, gsrc = dist.get_global_rank(group, dst), dist.get_global_rank(group, src)
        # Send buffers are kept on self: they must stay alive until the transfer ends.
        self._send = [None if t is None else t.contiguous() for t in tensors]
        self._recv = [None if t is None else torch.empty_like(t) for t in self._send]
        ops = []
        # One tag per slot so that several tensors between the same pair of
        # ranks can never be matched out of order; callers with two exchanges
        # in flight at once give them different tag_base values.
        for tag, (s, r) in enumerate(zip(self._send, self._recv), start=tag_base):
            if s is None:
                continue
            ops.append(dist.P2POp(dist.isend, s, gdst, group=group, tag=tag))
            ops.append(dist.P2POp(dist.irecv, r, gsrc, group=group, tag=tag))
        self._works = dist.batch_isend_irecv(ops) if ops else []
        if counter is not None:
            counter.add_sent(*self._send)
            counter.add_recv(*self._recv)

    def wait(self) -> list[torch.Tensor | None]:
        for w in self._works:
            w.wait()
        self._works, self._send = [], None
        return self._recv


def ring_exchange(
    tensors, group, counter: ByteCounter | None = None, tag_base: int = 0
) -> PeerExchange:
    """Post one ring step for `tensors`: send to the next rank, receive from the previous."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    return PeerExchange(tensors, group, (rank + 1) % size, (rank - 1) % size, counter, tag_base)


def all_to_all(
    x: torch.Tensor,
    group,
    scatter_dim: int,
    gather_dim: int,
    counter: ByteCounter | None = None,
) -> torch.Tensor:
    """All-to-all over `group`: split `x` into N equal chunks along `scatter_dim`,
    send chunk j to rank j of the group, and concatenate the chunks received
    along `gather_dim` in source-rank order.

    E.g. sequence-sharded ``[B, S/N, H, D]`` with ``scatter_dim=2, gather_dim=1``
    becomes head-sharded ``[B, S, H/N, D]`` (rank j gets heads ``[j*H/N, (j+1)*H/N)``
    of every rank's tokens, rank 0's tokens first); ``scatter_dim=1,
    gather_dim=2`` is the inverse. With a trivial group it returns `x`.

    `counter` counts what crosses the network: the (N-1)/N of `x` that goes to
    other ranks is sent, and as much is received; the chunk a rank keeps for
    itself is not counted. Not differentiable by itself (wrap it).
    """
    if group is None:
        return x
    n = dist.get_world_size(group)
    if n == 1:
        return x
    nd = x.dim()
    scatter_dim, gather_dim = scatter_dim % nd, gather_dim % nd
    if x.shape[scatter_dim] % n != 0:
        raise ValueError(
            f"all_to_all: dim {scatter_dim} of shape {tuple(x.shape)} is not divisible by the group size {n}"
        )
    # [N, *chunk]: destination first, one contiguous buffer (gloo needs contiguous tensors).
    send = x.unflatten(scatter_dim, (n, x.shape[scatter_dim] // n)).movedim(scatter_dim, 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    if counter is not None:
        moved = send.numel() // n * (n - 1) * send.element_size()
        counter.sent += moved
        counter.recv += moved
    # recv[j] came from rank j: put the source index next to gather_dim and merge.
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


def all_gather_cat(
    x: torch.Tensor, group, dim: int = 1, counter: ByteCounter | None = None
) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in group-rank order (not differentiable).

    `counter` counts each rank's shard reaching the N-1 others: (N-1) x `x` bytes
    sent and (N-1) x `x` bytes received (what a ring all-gather moves).
    """
    if group is None:
        return x
    n = dist.get_world_size(group)
    if n == 1:
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    if counter is not None:
        moved = (n - 1) * x.numel() * x.element_size()
        counter.sent += moved
        counter.recv += moved
    return torch.cat(parts, dim=dim)


# ---------------------------------------------------------------------------- differentiable / p2p helpers


class _AllGatherStack(torch.autograd.Function):
    """Differentiable all-gather of equal-shaped tensors: forward stacks them, backward
    all-reduces the gradient of the stack and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group, size, rank):
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(out, x, group=group)
        ctx.group, ctx.rank = group, rank
        return torch.stack(out)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g[ctx.rank], None, None, None


def all_gather_stack(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's `x` stacked in group-rank order (``[size, *x.shape]``), differentiable.

    `group` as in `resolve_group` (None = WORLD). Every rank must call it, and every rank's
    result must reach its loss (`tie` it where a rank does not need it): its backward is an
    all-reduce. `x` must live on the compute device (NCCL rejects CPU tensors)."""
    group, size, rank = resolve_group(group)
    if size == 1:
        return x.unsqueeze(0)
    return _AllGatherStack.apply(x, group, size, rank)


def tie(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`y` plus an exact zero that depends on `t`, so that `t`'s backward (a collective) runs
    on this rank even when `t` is not otherwise used here."""
    return y + (t.sum() * 0).to(y.dtype)


def send_tensors(tensors, group, dst: int) -> None:
    """Blocking send of `tensors` (made contiguous, detached) to group rank `dst`, in order."""
    gdst = dist.get_global_rank(group, dst)
    for t in tensors:
        dist.send(t.detach().contiguous(), dst=gdst, group=group)


def recv_tensors(specs, group, src: int, device) -> list[torch.Tensor]:
    """Blocking receive from group rank `src` of tensors ``(shape, dtype)`` in `specs`, in
    order, into new buffers on `device` (the compute device)."""
    gsrc = dist.get_global_rank(group, src)
    out = []
    for shape, dtype in specs:
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(t, src=gsrc, group=group)
        out.append(t)
    return out
