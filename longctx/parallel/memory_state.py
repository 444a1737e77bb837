"""Context parallelism for memory modules: passing the recurrent state between ranks.

    context_parallel_memory(m, group)   # m: a MemoryModule, or a model holding some

hands every memory module `m` holds a `ContextParallelMemoryState` over `group` (None =
WORLD, as everywhere in ``longctx.parallel``; see ``comm.resolve_group``). The module calls
it exactly as attention calls its strategy (the interface: ``LocalStatePassing`` in
``longctx.models.memory.common``, the single-rank default).

Ranks of a CP group hold contiguous slices of the row, in rank order. Two schemes:

* **Affine fold** (linear Titans, GSA): a rank's whole slice maps its incoming state
  affinely, ``X_out = X_in @ T_r + B_r``. Each rank computes ``(T_r, B_r)`` from a zero
  state (the op's ``affine_map``), one differentiable all-gather shares them (plus the
  first/last document id of each slice), and each rank folds the maps of the ranks before
  it in fp32 to get its incoming state; then it computes its outputs from that state.
  Communication per rank is ``O(state)``, independent of the sequence length; no rank waits
  for another. A document that starts exactly at a slice boundary resets the state.
* **Sequential passing** (MLP Titans, gated FIFO): the state is not affine (or not worth
  folding), so rank r receives its predecessor's final state, computes, and sends its own
  final state to rank r+1; in backward the state gradients flow the other way
  (``recv_prev`` / ``send_next``, autograd functions over point-to-point send/recv).

Every tensor handed to a collective or a send/recv lives on the compute device (the
device of the state), including the zero gradients sent for unused received tensors.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from longctx.models.memory.common import LocalStatePassing, MemoryModule

from .comm import all_gather_stack, recv_tensors, resolve_group, send_tensors, tie


class _RecvPrev(torch.autograd.Function):
    """Forward: receive the tensors of `specs` from group rank `src`. Backward: send their
    gradients back there (zeros, on the compute device, for those without one)."""

    @staticmethod
    def forward(ctx, anchor, group, src, specs):
        ctx.group, ctx.src, ctx.specs, ctx.device = group, src, specs, anchor.device
        return tuple(recv_tensors(specs, group, src, anchor.device))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        send_tensors([torch.zeros(shape, dtype=dtype, device=ctx.device) if g is None else g.to(dtype)
                      for g, (shape, dtype) in zip(grads, ctx.specs)], ctx.group, ctx.src)
        return None, None, None, None


class _SendNext(torch.autograd.Function):
    """Forward: send `state` to group rank `dst`, return a zero scalar (to tie into the
    output). Backward: receive the state's gradients from there."""

    @staticmethod
    def forward(ctx, group, dst, *state):
        send_tensors(state, group, dst)
        ctx.group, ctx.dst = group, dst
        ctx.specs = [(tuple(t.shape), t.dtype) for t in state]
        ctx.device = state[0].device
        return state[0].new_zeros(())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz):
        grads = recv_tensors(ctx.specs, ctx.group, ctx.dst, ctx.device)
        return (None, None, *[g if need else None for g, need in zip(grads, ctx.needs_input_grad[2:])])


def _rows(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """keep ``[B]`` shaped to broadcast over `like` ``[B, ...]``."""
    return keep.view(-1, *[1] * (like.dim() - 1))


class ContextParallelMemoryState(LocalStatePassing):
    """State passing over the ranks of `group` (None = WORLD; one rank without
    torch.distributed): the `LocalStatePassing` interface, for real."""

    def __init__(self, group=None):
        self.group, self.world, self.rank = resolve_group(group)

    def __deepcopy__(self, memo):  # a process group is a shared handle: copies share it
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(world={self.world}, rank={self.rank})"

    # ------------------------------------------------------------------ affine fold

    def fold(self, local_map: Callable[[], tuple[torch.Tensor, torch.Tensor]], reset: torch.Tensor,
             first_doc: torch.Tensor, last_doc: torch.Tensor) -> torch.Tensor:
        """This rank's incoming state from every rank's local map (see `LocalStatePassing`).
        One all-gather; the fold is in fp32 (fp64 inputs stay fp64)."""
        if self.world == 1:
            return reset
        T, Bv = local_map()
        dense = T.dim() == Bv.dim()
        cdt = torch.float64 if Bv.dtype == torch.float64 else torch.float32
        sizes = [T.numel(), Bv.numel(), first_doc.numel(), last_doc.numel()]
        payload = torch.cat([t.to(device=Bv.device, dtype=cdt).reshape(-1) for t in (T, Bv, first_doc, last_doc)])
        gathered = all_gather_stack(payload, self.group)  # [world, P]
        parts = torch.split(gathered, sizes, dim=1)
        Ts = parts[0].view(self.world, *T.shape)
        Bs = parts[1].view(self.world, *Bv.shape)
        firsts, lasts = parts[2].detach(), parts[3].detach()
        xi = reset.to(cdt)
        x = xi
        for r in range(self.rank + 1):
            if r > 0:  # a document starting at the boundary before slice r starts from `reset`
                x = torch.where(_rows(firsts[r] == lasts[r - 1], x), x, xi)
            if r < self.rank:
                x = (x @ Ts[r] if dense else x * Ts[r][..., None, :]) + Bs[r]
        # every rank (rank 0 included) must take part in the all-gather's backward all-reduce
        return tie(x, gathered).to(reset.dtype)

    # ------------------------------------------------------------------ sequential passing

    def recv_prev(self, reset: Sequence[torch.Tensor], first_doc: Optional[torch.Tensor] = None):
        """The previous rank's final state (shapes / dtypes of `reset`), or None on rank 0.
        Differentiable: in backward the gradients of the received tensors go back to rank r-1."""
        if self.world == 1 or self.rank == 0:
            return None
        device = reset[0].device
        specs = [(tuple(t.shape), t.dtype) for t in reset]
        if first_doc is not None:
            specs.append(((first_doc.shape[0],), torch.float64))
        anchor = torch.zeros((), device=device, requires_grad=torch.is_grad_enabled())
        got = _RecvPrev.apply(anchor, self.group, self.rank - 1, specs)
        if first_doc is None:
            return tuple(got)
        *state, doc_in = got
        keep = first_doc.to(device=device, dtype=torch.float64) == doc_in  # same document continues
        return tuple(torch.where(_rows(keep, s), s, i) for s, i in zip(state, reset))

    def send_next(self, y: torch.Tensor, state: Sequence[torch.Tensor],
                  last_doc: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Send this rank's final state (and `last_doc`) to rank r+1; returns `y` tied to the
        send so that, in backward, the state's gradient comes back from rank r+1."""
        if self.world == 1 or self.rank == self.world - 1:
            return y
        state = list(state)
        if last_doc is not None:
            state.append(last_doc.to(device=state[0].device, dtype=torch.float64))
        zero = _SendNext.apply(self.group, self.rank + 1, *state)
        return y + zero.to(y.dtype)


def context_parallel_memory(module: nn.Module, group=None) -> nn.Module:
    """Hand `module` (a MemoryModule, or any module holding some) its state passing over
    `group` (None = WORLD): every MemoryModule inside gets one `ContextParallelMemoryState`.
    Returns `module`."""
    state = ContextParallelMemoryState(group)
    for m in module.modules():
        if isinstance(m, MemoryModule):
            m.state_passing = state
    return module


__all__ = ["context_parallel_memory", "ContextParallelMemoryState"]
