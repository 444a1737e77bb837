"""Torch reference attention: exact, chunked, any device.

Semantics (see ARCHITECTURE.md, "Kernels"): key j is visible to query i when
``(not causal or q_index[i] >= k_index[j]) and q_doc[b, i] == k_doc[b, j]
and (window is None or q_index[i] - k_index[j] < window)``.
Queries and keys are processed in chunks with an online softmax, so memory is
O(S * D + q_chunk * k_chunk) per (batch, head), never O(S_q * S_k); chunk
pairs that cannot hold a visible pair (from the chunks' index ranges) are
skipped before any score is computed.

GQA is handled by viewing q as ``[B, H_kv, G, S, D]`` (query head
``h = kv * G + g``) and broadcasting k/v over ``G``, so k/v are never repeated.

Rows with no visible key give ``out = 0`` and ``lse = -inf``; nothing here
produces NaN for such rows, forward or backward.

On CPU, ``forward`` / ``backward`` first try ``cpu_fused``: PyTorch's fused
CPU flash-attention op on blocks planned from the indices and documents
(causal diagonals as ``is_causal`` calls, fully visible prefixes without a
mask, documents as separate segments, a sliding window as masked band blocks,
invisible blocks never computed).
Where that plan does not apply (unsorted indices, a document split into
several runs, other devices or dtypes; see that module)
the chunked path below runs. Both give the same results up to rounding.
"""

from __future__ import annotations

import math
import operator

import torch

from . import cpu_fused as _cpu_fused

DEFAULT_Q_CHUNK = 1024
DEFAULT_K_CHUNK = 1024

__all__ = [
    "forward",
    "backward",
    "merge_partials",
    "visible_pairs",
    "check_inputs",
    "check_window",
    "check_backward_inputs",
    "dims",
    "visible_counts",
    "compute_dtype",
    "DEFAULT_Q_CHUNK",
    "DEFAULT_K_CHUNK",
]


# ---------------------------------------------------------------------------
# validation and small helpers
# ---------------------------------------------------------------------------


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp64 if any input is fp64 (lets tests be tight), fp32 otherwise."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def check_window(window):
    """``None`` or a positive int (returned as int); ValueError naming ``window`` otherwise."""
    if window is None:
        return None
    if isinstance(window, bool):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    try:
        w = operator.index(window)
    except TypeError:
        raise ValueError(f"window must be a positive int or None, got {window!r}") from None
    if w < 1:
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    return int(w)


def dims(q, k, softmax_scale):
    """(B, S_q, H, D, S_k, H_kv, G, scale) of checked inputs; scale defaults to 1/sqrt(D)."""
    B, S_q, H, D = q.shape
    S_k, H_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    return B, S_q, H, D, S_k, H_kv, H // H_kv, scale


def check_backward_inputs(dout, q, out, lse, delta) -> None:
    """The backward-only shapes: dout, lse, and out (needed only without delta) or delta."""
    B, S_q, H, _ = q.shape
    if dout.shape != q.shape:
        raise ValueError(f"dout shape {tuple(dout.shape)} must equal q shape {tuple(q.shape)}")
    if lse.shape != (B, H, S_q):
        raise ValueError(f"lse must have shape ({B}, {H}, {S_q}), got {tuple(lse.shape)}")
    if delta is None and out.shape != q.shape:
        raise ValueError(f"out shape {tuple(out.shape)} must equal q shape {tuple(q.shape)}")
    if delta is not None and delta.shape != (B, H, S_q):
        raise ValueError(f"delta must have shape ({B}, {H}, {S_q}), got {tuple(delta.shape)}")


