"""Triton kernels for masked attention (forward, delta preprocessing, dK/dV, dQ).

This file is loaded by ``triton_attention._kernel_module()`` under one of two
module names, once with ``TRITON_INTERPRET=1`` (kernels become interpreted
functions, one small fixed tile config) and once without (compiled kernels,
wrapped in ``triton.autotune``). ``triton.jit`` reads the interpreter switch
when it decorates, so the two variants must be separate module objects.

Layouts: q/out/dout/dq ``[B, S_q, H, D]``, k/v/dk/dv ``[B, S_k, H_kv, D]`` (any
strides), lse/delta ``[B, H, S_q]`` fp32 contiguous, indices int32 ``[S]``,
documents int32 ``[B, S]`` shifted to >= 0 (row stride passed), bounds int32
``[Bb, 4, S]`` (see ``triton_attention._bounds``; ``Bb`` is B with documents,
else 1 with batch stride 0).

Tile iteration (forward and dQ loop over key tiles of one query tile; dK/dV
loops over query tiles of one key tile):

* The host gives, for every row on this side, the first/last position on the
  other side that can be visible (``lo``/``hi``) and, for rows whose visible
  set is exactly the interval ``[lo, hi]``, that interval again (``flo``/``fhi``;
  empty otherwise). The kernel reduces them over its tile: tiles outside
  ``[min lo, max hi]`` are never visited; tiles inside ``[max flo, min fhi]``
  are fully visible to every row of the tile and run without any mask
  (phase B); the remaining boundary tiles (phases A and C) load the other
  side's indices/doc ids and compare the two tiles' index and document
  ranges (min/max): a tile that cannot be visible is skipped before K/V (or
  Q/dO) are loaded; otherwise the element mask is built after the QK^T dot.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

INTERPRET = bool(knobs.runtime.interpret)

LOG2E_F = 1.4426950408889634  # host-side float
LOG2E = tl.constexpr(LOG2E_F)
LN2 = tl.constexpr(0.6931471805599453)

# Reductions go through ``tl.reduce`` with triton's standard combine functions
# instead of ``tl.max``/``tl.min``/``tl.sum``: those are themselves ``@jit``
# functions decorated when triton was first imported, so they would be
# compiled-mode objects inside our interpreted kernels whenever triton was
# imported before ``TRITON_INTERPRET=1`` was set. The interpreter recognises
# these combine functions and reduces with numpy; compiled code is identical
# to ``tl.max`` etc. on fp32/int32 inputs.
# If triton itself was imported in the other mode, its combine functions are
# the wrong kind of object for this variant: the compiled variant then uses
# its own (identical) combine functions; the interpreted one only needs the
# identity for numpy's fast path (it never calls them).
@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit
def _sum_combine(a, b):
    return a + b


def _pick_combine(name, own):
    std = getattr(getattr(tl, "standard", None), name, None)
    if std is None:  # pragma: no cover - other triton versions
        return own
    if INTERPRET:
        return std
    from triton.runtime.jit import JITFunction

    return std if isinstance(std, JITFunction) else own


_MAX_COMBINE = _pick_combine("_elementwise_max", _max_combine)
_MIN_COMBINE = _pick_combine("_elementwise_min", _min_combine)
_SUM_COMBINE = _pick_combine("_sum_combine", _sum_combine)


@triton.jit
def _rmax(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MAX_COMBINE)


@triton.jit
def _rmin(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MIN_COMBINE)


@triton.jit
def _rsum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _SUM_COMBINE)


# Fixed tiles for the interpreter: small, and different in M and N so tests
# exercise edge tiles and both loop directions.
INTERP_FWD = dict(BLOCK_M=16, BLOCK_N=32)
INTERP_BWD_KV = dict(BLOCK_M=32, BLOCK_N=16)
INTERP_BWD_Q = dict(BLOCK_M=16, BLOCK_N=32)
PRE_BLOCK_M = 64 if not INTERPRET else 16


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


@triton.jit
def _tile_ranges(Bnd, offs, valid, S_this, S_other, BLOCK: tl.constexpr):
    """Reduce per-row bounds over a tile -> (lo, hi, f_lo, f_hi) tile numbers,
    plus the rows' own [lo, hi] vectors (for the per-tile skip test).

    Bnd points at this batch row's ``[4, S_this]`` int32 bounds.
    """
    row_lo = tl.load(Bnd + offs, mask=valid, other=S_other)
    row_hi = tl.load(Bnd + S_this + offs, mask=valid, other=-1)
    lo = _rmin(row_lo, axis=0)
    hi = _rmax(row_hi, axis=0)
    flo = _rmax(tl.load(Bnd + 2 * S_this + offs, mask=valid, other=0), axis=0)
    fhi = _rmin(tl.load(Bnd + 3 * S_this + offs, mask=valid, other=S_other), axis=0)
    t_lo = lo // BLOCK
    t_hi = (hi + BLOCK) // BLOCK  # cdiv(hi + 1, BLOCK); hi = -1 -> 0
    f_lo = (flo + BLOCK - 1) // BLOCK  # first tile starting at or after flo
    f_hi = (fhi + 1) // BLOCK  # tiles ending at or before fhi
    has_full = f_lo < f_hi
    f_lo = tl.where(has_full, f_lo, t_hi)
    f_hi = tl.where(has_full, f_hi, t_hi)
    return t_lo, t_hi, f_lo, f_hi, row_lo, row_hi


@triton.jit
def _rows_touch(row_lo, row_hi, start, BLOCK: tl.constexpr):
    """Does any row's [lo, hi] bound intersect positions [start, start + BLOCK)?

    Exact for sorted layouts (visible sets are intervals); a superset test
    otherwise. Catches tiles between two documents of one query tile.
    """
    touch = (row_lo < start + BLOCK) & (row_hi >= start)
    return _rmax(touch.to(tl.int32), axis=0) > 0


@triton.jit
def _k_tile_visible(q_lo, q_hi, qd_lo, qd_hi, k_idx, k_doc, n_valid,
                    IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr):
    """Can any key of this tile be visible to any query of the query tile?

    From the query tile's index/doc ranges and this key tile's ranges only
    (scalars), so skipped tiles cost two small index loads, never a K/V load.
    """
    run = _rmax(n_valid.to(tl.int32), axis=0) > 0
    if IS_CAUSAL:
        run = run & (q_hi >= _rmin(tl.where(n_valid, k_idx, 2147483647), axis=0))
    if HAS_DOC:
        run = run & (qd_hi >= _rmin(tl.where(n_valid, k_doc, 2147483647), axis=0))
        run = run & (qd_lo <= _rmax(tl.where(n_valid, k_doc, -1), axis=0))
    return run


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, q_idx, q_doc, q_lo, q_hi, qd_lo, qd_hi, row_lo, row_hi,
    K, V, KIdx, KDoc, start_n, offs_n0, offs_d, d_valid,
    sks, skd, svs, svd, S_k, qk_scale,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
    EVEN_D: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n = start_n + offs_n0
    if MASKED:
        n_valid = offs_n < S_k
        k_idx = tl.load(KIdx + offs_n, mask=n_valid, other=0)
        k_doc = k_idx
        if HAS_DOC:
            k_doc = tl.load(KDoc + offs_n, mask=n_valid, other=-1)
        run = _rows_touch(row_lo, row_hi, start_n, BLOCK_N)
        run = run & _k_tile_visible(q_lo, q_hi, qd_lo, qd_hi, k_idx, k_doc, n_valid, IS_CAUSAL, HAS_DOC)
        if run:
            kT = tl.load(K + offs_n[None, :] * sks + offs_d[:, None] * skd,
                         mask=n_valid[None, :] & d_valid[:, None], other=0.0)
            v = tl.load(V + offs_n[:, None] * svs + offs_d[None, :] * svd,
                        mask=n_valid[:, None] & d_valid[None, :], other=0.0)
            s = tl.dot(q, kT, input_precision=PREC) * qk_scale
            # element mask only here, after the dot (keeps it out of the loads' live range)
            vis = n_valid[None, :]
            if IS_CAUSAL:
                vis = vis & (q_idx[:, None] >= k_idx[None, :])
            if HAS_DOC:
                vis = vis & (q_doc[:, None] == k_doc[None, :])
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, _rmax(s, axis=1))
            # rows with nothing visible yet keep m = -inf: shift by 0 instead
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + _rsum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
    else:
        if EVEN_D:
            kT = tl.load(K + offs_n[None, :] * sks + offs_d[:, None] * skd)
            v = tl.load(V + offs_n[:, None] * svs + offs_d[None, :] * svd)
        else:
            kT = tl.load(K + offs_n[None, :] * sks + offs_d[:, None] * skd, mask=d_valid[:, None], other=0.0)
            v = tl.load(V + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=d_valid[None, :], other=0.0)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale
        m_new = tl.maximum(m_i, _rmax(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + _rsum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, OutIn, LseIn,
    QIdx, KIdx, QDoc, KDoc, QBnd,
    sqb, sqs, sqh, sqd,
    skb, sks, skh, skd,
    svb, svs, svh, svd,
    sob, sos, soh, sod,
    sib, sis, sih, sid,
    sqdoc, skdoc, sbnd,
    H, G, S_q, S_k, D, qk_scale,
    Q_BUCKET, K_BUCKET,
    IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Heaviest (last) query tiles first: better tail balance for causal masks.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // G  # GQA: query head h reads kv head h // G, no repeat

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < S_q
    d_valid = offs_d < D

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    q_idx = tl.load(QIdx + offs_m, mask=m_valid, other=0)
    q_lo = _rmin(tl.where(m_valid, q_idx, 2147483647), axis=0)
    q_hi = _rmax(tl.where(m_valid, q_idx, -2147483647), axis=0)
    q_doc = q_idx  # unused without documents
    qd_lo = q_lo
    qd_hi = q_hi
    if HAS_DOC:
        q_doc = tl.load(QDoc + b * sqdoc + offs_m, mask=m_valid, other=-2)
        qd_lo = _rmin(tl.where(m_valid, q_doc, 2147483647), axis=0)
        qd_hi = _rmax(tl.where(m_valid, q_doc, -1), axis=0)
        KDoc = KDoc + b * skdoc
    n_lo, n_hi, f_lo, f_hi, row_lo, row_hi = _tile_ranges(QBnd + b * sbnd, offs_m, m_valid, S_q, S_k, BLOCK_N)

    K = K + b * skb + kvh * skh
    V = V + b * svb + kvh * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)

    for n in range(n_lo, f_lo):  # boundary tiles before the fully visible band
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, q_idx, q_doc, q_lo, q_hi, qd_lo, qd_hi, row_lo, row_hi,
                                  K, V, KIdx, KDoc,
                                  n * BLOCK_N, offs_n0, offs_d, d_valid, sks, skd, svs, svd, S_k, qk_scale,
                                  True, IS_CAUSAL, HAS_DOC, EVEN_D, PREC, BLOCK_N)
    for n in range(f_lo, f_hi):  # fully visible tiles: no mask at all
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, q_idx, q_doc, q_lo, q_hi, qd_lo, qd_hi, row_lo, row_hi,
                                  K, V, KIdx, KDoc,
                                  n * BLOCK_N, offs_n0, offs_d, d_valid, sks, skd, svs, svd, S_k, qk_scale,
                                  False, IS_CAUSAL, HAS_DOC, EVEN_D, PREC, BLOCK_N)
    for n in range(f_hi, n_hi):  # boundary tiles after it (e.g. the causal diagonal)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, q_idx, q_doc, q_lo, q_hi, qd_lo, qd_hi, row_lo, row_hi,
                                  K, V, KIdx, KDoc,
                                  n * BLOCK_N, offs_n0, offs_d, d_valid, sks, skd, svs, svd, S_k, qk_scale,
                                  True, IS_CAUSAL, HAS_DOC, EVEN_D, PREC, BLOCK_N)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows with nothing visible: acc = 0 -> out = 0
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))

    lse_off = (b * H + h) * S_q + offs_m
    if ACC:
        # Fold into the incoming (out, lse): a -inf side contributes nothing.
        lse_in = tl.load(LseIn + lse_off, mask=m_valid, other=float("-inf"))
        o_in = tl.load(OutIn + b * sib + h * sih + offs_m[:, None] * sis + offs_d[None, :] * sid,
                       mask=m_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)
        mx = tl.maximum(lse_in, lse)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w_in = tl.math.exp2((lse_in - mx) * LOG2E)
        w_new = tl.math.exp2((lse - mx) * LOG2E)
        tot = w_in + w_new
        any_seen = tot > 0.0
        tot_safe = tl.where(any_seen, tot, 1.0)
        out = (o_in * (w_in / tot_safe)[:, None]) + (out * (w_new / tot_safe)[:, None])
        lse = tl.where(any_seen, mx + tl.math.log2(tot_safe) * LN2, float("-inf"))

    tl.store(Out + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    tl.store(Lse + lse_off, lse, mask=m_valid)


# ---------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess(
    Out, DOut, Delta,
    sob, sos, soh, sod,
    sdb, sds, sdh, sdd,
    H, S_q, D,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_d dout * out, in fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < S_q)[:, None] & (offs_d < D)[None, :]
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :] * sdd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + (b * H + h) * S_q + offs_m, _rsum(o * do, axis=1), mask=offs_m < S_q)


@triton.jit
def _q_tile_visible(k_lo, k_hi, kd_lo, kd_hi, q_idx, q_doc, m_valid,
                    IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr):
    """Can any query of this tile see any key of the key tile? (ranges only)"""
    run = _rmax(m_valid.to(tl.int32), axis=0) > 0
    if IS_CAUSAL:
        run = run & (_rmax(tl.where(m_valid, q_idx, -2147483647), axis=0) >= k_lo)
    if HAS_DOC:
        run = run & (kd_hi >= _rmin(tl.where(m_valid, q_doc, 2147483647), axis=0))
        run = run & (kd_lo <= _rmax(tl.where(m_valid, q_doc, -1), axis=0))
    return run


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, k_idx, k_doc, k_lo, k_hi, kd_lo, kd_hi, row_lo, row_hi,
    Q, DO, Lse, Delta, QIdx, QDoc, start_m, offs_m0, offs_d, d_valid,
    sqs, sqd, sds, sdd, S_q, qk_scale,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
    EVEN_D: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_m = start_m + offs_m0
    run = True
    if MASKED:
        m_valid = offs_m < S_q
        q_idx = tl.load(QIdx + offs_m, mask=m_valid, other=0)
        q_doc = q_idx
        if HAS_DOC:
            q_doc = tl.load(QDoc + offs_m, mask=m_valid, other=-2)
        run = _rows_touch(row_lo, row_hi, start_m, BLOCK_M)
        run = run & _q_tile_visible(k_lo, k_hi, kd_lo, kd_hi, q_idx, q_doc, m_valid, IS_CAUSAL, HAS_DOC)
    if run:
        if MASKED:
            ld_mask = m_valid[:, None] & d_valid[None, :]
            q = tl.load(Q + offs_m[:, None] * sqs + offs_d[None, :] * sqd, mask=ld_mask, other=0.0)
            do = tl.load(DO + offs_m[:, None] * sds + offs_d[None, :] * sdd, mask=ld_mask, other=0.0)
            lse2 = tl.load(Lse + offs_m, mask=m_valid, other=float("inf"))
            delta = tl.load(Delta + offs_m, mask=m_valid, other=0.0)
        else:
            if EVEN_D:
                q = tl.load(Q + offs_m[:, None] * sqs + offs_d[None, :] * sqd)
                do = tl.load(DO + offs_m[:, None] * sds + offs_d[None, :] * sdd)
            else:
                q = tl.load(Q + offs_m[:, None] * sqs + offs_d[None, :] * sqd, mask=d_valid[None, :], other=0.0)
                do = tl.load(DO + offs_m[:, None] * sds + offs_d[None, :] * sdd, mask=d_valid[None, :], other=0.0)
            lse2 = tl.load(Lse + offs_m)
            delta = tl.load(Delta + offs_m)
        # lse = -inf (row sees nothing anywhere) -> +inf so that P = 0, not inf
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2) * LOG2E
        sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        pT = tl.math.exp2(sT - lse2[None, :])
        if MASKED:
            visT = m_valid[None, :]
            if IS_CAUSAL:
                visT = visT & (q_idx[None, :] >= k_idx[:, None])
            if HAS_DOC:
                visT = visT & (q_doc[None, :] == k_doc[:, None])
            pT = tl.where(visT, pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV,
    QIdx, KIdx, QDoc, KDoc, KBnd,
    sqb, sqs, sqh, sqd,
    skb, sks, skh, skd,
    svb, svs, svh, svd,
    sdb, sds, sdh, sdd,
    sdkb, sdks, sdkh, sdkd,
    sdvb, sdvs, sdvh, sdvd,
    sqdoc, skdoc, sbnd,
    H, H_KV, G, S_q, S_k, D, qk_scale, sm_scale,
    Q_BUCKET, K_BUCKET,
    IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key tile of one kv head; loops over the G query heads sharing it and
    over the visible query tiles, accumulating dK/dV in fp32 registers (GQA sum
    without atomics or a second pass)."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // H_KV).to(tl.int64)
    kvh = (pid_bk % H_KV).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < S_k
    d_valid = offs_d < D
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    k_idx = tl.load(KIdx + offs_n, mask=n_valid, other=2147483647)
    k_lo = _rmin(k_idx, axis=0)
    k_hi = _rmax(tl.where(n_valid, k_idx, -2147483647), axis=0)
    k_doc = k_idx  # unused without documents
    kd_lo = k_lo
    kd_hi = k_hi
    if HAS_DOC:
        k_doc = tl.load(KDoc + b * skdoc + offs_n, mask=n_valid, other=-1)
        kd_lo = _rmin(tl.where(n_valid, k_doc, 2147483647), axis=0)
        kd_hi = _rmax(k_doc, axis=0)
        QDoc = QDoc + b * sqdoc
    m_lo, m_hi, f_lo, f_hi, row_lo, row_hi = _tile_ranges(KBnd + b * sbnd, offs_n, n_valid, S_k, S_q, BLOCK_M)

    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    # One flat loop per phase over (query head of the group, query tile): no
    # nested loop (less register pressure than ``for g: for m:``).
    Qb = Q + b * sqb + (kvh * G) * sqh
    DOb = DO + b * sdb + (kvh * G) * sdh
    LSEb = Lse + (b * H + kvh * G) * S_q
    DELb = Delta + (b * H + kvh * G) * S_q
    n_a = f_lo - m_lo
    for it in range(0, G * n_a):
        g = it // n_a
        m = m_lo + it % n_a
        dk, dv = _dkdv_tile(dk, dv, k, v, k_idx, k_doc, k_lo, k_hi, kd_lo, kd_hi, row_lo, row_hi,
                            Qb + g * sqh, DOb + g * sdh, LSEb + g * S_q, DELb + g * S_q, QIdx, QDoc,
                            m * BLOCK_M, offs_m0, offs_d, d_valid, sqs, sqd, sds, sdd, S_q, qk_scale,
                            True, IS_CAUSAL, HAS_DOC, EVEN_D, PREC, BLOCK_M)
    n_b = f_hi - f_lo
    for it in range(0, G * n_b):
        g = it // n_b
        m = f_lo + it % n_b
        dk, dv = _dkdv_tile(dk, dv, k, v, k_idx, k_doc, k_lo, k_hi, kd_lo, kd_hi, row_lo, row_hi,
                            Qb + g * sqh, DOb + g * sdh, LSEb + g * S_q, DELb + g * S_q, QIdx, QDoc,
                            m * BLOCK_M, offs_m0, offs_d, d_valid, sqs, sqd, sds, sdd, S_q, qk_scale,
                            False, IS_CAUSAL, HAS_DOC, EVEN_D, PREC, BLOCK_M)
    n_c = m_hi - f_hi
    for it in range(0, G * n_c):
        g = it // n_c
        m = f_hi + it % n_c
        dk, dv = _dkdv_tile(dk, dv, k, v, k_idx, k_doc, k_lo, k_hi, kd_lo, kd_hi, row_lo, row_hi,
                            Qb + g * sqh, DOb + g * sdh, LSEb + g * S_q, DELb + g * S_q, QIdx, QDoc,
                            m * BLOCK_M, offs_m0, offs_d, d_valid, sqs, sqd, sds, sdd, S_q, qk_scale,
                            True, IS_CAUSAL, HAS_DOC, EVEN_D, PREC, BLOCK_M)

    dk = dk * sm_scale
    tl.store(DK + b * sdkb + kvh * sdkh + offs_n[:, None] * sdks + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + kvh * sdvh + offs_n[:, None] * sdvs + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(
    dq, q, do, lse2, delta, q_idx, q_doc, q_lo, q_hi, qd_lo, qd_hi, row_lo, row_hi,
    K, V, KIdx, KDoc, start_n, offs_n0, offs_d, d_valid,
    sks, skd, svs, svd, S_k, qk_scale,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
    EVEN_D: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n = start_n + offs_n0
    run = True
    if MASKED:
        n_valid = offs_n < S_k
        k_idx = tl.load(KIdx + offs_n, mask=n_valid, other=0)
        k_doc = k_idx
        if HAS_DOC:
            k_doc = tl.load(KDoc + offs_n, mask=n_valid, other=-1)
        run = _rows_touch(row_lo, row_hi, start_n, BLOCK_N)
        run = run & _k_tile_visible(q_lo, q_hi, qd_lo, qd_hi, k_idx, k_doc, n_valid, IS_CAUSAL, HAS_DOC)
    if run:
        if MASKED:
            ld_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(K + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=ld_mask, other=0.0)
            v = tl.load(V + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=ld_mask, other=0.0)
        else:
            if EVEN_D:
                k = tl.load(K + offs_n[:, None] * sks + offs_d[None, :] * skd)
                v = tl.load(V + offs_n[:, None] * svs + offs_d[None, :] * svd)
            else:
                k = tl.load(K + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=d_valid[None, :], other=0.0)
                v = tl.load(V + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=d_valid[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            vis = n_valid[None, :]
            if IS_CAUSAL:
                vis = vis & (q_idx[:, None] >= k_idx[None, :])
            if HAS_DOC:
                vis = vis & (q_doc[:, None] == k_doc[None, :])
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ,
    QIdx, KIdx, QDoc, KDoc, QBnd,
    sqb, sqs, sqh, sqd,
    skb, sks, skh, skd,
    svb, svs, svh, svd,
    sdb, sds, sdh, sdd,
    sdqb, sdqs, sdqh, sdqd,
    sqdoc, skdoc, sbnd,
    H, G, S_q, S_k, D, qk_scale, sm_scale,
    Q_BUCKET, K_BUCKET,
    IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // G

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < S_q
    d_valid = offs_d < D
    ld_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd, mask=ld_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :] * sdd, mask=ld_mask, other=0.0)
    lse2 = tl.load(Lse + (b * H + h) * S_q + offs_m, mask=m_valid, other=float("inf"))
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2) * LOG2E
    delta = tl.load(Delta + (b * H + h) * S_q + offs_m, mask=m_valid, other=0.0)
    q_idx = tl.load(QIdx + offs_m, mask=m_valid, other=0)
    q_lo = _rmin(tl.where(m_valid, q_idx, 2147483647), axis=0)
    q_hi = _rmax(tl.where(m_valid, q_idx, -2147483647), axis=0)
    q_doc = q_idx  # unused without documents
    qd_lo = q_lo
    qd_hi = q_hi
    if HAS_DOC:
        q_doc = tl.load(QDoc + b * sqdoc + offs_m, mask=m_valid, other=-2)
        qd_lo = _rmin(tl.where(m_valid, q_doc, 2147483647), axis=0)
        qd_hi = _rmax(tl.where(m_valid, q_doc, -1), axis=0)
        KDoc = KDoc + b * skdoc
    n_lo, n_hi, f_lo, f_hi, row_lo, row_hi = _tile_ranges(QBnd + b * sbnd, offs_m, m_valid, S_q, S_k, BLOCK_N)

    K = K + b * skb + kvh * skh
    V = V + b * svb + kvh * svh
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    for n in range(n_lo, f_lo):
        dq = _dq_tile(dq, q, do, lse2, delta, q_idx, q_doc, q_lo, q_hi, qd_lo, qd_hi, row_lo, row_hi, K, V, KIdx, KDoc,
                      n * BLOCK_N, offs_n0, offs_d, d_valid, sks, skd, svs, svd, S_k, qk_scale,
                      True, IS_CAUSAL, HAS_DOC, EVEN_D, PREC, BLOCK_N)
    for n in range(f_lo, f_hi):
        dq = _dq_tile(dq, q, do, lse2, delta, q_idx, q_doc, q_lo, q_hi, qd_lo, qd_hi, row_lo, row_hi, K, V, KIdx, KDoc,
                      n * BLOCK_N, offs_n0, offs_d, d_valid, sks, skd, svs, svd, S_k, qk_scale,
                      False, IS_CAUSAL, HAS_DOC, EVEN_D, PREC, BLOCK_N)
    for n in range(f_hi, n_hi):
        dq = _dq_tile(dq, q, do, lse2, delta, q_idx, q_doc, q_lo, q_hi, qd_lo, qd_hi, row_lo, row_hi, K, V, KIdx, KDoc,
                      n * BLOCK_N, offs_n0, offs_d, d_valid, sks, skd, svs, svd, S_k, qk_scale,
                      True, IS_CAUSAL, HAS_DOC, EVEN_D, PREC, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqs + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=ld_mask)


# ---------------------------------------------------------------------------
# autotuning (compiled mode only)
# ---------------------------------------------------------------------------

# Keys: head dim (BLOCK_D), power-of-two buckets of the sequence lengths, the
# mask kind; the autotuner adds the tensor dtypes itself.
_KEY = ["Q_BUCKET", "K_BUCKET", "BLOCK_D", "IS_CAUSAL", "HAS_DOC"]


def _smem_limit() -> int:
    try:
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "shared_memory_per_block_optin", 0) or 101376)
    except Exception:  # pragma: no cover - no CUDA
        return 101376


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Candidate tiles (BLOCK_M, BLOCK_N, warps, stages) per head-dim bucket
# (<= 64, 128, 256). Chosen by compiling every kernel for sm_90 and sm_80
# (bf16, causal + documents, the heaviest variant) and keeping the configs
# that do not spill registers (or spill a few bytes); the autotuner then
# picks the fastest on the actual GPU per key. Hopper tends to win with
# 128-row query tiles and 8 warps, Ampere with 4-warp 64/128 x 32/64 tiles.
# For dK/dV, BLOCK_N is the key tile a program owns and BLOCK_M the query
# tile of its loop.
_TILES = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 4), (64, 32, 4, 4), (128, 64, 8, 3), (128, 64, 8, 2)],
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 4)],
        256: [(128, 32, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2)],
    },
    "dkdv": {
        64: [(64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (16, 64, 4, 4), (32, 32, 4, 2)],
        128: [(32, 128, 8, 3), (16, 128, 8, 3), (32, 64, 8, 3), (32, 32, 4, 2)],
        256: [(16, 32, 4, 2), (32, 32, 4, 2)],
    },
    "dq": {
        64: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (64, 16, 4, 4), (32, 32, 4, 2)],
        128: [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 16, 4, 4)],
        256: [(32, 32, 8, 2), (32, 16, 4, 2), (32, 32, 4, 2)],
    },
}


def _d_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def _configs(kernel):
    seen = dict.fromkeys(t for tiles in _TILES[kernel].values() for t in tiles)
    return [_cfg(*t) for t in seen]


def _prune(kernel, kv_tiles_per_stage):
    """early_config_prune: the head-dim bucket's configs that fit in shared memory."""

    def prune(configs, named_args, **kwargs):
        d = int(kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128)))
        allowed = set(_TILES[kernel][_d_bucket(d)])
        q = named_args.get("Q", None)
        esize = q.element_size() if hasattr(q, "element_size") else 2
        limit = _smem_limit()
        keep, fallback = [], []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            if (bm, bn, c.num_warps, c.num_stages) not in allowed:
                continue
            need = esize * d * (bm + kv_tiles_per_stage(bm, bn) * max(c.num_stages - 1, 1))
            (keep if need <= limit * 0.9 else fallback).append(c)
        if keep:
            return keep
        smallest = min(fallback or configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))
        return [smallest]

    return prune


