"""The CPU fused path of the torch backend (``longctx.kernels.cpu_fused``) vs dense fp64 attention.

Every case first asserts that the fused plan applies (so the fused op, not
the chunked fallback, is what is tested), then compares out, lse, dq, dk, dv
with the dense fp64 reference of ``test_kernels_reference`` (arbitrary index
sets, documents, GQA). Tolerances:
  - fp64 inputs: atol = rtol = 1e-10 (the op computes in fp64)
  - fp32 inputs: atol = rtol = 1e-5
  - bf16 inputs: atol = rtol = 3e-2 (smoke check of the upcast)
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_reference import dense_mask, docs_from_lengths, make_inputs, naive_attention, naive_grads, zigzag_index

from longctx.kernels import attention, attention_backward, attention_forward, cpu_fused

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def striped_index(S, N, r):
    return torch.arange(r, S, N)


DOCS = docs_from_lengths([[7, 20, 13], [1, 30, 6, 3]])  # S = 40, two different rows
SAME_DOCS = docs_from_lengths([[11, 29], [11, 29]])  # identical rows share their calls
ZZ_DOC = docs_from_lengths([[10, 30, 8]])[0]  # S = 48, for zigzag / striped layouts


def _layout_docs(doc, q_index, k_index):
    return doc[q_index][None].repeat(2, 1), doc[k_index][None].repeat(2, 1)


def _layout(index_fn, qr, kr, docs=False, **extra):
    """Rank qr's queries vs rank kr's keys of a 48-token layout (zigzag over 3 ranks, striped over 4)."""
    qi, ki = index_fn(qr), index_fn(kr)
    case = dict(q_index=qi, k_index=ki, causal=True, **extra)
    if docs:
        case["q_doc"], case["k_doc"] = _layout_docs(ZZ_DOC, qi, ki)
    return case


def _zz(qr, kr, docs=False, **extra):
    return _layout(lambda r: zigzag_index(48, 3, r), qr, kr, docs, **extra)


def _striped(qr, kr, docs=False, **extra):
    return _layout(lambda r: striped_index(48, 4, r), qr, kr, docs, **extra)


A40 = torch.arange(40)
CASES = {
    "causal": dict(q_index=torch.arange(67), k_index=torch.arange(67), causal=True),
    "noncausal": dict(q_index=A40, k_index=A40, causal=False),
    "docs_causal": dict(q_index=A40, k_index=A40, q_doc=DOCS, k_doc=DOCS, causal=True),
    "docs_noncausal": dict(q_index=A40, k_index=A40, q_doc=DOCS, k_doc=DOCS, causal=False),
    "same_docs_rows": dict(q_index=A40, k_index=A40, q_doc=SAME_DOCS, k_doc=SAME_DOCS, causal=True),
    "window_covers_all": dict(q_index=A40, k_index=A40, q_doc=DOCS, k_doc=DOCS, causal=True, window=40),
    "gqa_4_2": dict(q_index=A40, k_index=A40, causal=True, H=4, H_kv=2),
    "gqa_6_1_docs": dict(q_index=A40, k_index=A40, q_doc=DOCS, k_doc=DOCS, causal=True, H=6, H_kv=1),
    # ring steps: q block after / before the k block, and q and k overlapping in index
    "q_after_k": dict(q_index=torch.arange(30, 50), k_index=torch.arange(0, 25), causal=True),
    "q_before_k": dict(q_index=torch.arange(0, 20), k_index=torch.arange(20, 35), causal=True),
    "q_overlaps_k": dict(q_index=torch.arange(10, 40), k_index=torch.arange(0, 25), causal=True),
    "k_overlaps_q": dict(q_index=torch.arange(0, 25), k_index=torch.arange(10, 40), causal=True),
    "zigzag_local": _zz(1, 1),
    "zigzag_1_2": _zz(1, 2),
    "zigzag_2_0_docs": _zz(2, 0, docs=True),
    "zigzag_gqa_docs": _zz(0, 1, docs=True, H=4, H_kv=2),
    "striped_1_2": _striped(1, 2),
    "striped_2_1": _striped(2, 1),
    "striped_3_0_docs_gqa": _striped(3, 0, docs=True, H=4, H_kv=1),
    "striped_noncausal_docs": _striped(0, 2, docs=True) | dict(causal=False),
    # sliding windows that hide pairs: band blocks (unmasked where every row sees the same keys)
    "window_causal": dict(q_index=torch.arange(100), k_index=torch.arange(100), causal=True, window=9),
    "window_docs_gqa": dict(q_index=torch.arange(100), k_index=torch.arange(100), causal=True, window=30,
                            q_doc=docs_from_lengths([[7, 50, 43], [100]]),
                            k_doc=docs_from_lengths([[7, 50, 43], [100]]), H=4, H_kv=2),
    "window_noncausal_docs": dict(q_index=A40, k_index=A40, q_doc=DOCS, k_doc=DOCS, causal=False, window=6),
    "window_q_after_k": dict(q_index=torch.arange(60, 100), k_index=torch.arange(0, 70), causal=True, window=25),
    "window_zigzag_1_2": _zz(1, 2, window=10),  # some rows see no key of the step: in no block
    "window_striped_docs": _striped(3, 1, docs=True, window=12),
    "empty_rows_docs": dict(
        q_index=torch.arange(10, 20), k_index=torch.arange(0, 12),
        q_doc=torch.tensor([[1] * 4 + [2] * 6, [0] * 10]),
        k_doc=torch.tensor([[0] * 5 + [1] * 7, [0] * 12]),
        causal=True,
    ),
}


def _split(case):
    case = dict(case)
    H, H_kv = case.pop("H", 2), case.pop("H_kv", 2)
    return case, H, H_kv


def _batch(case):
    return 2 if case.get("q_doc") is None else case["q_doc"].shape[0]


def _plan(case, B):
    return cpu_fused.plan(case["q_index"], case["k_index"], case.get("q_doc"), case.get("k_doc"),
                          case.get("causal", True), batch=B, window=case.get("window"))


def _close(a, r, dtype, name):
    torch.testing.assert_close(a.double(), r.double(), **TOL[dtype], msg=lambda m: f"{name}: {m}")


def run(case, dtype, seed=0):
    case, H, H_kv = _split(case)
    B = _batch(case)
    q, k, v, dout = make_inputs(B=B, S_q=len(case["q_index"]), S_k=len(case["k_index"]), H=H, H_kv=H_kv,
                                dtype=dtype, seed=seed)
    out, lse = attention_forward(q, k, v, backend="torch", **case)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, backend="torch", **case)
    ref = naive_attention(q, k, v, **case) + naive_grads(q, k, v, dout, **case)
    return (out, lse, dq, dk, dv), ref, (q, k, v, dout)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_matches_dense(name, dtype):
    case = CASES[name]
    assert _plan(_split(case)[0], _batch(case)) is not None, "the fused plan must apply"
    got, ref, (q, k, v, _) = run(case, dtype)
    for label, a, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert torch.isfinite(a).logical_or(torch.isneginf(a) & (label == "lse")).all(), label
        _close(a, r, dtype, label)
    out, lse, dq, dk, dv = got
    assert out.dtype == dq.dtype == dk.dtype == dv.dtype == dtype and lse.dtype == dtype
    assert out.shape == q.shape and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert out.is_contiguous() and lse.is_contiguous()


def test_long_rows_cross_the_ops_internal_blocks():
    """S >= 768 makes the op split queries (256) and keys (512) internally; documents cut across them."""
    S = 800
    docs = docs_from_lengths([[300, 450, 50]])
    idx = torch.arange(S)
    case = dict(q_index=idx, k_index=idx, q_doc=docs, k_doc=docs, causal=True)
    got, ref, _ = run(case, torch.float32)
    for label, a, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        _close(a, r, torch.float32, label)


def test_bf16_is_computed_in_fp32():
    got, ref, _ = run(CASES["docs_causal"], torch.bfloat16)
    out, lse, dq, dk, dv = got
    assert out.dtype == dq.dtype == torch.bfloat16 and lse.dtype == torch.float32
    for label, a, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        _close(a, r, torch.bfloat16, label)


def test_plans():
    a = torch.arange(64)
    # aligned causal and zigzag's local step: one causal call over everything
    assert _plan(dict(q_index=a, k_index=a), 1) == [(0, 1, 0, 64, [(0, 64, True)])]
    zz = zigzag_index(64, 4, 1)
    assert _plan(dict(q_index=zz, k_index=zz), 1) == [(0, 1, 0, 16, [(0, 16, True)])]
    # striped, keys of a later rank: row 0 sees nothing, then one causal call
    assert _plan(dict(q_index=striped_index(64, 4, 1), k_index=striped_index(64, 4, 2)), 1) == [
        (0, 1, 1, 16, [(0, 15, True)])]
    # q overlapping the end of k: a visible prefix + a causal square, then all of k
    assert _plan(dict(q_index=torch.arange(10, 40), k_index=torch.arange(0, 25)), 2) == [
        (0, 2, 0, 15, [(0, 10, False), (10, 25, True)]), (0, 2, 15, 30, [(0, 25, False)])]
    # documents: one group per document (rows sharing documents share groups)
    docs = docs_from_lengths([[20, 44], [20, 44], [64]])
    assert _plan(dict(q_index=a, k_index=a, q_doc=docs, k_doc=docs), 3) == [
        (0, 2, 0, 20, [(0, 20, True)]), (0, 2, 20, 64, [(20, 64, True)]), (2, 3, 0, 64, [(0, 64, True)])]


@pytest.mark.parametrize("why", ["unsorted", "split_doc", "tiny_segments"])
def test_fallback_cases_still_exact(why):
    a = torch.arange(40)
    case = dict(q_index=a, k_index=a, causal=True)
    if why == "unsorted":
        case["k_index"] = a[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    elif why == "split_doc":
        d = torch.tensor([[0] * 10 + [1] * 10 + [0] * 20] * 2)
        case.update(q_doc=d, k_doc=d)
    else:  # q every 4th token, k dense: a fused call per query
        case.update(q_index=torch.arange(0, 160, 4), k_index=torch.arange(160))
    B = _batch(case)
    assert _plan(case, B) is None
    got, ref, _ = run(case, torch.float64)
    for label, a_, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        _close(a_, r, torch.float64, label)


def test_empty_rows():
    case = CASES["empty_rows_docs"]
    (out, lse, dq, dk, dv), _, _ = run(case, torch.float32)
    empty = ~dense_mask(case["q_index"], case["k_index"], case["q_doc"], case["k_doc"], True, 2).any(-1)
    assert empty.any() and not empty.all()
    assert (out[empty] == 0).all() and torch.isneginf(lse.transpose(1, 2)[empty]).all()
    assert torch.isfinite(lse.transpose(1, 2)[~empty]).all()
    assert (dq[empty] == 0).all()
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    (out, lse, dq, dk, dv), _, _ = run(CASES["q_before_k"], torch.float32)
    assert (out == 0).all() and torch.isneginf(lse).all()
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag_docs", "striped_gqa"])
def test_backward_with_global_out_lse(layout, dtype):
    """Two key sets (as two ring steps): each backward with the global out/lse (or delta only)
    gives that set's contribution; together they are the full gradient."""
    S = 48
    if layout == "contiguous":
        qi, sets, doc, H, H_kv = torch.arange(S), [torch.arange(0, 20), torch.arange(20, S)], None, 2, 2
    elif layout == "zigzag_docs":
        qi, sets, doc, H, H_kv = zigzag_index(S, 3, 1), [zigzag_index(S, 3, 0), zigzag_index(S, 3, 2)], ZZ_DOC, 4, 2
    else:
        qi, sets, doc, H, H_kv = striped_index(S, 2, 1), [striped_index(S, 2, 0), striped_index(S, 2, 1)], None, 4, 1
    ki = torch.cat(sets)
    qd = None if doc is None else doc[qi][None]
    kd = None if doc is None else doc[ki][None]
    q, k, v, dout = make_inputs(B=1, S_q=len(qi), S_k=len(ki), H=H, H_kv=H_kv, dtype=dtype)
    full = dict(q_index=qi, k_index=ki, q_doc=qd, k_doc=kd, causal=True)
    ref_out, ref_lse = naive_attention(q, k, v, **full)
    ref_dq, ref_dk, ref_dv = naive_grads(q, k, v, dout, **full)
    out, lse = ref_out.to(dtype), ref_lse.to(dtype)  # the global results, as a ring would hold them
    delta = (dout * out).sum(-1).transpose(1, 2)
    for kw in (dict(out=out), dict(out=None, delta=delta)):
        dq, dks, dvs, start = torch.zeros_like(q), [], [], 0
        for idx in sets:
            sl = slice(start, start + len(idx))
            start += len(idx)
            part = dict(q_index=qi, k_index=idx, q_doc=qd, k_doc=None if kd is None else kd[:, sl], causal=True)
            assert _plan(part, 1) is not None
            o = kw.get("out")
            g = attention_backward(dout, q, k[:, sl], v[:, sl], o, lse, backend="torch",
                                   delta=kw.get("delta"), **part)
            dq += g[0]
            dks.append(g[1])
            dvs.append(g[2])
        _close(dq, ref_dq, dtype, "dq sum")
        _close(torch.cat(dks, 1), ref_dk, dtype, "dk")
        _close(torch.cat(dvs, 1), ref_dv, dtype, "dv")


