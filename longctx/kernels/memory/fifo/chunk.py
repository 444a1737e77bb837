"""Gated FIFO memory, chunk-parallel (see ``fifo/__init__.py``). Same arguments and state as
``naive.naive_fifo``."""

from __future__ import annotations

from typing import Optional

import torch

from ..common import doc_tensor, masked_softmax, pad_seq
from ..scan import affine_scan
from .naive import FIFOWeights, empty_bank, gate, read, slots_kv


def chunk_fifo(q, u, score, weights: FIFOWeights, doc_ids: Optional[torch.Tensor] = None, *, chunk_size: int,
               initial_state=None, output_final_state: bool = False, backend: str = "auto"):
    """All summaries and gates at once; the blend is a diagonal linear recurrence over chunks
    (``affine_scan``); the bank seen by chunk c is the window of the m previous candidates,
    gathered for all chunks at once; one batched cross-attention."""
    B, S, H, D = q.shape
    C, m = chunk_size, weights.age.shape[0]
    doc = doc_tensor(doc_ids, B, S, q.device)
    if initial_state is None:
        initial_state = empty_bank(B, m, u.shape[-1], u.dtype, u.device)
    bank, tags = initial_state
    n = -(-S // C)
    pad = n * C - S
    u = pad_seq(u, pad, 0.0)
    score = pad_seq(score, pad, 0.0)
    q = pad_seq(q, pad, 0.0).view(B, n, C, H, D)
    doc_p = pad_seq(doc, pad, None).view(B, n, C)
    real = (torch.arange(n * C, device=q.device) < S).view(1, n, C)
    last = doc_p[..., -1]  # [B, n] document of each chunk's last token
    sel = (doc_p == last[..., None]) & real
    w = masked_softmax(score.view(B, n, C), sel)
    summ = torch.einsum("bnc,bncd->bnd", w, u.view(B, n, C, -1))  # [B, n, dim]
    g = gate(weights, summ)
    lastf = last.to(torch.float64)
    prev_tag = torch.cat([tags[:, -1:], lastf[:, :-1]], dim=1)  # [B, n]
    cont = (lastf == prev_tag).to(g.dtype)[..., None]
    starts, final = affine_scan(bank[:, -1:, :], (g * summ)[:, :, None, :], gamma=(1 - g) * cont, backend=backend)
    cands = torch.cat([starts[:, 1:, 0], final], dim=1)  # [B, n, dim]: cand_c
    ext = torch.cat([bank, cands], dim=1)  # [B, m + n, dim]
    ext_tags = torch.cat([tags, lastf], dim=1)
    idx = torch.arange(n, device=q.device)[:, None] + torch.arange(m, device=q.device)[None, :]
    # chunk c reads ext[c : c + m] (oldest..newest = the m slots before its own candidate)
    kx, vx = slots_kv(weights, ext[:, idx], H, D)  # [B, n, m, H, D]
    valid = ext_tags[:, idx][:, :, None, :] == doc_p[..., None].to(torch.float64)  # [B, n, C, m]
    y = read(q, kx, vx, valid).reshape(B, n * C, H, D)[:, :S]
    if not output_final_state:
        return y, None
    keep = n if pad == 0 else n - 1  # the bank after the last *complete* chunk
    return y, (ext[:, keep:keep + m], ext_tags[:, keep:keep + m])


__all__ = ["chunk_fifo"]
