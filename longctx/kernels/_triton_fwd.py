"""Triton forward attention kernel (online softmax over key tiles, optional fold into an incoming result).

Loaded once per interpreter mode by ``_triton_kernels`` (see there, and
``_triton_common`` for the shared helpers and the visibility rule).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from longctx.kernels.triton_mode import load_kernel_module

_c = load_kernel_module("longctx.kernels._triton_common",
                        os.path.join(os.path.dirname(os.path.abspath(__file__)), "_triton_common.py"))
LOG2E, LN2 = _c.LOG2E, _c.LN2
rmax, rsum = _c.rmax, _c.rsum
own_tile, phase_range, loop_tile, visible = _c.own_tile, _c.phase_range, _c.loop_tile, _c.visible
load_rows, program_tile = _c.load_rows, _c.program_tile


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, own, KV, kv_strides, k_side, start_n, offs_n0, offs_d, d_valid, qk_scale, window,
              MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, EVEN_D: tl.constexpr,
              PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key tile of the online softmax: (acc, l_i, m_i) updated in the log2 domain."""
    run, offs_n, n_valid, k_idx, k_doc = loop_tile(k_side, start_n, offs_n0, own, window,
                                                   MASKED, True, IS_CAUSAL, HAS_DOC, BLOCK_N)
    if run:
        sks, skd, svs, svd = kv_strides
        kT = load_rows(KV[0], offs_n, offs_d, sks, skd, n_valid, d_valid, MASKED, EVEN_D, True)
        v = load_rows(KV[1], offs_n, offs_d, svs, svd, n_valid, d_valid, MASKED, EVEN_D)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale
        if MASKED:
            # element mask only here, after the dot (keeps it out of the loads' live range)
            vis = visible(own[0][:, None], k_idx[None, :], own[1][:, None], k_doc[None, :], n_valid[None, :],
                          window, IS_CAUSAL, HAS_DOC)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, rmax(s, axis=1))
        m_safe = m_new
        if MASKED:  # rows with nothing visible yet keep m = -inf: shift by 0 instead
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + rsum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


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
    H, G, S_q, S_k, D, qk_scale, window,
    Q_BUCKET, K_BUCKET,
    IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, ACC: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, b, h, kvh = program_tile(H, G, True)  # GQA: query head h reads kv head h // G, no repeat
    offs_m, m_valid, own, tiles = own_tile(pid_m, QIdx, QDoc + b * sqdoc, QBnd + b * sbnd, S_q, S_k,
                                           -2, HAS_DOC, BLOCK_M, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    q = load_rows(Q + b * sqb + h * sqh, offs_m, offs_d, sqs, sqd, m_valid, d_valid, True, EVEN_D)
    KV = (K + b * skb + kvh * skh, V + b * svb + kvh * svh)
    k_side = (KIdx, KDoc + b * skdoc, S_k)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    for phase in tl.static_range(3):  # boundary tiles, the fully visible band (no mask), boundary tiles
        start, end = phase_range(phase, tiles)
        for n in range(start, end):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, own, KV, (sks, skd, svs, svd), k_side, n * BLOCK_N,
                                      tl.arange(0, BLOCK_N), offs_d, d_valid, qk_scale, window,
                                      phase != 1, IS_CAUSAL, HAS_DOC, EVEN_D, PREC, BLOCK_N)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows with nothing visible: acc = 0 -> out = 0
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))

    lse_off = (b * H + h) * S_q + offs_m
    if ACC:
        # Fold into the incoming (out, lse): a -inf side contributes nothing.
        lse_in = tl.load(LseIn + lse_off, mask=m_valid, other=float("-inf"))
        o_in = load_rows(OutIn + b * sib + h * sih, offs_m, offs_d, sis, sid, m_valid, d_valid,
                         True, EVEN_D).to(tl.float32)
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
