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

import importlib.util
import math
import os

import pytest
import torch

from longctx.kernels import (
    _select_backend,
    attention,
    attention_backward,
    attention_forward,
    merge_partials,
    reference,
)

try:
    from distributed_utils import run_distributed
except ImportError:  # tests imported as a package
    from tests.distributed_utils import run_distributed

# triton is imported lazily (first by a test, after the ``interp`` fixture has
# set TRITON_INTERPRET where it applies), never at collection: other test
# files' interpreted kernels may rely on triton being first imported in
# interpreter mode. Our own kernels work with either import order.
if importlib.util.find_spec("triton") is None:  # a broken install, not a reason to skip
    raise ImportError("triton is a dependency of longctx (pyproject.toml); reinstall with `pip install -e .`")


def _ta():
    from longctx.kernels import triton_attention

    return triton_attention

FWD_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=2e-5, rtol=2e-5)
HALF_TOL = dict(atol=2e-2, rtol=2e-2)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.fixture
def interp(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------


def docs_from_lengths(rows):
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


def _case(name, S_q, S_k, H=4, H_kv=2, D=16, B=2, q_index=None, k_index=None, q_doc=None, k_doc=None,
          causal=True, scale=None):
    return pytest.param(
        dict(S_q=S_q, S_k=S_k, H=H, H_kv=H_kv, D=D, B=B,
             q_index=torch.arange(S_q) if q_index is None else q_index,
             k_index=torch.arange(S_k) if k_index is None else k_index,
             q_doc=q_doc, k_doc=k_doc, causal=causal, scale=scale),
        id=name,
    )


_DOCS67 = docs_from_lengths([[3, 40, 1, 9, 14], [67]])  # long-tailed lengths, one 1-token doc
_G = torch.Generator().manual_seed(7)
_PERM_Q = torch.randperm(80, generator=_G)[:45]
_PERM_K = torch.randperm(80, generator=_G)[:61]

CASES = [
    # self-attention, S not a multiple of either tile size
    _case("causal", 67, 67),
    _case("full", 45, 70, causal=False),
    _case("causal_scale_mqa", 50, 50, H=4, H_kv=1, scale=0.3),
    _case("causal_mha", 50, 50, H=2, H_kv=2),
    _case("causal_docs", 67, 67, q_doc=_DOCS67, k_doc=_DOCS67),
    _case("full_docs", 67, 67, q_doc=_DOCS67, k_doc=_DOCS67, causal=False),
    # ring steps: q block after its k block (all visible), before it (nothing visible)
    _case("ring_q_after_k", 40, 48, q_index=torch.arange(48, 88), k_index=torch.arange(48)),
    _case("ring_q_before_k", 40, 48, q_index=torch.arange(40), k_index=torch.arange(40, 88)),
    _case("ring_q_before_k_docs", 40, 48, q_index=torch.arange(40), k_index=torch.arange(40, 88),
          q_doc=torch.zeros(2, 40, dtype=torch.long), k_doc=torch.zeros(2, 48, dtype=torch.long)),
    # zigzag: rank 0 (chunks 0, 3) queries against rank 1's keys (chunks 1, 2)
    _case("zigzag_offsets", 48, 48, q_index=torch.cat([torch.arange(0, 24), torch.arange(72, 96)]),
          k_index=torch.arange(24, 72)),
    # striped: rank 1 queries vs rank 0 keys and the reverse (diagonal invisible)
    _case("striped_q1_k0", 40, 40, q_index=torch.arange(1, 80, 2), k_index=torch.arange(0, 80, 2)),
    _case("striped_q0_k1_docs", 40, 40, q_index=torch.arange(0, 80, 2), k_index=torch.arange(1, 80, 2),
          q_doc=docs_from_lengths([[15, 25], [1, 39]]), k_doc=docs_from_lengths([[16, 24], [2, 38]])),
    # rows with no visible key: a query document absent from the key block
    _case("empty_rows_docs", 36, 36, q_index=torch.arange(36, 72), k_index=torch.arange(36),
          q_doc=torch.tensor([[0] * 10 + [5] * 26, [1] * 36]), k_doc=torch.tensor([[0] * 36, [0] * 20 + [1] * 16])),
    # general index sets (unsorted, arbitrary docs): no fully visible tiles, every tile masked
    _case("permuted_docs", 45, 61, q_index=_PERM_Q, k_index=_PERM_K,
          q_doc=torch.randint(0, 3, (2, 45), generator=_G), k_doc=torch.randint(0, 3, (2, 61), generator=_G)),
    # head dims: 64, 128, and one that is not a power of two (padded to 32)
    _case("d64", 40, 40, H=2, H_kv=1, D=64, B=1),
    _case("d128_docs", 33, 33, H=2, H_kv=2, D=128, B=1, q_doc=docs_from_lengths([[20, 13]]),
          k_doc=docs_from_lengths([[20, 13]])),
    _case("d24_full", 30, 37, H=2, H_kv=1, D=24, B=1, causal=False),
]


def case(name):
    return next(c.values[0] for c in CASES if c.id == name)


def make_inputs(c, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, H_kv, D = c["B"], c["H"], c["H_kv"], c["D"]
    q = torch.randn(B, c["S_q"], H, D, generator=g)
    k = torch.randn(B, c["S_k"], H_kv, D, generator=g)
    v = torch.randn(B, c["S_k"], H_kv, D, generator=g)
    dout = torch.randn(B, c["S_q"], H, D, generator=g)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    kw = dict(q_index=c["q_index"].to(device), k_index=c["k_index"].to(device),
              q_doc=None if c["q_doc"] is None else c["q_doc"].to(device),
              k_doc=None if c["k_doc"] is None else c["k_doc"].to(device),
              causal=c["causal"], softmax_scale=c["scale"])
    return to(q), to(k), to(v), to(dout), kw


def assert_lse_close(got, ref, **tol):
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), "lse -inf rows differ"
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], **tol)


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


