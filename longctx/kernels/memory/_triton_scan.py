"""Triton kernels for the chunk-level affine recurrence (see ``memory/scan.py``).

Loaded by ``memory.triton_scan._kernel_module()`` under one of two module names,
once with ``TRITON_INTERPRET=1`` (interpreted) and once without (compiled):
``triton.jit`` reads the interpreter switch when it decorates.

One program per group ``g`` (a (batch, head) pair) owns the whole state
``X [R, N]`` in registers and walks the chunks in order:

    forward:   Starts[g, c] = X;  X = X @ T[g, c] + B[g, c]      (DENSE)
                                  X = X * gamma[g, c][None, :] + B[g, c]   (diagonal)
    backward:  walks the chunks backwards with dX (the gradient w.r.t. the state
               after chunk c):  dB[c] = dX;  dT[c] = Starts[c]^T @ dX  (or
               dgamma[c] = sum_rows Starts[c] * dX);  dX = dX @ T[c]^T (or
               dX * gamma[c]) + dStarts[c].

All tensors are fp32 and contiguous; offsets are computed in int64. Only builtins of
``triton.language`` (and jit functions of this file) are used, so the interpreter works even
when triton was imported before ``TRITON_INTERPRET=1`` was set.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _tiles(R, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    # offsets and masks of the state tile X [R, N] (rn) and of a transition tile T [N, N] (kn)
    rr = tl.arange(0, BLOCK_R)
    cc = tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_N)
    rn = rr[:, None] * N + cc[None, :]
    m_rn = (rr[:, None] < R) & (cc[None, :] < N)
    kn = kk[:, None] * N + cc[None, :]
    m_kn = (kk[:, None] < N) & (cc[None, :] < N)
    return cc, kk, rn, m_rn, kn, m_kn


@triton.jit
def _scan_fwd(X0, B, T, Starts, Final, n_chunks, R, N,
              DENSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    cc, kk, rn, m_rn, kn, m_kn = _tiles(R, N, BLOCK_R, BLOCK_N)
    RN = R * N
    x = tl.load(X0 + g * RN + rn, mask=m_rn, other=0.0)
    for c in range(n_chunks):
        gc = g * n_chunks + c
        tl.store(Starts + gc * RN + rn, x, mask=m_rn)
        b = tl.load(B + gc * RN + rn, mask=m_rn, other=0.0)
        if DENSE:
            t = tl.load(T + gc * N * N + kn, mask=m_kn, other=0.0)
            x = tl.dot(x, t, input_precision="ieee") + b
        else:
            gm = tl.load(T + gc * N + cc, mask=cc < N, other=0.0)
            x = x * gm[None, :] + b
    tl.store(Final + g * RN + rn, x, mask=m_rn)


@triton.jit
def _scan_bwd(T, Starts, DStarts, DFinal, DX0, DB, DT, n_chunks, R, N,
              DENSE: tl.constexpr, HAS_DSTARTS: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    cc, kk, rn, m_rn, kn, m_kn = _tiles(R, N, BLOCK_R, BLOCK_N)
    # T^T laid out as [k, n] -> element (n, k) of T: address n * N + k
    tn = cc[None, :] * N + kk[:, None]
    RN = R * N
    dx = tl.load(DFinal + g * RN + rn, mask=m_rn, other=0.0)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        gc = g * n_chunks + c
        tl.store(DB + gc * RN + rn, dx, mask=m_rn)
        xs = tl.load(Starts + gc * RN + rn, mask=m_rn, other=0.0)
        if DENSE:
            dt = tl.dot(tl.trans(xs), dx, input_precision="ieee")
            tl.store(DT + gc * N * N + kn, dt, mask=m_kn)
            # dX_prev = dX @ T^T: load T^T directly as a [N, N] tile
            tt = tl.load(T + gc * N * N + tn, mask=m_kn, other=0.0)
            dx = tl.dot(dx, tt, input_precision="ieee")
        else:
            # tl.reduce with a combine function of this module, not tl.sum: tl.sum is a jit
            # function of triton.language, compiled-mode if triton was imported before
            # TRITON_INTERPRET was set, and then unusable by the interpreter
            dg = tl.reduce(xs * dx, 0, _add)
            tl.store(DT + gc * N + cc, dg, mask=cc < N)
            gm = tl.load(T + gc * N + cc, mask=cc < N, other=0.0)
            dx = dx * gm[None, :]
        if HAS_DSTARTS:
            dx += tl.load(DStarts + gc * RN + rn, mask=m_rn, other=0.0)
    tl.store(DX0 + g * RN + rn, dx, mask=m_rn)
