"""Triton attention kernels (``backend="triton"``) against the torch reference backend.

On CPU the kernels run under the Triton interpreter: the ``interp`` fixture
sets ``TRITON_INTERPRET=1`` for the test (the backend reads it at call time
and loads an interpreted copy of the kernels, so the order in which triton or
longctx were imported does not matter). Shapes are small and the interpreter
uses fixed 16/32 tiles, so every case has edge tiles and several tiles.

Tolerances (stated once, used everywhere):
  - fp32 interpreter vs fp32 torch reference: out/lse atol = rtol = 1e-5,
    dq/dk/dv atol = rtol = 2e-5 (gradients sum over more terms).
  - fp16 interpreter vs fp32 reference: atol = rtol = 2e-2 (dtype smoke check).
  - GPU (skipped without CUDA): bf16/fp16 max error vs an fp32 reference at
    most 2x torch SDPA's max error in the same dtype (+ a small absolute floor).
"""

from __future__ import annotations

import os

import pytest
import torch

from distributed_utils import run_distributed
from longctx.kernels import _select_backend, attention, attention_backward, attention_forward, merge_partials, reference
from triton_cases import (
    FWD_TOL, GRAD_TOL, HALF_TOL, CASES, _brute_visible, _ring_blocks, _ta, assert_lse_close, case,
    docs_from_lengths, make_inputs,
)

# ---------------------------------------------------------------------------
# interpreter matrix: forward, lse, dq/dk/dv vs the torch reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("c", CASES)
def test_forward_backward_matches_reference(interp, c):
    q, k, v, dout, kw = make_inputs(c)
    out, lse = attention_forward(q, k, v, backend="triton", **kw)
    ref_out, ref_lse = attention_forward(q, k, v, backend="torch", **kw)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    torch.testing.assert_close(out, ref_out, **FWD_TOL)
    assert_lse_close(lse, ref_lse, **FWD_TOL)
    empty = torch.isneginf(ref_lse)
    if empty.any():  # rows with no visible key: out exactly 0, lse -inf, no NaN anywhere
        assert torch.all(out.transpose(1, 2)[empty] == 0)

    grads = attention_backward(dout, q, k, v, out, lse, backend="triton", **kw)
    ref_grads = attention_backward(dout, q, k, v, ref_out, ref_lse, backend="torch", **kw)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.dtype == q.dtype and got.shape == ref.shape, name
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, ref, **GRAD_TOL, msg=lambda m: f"{name}: {m}")


def test_noncontiguous_inputs(interp):
    """Strided q/k/v/dout (e.g. [B, H, S, D] storage) work without copies changing results."""
    q, k, v, dout, kw = make_inputs(case("causal_docs"))
    nc = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    qn, kn, vn, dn = nc(q), nc(k), nc(v), nc(dout)
    assert not qn.is_contiguous()
    out, lse = attention_forward(qn, kn, vn, backend="triton", **kw)
    ref_out, ref_lse = attention_forward(q, k, v, backend="torch", **kw)
    torch.testing.assert_close(out, ref_out, **FWD_TOL)
    grads = attention_backward(dn, qn, kn, vn, out, lse, backend="triton", **kw)
    ref = attention_backward(dout, q, k, v, ref_out, ref_lse, backend="torch", **kw)
    for got, r in zip(grads, ref):
        torch.testing.assert_close(got, r, **GRAD_TOL)


def test_autograd_attention(interp):
    q, k, v, dout, kw = make_inputs(case("causal"))
    kw = {n: kw[n] for n in ("causal", "softmax_scale")}
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    attention(*leaves, backend="triton", **kw).backward(dout)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    attention(*ref_leaves, backend="torch", **kw).backward(dout)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, **GRAD_TOL)


