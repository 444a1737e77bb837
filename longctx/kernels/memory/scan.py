"""The chunked linear recurrence that linear Titans and Gated Slot Attention reduce to.

Both memories are linear recurrences over a matrix state. Cut the sequence into
chunks of C tokens; everything *inside* a chunk is a handful of batched matmuls
(done in the memory ops, ``longctx.kernels.memory.<name>.chunk``), and what is
left is one recurrence over the chunk states, affine in the state:

    X_c = X_{c-1} @ T_c + B_c            X: [R, N] per (batch, head), c = 1..n

- Gated Slot Attention (and any gated linear attention with a per-column forget
  gate): ``T_c = diag(gamma_c)`` (the product of the chunk's gates), ``B_c`` the
  chunk's decayed outer products; ``X = [K~^T ; V~^T]`` (both slot memories
  stacked, ``N`` = slots).
- Linear Titans (matrix memory W with momentum S, gradients taken at the
  chunk-start weights): ``X = [W | S]`` (``N = 2 d_k``) and ``T_c`` is a dense
  ``2d_k x 2d_k`` matrix, because the chunk-start gradient ``2 (W_0 k - v) k^T``
  makes the chunk's update depend on ``W_0`` through ``W_0 k k^T``.

``affine_scan`` returns every chunk-start state (``starts[:, c] = X_{c-1}``, from
which the chunk's outputs are batched matmuls) and the final state. The same
map composes across context-parallel ranks (the affine fold of
``longctx.parallel.memory_state``).

Backends: ``"torch"`` (a loop over chunks; autograd), ``"triton"`` (one program per
(batch, head) keeps the state in registers and walks the chunks, forward and
backward; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"auto"`` (triton on CUDA).
``naive_recurrence`` is the token-by-token loop used as the reference in tests.
"""

from __future__ import annotations

from typing import Optional

import torch

BACKENDS = ("auto", "torch", "triton")

__all__ = ["affine_scan", "scan_torch", "naive_recurrence", "BACKENDS", "select_backend"]


def select_backend(backend: str, x: torch.Tensor, shape: Optional[tuple[int, int, bool]] = None) -> str:
    """"torch" or "triton" for tensors like `x`; `shape` = (R, N, dense) of the state, if known.
    "auto" takes Triton on CUDA when the state fits the kernel's tile, else the torch loop."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown recurrence backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    from . import triton_scan

    ok, why = triton_scan.supports(x)
    if ok and shape is not None:
        ok, why = triton_scan.fits(*shape)
    if backend == "triton":
        if not ok:
            raise RuntimeError(f"backend='triton' cannot run here: {why}")
        return "triton"
    return "triton" if (ok and x.is_cuda) else "torch"


def scan_torch(x0: torch.Tensor, b: torch.Tensor, t: Optional[torch.Tensor] = None,
               gamma: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk loop in torch (differentiable by autograd)."""
    n = b.shape[1]
    x = x0
    starts = []
    for c in range(n):
        starts.append(x)
        if t is not None:
            x = torch.matmul(x, t[:, c]) + b[:, c]
        else:
            x = x * gamma[:, c, None, :] + b[:, c]
    if not starts:
        return b.new_zeros(b.shape), x
    return torch.stack(starts, dim=1), x


def affine_scan(x0: torch.Tensor, b: torch.Tensor, t: Optional[torch.Tensor] = None,
                gamma: Optional[torch.Tensor] = None, *, backend: str = "auto"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """X_c = X_{c-1} @ t[:, c] + b[:, c] (dense) or X_{c-1} * gamma[:, c, None, :] + b[:, c].

    x0 ``[G, R, N]``, b ``[G, n, R, N]``, t ``[G, n, N, N]`` or gamma ``[G, n, N]`` (exactly
    one). Returns ``(starts [G, n, R, N], final [G, R, N])`` with ``starts[:, c] = X_{c-1}``.
    Computed in fp32 (fp64 inputs stay fp64 on the torch backend).
    """
    if (t is None) == (gamma is None):
        raise ValueError("give exactly one of t (dense transition) and gamma (diagonal transition)")
    G, n, R, N = b.shape
    if x0.shape != (G, R, N):
        raise ValueError(f"x0 must have shape {(G, R, N)}, got {tuple(x0.shape)}")
    if t is not None and t.shape != (G, n, N, N):
        raise ValueError(f"t must have shape {(G, n, N, N)}, got {tuple(t.shape)}")
    if gamma is not None and gamma.shape != (G, n, N):
        raise ValueError(f"gamma must have shape {(G, n, N)}, got {tuple(gamma.shape)}")
    impl = select_backend(backend, b, (R, N, t is not None))
    if impl == "torch" or b.dtype == torch.float64:
        return scan_torch(x0, b, t, gamma)
    from .triton_scan import TritonAffineScan

    dense = t is not None
    starts, final = TritonAffineScan.apply(x0, b, t if dense else gamma, dense)
    return starts.to(b.dtype), final.to(b.dtype)


def naive_recurrence(x0: torch.Tensor, steps) -> torch.Tensor:
    """Token-level reference for tests: apply ``x = x @ T + B`` for each (T, B) in ``steps``."""
    x = x0
    for t, b in steps:
        x = x @ t + b
    return x
