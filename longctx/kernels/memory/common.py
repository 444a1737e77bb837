"""Pieces shared by the gated-memory ops: dtypes, document ids, padding, chunk geometry,
masked decays and softmax."""

from __future__ import annotations

from typing import Optional

import torch

RETRIEVE = ("current", "chunk_start")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The recurrences run in fp32 (fp64 inputs stay fp64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_retrieve(retrieve: str) -> None:
    if retrieve not in RETRIEVE:
        raise ValueError(f"retrieve must be one of {RETRIEVE}, got {retrieve!r}")


def doc_tensor(doc_ids: Optional[torch.Tensor], B: int, S: int, device) -> torch.Tensor:
    """doc_ids as int64 ``[B, S]`` on `device` (None: one document)."""
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


def zero_diagonal(diff: torch.Tensor, dims: tuple[int, int] = (-2, -1)) -> torch.Tensor:
    """`diff` with an exact, gradient-free 0 where the two `dims` index the same position."""
    C = diff.shape[dims[0]]
    eye = torch.eye(C, dtype=torch.bool, device=diff.device)
    if dims != (-2, -1):
        eye = eye.view(*eye.shape, *[1] * (-dims[1] - 1))
    return torch.where(eye, torch.zeros((), dtype=diff.dtype, device=diff.device), diff)


def decay_matrix(L: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(L_t - L_i) where mask[t, i], else 0; L ``[..., C]`` cumulative log-gates (<= 0 steps).

    The difference is masked *before* exp so masked entries give exactly 0 with 0 gradient.
    The diagonal is exactly 1 with no gradient path: its derivative is 0 and, left in, its
    +g / -g contributions cancel in the cumulative sum's backward, which costs fp32 accuracy
    when the true gate gradient is tiny (saturated gates)."""
    diff = zero_diagonal(L[..., :, None] - L[..., None, :])
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


def chunk_end(t: torch.Tensor, last: int, dim: int = -1) -> torch.Tensor:
    """The chunk-end entry of `t` along `dim` for each chunk (dim ``dim - 1`` indexes chunks):
    position C-1, except position `last` in the last chunk (the last real token of a padded
    row), so that the chunk-end state of the last chunk is the state after the last real token."""
    if last == t.shape[dim] - 1:
        return t.select(dim, -1)
    cdim = (dim - 1) % t.dim()
    body = t.narrow(cdim, 0, t.shape[cdim] - 1).select(dim, -1)
    tail = t.narrow(cdim, t.shape[cdim] - 1, 1).select(dim, last)
    return torch.cat([body, tail], dim=cdim)


__all__ = ["RETRIEVE", "compute_dtype", "check_retrieve", "doc_tensor", "pad_seq", "chunk_geometry",
           "zero_diagonal", "decay_matrix", "masked_softmax", "silu_grad", "chunk_end"]