def check_inputs(q, k, v, q_index, k_index, q_doc, k_doc, window=None):
    """Raise ValueError naming the offending shape (or ``window``); returns the checked window."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, S, H, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    B, S_q, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: k {tuple(k.shape)}, v {tuple(v.shape)}")
    Bk, S_k, H_kv, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} "
            "(batch and head dim must agree)"
        )
    if H_kv == 0 or H % H_kv != 0:
        raise ValueError(
            f"q heads ({H}, q shape {tuple(q.shape)}) must be a multiple of "
            f"k/v heads ({H_kv}, k shape {tuple(k.shape)})"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q_index.shape != (S_q,):
        raise ValueError(f"q_index must have shape ({S_q},), got {tuple(q_index.shape)}")
    if k_index.shape != (S_k,):
        raise ValueError(f"k_index must have shape ({S_k},), got {tuple(k_index.shape)}")
    if (q_doc is None) != (k_doc is None):
        raise ValueError("q_doc and k_doc must both be given or both be None")
    if q_doc is not None:
        if q_doc.shape != (B, S_q):
            raise ValueError(f"q_doc must have shape ({B}, {S_q}), got {tuple(q_doc.shape)}")
        if k_doc.shape != (B, S_k):
            raise ValueError(f"k_doc must have shape ({B}, {S_k}), got {tuple(k_doc.shape)}")
    return check_window(window)


def _chunk_mask(qi, ki, qd, kd, causal, window=None):
    """Visibility of a (query chunk, key chunk) block.

    Returns None when everything is visible (no mask to apply), else a bool
    tensor ``[B or 1, cq, ck]``.
    """
    mask = None
    if causal:
        mask = (qi[:, None] >= ki[None, :]).unsqueeze(0)
    if window is not None:
        in_window = (qi[:, None] - ki[None, :] < window).unsqueeze(0)
        mask = in_window if mask is None else mask & in_window
    if qd is not None:
        same_doc = qd[:, :, None] == kd[:, None, :]
        mask = same_doc if mask is None else mask & same_doc
    return mask


def _chunk_ranges(index, chunk):
    """[(start, end, min index, max index)] of the chunks of ``index`` (one host sync)."""
    n = index.numel()
    starts = list(range(0, n, chunk))
    if not starts:
        return []
    pad = starts[-1] + chunk - n  # pad the last chunk with copies of its first element
    padded = torch.cat([index, index[starts[-1]:starts[-1] + 1].expand(pad)]).view(-1, chunk)
    lo, hi = padded.amin(dim=1).tolist(), padded.amax(dim=1).tolist()
    return [(s, min(s + chunk, n), a, b) for s, a, b in zip(starts, lo, hi)]


def _visible_chunks(q_chunk, q_index, q_doc, k_chunks, k_index, k_doc, causal, window):
    """Yield (ks, ke, mask) for the key chunks that may hold a pair visible to ``q_chunk``.

    Chunks are ``_chunk_ranges`` entries. Chunk pairs that are entirely
    causally invisible or entirely below the window are skipped from the
    index ranges alone, the others when their mask is all False.
    """
    qs, qe, q_lo, q_hi = q_chunk
    qi, qd = q_index[qs:qe], _chunk_doc(q_doc, qs, qe)
    for ks, ke, k_lo, k_hi in k_chunks:
        if causal and q_hi < k_lo:
            continue  # every key after every query
        if window is not None and q_lo - k_hi >= window:
            continue  # every key at or below every query's window
        mask = _chunk_mask(qi, k_index[ks:ke], qd, _chunk_doc(k_doc, ks, ke), causal, window)
        if mask is not None and not bool(mask.any()):
            continue  # e.g. no shared document
        yield ks, ke, mask


def _prepare(q, k, v, q_index, k_index, q_doc, k_doc, cdt):
    """Grouped fp32/fp64 views: q -> [B, H_kv, G, S_q, D], k/v -> [B, H_kv, 1, S_k, D]."""
    B, S_q, H, D = q.shape
    H_kv = k.shape[2]
    G = H // H_kv
    qg = q.to(cdt).reshape(B, S_q, H_kv, G, D).permute(0, 2, 3, 1, 4).contiguous()
    # The singleton group dim broadcasts k/v over the G query heads of a kv head.
    kg = k.to(cdt).permute(0, 2, 1, 3).unsqueeze(2).contiguous()
    vg = v.to(cdt).permute(0, 2, 1, 3).unsqueeze(2).contiguous()
    dev = q.device
    q_index = q_index.to(device=dev, dtype=torch.int64)
    k_index = k_index.to(device=dev, dtype=torch.int64)
    if q_doc is not None:
        q_doc = q_doc.to(device=dev, dtype=torch.int64)
        k_doc = k_doc.to(device=dev, dtype=torch.int64)
    return qg, kg, vg, q_index, k_index, q_doc, k_doc


def _chunk_doc(doc, start, end):
    return None if doc is None else doc[:, start:end]


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------


def forward(q, k, v, *, q_index, k_index, q_doc=None, k_doc=None, causal=True, window=None, softmax_scale=None,
            q_chunk_size=DEFAULT_Q_CHUNK, k_chunk_size=DEFAULT_K_CHUNK):
    """Returns ``out [B, S_q, H, D]`` (q's dtype) and ``lse [B, H, S_q]``.

    lse is fp32 (fp64 when the inputs are fp64, so fp64 checks stay tight).
    """
    window = check_inputs(q, k, v, q_index, k_index, q_doc, k_doc, window)
    fused = _cpu_fused.forward(q, k, v, q_index=q_index, k_index=k_index, q_doc=q_doc, k_doc=k_doc,
                               causal=causal, window=window, softmax_scale=softmax_scale)
    if fused is not None:
        return fused
    B, S_q, H, D, S_k, H_kv, G, scale = dims(q, k, softmax_scale)
    cdt = compute_dtype(q.dtype)
    qg, kg, vg, q_index, k_index, q_doc, k_doc = _prepare(q, k, v, q_index, k_index, q_doc, k_doc, cdt)

    out = torch.zeros(B, H_kv, G, S_q, D, dtype=cdt, device=q.device)
    lse = torch.full((B, H_kv, G, S_q), float("-inf"), dtype=cdt, device=q.device)
    k_chunks = _chunk_ranges(k_index, k_chunk_size)

    for q_chunk in _chunk_ranges(q_index, q_chunk_size):
        qs, qe = q_chunk[:2]
        qc = qg[:, :, :, qs:qe]
        # Online-softmax state: running max m, running sum l, unnormalised acc.
        m = torch.full((B, H_kv, G, qe - qs), float("-inf"), dtype=cdt, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(B, H_kv, G, qe - qs, D, dtype=cdt, device=q.device)
        for ks, ke, mask in _visible_chunks(q_chunk, q_index, q_doc, k_chunks, k_index, k_doc, causal, window):
            s = torch.matmul(qc, kg[:, :, :, ks:ke].transpose(-1, -2)) * scale
            if mask is not None:
                s = s.masked_fill(~mask[:, None, None], float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            # A row with nothing visible so far keeps m = -inf; shift by 0 instead
            # so that exp(-inf - (-inf)) never happens.
            m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(dim=-1)
            acc = acc * alpha[..., None] + torch.matmul(p, vg[:, :, :, ks:ke])
            m = m_new
        seen = l > 0
        l_safe = torch.where(seen, l, torch.ones_like(l))
        out[:, :, :, qs:qe] = torch.where(seen[..., None], acc / l_safe[..., None], torch.zeros_like(acc))
        lse[:, :, :, qs:qe] = torch.where(seen, m + torch.log(l_safe), torch.full_like(m, float("-inf")))

    out = out.permute(0, 3, 1, 2, 4).reshape(B, S_q, H, D).to(q.dtype)
    lse = lse.reshape(B, H, S_q)
    return out, lse


# ---------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------


def backward(dout, q, k, v, out, lse, *, q_index, k_index, q_doc=None, k_doc=None, causal=True, window=None,
             softmax_scale=None, delta=None, q_chunk_size=DEFAULT_Q_CHUNK, k_chunk_size=DEFAULT_K_CHUNK):
    """FlashAttention-2 style backward; returns dq, dk, dv in the input dtypes.

    Probabilities are recomputed from the *given* ``lse`` (never recomputed
    here), so ``out``/``lse`` may be the global results over a larger key set
    (ring attention calls this once per key block): the gradients returned are
    then exactly this key block's contribution. ``delta`` = rowsum(dout * out),
    ``[B, H, S_q]``, is computed from ``dout`` and ``out`` when not given.
    """
    window = check_inputs(q, k, v, q_index, k_index, q_doc, k_doc, window)
    check_backward_inputs(dout, q, out, lse, delta)
    fused = _cpu_fused.backward(dout, q, k, v, out, lse, q_index=q_index, k_index=k_index, q_doc=q_doc,
                                k_doc=k_doc, causal=causal, window=window, softmax_scale=softmax_scale,
                                delta=delta)
    if fused is not None:
        return fused
    B, S_q, H, D, S_k, H_kv, G, scale = dims(q, k, softmax_scale)
    cdt = compute_dtype(q.dtype, dout.dtype, lse.dtype)
    qg, kg, vg, q_index, k_index, q_doc, k_doc = _prepare(q, k, v, q_index, k_index, q_doc, k_doc, cdt)

    def grouped(t):  # [B, S_q, H, D] -> [B, H_kv, G, S_q, D]
        return t.to(cdt).reshape(B, S_q, H_kv, G, D).permute(0, 2, 3, 1, 4).contiguous()

    dog = grouped(dout)
    if delta is None:
        delta = (dout.to(cdt) * out.to(cdt)).sum(dim=-1).transpose(1, 2)  # [B, H, S_q]
    delta = delta.to(device=q.device, dtype=cdt).reshape(B, H_kv, G, S_q)
    lse = lse.to(device=q.device, dtype=cdt).reshape(B, H_kv, G, S_q)
    # lse = -inf means the row sees no key at all: use +inf so that
    # P = exp(s - lse) is 0 there instead of inf/NaN.
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)

    dq = torch.zeros(B, H_kv, G, S_q, D, dtype=cdt, device=q.device)
    dk = torch.zeros(B, H_kv, S_k, D, dtype=cdt, device=q.device)
    dv = torch.zeros(B, H_kv, S_k, D, dtype=cdt, device=q.device)

    k_chunks = _chunk_ranges(k_index, k_chunk_size)
    for q_chunk in _chunk_ranges(q_index, q_chunk_size):
        qs, qe = q_chunk[:2]
        cq = qe - qs
        qc, doc = qg[:, :, :, qs:qe], dog[:, :, :, qs:qe]
        lse_c, delta_c = lse[:, :, :, qs:qe, None], delta[:, :, :, qs:qe, None]
        # Flattened (G, cq) views let dK/dV sum over the G heads in one matmul.
        qc_flat = qc.reshape(B, H_kv, G * cq, D)
        doc_flat = doc.reshape(B, H_kv, G * cq, D)
        for ks, ke, mask in _visible_chunks(q_chunk, q_index, q_doc, k_chunks, k_index, k_doc, causal, window):
            kc, vc = kg[:, :, :, ks:ke], vg[:, :, :, ks:ke]
            s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
            if mask is not None:
                s = s.masked_fill(~mask[:, None, None], float("-inf"))
            p = torch.exp(s - lse_c)  # [B, H_kv, G, cq, ck]
            dp = torch.matmul(doc, vc.transpose(-1, -2))
            ds = p * (dp - delta_c)
            p_flat = p.reshape(B, H_kv, G * cq, ke - ks)
            ds_flat = ds.reshape(B, H_kv, G * cq, ke - ks)
            dv[:, :, ks:ke] += torch.matmul(p_flat.transpose(-1, -2), doc_flat)
            dk[:, :, ks:ke] += scale * torch.matmul(ds_flat.transpose(-1, -2), qc_flat)
            dq[:, :, :, qs:qe] += scale * torch.matmul(ds, kc)

    dq = dq.permute(0, 3, 1, 2, 4).reshape(B, S_q, H, D).to(q.dtype)
    dk = dk.permute(0, 2, 1, 3).to(k.dtype)
    dv = dv.permute(0, 2, 1, 3).to(v.dtype)
    return dq, dk, dv


# ---------------------------------------------------------------------------
# merging partial results, pair counting
# ---------------------------------------------------------------------------


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Merge attention results over two disjoint key sets.

    out_* ``[B, S, H, D]`` (any float dtype), lse_* ``[B, H, S]``. Returns
    ``(out, lse)`` in fp32 (fp64 if any input is fp64). -inf lse on either or
    both sides is handled: a side with lse = -inf contributes nothing, and a
    row empty on both sides stays out = 0, lse = -inf.
    """
    if out_a.shape != out_b.shape:
        raise ValueError(f"out shapes differ: {tuple(out_a.shape)} vs {tuple(out_b.shape)}")
    B, S, H, _ = out_a.shape
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.shape != (B, H, S):
            raise ValueError(f"{name} must have shape ({B}, {H}, {S}), got {tuple(t.shape)}")
    cdt = compute_dtype(out_a.dtype, out_b.dtype, lse_a.dtype, lse_b.dtype)
    la, lb = lse_a.to(cdt), lse_b.to(cdt)
    m = torch.maximum(la, lb)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m_safe), torch.exp(lb - m_safe)  # in [0, 1], 0 for -inf sides
    total = wa + wb
    seen = total > 0
    total_safe = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, m_safe + torch.log(total_safe), torch.full_like(m, float("-inf")))
    # [B, H, S] weights -> [B, S, H, 1] to scale the outputs.
    wa = (wa / total_safe).transpose(1, 2).unsqueeze(-1)
    wb = (wb / total_safe).transpose(1, 2).unsqueeze(-1)
    out = wa * out_a.to(cdt) + wb * out_b.to(cdt)
    return out, lse


