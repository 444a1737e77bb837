"""Torch reference attention vs. a naive dense fp64 implementation.

Tolerances (stated once, used everywhere):
  - fp64 inputs vs fp64 naive: atol = rtol = 1e-10
  - fp32 inputs vs fp64 naive: atol = rtol = 1e-5
  - bf16 inputs vs fp64 naive: atol = rtol = 3e-2 (smoke check of dtype handling)
"""

from __future__ import annotations

import math

import pytest
import torch

from longctx.kernels import (
    attention,
    attention_backward,
    attention_forward,
    merge_partials,
    visible_pairs,
)

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


# ---------------------------------------------------------------------------
# naive reference (dense, fp64, differentiable)
# ---------------------------------------------------------------------------


def dense_mask(q_index, k_index, q_doc, k_doc, causal, B, window=None):
    mask = torch.ones(B, len(q_index), len(k_index), dtype=torch.bool)
    if causal:
        mask &= q_index[None, :, None] >= k_index[None, None, :]
    if window is not None:
        mask &= q_index[None, :, None] - k_index[None, None, :] < window
    if q_doc is not None:
        mask &= q_doc[:, :, None] == k_doc[:, None, :]
    return mask


def naive_attention(q, k, v, q_index, k_index, q_doc=None, k_doc=None, causal=True, scale=None, window=None):
    """Dense masked softmax in fp64. Returns out [B,S_q,H,D], lse [B,H,S_q]."""
    q, k, v = q.double(), k.double(), v.double()
    B, S_q, H, D = q.shape
    G = H // k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(G, dim=2)  # query head h uses kv head h // G
    v = v.repeat_interleave(G, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = dense_mask(q_index, k_index, q_doc, k_doc, causal, B, window)[:, None]
    s = s.masked_fill(~mask, float("-inf"))
    # Explicit max/sum (instead of logsumexp) keeps empty rows NaN-free under autograd.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    l_safe = torch.where(l > 0, l, torch.ones_like(l))
    out = torch.einsum("bhqk,bkhd->bqhd", e / l_safe, v)
    lse = torch.where(l > 0, m + torch.log(l_safe), torch.full_like(l, float("-inf"))).squeeze(-1)
    return out, lse


def naive_grads(q, k, v, dout, **kw):
    q, k, v = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out, _ = naive_attention(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.double())
    return dq, dk, dv


def make_inputs(B=2, S_q=23, S_k=None, H=2, H_kv=2, D=8, dtype=torch.float64, seed=0):
    S_k = S_q if S_k is None else S_k
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S_q, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, S_k, H_kv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, S_k, H_kv, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, S_q, H, D, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype)


def docs_from_lengths(lengths_per_row):
    """[[5, 9, 9], ...] -> doc ids [B, sum(lengths)]."""
    rows = [torch.cat([torch.full((n,), d) for d, n in enumerate(lens)]) for lens in lengths_per_row]
    return torch.stack(rows).long()


def zigzag_index(S, N, r):
    c = S // (2 * N)
    return torch.cat([torch.arange(r * c, (r + 1) * c), torch.arange((2 * N - 1 - r) * c, (2 * N - r) * c)])


# ---------------------------------------------------------------------------
# cases: each gives shapes, indices and docs
# ---------------------------------------------------------------------------

S = 23
DOCS = docs_from_lengths([[5, 9, 9], [1, 13, 6, 3]])  # boundaries not aligned to chunks