def test_fp16_interpreter(interp):
    c = case("causal_docs")  # causal + documents, GQA
    q, k, v, dout, kw = make_inputs(c, dtype=torch.float16)
    out, lse = attention_forward(q, k, v, backend="triton", **kw)
    ref_out, ref_lse = attention_forward(q.float(), k.float(), v.float(), backend="torch", **kw)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref_out, **HALF_TOL)
    assert_lse_close(lse, ref_lse, **HALF_TOL)
    grads = attention_backward(dout, q, k, v, out, lse, backend="triton", **kw)
    ref = attention_backward(dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse, backend="torch", **kw)
    for got, r in zip(grads, ref):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), r, **HALF_TOL)


# ---------------------------------------------------------------------------
# accumulating mode, external lse / delta (ring and BurstAttention usage)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("docs", [False, True], ids=["nodocs", "docs"])
def test_accumulating_mode(interp, backend, docs):
    """Folding key blocks one by one with acc= equals attention over all keys.

    Queries are the last block of a causal sequence; key blocks come in ring
    order, starting with a block the queries cannot see (acc stays -inf there),
    so the fold meets -inf on the incoming side, the new side and both.
    """
    B, S, H, H_kv, D = 2, 72, 4, 2, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, 24, H, D, generator=g)
    k = torch.randn(B, S, H_kv, D, generator=g)
    v = torch.randn(B, S, H_kv, D, generator=g)
    q_index = torch.arange(24, 48)  # middle block: the last key block is invisible
    k_index = torch.arange(S)
    doc = docs_from_lengths([[30, 5, 37], [72]]) if docs else None
    q_doc = None if doc is None else doc[:, 24:48]
    ref_out, ref_lse = attention_forward(q, k, v, q_index=q_index, k_index=k_index, q_doc=q_doc, k_doc=doc,
                                         backend="torch")
    out_acc = torch.zeros(B, 24, H, D)
    lse_acc = torch.full((B, H, 24), float("-inf"))
    for blk in reversed(_ring_blocks(S, 3)):  # invisible block first
        before = (out_acc.clone(), lse_acc.clone())
        out_acc, lse_acc = attention_forward(
            q, k[:, blk], v[:, blk], q_index=q_index, k_index=k_index[blk],
            q_doc=q_doc, k_doc=None if doc is None else doc[:, blk], backend=backend, acc=(out_acc, lse_acc),
        )
        assert out_acc.dtype == torch.float32 and lse_acc.dtype == torch.float32
        assert torch.isfinite(out_acc).all()
        if blk.start == 48:  # nothing visible yet: still the empty state
            assert torch.all(out_acc == 0) and torch.isneginf(lse_acc).all()
        else:
            assert not torch.equal(out_acc, before[0])
    torch.testing.assert_close(out_acc, ref_out, **FWD_TOL)
    assert_lse_close(lse_acc, ref_lse, **FWD_TOL)


def test_accumulating_mode_matches_merge_partials(interp):
    """Non-empty incoming state with a partly invisible block, bf16-free fp32 check, both backends."""
    c = case("empty_rows_docs")  # rows with no visible key
    q, k, v, _, kw = make_inputs(c)
    g = torch.Generator().manual_seed(5)
    out_in = torch.randn(q.shape, generator=g)
    lse_in = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=g)
    lse_in[0, 1, :7] = float("-inf")
    out_in[0, :7, 1] = 0
    expect = merge_partials(out_in, lse_in, *attention_forward(q, k, v, backend="torch", **kw))
    for backend in ("torch", "triton"):
        got = attention_forward(q, k, v, backend=backend, acc=(out_in, lse_in), **kw)
        torch.testing.assert_close(got[0], expect[0], **FWD_TOL)
        assert_lse_close(got[1], expect[1], **FWD_TOL)
    # the incoming tensors are not modified
    assert torch.isneginf(lse_in[0, 1, :7]).all()