def visible_counts(q_index, k_index, q_doc=None, k_doc=None, causal=True, window=None):
    """Per query, the number of visible keys: int64 ``[B, S_q]`` (``[1, S_q]`` without documents).

    Keys are sorted by (document, index) packed into one int64 (documents
    mapped to ranks < B * (S_q + S_k) first, so the packing cannot overflow)
    and each query's visible keys -- its document's keys with index in
    ``(q - window, q]`` (``(q - window, inf)`` without causality) -- are
    counted by two binary searches: O(S log S), no ``S_q x S_k`` mask, no
    host-device sync. Inputs are assumed validated (1-D indices, ``[B, S]``
    documents, a checked window).
    """
    dev = q_index.device
    q_index = q_index.to(torch.int64)
    k_index = k_index.to(device=dev, dtype=torch.int64)
    S_q, S_k = q_index.numel(), k_index.numel()
    rows = 1 if q_doc is None else q_doc.shape[0]
    if S_q == 0 or S_k == 0:
        return torch.zeros(rows, S_q, dtype=torch.int64, device=dev)
    if q_doc is None:
        q_rank = torch.zeros(1, S_q, dtype=torch.int64, device=dev)
        k_rank = torch.zeros(1, S_k, dtype=torch.int64, device=dev)
    else:
        q_doc = q_doc.to(device=dev, dtype=torch.int64)
        k_doc = k_doc.to(device=dev, dtype=torch.int64)
        all_docs = torch.sort(torch.cat([q_doc.flatten(), k_doc.flatten()])).values
        q_rank = torch.searchsorted(all_docs, q_doc.contiguous())
        k_rank = torch.searchsorted(all_docs, k_doc.contiguous())
    lo = torch.minimum(q_index.min(), k_index.min())
    span = torch.maximum(q_index.max(), k_index.max()) - lo + 1
    k_keys = torch.sort(k_rank * span + (k_index - lo), dim=1).values
    q_off = q_index - lo  # in [0, span)
    first = torch.zeros_like(q_off) if window is None else (q_off - (window - 1)).clamp(min=0)
    last = q_off if causal else span - 1
    base = q_rank * span
    return (torch.searchsorted(k_keys, base + last, right=True)
            - torch.searchsorted(k_keys, base + first))


