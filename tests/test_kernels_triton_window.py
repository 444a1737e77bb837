"""Triton kernels with a sliding window (`window=`), under the interpreter, against the torch
reference; tiles below the window are never loaded. Tolerances: see test_kernels_triton.py."""

from __future__ import annotations

import pytest
import torch

from longctx.kernels import attention_backward, attention_forward
from triton_cases import (
    FWD_TOL, GRAD_TOL, _brute_visible, _case, _ring_blocks, _ta, assert_lse_close,
    docs_from_lengths, make_inputs,
)

# ---------------------------------------------------------------------------
# sliding window
# ---------------------------------------------------------------------------

_DOCS48 = docs_from_lengths([[3, 30, 15], [48]])
_ZZ_Q = torch.cat([torch.arange(0, 24), torch.arange(72, 96)])  # zigzag rank 0 of 2
WINDOW_CASES = [
    pytest.param(dict(case, window=w), id=name)
    for name, case, w in (
        ("w7_causal_docs_gqa", _case("", 48, 48, q_doc=_DOCS48, k_doc=_DOCS48).values[0], 7),
        ("w1_causal", _case("", 40, 40, B=1).values[0], 1),
        ("w12_striped_q1_k0", _case("", 40, 40, B=1, q_index=torch.arange(1, 80, 2),
                                    k_index=torch.arange(0, 80, 2)).values[0], 12),
        ("w20_zigzag", _case("", 48, 48, B=1, q_index=_ZZ_Q, k_index=torch.arange(24, 72)).values[0], 20),
        ("w9_noncausal", _case("", 40, 40, B=1, causal=False).values[0], 9),
        ("w60_longer_than_seq_docs", _case("", 40, 40, B=1, q_doc=_DOCS48[:1, :40],
                                           k_doc=_DOCS48[:1, :40]).values[0], 60),
        # ring step with the queries after their keys: only the first queries reach back into the block
        ("w10_ring_q_after_k_empty_rows", _case("", 40, 48, B=1, q_index=torch.arange(48, 88),
                                                k_index=torch.arange(48)).values[0], 10),
    )
]


@pytest.mark.parametrize("c", WINDOW_CASES)
def test_window_matches_reference(interp, c):
    q, k, v, dout, kw = make_inputs(c)
    kw["window"] = c["window"]
    out, lse = attention_forward(q, k, v, backend="triton", **kw)
    ref_out, ref_lse = attention_forward(q, k, v, backend="torch", **kw)
    torch.testing.assert_close(out, ref_out, **FWD_TOL)
    assert_lse_close(lse, ref_lse, **FWD_TOL)
    empty = torch.isneginf(ref_lse)
    assert torch.all(out.transpose(1, 2)[empty] == 0)
    grads = attention_backward(dout, q, k, v, out, lse, backend="triton", **kw)
    ref_grads = attention_backward(dout, q, k, v, ref_out, ref_lse, backend="torch", **kw)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, ref, **GRAD_TOL, msg=lambda m: f"{name}: {m}")


def _poison(t, rows):
    t = t.clone()
    t[:, rows] = float("nan")
    return t


def test_window_tiles_below_the_window_are_not_loaded(interp):
    """Tiles entirely below every row's window are never read (NaN-poisoned):
    key tiles in forward and dQ, query tiles in dK/dV. Sorted layouts skip them
    through the host bounds; interleaved ones put a dead tile between live ones,
    so only the kernels' per-tile window test can skip it."""
    km = _ta()._kernel_module()
    bn, bm_kv = km.FIXED["fwd"]["BLOCK_N"], km.FIXED["dkdv"]["BLOCK_M"]
    assert km.FIXED["dq"]["BLOCK_N"] == bn
    g = torch.Generator().manual_seed(2)
    B, H, D = 1, 2, 16
    # Keys: S_k = 4 tiles; queries 88..127 with window 20 see keys >= 69 only.
    S_q, S_k, W = 40, 4 * bn, 20
    q, dout = torch.randn(B, S_q, H, D, generator=g), torch.randn(B, S_q, H, D, generator=g)
    k, v = torch.randn(B, S_k, H, D, generator=g), torch.randn(B, S_k, H, D, generator=g)
    tiles = [torch.arange(t * bn, (t + 1) * bn) for t in range(4)]
    for k_index, dead in ((torch.arange(S_k), slice(0, 2 * bn)),  # tiles 0, 1 below the window
                          (torch.cat([tiles[3], tiles[0], tiles[2], tiles[1]]), [*range(bn, 2 * bn), *range(3 * bn, S_k)])):
        kw = dict(q_index=torch.arange(88, 128), k_index=k_index, window=W)
        kp, vp = _poison(k, dead), _poison(v, dead)
        out, lse = attention_forward(q, kp, vp, backend="triton", **kw)
        ref_out, ref_lse = attention_forward(q, k, v, backend="torch", **kw)
        torch.testing.assert_close(out, ref_out, **FWD_TOL)
        dq, dk, dv = attention_backward(dout, q, kp, vp, out, lse, backend="triton", **kw)
        rdq, rdk, rdv = attention_backward(dout, q, k, v, ref_out, ref_lse, backend="torch", **kw)
        torch.testing.assert_close(dq, rdq, **GRAD_TOL)
        live = torch.isfinite(kp[0, :, 0, 0])
        torch.testing.assert_close(dk[:, live], rdk[:, live], **GRAD_TOL)
        torch.testing.assert_close(dv[:, live], rdv[:, live], **GRAD_TOL)
    # Queries: keys 0..39 with window 16 are seen by queries < 55 only.
    S_q, S_k, W = 4 * bm_kv, 40, 16
    q, dout = torch.randn(B, S_q, H, D, generator=g), torch.randn(B, S_q, H, D, generator=g)
    k, v = torch.randn(B, S_k, H, D, generator=g), torch.randn(B, S_k, H, D, generator=g)
    qt = [torch.arange(t * bm_kv, (t + 1) * bm_kv) for t in range(4)]
    for q_index, dead in ((torch.arange(S_q), slice(2 * bm_kv, S_q)),
                          (torch.cat([qt[0], qt[3], qt[1], qt[2]]), [*range(bm_kv, 2 * bm_kv), *range(3 * bm_kv, S_q)])):
        kw = dict(q_index=q_index, k_index=torch.arange(S_k), window=W)
        out, lse = attention_forward(q, k, v, backend="torch", **kw)
        dq, dk, dv = attention_backward(_poison(dout, dead), _poison(q, dead), k, v, out, lse, backend="triton", **kw)
        rdq, rdk, rdv = attention_backward(dout, q, k, v, out, lse, backend="torch", **kw)
        torch.testing.assert_close(dk, rdk, **GRAD_TOL)
        torch.testing.assert_close(dv, rdv, **GRAD_TOL)