def _ring_blocks(S, n_blocks):
    edges = [round(i * S / n_blocks) for i in range(n_blocks + 1)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


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


def _brute_visible(a_idx, b_idx, a_doc, b_doc, causal):
    vis = torch.ones(1 if a_doc is None else a_doc.shape[0], len(a_idx), len(b_idx), dtype=torch.bool,
                     device=a_idx.device)
    if causal:
        vis &= b_idx[None, None, :] <= a_idx[None, :, None]
    if a_doc is not None:
        vis &= a_doc[:, :, None] == b_doc[:, None, :]
    return vis


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


# ---------------------------------------------------------------------------
# compiled kernels: they must compile for real GPU targets (no GPU needed)
# ---------------------------------------------------------------------------


def _compile_for_target(fn, arch, dtype, consts, warps, stages):
    """triton.compile one kernel for ``sm_<arch>`` down to a cubin, with the
    specialisations a real launch gets (unit head-dim strides, 16-divisible
    pointers/strides). Returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    unit = {"sqd", "skd", "svd", "sod", "sid", "sdd", "sdkd", "sdvd", "sdqd"}
    consts = dict(consts, **{n: 1 for n in fn.arg_names if n in unit})
    floats = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n in consts:
            sig[n] = "constexpr"
        elif n in floats:
            sig[n] = f"*{dtype}"
        elif n in ("OutIn", "Lse", "LseIn", "Delta"):
            sig[n] = "*fp32"
        elif n in ("QIdx", "KIdx", "QDoc", "KDoc", "QBnd", "KBnd"):
            sig[n] = "*i32"
        elif n in ("qk_scale", "sm_scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
        if sig[n].startswith("*") or (sig[n] == "i32" and n.startswith("s") and n not in ("sqdoc", "skdoc", "sbnd")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=True))


@pytest.mark.parametrize("arch, dtype, D", [(90, "bf16", 128), (80, "fp16", 64)], ids=["sm90_bf16_d128", "sm80_fp16_d64"])
def test_kernels_compile_for_gpu_targets(monkeypatch, arch, dtype, D):
    """The interpreter is lenient; compiling catches typing/lowering errors in
    the real kernels (forward with acc + causal + documents, dK/dV, dQ)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    km = _ta()._kernel_module()
    assert not km.INTERPRET
    base = dict(IS_CAUSAL=True, HAS_DOC=True, BLOCK_D=D, EVEN_D=True, PREC="tf32")
    try:
        k = _compile_for_target(km._attn_fwd, arch, dtype, dict(base, ACC=True, BLOCK_M=128, BLOCK_N=32), 8, 3)
    except RuntimeError as err:  # no ptxas / CUDA toolchain bundled with this triton
        if "ptxas" in str(err).lower():
            pytest.skip(f"no CUDA toolchain to compile with: {err}")
        raise
    assert k.asm["cubin"]
    for fn, tiles in ((km._attn_bwd_dkdv, dict(BLOCK_M=32, BLOCK_N=64)), (km._attn_bwd_dq, dict(BLOCK_M=64, BLOCK_N=32))):
        assert _compile_for_target(fn, arch, dtype, dict(base, **tiles), 4, 2).asm["cubin"]


# ---------------------------------------------------------------------------
# GPU: bf16 / fp16 accuracy vs torch SDPA (skipped without CUDA)
# ---------------------------------------------------------------------------


def _sdpa_dense(q, k, v, mask, scale):
    """torch SDPA in q's dtype with a dense boolean mask; rows with nothing visible -> 0."""
    import torch.nn.functional as F

    G = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2).nan_to_num(0.0)