def visible_pairs(q_index, k_index, q_doc=None, k_doc=None, causal=True, *, window=None, batch_size=None) -> int:
    """Number of visible (query, key) pairs, summed over the batch rows.

    With documents, the rows are those of ``q_doc``/``k_doc`` ``[B, S]``.
    Without documents every row has the same count; it is multiplied by
    ``batch_size`` (default 1, i.e. the count for one row). Attention FLOPs
    are then ``4 * H * D * visible_pairs(...)`` over the whole batch. With a
    ``window``, only pairs with ``q_index - k_index < window`` count.

    Counting uses sort + binary search (``visible_counts``), O(S log S) time
    and O(S) memory, so no ``S_q x S_k`` mask is built.
    """
    window = check_window(window)
    q_index = torch.as_tensor(q_index).to(torch.int64)
    k_index = torch.as_tensor(k_index).to(device=q_index.device, dtype=torch.int64)
    if q_index.dim() != 1 or k_index.dim() != 1:
        raise ValueError(
            f"q_index/k_index must be 1-D, got {tuple(q_index.shape)} and {tuple(k_index.shape)}"
        )
    if (q_doc is None) != (k_doc is None):
        raise ValueError("q_doc and k_doc must both be given or both be None")
    S_q, S_k = q_index.numel(), k_index.numel()
    rows = 1 if batch_size is None else int(batch_size)
    if q_doc is not None:
        q_doc = torch.as_tensor(q_doc).to(device=q_index.device, dtype=torch.int64)
        k_doc = torch.as_tensor(k_doc).to(device=q_index.device, dtype=torch.int64)
        if q_doc.dim() != 2 or q_doc.shape[1] != S_q:
            raise ValueError(f"q_doc must have shape (B, {S_q}), got {tuple(q_doc.shape)}")
        B = q_doc.shape[0]
        if k_doc.shape != (B, S_k):
            raise ValueError(f"k_doc must have shape ({B}, {S_k}), got {tuple(k_doc.shape)}")
        if batch_size is not None and int(batch_size) != B:
            raise ValueError(f"batch_size={batch_size} disagrees with q_doc shape {tuple(q_doc.shape)}")
        rows = 1  # the counts already cover every row
    if S_q == 0 or S_k == 0:
        return 0
    if q_doc is None and not causal and window is None:
        return rows * S_q * S_k
    return rows * int(visible_counts(q_index, k_index, q_doc, k_doc, causal, window).sum())
