"""Shared pieces of the memory modules: the base class, chunk geometry, masked softmax."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

RETRIEVE = ("current", "chunk_start")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The recurrences run in fp32 (fp64 inputs stay fp64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def doc_tensor(doc_ids: Optional[torch.Tensor], B: int, S: int, device) -> torch.Tensor:
    if doc_ids is None:
        return torch.zeros(B, S, dtype=torch.long, device=device)
    if doc_ids.shape != (B, S):
        raise ValueError(f"doc_ids must have shape {(B, S)}, got {tuple(doc_ids.shape)}")
    return doc_ids.to(device=device, dtype=torch.long)


def pad_seq(t: torch.Tensor, pad: int, value: float = 0.0, dim: int = 1) -> torch.Tensor:
    """Append `pad` entries along `dim` (filled with `value`, or repeating the last entry if value is None)."""
    if pad == 0:
        return t
    if value is None:
        last = t.narrow(dim, t.shape[dim] - 1, 1)
        return torch.cat([t, last.expand(*[pad if d == dim else -1 for d in range(t.dim())])], dim=dim)
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


def chunk_geometry(doc: torch.Tensor, C: int, doc_in: Optional[torch.Tensor] = None):
    """Masks for chunks of a padded row of documents.

    doc ``[B, n*C]`` -> (cont ``[B, n, C]``: token is in the document that was running just
    before its chunk (the state carried into the chunk is its own); mask ``[B, n, C, C]``:
    i <= t and same document; first ``[B, n, C]``: token starts a segment (first token of
    the chunk or first token of a document inside it)). ``doc_in [B]``: the document of the
    token before the row (None = the row's first document, i.e. the incoming state belongs
    to it).
    """
    B, Sp = doc.shape
    n = Sp // C
    d = doc.view(B, n, C)
    first_prev = d[:, 0, 0] if doc_in is None else doc_in.to(d.dtype)
    prev = torch.cat([first_prev.view(B, 1), d[:, :-1, -1]], dim=1)  # [B, n]
    cont = d == prev[..., None]
    tril = torch.ones(C, C, dtype=torch.bool, device=doc.device).tril()
    mask = (d[..., :, None] == d[..., None, :]) & tril
    first = torch.ones_like(d, dtype=torch.bool)
    first[..., 1:] = d[..., 1:] != d[..., :-1]
    return cont, mask, first


def decay_matrix(L: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(L_t - L_i) where mask[t, i], else 0; L ``[..., C]`` cumulative log-gates (<= 0 steps).

    The difference is masked *before* exp so masked entries give exactly 0 with 0 gradient.
    The diagonal is exactly 1 with no gradient path: its derivative is 0 and, left in, its
    +g / -g contributions cancel in the cumulative sum's backward, which costs fp32 accuracy
    when the true gate gradient is tiny (saturated gates)."""
    diff = L[..., :, None] - L[..., None, :]
    C = L.shape[-1]
    eye = torch.eye(C, dtype=torch.bool, device=L.device)
    diff = torch.where(eye, torch.zeros((), dtype=L.dtype, device=L.device), diff)
    return torch.exp(diff.masked_fill(~mask, float("-inf")))


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over `valid` entries; rows with nothing valid give 0 (no NaN, forward or backward)."""
    s = scores.masked_fill(~valid, float("-inf"))
    m = s.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m)
    den = e.sum(dim=dim, keepdim=True)
    return e / den.clamp(min=torch.finfo(e.dtype).tiny)


def silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


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


class MemoryModule(nn.Module):
    """Base: `forward(x, doc_ids=None, group=None)` fast path, `reference(x, doc_ids=None)` loop.

    Both take ``retrieve="current"`` (read the memory after absorbing token t, the default)
    or ``"chunk_start"`` (read the memory as it was at the start of t's chunk, or the
    fresh memory if t's document started inside the chunk: what MAC prepends to a segment).
    """

    name = "base"
    #: True when the context-parallel path needs rank boundaries on chunk boundaries.
    needs_chunk_aligned_cp = True

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

    @staticmethod
    def _check_retrieve(retrieve: str) -> None:
        if retrieve not in RETRIEVE:
            raise ValueError(f"retrieve must be one of {RETRIEVE}, got {retrieve!r}")

    def _check_x(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, S, {self.dim}], got {tuple(x.shape)}")

    def _check_cp_alignment(self, S_local: int, world: int, rank: int) -> None:
        if world > 1 and self.needs_chunk_aligned_cp and rank < world - 1 and S_local % self.chunk_size:
            raise ValueError(
                f"{self.name} memory under context parallelism needs each rank's slice ({S_local} tokens) "
                f"to be a multiple of chunk_size={self.chunk_size}: chunks are a global grid; pad rows "
                f"to a multiple of cp * chunk_size")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, head_dim={self.head_dim}, chunk_size={self.chunk_size}"


__all__ = ["MemoryModule", "HeadRMSNorm", "chunk_geometry", "decay_matrix", "masked_softmax", "doc_tensor",
           "pad_seq", "silu_grad", "compute_dtype", "RETRIEVE"]