# Cases where every query sees some key: SDPA gives NaN rows (and NaN
# gradients) otherwise, so rows with no visible key are checked on CPU only.
GPU_CASES = [c for c in CASES if c.id in ("causal", "full", "causal_docs", "full_docs", "ring_q_after_k",
                                         "striped_q1_k0", "causal_scale_mqa", "d64", "d128_docs", "d24_full")]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("gc", GPU_CASES)
@pytest.mark.parametrize("scale_up", [1, 16], ids=["small", "x16"])
def test_gpu_accuracy_vs_sdpa(monkeypatch, gc, dtype, scale_up):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    c = dict(gc)
    if scale_up > 1:  # longer sequences: many full tiles, real autotuned tiles
        f = scale_up
        c.update(S_q=c["S_q"] * f, S_k=c["S_k"] * f, D=max(c["D"], 64))
        c["q_index"] = torch.arange(c["S_q"]) + (c["q_index"][0].item() * f)
        c["k_index"] = torch.arange(c["S_k"]) + (c["k_index"][0].item() * f)
        if c["q_doc"] is not None:
            c["q_doc"] = c["q_doc"].repeat_interleave(f, dim=1)
            c["k_doc"] = c["k_doc"].repeat_interleave(f, dim=1)
    q32, k32, v32, do32, kw = make_inputs(c, torch.float32, "cuda")
    scale = kw["softmax_scale"] or 1.0 / math.sqrt(c["D"])
    mask = _brute_visible(kw["q_index"], kw["k_index"], kw["q_doc"], kw["k_doc"], kw["causal"]).expand(
        c["B"], -1, -1).to("cuda")

    leaves32 = [t.clone().requires_grad_() for t in (q32, k32, v32)]
    ref = attention(*leaves32, backend="torch", **kw)
    ref.backward(do32)
    lo = [t.to(dtype).requires_grad_() for t in (q32, k32, v32)]
    ours = attention(*lo, backend="triton", **kw)
    ours.backward(do32.to(dtype))
    sd = [t.to(dtype).requires_grad_() for t in (q32, k32, v32)]
    theirs = _sdpa_dense(*sd, mask, scale)
    theirs.backward(do32.to(dtype))

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()

    floor = 1e-3 if dtype == torch.float16 else 8e-3
    assert err(ours, ref) <= 2 * err(theirs, ref) + floor
    for a, s_, r in zip(lo, sd, leaves32):
        assert torch.isfinite(a.grad).all()
        assert err(a.grad, r.grad) <= 2 * err(s_.grad, r.grad) + floor


@requires_cuda
def test_gpu_auto_uses_triton():
    q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert _select_backend("auto", q) is _ta()