def test_acc_argument_validation():
    q = torch.randn(1, 8, 2, 16)
    k = v = torch.randn(1, 8, 2, 16)
    idx = torch.arange(8)
    with pytest.raises(ValueError, match="acc out must have shape"):
        attention_forward(q, k, v, q_index=idx, k_index=idx, backend="torch",
                          acc=(torch.zeros(1, 8, 2, 8), torch.zeros(1, 2, 8)))
    with pytest.raises(ValueError, match="acc must be a pair"):
        attention_forward(q, k, v, q_index=idx, k_index=idx, backend="torch", acc=torch.zeros(1))


def test_external_lse_and_delta(interp):
    """Backward per key block with the *global* out/lse and a precomputed delta
    (BurstAttention / ring backward): the blocks' gradients add up to the full ones."""
    B, S, H, H_kv, D = 1, 64, 4, 2, 16
    g = torch.Generator().manual_seed(11)
    q, dout = torch.randn(B, S, H, D, generator=g), torch.randn(B, S, H, D, generator=g)
    k, v = torch.randn(B, S, H_kv, D, generator=g), torch.randn(B, S, H_kv, D, generator=g)
    doc = docs_from_lengths([[9, 50, 5]])
    idx = torch.arange(S)
    kw = dict(q_doc=doc, k_doc=doc)
    out, lse = attention_forward(q, k, v, q_index=idx, k_index=idx, backend="torch", **kw)
    ref = attention_backward(dout, q, k, v, out, lse, q_index=idx, k_index=idx, backend="torch", **kw)
    delta = (dout * out).sum(-1).transpose(1, 2).contiguous()
    dq = torch.zeros_like(q)
    for blk in _ring_blocks(S, 2):
        dq_b, dk_b, dv_b = attention_backward(
            dout, q, k[:, blk], v[:, blk], None, lse, q_index=idx, k_index=idx[blk], q_doc=doc, k_doc=doc[:, blk],
            delta=delta, backend="triton",
        )
        dq += dq_b
        torch.testing.assert_close(dk_b, ref[1][:, blk], **GRAD_TOL)
        torch.testing.assert_close(dv_b, ref[2][:, blk], **GRAD_TOL)
    torch.testing.assert_close(dq, ref[0], **GRAD_TOL)


# ---------------------------------------------------------------------------
# tile skipping and host-side bounds
# ---------------------------------------------------------------------------


