"""Host side of the Triton chunk-scan kernels: launch, autograd, interpreter switch."""

from __future__ import annotations

import os

import torch

from longctx.kernels.triton_mode import interpreting, load_kernel_module

_KERNEL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_triton_scan.py")


def _kernel_module():
    """The kernels, compiled or interpreted per the current switch (one module object each)."""
    return load_kernel_module("longctx.kernels.memory._triton_scan", _KERNEL_FILE)


def supports(x: torch.Tensor) -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as err:  # pragma: no cover - triton is a dependency
        return False, f"triton does not import: {err}"
    if interpreting():
        return True, ""
    if not x.is_cuda:
        return False, (f"tensors on {x.device}: the compiled Triton scan needs CUDA; on CPU set "
                       "TRITON_INTERPRET=1 (tests) or use backend='torch'")
    return True, ""


MAX_DENSE = 128  # dense transitions: N (and R) up to 128 (a 128 x 128 fp32 tile of T)
MAX_DIAG_ELEMS = 256 * 128  # diagonal transitions: the state tile R x N


def fits(R: int, N: int, dense: bool) -> tuple[bool, str]:
    """Whether one program can hold the state (and T) on chip."""
    BR, BN = _blocks(R, N)
    if dense and (BN > MAX_DENSE or BR > MAX_DENSE):
        return False, f"dense state {R}x{N} exceeds the kernel's {MAX_DENSE}x{MAX_DENSE} tile"
    if not dense and BR * BN > MAX_DIAG_ELEMS:
        return False, f"state {R}x{N} exceeds the kernel's {MAX_DIAG_ELEMS}-element tile"
    return True, ""


def _blocks(R: int, N: int) -> tuple[int, int]:
    p2 = lambda n: 1 << max(int(n) - 1, 0).bit_length()  # noqa: E731
    return max(16, p2(R)), max(16, p2(N))


def _warps(BR: int, BN: int) -> int:
    return 8 if BR * BN >= 64 * 128 else 4


def scan_forward(x0, b, t, dense: bool):
    G, n, R, N = b.shape
    starts = torch.empty_like(b)
    final = torch.empty_like(x0)
    if G == 0:
        return starts, final
    if n == 0:
        final.copy_(x0)
        return starts, final
    BR, BN = _blocks(R, N)
    _kernel_module()._scan_fwd[(G,)](x0, b, t, starts, final, n, R, N,
                                     DENSE=dense, BLOCK_R=BR, BLOCK_N=BN, num_warps=_warps(BR, BN))
    return starts, final


def scan_backward(t, starts, dstarts, dfinal, dense: bool):
    G, n, R, N = starts.shape
    dx0 = torch.empty_like(dfinal)
    db = torch.empty_like(starts)
    dt = torch.empty_like(t)
    if G == 0:
        return dx0, db, dt
    if n == 0:
        dx0.copy_(dfinal)
        return dx0, db, dt
    BR, BN = _blocks(R, N)
    has = dstarts is not None
    _kernel_module()._scan_bwd[(G,)](t, starts, dstarts if has else dfinal, dfinal, dx0, db, dt, n, R, N,
                                     DENSE=dense, HAS_DSTARTS=has, BLOCK_R=BR, BLOCK_N=BN,
                                     num_warps=_warps(BR, BN))
    return dx0, db, dt


class TritonAffineScan(torch.autograd.Function):
    """(x0 [G,R,N], b [G,n,R,N], t [G,n,N,N] | gamma [G,n,N]) -> (starts, final), fp32."""

    @staticmethod
    def forward(ctx, x0, b, t, dense):
        x0, b, t = (z.float().contiguous() for z in (x0, b, t))
        starts, final = scan_forward(x0, b, t, dense)
        ctx.save_for_backward(t, starts)
        ctx.dense = dense
        return starts, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dstarts, dfinal):
        t, starts = ctx.saved_tensors
        dfinal = torch.zeros(starts.shape[0], *starts.shape[2:], device=starts.device) if dfinal is None \
            else dfinal.float().contiguous()
        dstarts = None if dstarts is None else dstarts.float().contiguous()
        dx0, db, dt = scan_backward(t, starts, dstarts, dfinal, ctx.dense)
        return dx0, db, dt, None
