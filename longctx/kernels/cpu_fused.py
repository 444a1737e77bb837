"""CPU fast path of the ``torch`` backend: PyTorch's fused CPU flash attention on planned blocks.

``reference.forward`` / ``reference.backward`` call :func:`forward` /
:func:`backward` here first; they return ``None`` when the inputs are not
eligible and the chunked online-softmax path runs instead.

Algorithm
---------
Work happens in *position* space (the order of the rows of q and of k/v),
not in token-index space. When ``q_index`` and ``k_index`` are each
non-decreasing, there is no window (see below for one), and every document occupies one
contiguous run of positions in both q and k (true whenever a document is a
contiguous token range, in any sorted layout: arange, zigzag, striped, ring
steps), the keys visible to query ``i`` of one document ``d`` are exactly
the key positions ``[ka_d, ka_d + hi(i))``, where ``[ka_d, kb_d)`` is the
document's key run and ``hi(i)`` = the number of its keys with
``k_index <= q_index[i]`` (``kb_d - ka_d`` when not causal). ``hi`` is
non-decreasing in ``i``. The query rows are cut into maximal segments where
``hi`` is

* constant ("flat"): every row sees the same key prefix -> one call of the
  fused op without mask over that prefix;
* increasing by exactly 1 per row ("diagonal", ``hi(i) = hi(r0) + i - r0``):
  the prefix of ``p = hi(r0) - 1`` keys is seen by every row -> one call
  without mask, plus one *square* ``is_causal=True`` call on the next
  ``r1 - r0`` keys, whose top-left causal mask (row ``i'`` sees keys
  ``j' <= i'``) is exactly this segment's visibility.

Rows with ``hi = 0`` (a leading run, ``hi`` is monotone) see nothing: they
are in no call and keep ``out = 0``, ``lse = -inf``; every call therefore has
at least one visible key per row, so the fused op never meets an empty row.
Aligned causal attention (``q_index == k_index == arange``), zigzag's local
step and a striped step are a single diagonal segment: one fused call. Each
segment is exact because the union of its calls' key sets is exactly the
visible set, with no overlap, and partial results over disjoint key sets
merge exactly by log-sum-exp (``reference.merge_partials``).

Backward calls the fused backward on the same blocks with the *given* ``out``
and ``lse`` (a row with ``lse = -inf`` sees no key anywhere, so it is in no
block; ``-inf`` is still mapped to ``+inf``, as in the chunked path, so that
``P = exp(s - lse)`` would be 0 rather than NaN): it recomputes
``P = exp(s * scale - lse)`` from that lse and ``delta = rowsum(dout * out)``
from that out, never renormalising, so with a
global out/lse it returns exactly this key set's contribution (dq summed
over a row's blocks, dk/dv over a key's blocks). When ``delta`` is given it
is the one used: the op is handed ``out' = u * delta / (dout . u)`` with
``u = dout / max|dout|`` per row, whose ``rowsum(dout * out')`` is ``delta``
up to a relative ``O(D * eps)`` rounding (a sum of non-negative terms, so
no cancellation: the same order as computing delta itself); a row with
``dout = 0`` has ``delta = 0`` by definition and gets ``out' = 0``.

Batch rows with identical documents share their calls; without documents
all rows share them. GQA goes to the op as is (it maps query head ``h`` to
kv head ``h // G`` and sums dk/dv over the group). Inputs are computed in
``reference.compute_dtype`` (fp64 for fp64 inputs, fp32 otherwise: bf16 and
fp16 are upcast first, since the op would round P to bf16 before P @ V).
q/k/v go to the op as ``[B, H, S, D]`` views of the ``[B, S, H, D]`` tensors
(no copies for fp32); the op's own blocking bounds its memory.

A window with ``window > max(q_index) - min(k_index)`` cannot hide any pair
and is dropped (exact: every pair is inside it). A window that hides some
pair adds a lower end: query ``i`` sees key positions ``[ka_d + lo(i), ka_d +
hi(i))`` with ``lo(i)`` = the number of the document's keys with ``k_index <=
q_index[i] - window``, also non-decreasing ("band"). Rows with ``lo < hi`` are
cut into blocks of ``band_rows(window)`` rows (at most ``window / 2``, so a
block's key span ``hi(r1 - 1) - lo(r0)`` is at most 1.5x a row's); a block
where every row sees the same keys is one call without mask, any other one
call over its key span with a boolean mask ``lo(i) <= j < hi(i)`` (the op
takes ``attn_mask``, forward and backward). Rows with ``lo = hi`` see nothing
and are in no block, so no call has an empty row here either.

Fallback (``None`` returned, chunked path): a non-CPU device, a dtype other
than fp16/bf16/fp32/fp64, empty sequences, unsorted indices, a document split
into several runs of positions, a plan with far more fused calls than rows
warrant (many tiny segments: per-call overhead would dominate), or
``LONGCTX_CPU_FUSED=0`` in the environment (used to compare the two paths).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from . import reference as _ref

__all__ = ["enabled", "eligible", "plan", "forward", "backward"]

_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ENV = "LONGCTX_CPU_FUSED"


def enabled() -> bool:
    """False when ``LONGCTX_CPU_FUSED=0`` (or the op is missing from this torch)."""
    return _FWD is not None and _BWD is not None and os.environ.get(ENV, "1") != "0"


def eligible(q, k) -> bool:
    """Cheap checks that need no host sync: device, dtype, sizes."""
    return (enabled() and q.device.type == "cpu" and q.dtype in _DTYPES
            and q.shape[0] > 0 and q.shape[1] > 0 and k.shape[1] > 0 and q.shape[2] > 0 and q.shape[3] > 0)


# ---------------------------------------------------------------------------
# planning (host side, O(S) work, no S_q x S_k tensor)
# ---------------------------------------------------------------------------


def _sorted(index) -> bool:
    return index.numel() < 2 or bool((index[1:] >= index[:-1]).all())


def _runs(doc_row):
    """{doc id: (start, end)} of a 1-D doc row, or None if some id has several runs."""
    ids, counts = torch.unique_consecutive(doc_row, return_counts=True)
    ids = ids.tolist()
    if len(set(ids)) != len(ids):
        return None
    ends = torch.cumsum(counts, 0).tolist()
    return {d: (e - c, e) for d, c, e in zip(ids, counts.tolist(), ends)}


def _segments(hi):
    """Cut rows with non-decreasing visible-prefix lengths ``hi`` (1-D int64) into calls.

    Returns [(r0, r1, [(k0, k1, causal), ...])] in local coordinates: rows
    ``[r0, r1)`` see keys ``[k0, k1)`` (top-left causal when ``causal``).
    Greedy from the first row that sees a key: a segment takes the longest
    run of equal steps ``hi[i + 1] - hi[i]`` in {0, 1} from its first row (a
    lone row otherwise). Work: one run-length encoding of the steps, then
    one Python iteration per segment.
    """
    n = hi.numel()
    r = int((hi <= 0).sum())  # hi is monotone: the rows that see nothing lead
    if r >= n:
        return []
    steps, counts = torch.unique_consecutive(hi[r + 1:] - hi[r:-1], return_counts=True)
    ends = (torch.cumsum(counts, 0) + r).tolist()  # step run j covers steps [ends[j-1], ends[j])
    steps = steps.tolist()
    h = hi.tolist() if len(steps) * 4 > n else None  # many runs: one conversion beats many lookups
    out, j = [], 0
    while r < n:
        while j < len(ends) and ends[j] <= r:
            j += 1
        if j < len(ends) and steps[j] in (0, 1):
            e, step = ends[j] + 1, steps[j]  # rows r .. ends[j], steps r .. ends[j] - 1
        else:
            e, step = r + 1, 0  # the last row, or a jump of more than one key
        h0 = h[r] if h is not None else int(hi[r])
        if step == 0:
            out.append((r, e, [(0, h0, False)]))
        else:
            p = h0 - 1  # every row sees keys [0, p); then the diagonal
            out.append((r, e, ([(0, p, False)] if p > 0 else []) + [(p, p + (e - r), True)]))
        r = e
    return out


def band_rows(window: int) -> int:
    """Query rows per block of a band plan: half the window, within [16, 256]."""
    return max(16, min(256, window // 2))


def _band_segments(lo, hi, rows):
    """Cut rows that see keys ``[lo(i), hi(i))`` (both non-decreasing) into calls.

    Returns [(r0, r1, [(k0, k1, kind)])] like ``_segments``: rows with ``lo < hi``
    in blocks of at most ``rows``; ``kind`` is False when every row of the block
    sees the whole span ``[k0, k1)``, else the block's boolean mask ``[r1 - r0,
    k1 - k0]``.
    """
    sees = (hi > lo).tolist()
    lo_l, hi_l = lo.tolist(), hi.tolist()
    out, n, r = [], len(sees), 0
    while r < n:
        if not sees[r]:
            r += 1
            continue
        e = r  # the run of rows that see keys, then its blocks
        while e < n and sees[e]:
            e += 1
        for r0 in range(r, e, rows):
            r1 = min(r0 + rows, e)
            k0, k1 = lo_l[r0], hi_l[r1 - 1]
            if lo_l[r1 - 1] == k0 and hi_l[r0] == k1:
                kind = False
            else:
                j = torch.arange(k0, k1)
                kind = (j[None] >= lo[r0:r1, None]) & (j[None] < hi[r0:r1, None])
            out.append((r0, r1, [(k0, k1, kind)]))
        r = e
    return out


def _calls(q_index, k_index, causal, window):
    """The calls of one document's (or the whole row's) queries against its keys."""
    hi = _hi(q_index, k_index, causal)
    if window is not None:
        lo = _keys_at_or_below(k_index, q_index - window)  # the keys below each query's window
        if bool(lo.any()):
            return _band_segments(lo, hi, band_rows(window))
    return _segments(hi)


def _keys_at_or_below(k_index, bounds):
    """Per bound, the number of (sorted) keys with ``k_index <= bound``."""
    # numpy's searchsorted: torch's CPU one runs a parallel region costing milliseconds on a busy machine
    return torch.from_numpy(np.searchsorted(k_index.numpy(), bounds.numpy(), side="right").astype(np.int64))


def _hi(q_index, k_index, causal):
    """Per query, the number of keys with ``k_index <= q_index`` (all keys when not causal)."""
    if not causal:
        return torch.full((q_index.numel(),), k_index.numel(), dtype=torch.int64)
    return _keys_at_or_below(k_index, q_index)


def plan(q_index, k_index, q_doc=None, k_doc=None, causal=True, batch=1, window=None):
    """The fused calls, or None when the fast path does not apply.

    Returns a list of groups ``(b0, b1, q0, q1, [(k0, k1, kind), ...])``:
    batch rows ``[b0, b1)``, query rows ``[q0, q1)`` and the key ranges whose
    partial results merge to the rows' result; ``kind`` is True (top-left
    causal), False (no mask) or a boolean mask ``[q1 - q0, k1 - k0]`` (a
    window's band). Groups cover disjoint (batch, query) regions; rows in no
    group see no key. Indices must be int64 CPU tensors, documents int64
    ``[B, S]`` or None.
    """
    if not (_sorted(q_index) and _sorted(k_index)):
        return None
    groups = []
    if q_doc is None:
        for r0, r1, calls in _calls(q_index, k_index, causal, window):
            groups.append((0, batch, r0, r1, calls))
    else:
        B = q_doc.shape[0]
        b = 0
        while b < B:
            b1 = b + 1  # rows with identical documents share their calls
            while b1 < B and torch.equal(q_doc[b1], q_doc[b]) and torch.equal(k_doc[b1], k_doc[b]):
                b1 += 1
            q_runs, k_runs = _runs(q_doc[b]), _runs(k_doc[b])
            if q_runs is None or k_runs is None:
                return None
            for d, (qa, qb) in q_runs.items():
                if d not in k_runs:
                    continue
                ka, kb = k_runs[d]
                for r0, r1, calls in _calls(q_index[qa:qb], k_index[ka:kb], causal, window):
                    groups.append((b, b1, qa + r0, qa + r1, [(ka + k0, ka + k1, c) for k0, k1, c in calls]))
            b = b1
    n_calls = sum(len(g[4]) * (g[1] - g[0]) for g in groups)
    if n_calls > 16 + batch * q_index.numel() // 16:
        return None  # many tiny segments: per-call overhead would dominate
    return groups


def _plan_for(q, k, q_index, k_index, q_doc, k_doc, causal, window):
    if not eligible(q, k):
        return None
    q_index = q_index.to(device="cpu", dtype=torch.int64)
    k_index = k_index.to(device="cpu", dtype=torch.int64)
    if window is not None and int(q_index.max()) - int(k_index.min()) < window:
        window = None  # every pair has q_index - k_index < window: the window changes nothing
    if q_doc is not None:
        q_doc = q_doc.to(device="cpu", dtype=torch.int64)
        k_doc = k_doc.to(device="cpu", dtype=torch.int64)
    return plan(q_index, k_index, q_doc, k_doc, causal, batch=q.shape[0], window=window)


def _mask_args(kind, cdt):
    """(is_causal, attn_mask) of a planned call's ``kind`` (see ``plan``)."""
    if isinstance(kind, bool):
        return kind, None
    return False, torch.zeros(kind.shape, dtype=cdt).masked_fill_(~kind, float("-inf"))


def _heads_first(t, cdt):
    """[B, S, H, D] -> a [B, H, S, D] view (the op's layout), in dtype cdt."""
    return t.to(cdt).transpose(1, 2)


# ---------------------------------------------------------------------------
# forward / backward
# ---------------------------------------------------------------------------


def forward(q, k, v, *, q_index, k_index, q_doc, k_doc, causal, window, softmax_scale):
    """(out, lse) as ``reference.forward``, or None when the fast path does not apply.

    Inputs are assumed checked by ``reference.check_inputs``.
    """
    groups = _plan_for(q, k, q_index, k_index, q_doc, k_doc, causal, window)
    if groups is None:
        return None
    B, S_q, H, D, S_k, H_kv, G, scale = _ref.dims(q, k, softmax_scale)
    cdt = _ref.compute_dtype(q.dtype)
    qt, kt, vt = (_heads_first(t, cdt) for t in (q, k, v))
    if len(groups) == 1 and groups[0][:4] == (0, B, 0, S_q) and len(groups[0][4]) == 1:
        (k0, k1, kind), = groups[0][4]  # one call covers everything (e.g. aligned causal)
        is_causal, mask = _mask_args(kind, cdt)
        o, l = _FWD(qt, kt[:, :, k0:k1], vt[:, :, k0:k1], 0.0, is_causal, attn_mask=mask, scale=scale)
        return o.transpose(1, 2).to(q.dtype), l.contiguous()
    out = torch.zeros(B, S_q, H, D, dtype=cdt)
    lse = torch.full((B, H, S_q), float("-inf"), dtype=cdt)
    for b0, b1, q0, q1, calls in groups:
        o = l = None
        qc = qt[b0:b1, :, q0:q1]
        for k0, k1, kind in calls:
            is_causal, mask = _mask_args(kind, cdt)
            oc, lc = _FWD(qc, kt[b0:b1, :, k0:k1], vt[b0:b1, :, k0:k1], 0.0, is_causal, attn_mask=mask,
                          scale=scale)
            oc = oc.transpose(1, 2)  # [b, nq, H, D]
            if o is None:
                o, l = oc, lc
            else:
                o, l = _ref.merge_partials(o, l, oc, lc)
        out[b0:b1, q0:q1] = o
        lse[b0:b1, :, q0:q1] = l
    return out.to(q.dtype), lse


def _out_for_delta(dout, delta):
    """An ``out'`` [B, S, H, D] with rowsum(dout * out') = delta (see the module docstring)."""
    m = dout.abs().amax(dim=-1, keepdim=True)
    u = dout / torch.where(m > 0, m, torch.ones_like(m))
    den = (dout * u).sum(dim=-1, keepdim=True)  # >= max|dout| > 0 where dout != 0
    d = delta.transpose(1, 2).unsqueeze(-1)  # [B, H, S] -> [B, S, H, 1]
    return u * (d / torch.where(den > 0, den, torch.ones_like(den)))


def backward(dout, q, k, v, out, lse, *, q_index, k_index, q_doc, k_doc, causal, window, softmax_scale, delta):
    """(dq, dk, dv) as ``reference.backward``, or None when the fast path does not apply.

    Inputs are assumed checked by ``reference.check_inputs`` and ``check_backward_inputs``.
    """
    groups = _plan_for(q, k, q_index, k_index, q_doc, k_doc, causal, window)
    if groups is None:
        return None
    B, S_q, H, D, S_k, H_kv, G, scale = _ref.dims(q, k, softmax_scale)
    cdt = _ref.compute_dtype(q.dtype, dout.dtype, lse.dtype)
    qt, kt, vt, dot = (_heads_first(t, cdt) for t in (q, k, v, dout))
    if delta is None:
        ot = _heads_first(out, cdt)
    else:
        ot = _out_for_delta(dout.to(cdt), delta.to(cdt)).transpose(1, 2)
    lse = lse.to(cdt)
    # lse = -inf: the row sees no key at all; +inf makes P = exp(s - lse) = 0 there.
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    if len(groups) == 1 and groups[0][:4] == (0, B, 0, S_q) and len(groups[0][4]) == 1 \
            and groups[0][4][0][:2] == (0, S_k):
        # one call covers every (query, key) block: its gradients are the result
        is_causal, mask = _mask_args(groups[0][4][0][2], cdt)
        gq, gk, gv = _BWD(dot, qt, kt, vt, ot, lse, 0.0, is_causal, attn_mask=mask, scale=scale)
        return gq.transpose(1, 2).to(q.dtype), gk.transpose(1, 2).to(k.dtype), gv.transpose(1, 2).to(v.dtype)
    dq = torch.zeros(B, S_q, H, D, dtype=cdt)
    dk = torch.zeros(B, S_k, H_kv, D, dtype=cdt)
    dv = torch.zeros(B, S_k, H_kv, D, dtype=cdt)
    for b0, b1, q0, q1, calls in groups:
        rows = (slice(b0, b1), slice(None), slice(q0, q1))
        for k0, k1, kind in calls:
            keys = (slice(b0, b1), slice(None), slice(k0, k1))
            is_causal, mask = _mask_args(kind, cdt)
            gq, gk, gv = _BWD(dot[rows], qt[rows], kt[keys], vt[keys], ot[rows], lse[rows], 0.0, is_causal,
                              attn_mask=mask, scale=scale)
            dq[b0:b1, q0:q1] += gq.transpose(1, 2)
            dk[b0:b1, k0:k1] += gk.transpose(1, 2)
            dv[b0:b1, k0:k1] += gv.transpose(1, 2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
