"""Triton backward attention kernels: delta preprocessing, dK/dV, dQ.

Loaded once per interpreter mode by ``_triton_kernels`` (see there, and
``_triton_common`` for the shared helpers and the visibility rule). P is
recomputed from the *given* lse, so out/lse may be global results over a
larger key set (ring / BurstAttention).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from longctx.kernels.triton_mode import load_kernel_module

_c = load_kernel_module("longctx.kernels._triton_common",
                        os.path.join(os.path.dirname(os.path.abspath(__file__)), "_triton_common.py"))
LOG2E = _c.LOG2E
rsum = _c.rsum
own_tile, phase_range, loop_tile, visible = _c.own_tile, _c.phase_range, _c.loop_tile, _c.visible
load_rows, load_pair, load_vec, program_tile = _c.load_rows, _c.load_pair, _c.load_vec, _c.program_tile


@triton.jit
def _bwd_preprocess(
    Out, DOut, Delta,
    sob, sos, soh, sod,
    sdb, sds, sdh, sdd,
    H, S_q, D,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_d dout * out, in fp32."""
    pid_m, b, h, _ = program_tile(H, 1, False)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < S_q
    o, do = load_pair((Out + b * sob + h * soh, DOut + b * sdb + h * sdh), (sos, sod, sds, sdd),
                      offs_m, offs_d, m_valid, offs_d < D, True, False)
    tl.store(Delta + (b * H + h) * S_q + offs_m, rsum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=m_valid)


# ---------------------------------------------------------------------------
# dK / dV: one key tile per program, looping over query tiles
# ---------------------------------------------------------------------------


@triton.jit
def _dkdv_tile(dk, dv, k, v, own, QDO, qdo_strides, LseDelta, q_side, start_m, offs_m0, offs_d, d_valid,
               qk_scale, window, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
               EVEN_D: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    """One query tile's contribution to this key tile's (dk, dv), transposed (keys as rows)."""
    run, offs_m, m_valid, q_idx, q_doc = loop_tile(q_side, start_m, offs_m0, own, window,
                                                   MASKED, False, IS_CAUSAL, HAS_DOC, BLOCK_M)
    if run:
        q, do = load_pair(QDO, qdo_strides, offs_m, offs_d, m_valid, d_valid, MASKED, EVEN_D)
        lse2 = load_vec(LseDelta[0], offs_m, m_valid, float("inf"), MASKED)
        delta = load_vec(LseDelta[1], offs_m, m_valid, 0.0, MASKED)
        # lse = -inf (row sees nothing anywhere) -> +inf so that P = 0, not inf
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2) * LOG2E
        pT = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse2[None, :])  # [N, M]
        if MASKED:
            visT = visible(q_idx[None, :], own[0][:, None], q_doc[None, :], own[1][:, None], m_valid[None, :],
                           window, IS_CAUSAL, HAS_DOC)
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
    H, H_KV, G, S_q, S_k, D, qk_scale, sm_scale, window,
    Q_BUCKET, K_BUCKET,
    IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key tile of one kv head; loops over the G query heads sharing it and
    over the visible query tiles, accumulating dK/dV in fp32 registers (GQA sum
    without atomics or a second pass)."""
    pid_n, b, kvh, _ = program_tile(H_KV, 1, False)
    offs_n, n_valid, own, tiles = own_tile(pid_n, KIdx, KDoc + b * skdoc, KBnd + b * sbnd, S_k, S_q,
                                           -1, HAS_DOC, BLOCK_N, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    k, v = load_pair((K + b * skb + kvh * skh, V + b * svb + kvh * svh), (sks, skd, svs, svd),
                     offs_n, offs_d, n_valid, d_valid, True, EVEN_D)
    q_side = (QIdx, QDoc + b * sqdoc, S_q)

    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    # One flat loop per phase over (query head of the group, query tile): no
    # nested loop (less register pressure than ``for g: for m:``).
    Qb = Q + b * sqb + (kvh * G) * sqh
    DOb = DO + b * sdb + (kvh * G) * sdh
    LSEb = Lse + (b * H + kvh * G) * S_q
    DELb = Delta + (b * H + kvh * G) * S_q
    for phase in tl.static_range(3):  # boundary tiles, the fully visible band (no mask), boundary tiles
        start, end = phase_range(phase, tiles)
        n_t = end - start
        for it in range(0, G * n_t):
            g = it // n_t
            dk, dv = _dkdv_tile(dk, dv, k, v, own, (Qb + g * sqh, DOb + g * sdh), (sqs, sqd, sds, sdd),
                                (LSEb + g * S_q, DELb + g * S_q), q_side, (start + it % n_t) * BLOCK_M,
                                tl.arange(0, BLOCK_M), offs_d, d_valid, qk_scale, window,
                                phase != 1, IS_CAUSAL, HAS_DOC, EVEN_D, PREC, BLOCK_M)

    kv_mask = n_valid[:, None] & d_valid[None, :]
    tl.store(DK + b * sdkb + kvh * sdkh + offs_n[:, None] * sdks + offs_d[None, :] * sdkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + kvh * sdvh + offs_n[:, None] * sdvs + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


# ---------------------------------------------------------------------------
# dQ: one query tile per program, looping over key tiles
# ---------------------------------------------------------------------------


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, own, KV, kv_strides, k_side, start_n, offs_n0, offs_d, d_valid,
             qk_scale, window, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
             EVEN_D: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key tile's contribution to this query tile's dq (unscaled)."""
    run, offs_n, n_valid, k_idx, k_doc = loop_tile(k_side, start_n, offs_n0, own, window,
                                                   MASKED, True, IS_CAUSAL, HAS_DOC, BLOCK_N)
    if run:
        k, v = load_pair(KV, kv_strides, offs_n, offs_d, n_valid, d_valid, MASKED, EVEN_D)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse2[:, None])
        if MASKED:
            vis = visible(own[0][:, None], k_idx[None, :], own[1][:, None], k_doc[None, :], n_valid[None, :],
                          window, IS_CAUSAL, HAS_DOC)
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
    H, G, S_q, S_k, D, qk_scale, sm_scale, window,
    Q_BUCKET, K_BUCKET,
    IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, b, h, kvh = program_tile(H, G, True)
    offs_m, m_valid, own, tiles = own_tile(pid_m, QIdx, QDoc + b * sqdoc, QBnd + b * sbnd, S_q, S_k,
                                           -2, HAS_DOC, BLOCK_M, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    q, do = load_pair((Q + b * sqb + h * sqh, DO + b * sdb + h * sdh), (sqs, sqd, sds, sdd),
                      offs_m, offs_d, m_valid, d_valid, True, EVEN_D)
    lse2 = tl.load(Lse + (b * H + h) * S_q + offs_m, mask=m_valid, other=float("inf"))
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2) * LOG2E
    delta = tl.load(Delta + (b * H + h) * S_q + offs_m, mask=m_valid, other=0.0)
    KV = (K + b * skb + kvh * skh, V + b * svb + kvh * svh)
    k_side = (KIdx, KDoc + b * skdoc, S_k)

    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    for phase in tl.static_range(3):  # boundary tiles, the fully visible band (no mask), boundary tiles
        start, end = phase_range(phase, tiles)
        for n in range(start, end):
            dq = _dq_tile(dq, q, do, lse2, delta, own, KV, (sks, skd, svs, svd), k_side, n * BLOCK_N,
                          tl.arange(0, BLOCK_N), offs_d, d_valid, qk_scale, window,
                          phase != 1, IS_CAUSAL, HAS_DOC, EVEN_D, PREC, BLOCK_N)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqs + offs_d[None, :] * sdqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