CASES = {
    "causal": dict(q_index=torch.arange(S), k_index=torch.arange(S), causal=True),
    "noncausal": dict(q_index=torch.arange(S), k_index=torch.arange(S), causal=False),
    "docs_causal": dict(q_index=torch.arange(S), k_index=torch.arange(S), q_doc=DOCS, k_doc=DOCS, causal=True),
    "docs_noncausal": dict(q_index=torch.arange(S), k_index=torch.arange(S), q_doc=DOCS, k_doc=DOCS, causal=False),
    "gqa_4_2": dict(q_index=torch.arange(S), k_index=torch.arange(S), causal=True, H=4, H_kv=2),
    "gqa_4_1_docs": dict(q_index=torch.arange(S), k_index=torch.arange(S), q_doc=DOCS, k_doc=DOCS, causal=True,
                         H=4, H_kv=1),
    # ring step: q block after k block -> everything visible
    "offset_q_after_k": dict(q_index=torch.arange(16, 32), k_index=torch.arange(0, 13), causal=True),
    # q block before k block -> nothing visible under causal
    "offset_q_before_k": dict(q_index=torch.arange(0, 16), k_index=torch.arange(16, 29), causal=True),
    # striped layout, rank 1 queries vs rank 2 keys (N=4)
    "striped": dict(q_index=torch.arange(1, 40, 4), k_index=torch.arange(2, 40, 4), causal=True),
    "striped_gqa": dict(q_index=torch.arange(3, 40, 4), k_index=torch.arange(0, 40, 4), causal=True, H=4, H_kv=1),
    "zigzag": dict(q_index=zigzag_index(48, 3, 1), k_index=zigzag_index(48, 3, 2), causal=True),
    # some rows see no key: q doc 2 starts inside the q block, keys end before it
    "empty_rows_docs": dict(
        q_index=torch.arange(10, 20), k_index=torch.arange(0, 12),
        q_doc=torch.tensor([[1] * 4 + [2] * 6, [0] * 10]),
        k_doc=torch.tensor([[0] * 5 + [1] * 7, [0] * 12]),
        causal=True,
    ),
}

CHUNKS = [dict(q_chunk_size=5, k_chunk_size=7), dict(q_chunk_size=4, k_chunk_size=3), dict()]


def run_case(case, dtype, chunks, seed=0):
    case = dict(case)
    H, H_kv = case.pop("H", 2), case.pop("H_kv", 2)
    q_doc = case.get("q_doc")
    B = 2 if q_doc is None else q_doc.shape[0]
    q, k, v, dout = make_inputs(B=B, S_q=len(case["q_index"]), S_k=len(case["k_index"]), H=H, H_kv=H_kv,
                                dtype=dtype, seed=seed)
    out, lse = attention_forward(q, k, v, backend="torch", **case, **chunks)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, backend="torch", **case, **chunks)
    ref_out, ref_lse = naive_attention(q, k, v, **case)
    ref_grads = naive_grads(q, k, v, dout, **case)
    return (out, lse, dq, dk, dv), (ref_out, ref_lse, *ref_grads), (q, k, v)


def assert_close(actual, expected, dtype, name):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("chunks", CHUNKS, ids=["q5k7", "q4k3", "default"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_naive_fp64(name, chunks):
    (out, lse, dq, dk, dv), ref, (q, k, v) = run_case(CASES[name], torch.float64, chunks)
    for label, a, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), ref):
        assert torch.isfinite(a).logical_or(torch.isneginf(a) & (label == "lse")).all(), label
        assert_close(a, r, torch.float64, label)
    # dtypes and shapes of the contract
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("name", ["causal", "docs_causal", "gqa_4_1_docs", "striped", "empty_rows_docs"])
def test_matches_naive_fp32(name):
    (out, lse, dq, dk, dv), ref, (q, k, v) = run_case(CASES[name], torch.float32, CHUNKS[0])
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert dq.dtype == dk.dtype == dv.dtype == torch.float32
    for label, a, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), ref):
        assert_close(a, r, torch.float32, label)


def test_bf16_dtypes():
    (out, lse, dq, dk, dv), ref, _ = run_case(CASES["docs_causal"], torch.bfloat16, CHUNKS[0])
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16
    assert_close(out, ref[0], torch.bfloat16, "out")
    assert_close(lse, ref[1], torch.float32, "lse")  # lse is computed in fp32 from bf16 inputs
    assert_close(dv, ref[4], torch.bfloat16, "dv")


