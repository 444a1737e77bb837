"""Triton attention backend: same semantics and keywords as ``reference``.

``forward`` / ``backward`` take the contract's arguments (``q_index``,
``k_index``, optional ``q_doc``/``k_doc``, ``causal``, ``window``,
``softmax_scale``),
plus ``acc=(out_acc, lse_acc)`` on forward (fold into an incoming result
inside the kernel) and ``delta`` on backward (precomputed rowsum(dO * O)).
The reference backend's ``q_chunk_size`` / ``k_chunk_size`` are accepted and
ignored (tile sizes are autotuned).

Runs compiled on CUDA tensors, or under the Triton interpreter
(``TRITON_INTERPRET=1`` in the environment when the call is made) on any
device, in fp32/fp16 (bf16 needs a GPU: numpy has no bfloat16).

Kernel design (see ``_triton_kernels.py``; kernels in ``_triton_fwd.py`` /
``_triton_bwd.py``, shared helpers in ``_triton_common.py``):

* Forward: one program per (query tile, batch, head); online softmax over key
  tiles in the log2 domain, fp32 accumulators, natural-log fp32 lse.
* Visibility: the host computes, for each query (and, for dK/dV, each key),
  the first and last position on the other side that can be visible (with a
  window, also the first that is not below it), and whether the visible set
  is exactly that interval (``_bounds``; O(S log S) sorts and searches, no
  host-device sync). Kernels visit only tiles inside
  the tile's bounds, run the tiles that are fully visible to the whole query
  tile without any mask, and build the element mask only on boundary tiles,
  skipping those (before loading K/V) when nothing in them is visible.
* GQA: query head ``h`` reads kv head ``h // G``; dK/dV programs own one key
  tile of one kv head and loop over the G query heads, so the GQA sum happens
  in fp32 registers without atomics.
* Backward recomputes P from the *given* lse (never recomputed), so out/lse
  may be global results over a larger key set (ring / BurstAttention).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import triton

from .reference import check_backward_inputs, check_inputs, dims, visible_counts
from .triton_mode import interpreting, load_kernel_module

MAX_HEAD_DIM = 256

__all__ = ["forward", "backward", "supports", "interpreting"]

_KERNEL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_triton_kernels.py")


def _kernel_module():
    """The kernels compiled (``triton.jit``) or interpreted, per the current switch.

    ``triton.jit`` decides at decoration time, so each mode gets its own copy
    of the kernel module, loaded on first use; importing longctx (or triton)
    before setting ``TRITON_INTERPRET`` is therefore harmless.
    """
    return load_kernel_module("longctx.kernels._triton_kernels", _KERNEL_FILE)


def supports(q: torch.Tensor, k: torch.Tensor | None = None) -> tuple[bool, str]:
    """(ok, reason): whether this backend can run these inputs right now."""
    D = q.shape[-1]
    if D > MAX_HEAD_DIM:
        return False, f"head dim {D} > {MAX_HEAD_DIM}"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False, f"dtype {q.dtype} (supported: float32, float16, bfloat16)"
    if interpreting():
        if q.dtype == torch.bfloat16:
            return False, "bfloat16 under the Triton interpreter (numpy has no bfloat16; use a GPU)"
        return True, ""
    if not q.is_cuda:
        return False, (
            f"tensors on {q.device}: the compiled Triton backend needs CUDA tensors; on CPU set "
            "TRITON_INTERPRET=1 in the environment to run it under the Triton interpreter "
            "(slow; for tests), or use backend='torch'"
        )
    return True, ""


def _require(q):
    ok, why = supports(q)
    if not ok:
        raise RuntimeError(f"backend='triton' (the Triton attention kernels) cannot run these inputs: {why}")


# ---------------------------------------------------------------------------
# visibility bounds (host side, on the tensors' device, no sync)
# ---------------------------------------------------------------------------


def _bounds(a_idx, b_idx, a_doc, b_doc, causal, window=None):
    """Per row i of side "a", bounds over positions j of side "b" where
    visible(i, j) = (not causal or b_idx[j] <= a_idx[i]) and a_doc[:, i] == b_doc[:, j]
    and (window is None or a_idx[i] - b_idx[j] < window).

    Returns int32 ``[Bb, 4, S_a]``: lo, hi (every visible j lies in [lo, hi];
    lo = S_b, hi = -1 when nothing is visible) and flo, fhi (= lo, hi when the
    visible set is exactly the interval [lo, hi], else the empty S_b, -1).
    ``Bb`` = B with documents, else 1. The key side of the backward is the
    same question with negated indices (``q >= k`` and ``q - k < W`` become
    ``-q <= -k`` and ``-k - (-q) < W``).
    """
    S_a, S_b = a_idx.numel(), b_idx.numel()
    dev = a_idx.device
    lo = torch.zeros(S_a, dtype=torch.int64, device=dev)
    hi = torch.full((S_a,), S_b - 1, dtype=torch.int64, device=dev)
    if causal:
        pmin = torch.cummin(b_idx, 0).values  # prefix min, non-increasing
        lo = torch.searchsorted(-pmin, -a_idx, side="left")  # first j with pmin[j] <= a
        smin = torch.flip(torch.cummin(torch.flip(b_idx, [0]), 0).values, [0])  # suffix min, non-decreasing
        hi = torch.searchsorted(smin, a_idx, side="right") - 1  # last j with smin[j] <= a
    if window is not None:
        # visible needs b_idx[j] > a - window
        pmax = torch.cummax(b_idx, 0).values  # prefix max, non-decreasing
        lo = torch.maximum(lo, torch.searchsorted(pmax, a_idx - window, side="right"))  # first j with pmax[j] > a - W
        smax = torch.flip(torch.cummax(torch.flip(b_idx, [0]), 0).values, [0])  # suffix max, non-increasing
        hi = torch.minimum(hi, torch.searchsorted(-smax, window - a_idx, side="left") - 1)  # last j, smax[j] > a - W
    lo, hi = lo[None], hi[None]
    if a_doc is not None:
        ad, bd = a_doc, b_doc  # already shifted to >= 0 by _prep
        pos = torch.arange(S_b, device=dev)
        keys = torch.sort(bd * S_b + pos, dim=1).values  # by (doc, position)
        first = torch.searchsorted(keys, ad * S_b, side="left")
        end = torch.searchsorted(keys, (ad + 1) * S_b, side="left")
        has = end > first
        lo_d = torch.gather(keys, 1, first.clamp(max=S_b - 1)) % S_b
        hi_d = torch.gather(keys, 1, (end - 1).clamp(min=0)) % S_b
        lo = torch.where(has, torch.maximum(lo, lo_d), S_b)
        hi = torch.where(has, torch.minimum(hi, hi_d), -1)
    count = visible_counts(a_idx, b_idx, a_doc, b_doc, causal, window)
    nonempty = (hi >= lo) & (count > 0)
    exact = nonempty & (count == hi - lo + 1)
    lo = torch.where(nonempty, lo, S_b)
    hi = torch.where(nonempty, hi, -1)
    flo = torch.where(exact, lo, S_b)
    fhi = torch.where(exact, hi, -1)
    return torch.stack([lo, hi, flo, fhi], dim=1).to(torch.int32).contiguous()


def _bucket(n: int) -> int:
    return 1 << max(int(n) - 1, 1).bit_length()


def _prep(q, q_index, k_index, q_doc, k_doc):
    """int64 copies (for the host-side bounds) and the kernels' int32 copies.

    Token indices must be < 2**31. Document ids are shifted by their minimum
    (so they are >= 0; the kernels use -1/-2 for padding) and stored as int32:
    ids within a row must span less than 2**31.
    """
    dev = q.device
    q_index = q_index.to(device=dev, dtype=torch.int64).contiguous()
    k_index = k_index.to(device=dev, dtype=torch.int64).contiguous()
    q32, k32 = q_index.to(torch.int32), k_index.to(torch.int32)
    qd32 = kd32 = None
    if q_doc is not None:
        q_doc = q_doc.to(device=dev, dtype=torch.int64)
        k_doc = k_doc.to(device=dev, dtype=torch.int64)
        dmin = torch.minimum(q_doc.min(), k_doc.min())
        q_doc, k_doc = (q_doc - dmin).contiguous(), (k_doc - dmin).contiguous()
        qd32, kd32 = q_doc.to(torch.int32), k_doc.to(torch.int32)
    return (q_index, k_index, q_doc, k_doc), (q32, k32, qd32, kd32)


def _consts(q, D, causal, has_doc):
    block_d = max(16, triton_next_pow2(D))
    return dict(
        IS_CAUSAL=bool(causal), HAS_DOC=bool(has_doc), BLOCK_D=block_d, EVEN_D=(block_d == D),
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )


def triton_next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def _setup(q, k, v, q_index, k_index, q_doc, k_doc, causal, window, softmax_scale):
    """Checked inputs -> everything both launches need (a namespace).

    ``ids`` are the kernels' int32 index/doc pointers (a dummy for absent
    docs), ``kwin`` the kernels' window (``NO_WINDOW`` for none).
    """
    window = check_inputs(q, k, v, q_index, k_index, q_doc, k_doc, window)
    _require(q)
    km = _kernel_module()
    B, S_q, H, D, S_k, H_kv, G, scale = dims(q, k, softmax_scale)
    (q_index, k_index, q_doc, k_doc), (qi32, ki32, qd32, kd32) = _prep(q, q_index, k_index, q_doc, k_doc)
    has_doc = q_doc is not None
    return SimpleNamespace(
        km=km, B=B, S_q=S_q, H=H, D=D, S_k=S_k, H_kv=H_kv, G=G, scale=scale, has_doc=has_doc, causal=causal,
        window=window, kwin=km.NO_WINDOW if window is None else min(window, km.NO_WINDOW),
        idx=(q_index, k_index, q_doc, k_doc),
        ids=(qi32, ki32, qi32, qi32) if qd32 is None else (qi32, ki32, qd32, kd32),
        doc_strides=(0, 0) if qd32 is None else (qd32.stride(0), kd32.stride(0)),
        consts=_consts(q, D, causal, has_doc), buckets=(_bucket(S_q), _bucket(S_k)),
    )


def _side_bounds(p, keys=False):
    """(bounds, batch stride) for the query side, or the key side with ``keys``."""
    q_index, k_index, q_doc, k_doc = p.idx
    if keys:  # query i sees key j iff -q_idx[i] <= -k_idx[j] (and -k - (-q) < window)
        bnd = _bounds(-k_index, -q_index, k_doc, q_doc, p.causal, p.window)
    else:
        bnd = _bounds(q_index, k_index, q_doc, k_doc, p.causal, p.window)
    return bnd, bnd.stride(0) if p.has_doc else 0


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------


def forward(q, k, v, *, q_index, k_index, q_doc=None, k_doc=None, causal=True, window=None, softmax_scale=None,
            acc=None, q_chunk_size=None, k_chunk_size=None):
    """out ``[B, S_q, H, D]`` (q's dtype; fp32 with ``acc``), lse fp32 ``[B, H, S_q]``.

    With ``acc=(out_acc, lse_acc)`` the incoming result is read by the kernel
    and the merged result is written to new tensors (the inputs are not
    modified).
    """
    p = _setup(q, k, v, q_index, k_index, q_doc, k_doc, causal, window, softmax_scale)
    B, S_q, H, D, S_k = p.B, p.S_q, p.H, p.D, p.S_k
    if acc is not None:
        out_in = acc[0].to(device=q.device, dtype=torch.float32).contiguous()
        lse_in = acc[1].to(device=q.device, dtype=torch.float32).contiguous()
        out = torch.empty(B, S_q, H, D, device=q.device, dtype=torch.float32)
    else:
        out_in = lse_in = None
        out = torch.empty(B, S_q, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, S_q, device=q.device, dtype=torch.float32)
    if B == 0 or S_q == 0 or H == 0 or S_k == 0:
        return (out.zero_(), lse.fill_(float("-inf"))) if acc is None else (out_in.clone(), lse_in.clone())

    qb, sbnd = _side_bounds(p)
    if out_in is None:
        out_in, lse_in, si = out, lse, out.stride()
    else:
        si = out_in.stride()
    p.km.attn_fwd[lambda meta: (triton.cdiv(S_q, meta["BLOCK_M"]), B * H)](
        q, k, v, out, lse, out_in, lse_in, *p.ids, qb,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *si, *p.doc_strides, sbnd,
        H, p.G, S_q, S_k, D, p.scale * p.km.LOG2E_F, p.kwin, *p.buckets,
        ACC=acc is not None, **p.consts, **p.km.FIXED["fwd"],
    )
    return out, lse


# ---------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------


def backward(dout, q, k, v, out, lse, *, q_index, k_index, q_doc=None, k_doc=None, causal=True, window=None,
             softmax_scale=None, delta=None, q_chunk_size=None, k_chunk_size=None):
    """dq, dk, dv (input dtypes). P is recomputed from the given ``lse``; ``delta``
    ``[B, H, S_q]`` = rowsum(dout * out) is computed by a small kernel when not given."""
    p = _setup(q, k, v, q_index, k_index, q_doc, k_doc, causal, window, softmax_scale)
    check_backward_inputs(dout, q, out, lse, delta)
    B, S_q, H, D, S_k, H_kv, km = p.B, p.S_q, p.H, p.D, p.S_k, p.H_kv, p.km
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)

    dq = torch.empty(B, S_q, H, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, S_k, H_kv, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, S_k, H_kv, D, device=q.device, dtype=v.dtype)
    if B == 0 or H == 0 or S_q == 0 or S_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.to(device=q.device, dtype=torch.float32).contiguous()

    if delta is None:
        delta = torch.empty(B, H, S_q, device=q.device, dtype=torch.float32)
        pre_m = km.PRE_BLOCK_M
        km.bwd_preprocess[(triton.cdiv(S_q, pre_m), B * H)](
            out, dout, delta, *out.stride(), *dout.stride(), H, S_q, D,
            BLOCK_D=p.consts["BLOCK_D"], BLOCK_M=pre_m,
        )
    else:
        delta = delta.to(device=q.device, dtype=torch.float32).contiguous()

    scales = (p.scale * km.LOG2E_F, p.scale, p.kwin)
    kb, skb = _side_bounds(p, keys=True)
    km.attn_bwd_dkdv[lambda meta: (triton.cdiv(S_k, meta["BLOCK_N"]), B * H_kv)](
        q, k, v, dout, lse, delta, dk, dv, *p.ids, kb,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(), *p.doc_strides, skb,
        H, H_kv, p.G, S_q, S_k, D, *scales, *p.buckets,
        **p.consts, **km.FIXED["dkdv"],
    )
    qb, sqb = _side_bounds(p)
    km.attn_bwd_dq[lambda meta: (triton.cdiv(S_q, meta["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dq, *p.ids, qb,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *p.doc_strides, sqb,
        H, p.G, S_q, S_k, D, *scales, *p.buckets,
        **p.consts, **km.FIXED["dq"],
    )
    return dq, dk, dv