def test_invisible_tiles_are_not_loaded(interp):
    """K/V of tiles nobody can see are never read: poison them with NaN.

    (A read tile with an invisible NaN key would give NaN: 0 * NaN in P @ V.)
    """
    km = _ta()._kernel_module()
    bn = km.FIXED["fwd"]["BLOCK_N"]
    bm_kv = km.FIXED["dkdv"]["BLOCK_M"]
    B, S_q, S_k, H, D = 1, 40, 4 * bn, 2, 16
    g = torch.Generator().manual_seed(1)
    q, dout = torch.randn(B, S_q, H, D, generator=g), torch.randn(B, S_q, H, D, generator=g)
    k, v = torch.randn(B, S_k, H, D, generator=g), torch.randn(B, S_k, H, D, generator=g)
    q_index, k_index = torch.arange(S_q), torch.arange(S_k)
    # Causal: keys >= S_q are invisible; whole key tiles from ceil(S_q / bn) on.
    first_dead = -(-S_q // bn) * bn
    kp, vp = k.clone(), v.clone()
    kp[:, first_dead:] = float("nan")
    vp[:, first_dead:] = float("nan")
    # Documents: queries in doc 0 or 2, keys of doc 1 in whole tiles are never read.
    q_doc = torch.tensor([[0] * 20 + [2] * 20])
    k_doc = torch.tensor([[0] * bn + [1] * (2 * bn) + [2] * bn])
    kd, vd = k.clone(), v.clone()
    kd[:, bn:3 * bn] = float("nan")
    vd[:, bn:3 * bn] = float("nan")
    for kk, vv, extra in ((kp, vp, {}), (kd, vd, dict(q_doc=q_doc, k_doc=k_doc, causal=False))):
        kw = dict(q_index=q_index, k_index=k_index, **extra)
        out, lse = attention_forward(q, kk, vv, backend="triton", **kw)
        ref_out, ref_lse = attention_forward(q, k, v, backend="torch", **kw)
        torch.testing.assert_close(out, ref_out, **FWD_TOL)
        dq, dk, dv = attention_backward(dout, q, kk, vv, out, lse, backend="triton", **kw)
        rdq, rdk, rdv = attention_backward(dout, q, k, v, ref_out, ref_lse, backend="torch", **kw)
        torch.testing.assert_close(dq, rdq, **GRAD_TOL)
        live = torch.isfinite(kk[0, :, 0, 0])
        torch.testing.assert_close(dk[:, live], rdk[:, live], **GRAD_TOL)
        torch.testing.assert_close(dv[:, live], rdv[:, live], **GRAD_TOL)
    # Queries likewise: the first query tile (index -5) sees no key; poison its
    # q/dout rows: the dK/dV loop over query tiles must never read them.
    q_index2 = torch.cat([torch.full((bm_kv,), -5), torch.arange(S_q - bm_kv)])
    qp, dp = q.clone(), dout.clone()
    qp[:, :bm_kv] = float("nan")
    dp[:, :bm_kv] = float("nan")
    kw = dict(q_index=q_index2, k_index=k_index)
    out, lse = attention_forward(q, k, v, backend="torch", **kw)
    dq, dk, dv = attention_backward(dp, qp, k, v, out, lse, backend="triton", **kw)
    rdq, rdk, rdv = attention_backward(dout, q, k, v, out, lse, backend="torch", **kw)
    torch.testing.assert_close(dk, rdk, **GRAD_TOL)
    torch.testing.assert_close(dv, rdv, **GRAD_TOL)


@pytest.mark.parametrize("seed", range(6))
def test_bounds_contain_visible_keys(seed):
    """Host-side bounds: [lo, hi] contains every visible position; [flo, fhi] is
    either empty or exactly the visible set; sorted layouts get exact intervals."""
    g = torch.Generator().manual_seed(seed)
    S_a, S_b = 23 + seed, 31 - seed
    sorted_case = seed % 2 == 0
    if sorted_case:
        a_idx = torch.sort(torch.randperm(70, generator=g)[:S_a]).values
        b_idx = torch.sort(torch.randperm(70, generator=g)[:S_b]).values
        a_doc = torch.sort(torch.randint(0, 4, (2, S_a), generator=g), dim=1).values
        b_doc = torch.sort(torch.randint(0, 4, (2, S_b), generator=g), dim=1).values
    else:
        a_idx, b_idx = torch.randperm(70, generator=g)[:S_a], torch.randperm(70, generator=g)[:S_b]
        a_doc, b_doc = torch.randint(0, 3, (2, S_a), generator=g), torch.randint(0, 3, (2, S_b), generator=g)
    for causal in (True, False):
        for docs in (False, True):
            ad, bd = (a_doc, b_doc) if docs else (None, None)
            bnd = _ta()._bounds(a_idx, b_idx, ad, bd, causal)
            vis = _brute_visible(a_idx, b_idx, ad, bd, causal)
            pos = torch.arange(S_b)
            lo, hi, flo, fhi = (bnd[:, i, :, None].long() for i in range(4))
            assert not (vis & ((pos < lo) | (pos > hi))).any()
            empty = ~vis.any(-1, keepdim=True)
            assert torch.all(lo[empty] == S_b) and torch.all(hi[empty] == -1)
            exact = flo <= fhi
            interval = (pos >= flo) & (pos <= fhi)
            assert torch.equal((vis & exact), (interval & exact))
            if sorted_case and (docs or causal):
                # contiguous visible sets are always recognised as intervals
                contiguous = (vis.sum(-1, keepdim=True) == (hi - lo + 1)) & ~empty
                assert torch.equal(exact, contiguous)


# ---------------------------------------------------------------------------
# backend selection and errors
# ---------------------------------------------------------------------------


def test_backend_selection(monkeypatch):
    q = torch.randn(1, 4, 2, 16)
    assert _select_backend("auto", q) is reference  # CPU tensors: torch reference
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _select_backend("triton", q)
    idx = torch.arange(4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        attention_forward(q, q, q, q_index=idx, k_index=idx, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _select_backend("triton", q) is _ta()
    with pytest.raises(RuntimeError, match="bfloat16"):
        _select_backend("triton", q.bfloat16())
    with pytest.raises(RuntimeError, match="head dim"):
        _select_backend("triton", torch.randn(1, 4, 2, 512))
    with pytest.raises(ValueError, match="unknown attention backend"):
        _select_backend("flash", q)


# ---------------------------------------------------------------------------
# the ring strategy with backend="triton" (interpreter, world 2, gloo)
# ---------------------------------------------------------------------------


def _strategy_body(rank, world, names):
    os.environ["TRITON_INTERPRET"] = "1"  # the kernels run interpreted in this child
    from longctx.kernels import triton_attention as ta
    from longctx.parallel import build_strategy

    calls = {"forward": 0, "backward": 0}
    for fn_name in calls:  # count that the strategies really reach the Triton kernels
        orig = getattr(ta, fn_name)

        def counted(*a, _orig=orig, _n=fn_name, **kw):
            calls[_n] += 1
            return _orig(*a, **kw)

        setattr(ta, fn_name, counted)

    results = {}
    B, S, H, H_kv, D = 1, 32, 4, 2, 16
    doc = docs_from_lengths([[5, 14, 13]])
    for name in names:
        strat = build_strategy(name, backend="triton")
        for causal, use_doc in ((True, True), (False, False)):
            before = dict(calls)
            g = torch.Generator().manual_seed(0)
            q = torch.randn(B, S, H, D, generator=g)
            k, v = torch.randn(B, S, H_kv, D, generator=g), torch.randn(B, S, H_kv, D, generator=g)
            dout = torch.randn(B, S, H, D, generator=g)
            d = doc if use_doc else None
            leaves = [t.double().requires_grad_() for t in (q, k, v)]
            ref = attention(*leaves, q_doc=d, k_doc=d, causal=causal, backend="torch")
            ref.backward(dout.double())
            ql, kl, vl = (strat.shard(t).requires_grad_() for t in (q, k, v))
            out = strat.attention(ql, kl, vl, doc_ids=None if d is None else strat.shard(d), causal=causal)
            out.backward(strat.shard(dout))
            errs = {"out": (out.double() - strat.shard(ref.detach())).abs().max().item()}
            for n, got, leaf in (("dq", ql.grad, leaves[0]), ("dk", kl.grad, leaves[1]), ("dv", vl.grad, leaves[2])):
                errs[n] = (got.double() - strat.shard(leaf.grad)).abs().max().item()
            errs["triton_calls"] = sum(calls.values()) - sum(before.values())
            results[(name, causal, use_doc)] = errs
    return results


# Every strategy present, world 2. Ring, zigzag, striped and burst call the
# kernels with offset / striped index sets, external lse and the fused
# accumulating mode; Ulysses, hybrid and CAD with whole sequences.
STRATEGY_NAMES = ("ring", "zigzag", "striped", "burst", "ulysses", "hybrid", "cad")


def test_strategies_with_triton_backend_exact(interp):
    from longctx.parallel.strategy import _implemented

    names = tuple(n for n in STRATEGY_NAMES if n in _implemented())
    assert "ring" in names
    results = run_distributed(_strategy_body, 2, names, timeout=600)
    for rank, res in enumerate(results):
        for key, errs in res.items():
            assert errs.pop("triton_calls") > 0, f"rank {rank} {key}: the Triton kernels were not called"
            for what, err in errs.items():
                assert err < 2e-5, f"rank {rank} {key} {what}: max error {err:.3g}"
