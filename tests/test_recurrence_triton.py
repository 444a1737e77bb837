"""The Triton chunk-scan kernel (`longctx.kernels.memory`) under the Triton interpreter
(TRITON_INTERPRET=1, CPU), against the naive loops, forward and backward; and the memory
modules run on it end to end against their token-by-token references.

The interpreter switch is read when the kernel module is loaded, and the kernels are loaded
once per mode under separate module names, so setting the variable inside the test (after
triton was imported) is enough.
"""

from __future__ import annotations

import pytest
import torch

from longctx.kernels.memory import affine_scan, naive_recurrence, scan_torch, select_backend

REL = 1e-4


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from longctx.kernels.memory import triton_scan

    assert triton_scan.interpreting()
    yield


def _inputs(G, n, R, N, dense, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(G, R, N, generator=g)
    b = torch.randn(G, n, R, N, generator=g)
    if dense:
        t = torch.randn(G, n, N, N, generator=g) / N ** 0.5
    else:
        t = torch.rand(G, n, N, generator=g)
    return x0, b, t


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 10, 12), (1, 1, 16, 16), (2, 7, 33, 17)])
def test_scan_matches_naive_loop_fwd_bwd(interpret, dense, shape):
    G, n, R, N = shape
    x0, b, t = _inputs(G, n, R, N, dense)
    kw = lambda tt: {"t": tt} if dense else {"gamma": tt}  # noqa: E731
    leaves1 = [z.clone().requires_grad_() for z in (x0, b, t)]
    leaves2 = [z.clone().requires_grad_() for z in (x0, b, t)]
    s1, f1 = affine_scan(leaves1[0], leaves1[1], **kw(leaves1[2]), backend="triton")
    s2, f2 = scan_torch(leaves2[0], leaves2[1], **kw(leaves2[2]))
    # the naive per-chunk loop, written out
    T = t if dense else torch.diag_embed(t)
    f3 = torch.stack([naive_recurrence(x0[g], [(T[g, c], b[g, c]) for c in range(n)]) for g in range(G)])
    assert rel(f1, f3) < REL and rel(s1, s2) < REL and rel(f1, f2) < REL
    ws, wf = torch.randn_like(s2), torch.randn_like(f2)
    g1 = torch.autograd.grad((s1 * ws).sum() + (f1 * wf).sum(), leaves1)
    g2 = torch.autograd.grad((s2 * ws).sum() + (f2 * wf).sum(), leaves2)
    for a, c in zip(g1, g2):
        assert rel(a, c) < REL


def test_scan_final_state_only_gradient(interpret):
    x0, b, t = _inputs(2, 4, 8, 8, True, seed=1)
    leaves = [z.clone().requires_grad_() for z in (x0, b, t)]
    _, f1 = affine_scan(*leaves[:2], t=leaves[2], backend="triton")
    g1 = torch.autograd.grad(f1.sum(), leaves)
    leaves2 = [z.clone().requires_grad_() for z in (x0, b, t)]
    _, f2 = scan_torch(*leaves2[:2], t=leaves2[2])
    g2 = torch.autograd.grad(f2.sum(), leaves2)
    for a, c in zip(g1, g2):
        assert rel(a, c) < REL


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(1)
    assert select_backend("auto", x) == "torch"  # CPU without the interpreter
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        select_backend("triton", x)
    with pytest.raises(ValueError, match="unknown recurrence backend"):
        select_backend("cuda", x)
    with pytest.raises(ValueError, match="exactly one"):
        affine_scan(torch.zeros(1, 2, 2), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("case", ["titans-linear", "gsa", "fifo"])
def test_memory_modules_on_triton_scan_match_reference(interpret, case):
    """The modules whose chunk recurrence runs on the kernel, vs their token loops."""
    from test_memory import assert_close_all, make, packed_docs

    m = make(case, backend="triton")
    x = torch.randn(2, 21, 16, requires_grad=True)
    doc = packed_docs(2, 21, [[4, 9, 8], [21]])
    assert_close_all(m, x, doc)


def test_oversized_state_falls_back_or_raises(interpret):
    from longctx.kernels.memory import triton_scan

    assert triton_scan.fits(64, 128, True)[0] and not triton_scan.fits(64, 256, True)[0]
    x0, b, t = _inputs(1, 2, 4, 160, True)
    with pytest.raises(RuntimeError, match="tile"):
        affine_scan(x0, b, t=t, backend="triton")
    s, f = affine_scan(x0, b, t=t, backend="auto")  # CPU: the torch loop
    assert rel(f, scan_torch(x0, b, t=t)[1]) < REL