def test_fused_equals_chunked_fallback(monkeypatch):
    """Same inputs through both paths (LONGCTX_CPU_FUSED=0 forces the chunked one)."""
    case, H, H_kv = _split(CASES["zigzag_gqa_docs"])
    q, k, v, dout = make_inputs(B=2, S_q=16, S_k=16, H=H, H_kv=H_kv, dtype=torch.float32)
    res = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(cpu_fused.ENV, flag)
        out, lse = attention_forward(q, k, v, backend="torch", **case)
        res[flag] = (out, lse) + attention_backward(dout, q, k, v, out, lse, backend="torch", **case)
    for a, b in zip(res["1"], res["0"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_autograd_through_fused_path():
    docs = docs_from_lengths([[9, 15]])
    q, k, v, dout = make_inputs(B=1, S_q=24, H=4, H_kv=2)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attention(*leaves, q_doc=docs, k_doc=docs, backend="torch")
    out.backward(dout)
    idx = torch.arange(24)
    ref_out, _ = naive_attention(q, k, v, idx, idx, docs, docs)
    ref = naive_grads(q, k, v, dout, q_index=idx, k_index=idx, q_doc=docs, k_doc=docs)
    _close(out.detach(), ref_out, torch.float64, "out")
    for t, r, name in zip(leaves, ref, ("dq", "dk", "dv")):
        _close(t.grad, r, torch.float64, name)


def test_segments_cover_exactly_the_visible_prefixes():
    """Random non-decreasing prefix lengths: the planned calls give each row exactly keys [0, hi), once."""
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(1, 30, (), generator=g))
        jumps = torch.tensor([0, 0, 1, 1, 1, 2, 5])[torch.randint(0, 7, (n,), generator=g)]
        jumps[0] = int(torch.randint(0, 4, (), generator=g))
        hi = torch.cumsum(jumps, 0)
        seen = torch.zeros(n, int(hi[-1]) + 1, dtype=torch.int64)
        for r0, r1, calls in cpu_fused._segments(hi):
            for k0, k1, causal in calls:
                block = torch.ones(r1 - r0, k1 - k0, dtype=torch.int64)
                seen[r0:r1, k0:k1] += block.tril() if causal else block
        want = (torch.arange(seen.shape[1])[None] < hi[:, None]).long()
        assert torch.equal(seen, want), hi.tolist()


def test_band_blocks_cover_exactly_the_window():
    """Random non-decreasing [lo, hi) per row (lo <= hi): the band calls give each row exactly
    keys [lo, hi), once; rows with lo = hi are in no call; a block has at most `rows` rows."""
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        n = int(torch.randint(1, 60, (), generator=g))
        hi = torch.cumsum(torch.tensor([0, 1, 1, 1, 2, 4])[torch.randint(0, 6, (n,), generator=g)], 0) + 3
        lo = torch.minimum(torch.cumsum(torch.tensor([0, 1, 1, 3])[torch.randint(0, 4, (n,), generator=g)], 0), hi)
        rows = int(torch.randint(1, 20, (), generator=g))
        seen = torch.zeros(n, int(hi[-1]) + 1, dtype=torch.int64)
        for r0, r1, calls in cpu_fused._band_segments(lo, hi, rows):
            assert 0 < r1 - r0 <= rows and bool((hi[r0:r1] > lo[r0:r1]).all())
            for k0, k1, kind in calls:
                block = torch.ones(r1 - r0, k1 - k0, dtype=torch.int64)
                seen[r0:r1, k0:k1] += block if kind is False else kind.long()
        j = torch.arange(seen.shape[1])[None]
        want = ((j >= lo[:, None]) & (j < hi[:, None])).long()
        assert torch.equal(seen, want), (lo.tolist(), hi.tolist())