def test_empty_rows_are_zero_and_neg_inf():
    (out, lse, dq, dk, dv), _, _ = run_case(CASES["offset_q_before_k"], torch.float64, CHUNKS[0])
    assert (out == 0).all() and torch.isneginf(lse).all()
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()

    case = CASES["empty_rows_docs"]
    (out, lse, dq, dk, dv), _, _ = run_case(case, torch.float64, CHUNKS[1])
    empty = ~dense_mask(case["q_index"], case["k_index"], case["q_doc"], case["k_doc"], True, 2).any(-1)
    assert empty.any() and not empty.all()
    assert (out[empty] == 0).all()
    assert torch.isneginf(lse.transpose(1, 2)[empty]).all()
    assert torch.isfinite(lse.transpose(1, 2)[~empty]).all()
    assert (dq[empty] == 0).all() and torch.isfinite(dq).all()
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_softmax_scale():
    case = CASES["docs_causal"]
    q, k, v, dout = make_inputs(B=2, S_q=S)
    out, lse = attention_forward(q, k, v, softmax_scale=0.37, backend="torch", q_chunk_size=6, **case)
    ref_out, ref_lse = naive_attention(q, k, v, scale=0.37, **case)
    assert_close(out, ref_out, torch.float64, "out")
    assert_close(lse, ref_lse, torch.float64, "lse")


# ---------------------------------------------------------------------------
# merging partial results and backward on key subsets (ring attention)
# ---------------------------------------------------------------------------

def _split_keys(S_k, seed=1):
    perm = torch.randperm(S_k, generator=torch.Generator().manual_seed(seed))
    return perm[: S_k // 2].sort().values, perm[S_k // 2:].sort().values


def _subset(case, idx):
    sub = dict(case, k_index=case["k_index"][idx])
    if case.get("k_doc") is not None:
        sub["k_doc"] = case["k_doc"][:, idx]
    return sub


@pytest.mark.parametrize("name", ["causal", "docs_causal", "gqa_4_1_docs", "empty_rows_docs", "striped"])
def test_merge_partials_equals_full(name):
    case = dict(CASES[name])
    H, H_kv = case.pop("H", 2), case.pop("H_kv", 2)
    B = 2 if case.get("q_doc") is None else case["q_doc"].shape[0]
    q, k, v, _ = make_inputs(B=B, S_q=len(case["q_index"]), S_k=len(case["k_index"]), H=H, H_kv=H_kv)
    full_out, full_lse = attention_forward(q, k, v, backend="torch", **case)
    a, b = _split_keys(k.shape[1])
    out_a, lse_a = attention_forward(q, k[:, a], v[:, a], backend="torch", q_chunk_size=4, **_subset(case, a))
    out_b, lse_b = attention_forward(q, k[:, b], v[:, b], backend="torch", k_chunk_size=3, **_subset(case, b))
    for x, y in (((out_a, lse_a), (out_b, lse_b)), ((out_b, lse_b), (out_a, lse_a))):
        out, lse = merge_partials(*x, *y)
        assert_close(out, full_out, torch.float64, "merged out")
        assert_close(lse, full_lse, torch.float64, "merged lse")


def test_merge_partials_neg_inf_cases():
    # q 0..15 causal; keys 4..15 split into a = 4..9 and b = 10..15:
    # rows 0-3 see nothing in either, rows 4-9 only a, rows 10-15 both.
    q_index, k_index = torch.arange(16), torch.arange(4, 16)
    q, k, v, _ = make_inputs(B=1, S_q=16, S_k=12, dtype=torch.float32)
    full_out, full_lse = attention_forward(q, k, v, q_index=q_index, k_index=k_index)
    out_a, lse_a = attention_forward(q, k[:, :6], v[:, :6], q_index=q_index, k_index=k_index[:6])
    out_b, lse_b = attention_forward(q, k[:, 6:], v[:, 6:], q_index=q_index, k_index=k_index[6:])
    assert torch.isneginf(lse_b[:, :, :10]).all() and torch.isneginf(lse_a[:, :, :4]).all()
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[:, :4] == 0).all() and torch.isneginf(lse[:, :, :4]).all()
    assert_close(out, full_out, torch.float32, "out")
    assert_close(lse, full_lse, torch.float32, "lse")
    # both sides empty everywhere, and a bf16 out mixed in
    empty = torch.full_like(lse_a, float("-inf"))
    out, lse = merge_partials(torch.zeros_like(out_a), empty, torch.zeros_like(out_b, dtype=torch.bfloat16), empty)
    assert out.dtype == torch.float32 and (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("name", ["causal", "docs_causal", "gqa_4_1_docs", "empty_rows_docs", "zigzag"])
def test_backward_on_key_subsets_with_global_out_lse(name):
    case = dict(CASES[name])
    H, H_kv = case.pop("H", 2), case.pop("H_kv", 2)
    B = 2 if case.get("q_doc") is None else case["q_doc"].shape[0]
    q, k, v, dout = make_inputs(B=B, S_q=len(case["q_index"]), S_k=len(case["k_index"]), H=H, H_kv=H_kv)
    out, lse = attention_forward(q, k, v, backend="torch", **case)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, backend="torch", **case)
    delta = (dout * out).sum(-1).transpose(1, 2)  # precomputed once, as ring strategies do (fp64 here)
    dq_sum = torch.zeros_like(dq)
    for idx in _split_keys(k.shape[1]):
        for kw in (dict(), dict(delta=delta)):
            dq_s, dk_s, dv_s = attention_backward(dout, q, k[:, idx], v[:, idx], out, lse, backend="torch",
                                                  q_chunk_size=5, k_chunk_size=2, **_subset(case, idx), **kw)
            assert_close(dk_s, dk[:, idx], torch.float64, "dk subset")
            assert_close(dv_s, dv[:, idx], torch.float64, "dv subset")
        dq_sum += dq_s
    assert_close(dq_sum, dq, torch.float64, "dq sum")