def test_window_accumulating_mode_and_external_delta(interp):
    """Ring-style use under a window: acc= folding over key blocks (first block
    entirely below the window) and per-block backward with global lse + delta."""
    B, S, H, H_kv, D, W = 1, 72, 4, 2, 16, 11
    g = torch.Generator().manual_seed(4)
    q, dout = torch.randn(B, 24, H, D, generator=g), torch.randn(B, 24, H, D, generator=g)
    k, v = torch.randn(B, S, H_kv, D, generator=g), torch.randn(B, S, H_kv, D, generator=g)
    doc = docs_from_lengths([[30, 5, 37]])
    kw = dict(q_index=torch.arange(48, 72), q_doc=doc[:, 48:], window=W)
    k_index = torch.arange(S)
    out, lse = attention_forward(q, k, v, k_index=k_index, k_doc=doc, backend="torch", **kw)
    ref = attention_backward(dout, q, k, v, out, lse, k_index=k_index, k_doc=doc, backend="torch", **kw)
    delta = (dout * out).sum(-1).transpose(1, 2).contiguous()
    acc = (torch.zeros(B, 24, H, D), torch.full((B, H, 24), float("-inf")))
    dq = torch.zeros_like(q)
    for blk in _ring_blocks(S, 3):  # block 0..23 is entirely below the window
        sub = dict(k_index=k_index[blk], k_doc=doc[:, blk], **kw)
        acc = attention_forward(q, k[:, blk], v[:, blk], backend="triton", acc=acc, **sub)
        if blk.start == 0:
            assert torch.all(acc[0] == 0) and torch.isneginf(acc[1]).all()
        dq_b, dk_b, dv_b = attention_backward(dout, q, k[:, blk], v[:, blk], None, lse, delta=delta,
                                              backend="triton", **sub)
        dq += dq_b
        torch.testing.assert_close(dk_b, ref[1][:, blk], **GRAD_TOL)
        torch.testing.assert_close(dv_b, ref[2][:, blk], **GRAD_TOL)
    torch.testing.assert_close(acc[0], out, **FWD_TOL)
    assert_lse_close(acc[1], lse, **FWD_TOL)
    torch.testing.assert_close(dq, ref[0], **GRAD_TOL)


@pytest.mark.parametrize("seed", range(4))
def test_bounds_with_window_contain_visible_keys(seed):
    """Host-side bounds under a window, both sides (the key side uses negated
    indices): [lo, hi] contains every visible position, [flo, fhi] is empty or
    exactly the visible set, and sorted layouts get exact intervals."""
    g = torch.Generator().manual_seed(seed)
    S_a, S_b = 23 + seed, 31 - seed
    sorted_case = seed % 2 == 0
    a_idx, b_idx = torch.randperm(70, generator=g)[:S_a], torch.randperm(70, generator=g)[:S_b]
    a_doc, b_doc = torch.randint(0, 3, (2, S_a), generator=g), torch.randint(0, 3, (2, S_b), generator=g)
    if sorted_case:
        a_idx, b_idx = a_idx.sort().values, b_idx.sort().values
        a_doc, b_doc = a_doc.sort(dim=1).values, b_doc.sort(dim=1).values
    for window in (1, 6, 200):
        for causal in (True, False):
            for ad, bd in ((None, None), (a_doc, b_doc)):
                for x, y, xd, yd in ((a_idx, b_idx, ad, bd), (-b_idx, -a_idx, bd, ad)):
                    bnd = _ta()._bounds(x, y, xd, yd, causal, window)
                    vis = _brute_visible(x, y, xd, yd, causal) & (x[:, None] - y[None, :] < window)
                    pos = torch.arange(len(y))
                    lo, hi, flo, fhi = (bnd[:, i, :, None].long() for i in range(4))
                    assert not (vis & ((pos < lo) | (pos > hi))).any()
                    empty = ~vis.any(-1, keepdim=True)
                    assert torch.all(lo[empty] == len(y)) and torch.all(hi[empty] == -1)
                    exact = flo <= fhi
                    assert torch.equal(vis & exact, ((pos >= flo) & (pos <= fhi)) & exact)
                    if sorted_case and (xd is not None or causal):
                        contiguous = (vis.sum(-1, keepdim=True) == (hi - lo + 1)) & ~empty
                        assert torch.equal(exact, contiguous)


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_window_validation_triton(interp, bad):
    q = torch.randn(1, 8, 2, 16)
    idx = torch.arange(8)
    with pytest.raises(ValueError, match="window"):
        attention_forward(q, q, q, q_index=idx, k_index=idx, window=bad, backend="triton")
