"""Context parallelism for memory modules: passing the recurrent state between ranks.

Ranks of a CP group hold contiguous slices of the row, in rank order. Two schemes:

* **Affine fold** (linear Titans, GSA): a rank's whole slice maps its incoming state
  affinely, ``X_out = X_in @ T_r + B_r``. Each rank computes ``(T_r, B_r)`` from a zero
  state, one differentiable all-gather shares them (plus the first/last document id of
  each slice), and each rank folds the maps of the ranks before it in fp32 to get its
  incoming state; then it recomputes its outputs from that state. Communication per rank
  is ``O(state)``, independent of the sequence length; no rank waits for another.
  A document that starts exactly at a slice boundary resets the state to the initial one.
* **Sequential passing** (MLP Titans, gated FIFO): the state is not affine (or not
  worth folding), so rank r receives its predecessor's final state, computes, and sends
  its own final state to rank r+1; in backward the state gradients flow the other way
  (``recv_prev`` / ``send_next``, autograd functions over point-to-point send/recv).

``group=None`` means a single rank: nothing is exchanged.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


def group_info(group) -> tuple[int, int]:
    """(world, rank) of `group`; (1, 0) for None or without an initialised process group."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _global(group, rank: int) -> int:
    return dist.get_global_rank(group, rank)


class _AllGather(torch.autograd.Function):
    """Differentiable all-gather of equal-shaped tensors: forward stacks them, backward
    all-reduces the gradient of the stack and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        world, rank = group_info(group)
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x, group=group)
        ctx.group, ctx.rank = group, rank
        return torch.stack(out)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g[ctx.rank], None


def all_gather_diff(x: torch.Tensor, group) -> torch.Tensor:
    """Stack of every rank's `x` (``[world, ...]``), differentiable.

    Every rank must call it, and every rank's result must reach its loss (use `tie` where
    a rank does not need it): its backward is a collective too."""
    world, _ = group_info(group)
    if world == 1:
        return x.unsqueeze(0)
    return _AllGather.apply(x, group)


def tie(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`y` plus an exact zero that depends on `t`, so that `t`'s backward (a collective) runs
    on this rank even when `t` is not otherwise used here."""
    return y + (t.sum() * 0).to(y.dtype)


def affine_fold(T: torch.Tensor, Bv: torch.Tensor, x_init: torch.Tensor, first_doc: torch.Tensor,
                last_doc: torch.Tensor, group, *, dense: bool, heads: int) -> torch.Tensor:
    """This rank's incoming state, from every rank's local affine map.

    T ``[G, N, N]`` (dense) or ``[G, N]`` (diagonal), Bv ``[G, R, N]``: this rank's map from a
    zero state; x_init ``[G, R, N]``: the state at a document start; first_doc / last_doc
    ``[Bsz]``: document ids of this slice's first and last token (``G = Bsz * heads``).
    One all-gather; the fold is in fp32 (fp64 inputs stay fp64).
    """
    world, rank = group_info(group)
    if world == 1:
        return x_init
    cdt = torch.float64 if Bv.dtype == torch.float64 else torch.float32
    sizes = [T.numel(), Bv.numel(), first_doc.numel(), last_doc.numel()]
    payload = torch.cat([T.to(cdt).reshape(-1), Bv.to(cdt).reshape(-1),
                         first_doc.to(cdt).reshape(-1), last_doc.to(cdt).reshape(-1)])
    gathered = all_gather_diff(payload, group)  # [world, P]
    parts = torch.split(gathered, sizes, dim=1)
    Ts = parts[0].view(world, *T.shape)
    Bs = parts[1].view(world, *Bv.shape)
    firsts, lasts = parts[2].detach(), parts[3].detach()
    xi = x_init.to(cdt)
    x = xi
    for r in range(rank):
        if r > 0:
            keep = (firsts[r] == lasts[r - 1]).repeat_interleave(heads).view(-1, 1, 1)
            x = torch.where(keep, x, xi)
        x = (x @ Ts[r] if dense else x * Ts[r][:, None, :]) + Bs[r]
    if rank > 0:
        keep = (firsts[rank] == lasts[rank - 1]).repeat_interleave(heads).view(-1, 1, 1)
        x = torch.where(keep, x, xi)
    # every rank (rank 0 included) must take part in the all-gather's backward all-reduce
    return tie(x, gathered).to(x_init.dtype)


# ---------------------------------------------------------------------------- sequential passing


class _RecvPrev(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, group, specs):
        world, rank = group_info(group)
        src = _global(group, rank - 1)
        out = []
        for shape, dtype in specs:
            t = torch.empty(shape, dtype=dtype, device=anchor.device)
            dist.recv(t, src=src, group=group)
            out.append(t)
        ctx.group, ctx.dst = group, src
        ctx.specs = specs
        return tuple(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        for g, (shape, dtype) in zip(grads, ctx.specs):
            g = torch.zeros(shape, dtype=dtype) if g is None else g.to(dtype).contiguous()
            dist.send(g, dst=ctx.dst, group=ctx.group)
        return None, None, None


class _SendNext(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, *state):
        world, rank = group_info(group)
        dst = _global(group, rank + 1)
        for t in state:
            dist.send(t.detach().contiguous(), dst=dst, group=group)
        ctx.group, ctx.src = group, dst
        ctx.specs = [(tuple(t.shape), t.dtype, t.device) for t in state]
        return state[0].new_zeros(())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz):
        grads = []
        for shape, dtype, device in ctx.specs:
            g = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(g, src=ctx.src, group=ctx.group)
            grads.append(g)
        return (None, *[g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:])])


def recv_prev(template: Sequence[torch.Tensor], group) -> Optional[tuple[torch.Tensor, ...]]:
    """The predecessor's final state (same shapes/dtypes as `template`), or None on rank 0.

    Differentiable: in backward the gradients of the received tensors go back to rank r-1."""
    world, rank = group_info(group)
    if world == 1 or rank == 0:
        return None
    device = template[0].device
    anchor = torch.zeros((), device=device, requires_grad=torch.is_grad_enabled())
    specs = [(tuple(t.shape), t.dtype) for t in template]
    return _RecvPrev.apply(anchor, group, specs)


def send_next(y: torch.Tensor, state: Sequence[torch.Tensor], group) -> torch.Tensor:
    """Send this rank's final state to rank r+1; returns `y` tied to the send so that, in
    backward, the state's gradient is received from rank r+1 and flows into this rank's graph."""
    world, rank = group_info(group)
    if world == 1 or rank == world - 1:
        return y
    zero = _SendNext.apply(group, *state)
    return y + zero.to(y.dtype)


__all__ = ["group_info", "all_gather_diff", "tie", "affine_fold", "recv_prev", "send_next"]
