"""Shared pieces of the memory modules: the base class, its default (single-rank) state
passing, the per-head output norm. The recurrences are ops in ``longctx.kernels.memory``."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from longctx.kernels.memory.common import RETRIEVE, check_retrieve, compute_dtype, doc_tensor


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last dim (the head dim), one weight shared by the heads."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype != torch.float64 else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class LocalStatePassing:
    """How a memory module passes its recurrent state between the ranks that hold contiguous
    slices of a row: here a single rank, nothing to pass (every `MemoryModule`'s default).
    ``context_parallel_memory`` (in the parallel package) hands a module the real one.

    * ``fold(local_map, reset, first_doc, last_doc)`` -> this slice's incoming state, for
      states a slice maps affinely (``X_out = X_in @ T + B``, or ``X_in * T[..., None, :] + B``
      for a diagonal T): `local_map()` gives this slice's (T, B) from a zero state (only
      called when there are other ranks), `reset` ``[B, H, R, N]`` is the state at a
      document start, first_doc / last_doc ``[B]`` the documents of the slice's first and
      last tokens (a document starting at a slice boundary starts from `reset`).
    * ``recv_prev(reset, first_doc=None)`` -> the previous rank's final state (a tuple like
      `reset`), or None (the first rank); rows whose first document is not the one the
      previous slice ended in get `reset` (no reset when first_doc is None).
    * ``send_next(y, state, last_doc=None)`` -> `y`, with `state` (and `last_doc`) sent to the
      next rank; in backward the state's gradient comes back from there.
    """

    world, rank = 1, 0

    def fold(self, local_map: Callable[[], tuple[torch.Tensor, torch.Tensor]], reset: torch.Tensor,
             first_doc: torch.Tensor, last_doc: torch.Tensor) -> torch.Tensor:
        return reset

    def recv_prev(self, reset: Sequence[torch.Tensor], first_doc: Optional[torch.Tensor] = None):
        return None

    def send_next(self, y: torch.Tensor, state: Sequence[torch.Tensor],
                  last_doc: Optional[torch.Tensor] = None) -> torch.Tensor:
        return y

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


LOCAL = LocalStatePassing()


class MemoryModule(nn.Module):
    """Base: `forward(x, doc_ids=None)` fast path, `reference(x, doc_ids=None)` loop.

    Both take ``retrieve="current"`` (read the memory after absorbing token t, the default)
    or ``"chunk_start"`` (read the memory as it was at the start of t's chunk, or the
    fresh memory if t's document started inside the chunk: what MAC prepends to a segment).
    The fast path passes its state through `state_passing` (single rank by default).
    """

    name = "base"
    #: True when the context-parallel path needs rank boundaries on chunk boundaries.
    needs_chunk_aligned_cp = True
    #: What the forward passes its state through (`LocalStatePassing`); set per module by
    #: ``context_parallel_memory`` (parallel package).
    state_passing: LocalStatePassing = LOCAL

    def __init__(self, dim: int, num_heads: int, chunk_size: int, head_dim: Optional[int] = None,
                 backend: str = "auto"):
        super().__init__()
        if dim <= 0 or num_heads <= 0 or chunk_size <= 0:
            raise ValueError(f"dim, num_heads and chunk_size must be positive, got {dim}, {num_heads}, {chunk_size}")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}; give head_dim")
            head_dim = dim // num_heads
        self.dim, self.num_heads, self.head_dim, self.chunk_size = dim, num_heads, head_dim, chunk_size
        self.backend = backend

    def _param_dtype(self) -> torch.dtype:
        return self.wq.weight.dtype

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        """x in the parameters' dtype (under autocast a block may hand bf16 activations to fp32
        weights; the memory runs with autocast off)."""
        return x.to(self._param_dtype())

    def _begin(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor], retrieve: str,
               aligned: Optional[bool] = None) -> torch.Tensor:
        """Check the arguments (and, with `aligned`, the CP chunk alignment); the doc ids ``[B, S]``."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, S, {self.dim}], got {tuple(x.shape)}")
        check_retrieve(retrieve)
        B, S, _ = x.shape
        sp = self.state_passing
        if aligned and sp.world > 1 and sp.rank < sp.world - 1 and S % self.chunk_size:
            raise ValueError(
                f"{self.name} memory under context parallelism needs each rank's slice ({S} tokens) "
                f"to be a multiple of chunk_size={self.chunk_size}: chunks are a global grid; pad rows "
                f"to a multiple of cp * chunk_size")
        return doc_tensor(doc_ids, B, S, x.device)

    def _heads_out(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y ``[B, S, H, D]`` -> ``wo(norm(y))`` ``[B, S, dim]`` in x's dtype."""
        B, S = y.shape[:2]
        return self.wo(self.norm(y).reshape(B, S, -1).to(self._param_dtype())).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, head_dim={self.head_dim}, chunk_size={self.chunk_size}"


__all__ = ["MemoryModule", "LocalStatePassing", "LOCAL", "HeadRMSNorm", "compute_dtype", "RETRIEVE"]