FWD_CONFIGS = _configs("fwd")
BWD_KV_CONFIGS = _configs("dkdv")
BWD_Q_CONFIGS = _configs("dq")

if INTERPRET:
    attn_fwd = _attn_fwd
    attn_bwd_dkdv = _attn_bwd_dkdv
    attn_bwd_dq = _attn_bwd_dq
    FIXED = {"fwd": INTERP_FWD, "dkdv": INTERP_BWD_KV, "dq": INTERP_BWD_Q}
else:
    attn_fwd = triton.autotune(
        configs=FWD_CONFIGS, key=_KEY + ["ACC"],
        prune_configs_by={"early_config_prune": _prune("fwd", lambda bm, bn: 2 * bn)},
    )(_attn_fwd)
    attn_bwd_dkdv = triton.autotune(
        configs=BWD_KV_CONFIGS, key=_KEY,
        prune_configs_by={"early_config_prune": _prune("dkdv", lambda bm, bn: 2 * bm + bn)},
    )(_attn_bwd_dkdv)
    attn_bwd_dq = triton.autotune(
        configs=BWD_Q_CONFIGS, key=_KEY,
        prune_configs_by={"early_config_prune": _prune("dq", lambda bm, bn: 2 * bn)},
    )(_attn_bwd_dq)
    FIXED = {"fwd": {}, "dkdv": {}, "dq": {}}
bwd_preprocess = _bwd_preprocess