def test_backward_fp32_delta_argument():
    case = CASES["docs_causal"]
    q, k, v, dout = make_inputs(B=2, S_q=S, dtype=torch.float32)
    out, lse = attention_forward(q, k, v, **case)
    delta = (dout * out).sum(-1).transpose(1, 2)
    a = attention_backward(dout, q, k, v, out, lse, **case)
    b = attention_backward(dout, q, k, v, out, lse, delta=delta, **case)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------
# autograd wrapper
# ---------------------------------------------------------------------------


def test_attention_gradcheck():
    q, k, v, _ = make_inputs(B=1, S_q=6, H=2, H_kv=1, D=3)
    docs = torch.tensor([[0, 0, 1, 1, 1, 2]])
    for t in (q, k, v):
        t.requires_grad_(True)

    def fn(q, k, v):
        return attention(q, k, v, q_doc=docs, k_doc=docs, backend="torch", q_chunk_size=4, k_chunk_size=4)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)

    # offset blocks with empty rows (q index 0..2 see no key at 3..8)
    def fn_offset(q, k, v):
        return attention(q, k, v, q_index=torch.arange(6), k_index=torch.arange(3, 9), backend="torch",
                         q_chunk_size=2, k_chunk_size=5)

    assert torch.autograd.gradcheck(fn_offset, (q, k, v), eps=1e-6, atol=1e-7)


def test_attention_matches_naive_and_defaults():
    q, k, v, dout = make_inputs(B=2, S_q=S, H=4, H_kv=2)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = attention(q, k, v, q_doc=DOCS, k_doc=DOCS, q_chunk_size=8, k_chunk_size=8)  # backend="auto"
    out.backward(dout)
    ar = dict(q_index=torch.arange(S), k_index=torch.arange(S), q_doc=DOCS, k_doc=DOCS, causal=True)
    ref_out, _ = naive_attention(q.detach(), k.detach(), v.detach(), **ar)
    assert_close(out, ref_out, torch.float64, "out")
    for a, r, label in zip((q.grad, k.grad, v.grad), naive_grads(q, k, v, dout, **ar), ("dq", "dk", "dv")):
        assert_close(a, r, torch.float64, label)


# ---------------------------------------------------------------------------
# backends and input checks
# ---------------------------------------------------------------------------


def test_backend_dispatch():
    q, k, v, _ = make_inputs(B=1, S_q=5)
    idx = torch.arange(5)
    out_auto, _ = attention_forward(q, k, v, q_index=idx, k_index=idx, backend="auto")
    out_torch, _ = attention_forward(q, k, v, q_index=idx, k_index=idx, backend="torch")
    assert torch.equal(out_auto, out_torch)
    with pytest.raises(RuntimeError, match="Triton"):
        attention_forward(q, k, v, q_index=idx, k_index=idx, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        attention_forward(q, k, v, q_index=idx, k_index=idx, backend="cuda")


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 5, 4, 8), (1, 5, 3, 8), (1, 5, 3, 8)), r"\(1, 5, 3, 8\)"),  # H % H_kv != 0
        (((1, 5, 2, 8), (1, 5, 2, 4), (1, 5, 2, 4)), r"\(1, 5, 2, 4\)"),  # head dim mismatch
        (((1, 5, 2, 8), (1, 5, 2, 8), (1, 6, 2, 8)), r"\(1, 6, 2, 8\)"),  # k vs v
        (((5, 2, 8), (1, 5, 2, 8), (1, 5, 2, 8)), r"\(5, 2, 8\)"),  # q not 4-D
        (((2, 5, 2, 8), (1, 5, 2, 8), (1, 5, 2, 8)), r"\(1, 5, 2, 8\)"),  # batch mismatch
    ],
)
def test_bad_shapes_raise(shapes, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        attention_forward(q, k, v, q_index=torch.arange(q.shape[1] if q.dim() == 4 else 5),
                          k_index=torch.arange(k.shape[1]), backend="torch")


def test_bad_index_and_doc_shapes_raise():
    q, k, v, dout = make_inputs(B=2, S_q=5, S_k=6)
    with pytest.raises(ValueError, match=r"q_index.*\(4,\)"):
        attention_forward(q, k, v, q_index=torch.arange(4), k_index=torch.arange(6))
    with pytest.raises(ValueError, match=r"k_doc.*\(2, 5\)"):
        attention_forward(q, k, v, q_index=torch.arange(5), k_index=torch.arange(6),
                          q_doc=torch.zeros(2, 5, dtype=torch.long), k_doc=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="both"):
        attention_forward(q, k, v, q_index=torch.arange(5), k_index=torch.arange(6),
                          q_doc=torch.zeros(2, 5, dtype=torch.long))
    out, lse = attention_forward(q, k, v, q_index=torch.arange(5), k_index=torch.arange(6))
    with pytest.raises(ValueError, match=r"lse.*\(2, 2, 2\)"):
        attention_backward(dout, q, k, v, out, lse[:, :, :2], q_index=torch.arange(5), k_index=torch.arange(6))


# ---------------------------------------------------------------------------
# visible pairs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_visible_pairs_matches_dense_count(name):
    case = CASES[name]
    q_doc, k_doc = case.get("q_doc"), case.get("k_doc")
    B = 1 if q_doc is None else q_doc.shape[0]
    dense = int(dense_mask(case["q_index"], case["k_index"], q_doc, k_doc, case["causal"], B).sum())
    assert visible_pairs(case["q_index"], case["k_index"], q_doc, k_doc, causal=case["causal"]) == dense


def test_visible_pairs_batch_and_extremes():
    idx = torch.arange(1000)
    assert visible_pairs(idx, idx, causal=True) == 1000 * 1001 // 2
    assert visible_pairs(idx, idx, causal=True, batch_size=3) == 3 * 1000 * 1001 // 2
    assert visible_pairs(idx, idx, causal=False, batch_size=2) == 2 * 1000 * 1000
    assert visible_pairs(torch.arange(10), torch.arange(10, 20)) == 0
    # negative (padding) and large doc ids, several rows
    q_doc = torch.tensor([[-1, -1, 7, 7, 10**12], [3, 3, 3, 3, 3]])
    k_doc = torch.tensor([[7, -1, 7, 10**12, 10**12], [3, 3, 4, 4, 3]])
    for causal in (True, False):
        dense = int(dense_mask(torch.arange(5), torch.arange(5), q_doc, k_doc, causal, 2).sum())
        assert visible_pairs(torch.arange(5), torch.arange(5), q_doc, k_doc, causal=causal) == dense


# ---------------------------------------------------------------------------
# memory bound: no S_q x S_k tensor is ever built
# ---------------------------------------------------------------------------


class _LargestTensor(torch.overrides.TorchFunctionMode):
    """Records the largest tensor any torch call returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


def test_chunking_bounds_memory():
    B, S_long, H, H_kv, D, chunk = 1, 512, 4, 1, 4, 32
    q, k, v, dout = make_inputs(B=B, S_q=S_long, H=H, H_kv=H_kv, D=D, dtype=torch.float32)
    idx, docs = torch.arange(S_long), torch.arange(S_long)[None] // 100
    kw = dict(q_index=idx, k_index=idx, q_doc=docs, k_doc=docs, q_chunk_size=chunk, k_chunk_size=chunk)
    with _LargestTensor() as mode:
        out, lse = attention_forward(q, k, v, **kw)
        attention_backward(dout, q, k, v, out, lse, **kw)
    # Largest expected: a score block [B, H, chunk, chunk] or a full q-sized tensor.
    assert mode.largest <= max(B * H * chunk * chunk, B * S_long * H * D)
    assert mode.largest < B * H * S_long * S_long // 16


# ---------------------------------------------------------------------------
# sliding window
# ---------------------------------------------------------------------------

# Windows 1 (only the key at the query's own index), 7, S/4 and larger than S.
WINDOWS = [1, 7, S // 4, S + 5]
WINDOW_LAYOUTS = {
    "docs_gqa_4_2": dict(CASES["docs_causal"], H=4, H_kv=2),
    "docs_noncausal": CASES["docs_noncausal"],
    "striped": CASES["striped"],
    "zigzag": CASES["zigzag"],
    "ring_q_after_k": CASES["offset_q_after_k"],  # small windows: nothing visible
}


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layout", list(WINDOW_LAYOUTS))
def test_window_matches_naive_fp64(layout, window):
    case = dict(WINDOW_LAYOUTS[layout], window=window)
    for chunks in CHUNKS[:2]:
        (out, lse, dq, dk, dv), ref, _ = run_case(case, torch.float64, chunks)
        for label, a, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), ref):
            assert torch.isfinite(a).logical_or(torch.isneginf(a) & (label == "lse")).all(), label
            assert_close(a, r, torch.float64, f"{label} {chunks}")
        empty = torch.isneginf(ref[1]).transpose(1, 2)
        assert (out[empty] == 0).all() and (dq[empty] == 0).all()


def test_window_larger_than_sequence_equals_no_window():
    case = CASES["docs_causal"]
    q, k, v, dout = make_inputs(B=2, S_q=S)
    full = attention_forward(q, k, v, backend="torch", **case)
    windowed = attention_forward(q, k, v, backend="torch", window=S, **case)
    assert torch.equal(full[0], windowed[0]) and torch.equal(full[1], windowed[1])


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layout", list(WINDOW_LAYOUTS) + ["permuted"])
def test_window_visible_pairs_matches_dense_count(layout, window):
    if layout == "permuted":  # arbitrary index sets, unsorted
        g = torch.Generator().manual_seed(window)
        case = dict(q_index=torch.randperm(60, generator=g)[:S], k_index=torch.randperm(60, generator=g)[:31],
                    q_doc=torch.randint(0, 3, (2, S), generator=g), k_doc=torch.randint(0, 3, (2, 31), generator=g),
                    causal=bool(window % 2))
    else:
        case = WINDOW_LAYOUTS[layout]
    q_doc, k_doc = case.get("q_doc"), case.get("k_doc")
    B = 1 if q_doc is None else q_doc.shape[0]
    dense = dense_mask(case["q_index"], case["k_index"], q_doc, k_doc, case["causal"], B, window)
    got = visible_pairs(case["q_index"], case["k_index"], q_doc, k_doc, causal=case["causal"], window=window)
    assert got == int(dense.sum())
    if q_doc is None:
        assert visible_pairs(case["q_index"], case["k_index"], causal=case["causal"], window=window,
                             batch_size=3) == 3 * int(dense.sum())


def test_window_visible_pairs_extremes():
    idx = torch.arange(1000)
    assert visible_pairs(idx, idx, causal=True, window=10) == 10 * 1000 - 45
    assert visible_pairs(idx, idx, causal=True, window=1) == 1000
    assert visible_pairs(idx, idx, causal=True, window=5000) == 1000 * 1001 // 2
    # non-causal: the window bounds only how far back a key may be
    assert visible_pairs(idx, idx, causal=False, window=1) == 1000 * 1001 // 2
    assert visible_pairs(torch.arange(100, 110), torch.arange(0, 50), window=50) == 0
    q_doc = torch.tensor([[-1, -1, 7, 7, 10**12], [3, 3, 3, 3, 3]])
    k_doc = torch.tensor([[7, -1, 7, 10**12, 10**12], [3, 3, 4, 4, 3]])
    for causal in (True, False):
        for window in (1, 2, 4):
            dense = int(dense_mask(torch.arange(5), torch.arange(5), q_doc, k_doc, causal, 2, window).sum())
            assert visible_pairs(torch.arange(5), torch.arange(5), q_doc, k_doc, causal=causal, window=window) == dense


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
def test_window_must_be_positive_int(bad):
    q, k, v, dout = make_inputs(B=1, S_q=5)
    idx = torch.arange(5)
    out, lse = attention_forward(q, k, v, q_index=idx, k_index=idx, backend="torch")
    with pytest.raises(ValueError, match="window"):
        attention_forward(q, k, v, q_index=idx, k_index=idx, window=bad, backend="torch")
    with pytest.raises(ValueError, match="window"):
        attention_backward(dout, q, k, v, out, lse, q_index=idx, k_index=idx, window=bad, backend="torch")
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=bad, backend="torch")
    with pytest.raises(ValueError, match="window"):
        visible_pairs(idx, idx, window=bad)


def test_window_acc_and_key_subsets():
    """Accumulating mode and per-key-block backward (global out/lse, external delta) under a window."""
    case = dict(CASES["docs_causal"], window=6)
    q, k, v, dout = make_inputs(B=2, S_q=S, H=4, H_kv=2)
    out, lse = attention_forward(q, k, v, backend="torch", **case)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, backend="torch", **case)
    delta = (dout * out).sum(-1).transpose(1, 2)
    acc = (torch.zeros_like(out), torch.full_like(lse, float("-inf")))
    dq_sum = torch.zeros_like(dq)
    for idx in _split_keys(S):
        sub = _subset(case, idx)
        acc = attention_forward(q, k[:, idx], v[:, idx], backend="torch", acc=acc, q_chunk_size=4, **sub)
        dq_s, dk_s, dv_s = attention_backward(dout, q, k[:, idx], v[:, idx], out, lse, backend="torch",
                                              delta=delta, k_chunk_size=3, **sub)
        assert_close(dk_s, dk[:, idx], torch.float64, "dk subset")
        assert_close(dv_s, dv[:, idx], torch.float64, "dv subset")
        dq_sum += dq_s
    assert_close(acc[0], out, torch.float64, "acc out")
    assert_close(acc[1], lse, torch.float64, "acc lse")
    assert_close(dq_sum, dq, torch.float64, "dq sum")


def test_window_autograd_gradcheck():
    q, k, v, _ = make_inputs(B=1, S_q=9, H=2, H_kv=1, D=3)
    for t in (q, k, v):
        t.requires_grad_(True)

    def fn(q, k, v):
        return attention(q, k, v, window=3, backend="torch", q_chunk_size=4, k_chunk_size=2)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


class _CountMatmuls(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.matmul
        return func(*args, **(kwargs or {}))


def test_window_skips_chunks_below_the_window(monkeypatch):
    """Only key chunks that reach into the window are computed: with window = chunk,
    every query chunk but the first touches exactly two key chunks (the chunked path:
    on CPU a window takes the fused path first, test_kernels_cpu_fused.py)."""
    from longctx.kernels import cpu_fused

    monkeypatch.setenv(cpu_fused.ENV, "0")
    S_long, chunk = 256, 32
    q, k, v, dout = make_inputs(B=1, S_q=S_long, H=2, H_kv=1, D=4, dtype=torch.float32)
    idx = torch.arange(S_long)
    kw = dict(q_index=idx, k_index=idx, window=chunk, q_chunk_size=chunk, k_chunk_size=chunk, backend="torch")
    n_q = S_long // chunk
    with _CountMatmuls() as fwd:
        out, lse = attention_forward(q, k, v, **kw)
    assert fwd.calls == 2 * (2 * n_q - 1)  # QK^T and PV per visited chunk pair
    with _CountMatmuls() as bwd:
        attention_backward(dout, q, k, v, out, lse, **kw)
    assert bwd.calls == 5 * (2 * n_q - 1)
