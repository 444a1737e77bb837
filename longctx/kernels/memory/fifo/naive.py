"""Gated FIFO memory, token by token: the definition (see ``fifo/__init__.py``)."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..common import doc_tensor, masked_softmax


class FIFOWeights(NamedTuple):
    """The learned maps the recurrence applies to its state: the write gate ``sigmoid(W_g s +
    b_g)`` (``gate_weight [dim, dim]``, ``gate_bias [dim]``), slot keys ``W_k slot + age``
    and values ``W_v slot`` (``key_weight``, ``value_weight [H*D, dim]``, ``age [m, H*D]``,
    row 0 the oldest slot's; m = the number of slots)."""

    gate_weight: torch.Tensor
    gate_bias: Optional[torch.Tensor]
    key_weight: torch.Tensor
    value_weight: torch.Tensor
    age: torch.Tensor


def empty_bank(B: int, m: int, dim: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The state with no slot written: (bank ``[B, m, dim]`` zeros, tags ``[B, m]`` NaN, fp64)."""
    bank = torch.zeros(B, m, dim, dtype=dtype, device=device)
    tags = torch.full((B, m), float("nan"), dtype=torch.float64, device=device)
    return bank, tags


def gate(w: FIFOWeights, summ: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(F.linear(summ.to(w.gate_weight.dtype), w.gate_weight, w.gate_bias).to(summ.dtype))


def slots_kv(w: FIFOWeights, slots: torch.Tensor, H: int, D: int):
    """slots ``[..., m, dim]`` (oldest..newest) -> keys (with age embedding), values ``[..., m, H, D]``."""
    m = w.age.shape[0]
    age = w.age.to(slots.dtype).flip(0).view(m, H, D)  # newest slot has age 0
    sp = slots.to(w.key_weight.dtype)
    k = F.linear(sp, w.key_weight).to(slots.dtype).view(*slots.shape[:-1], H, D) + age
    v = F.linear(sp, w.value_weight).to(slots.dtype).view(*slots.shape[:-1], H, D)
    return k, v


def read(q, bank_k, bank_v, valid):
    """q ``[..., C, H, D]``; bank_k/v ``[..., m, H, D]``; valid ``[..., C, m]`` -> ``[..., C, H, D]``."""
    scores = torch.einsum("...chd,...ahd->...hca", q, bank_k) / math.sqrt(q.shape[-1])
    p = masked_softmax(scores, valid.unsqueeze(-3))
    return torch.einsum("...hca,...ahd->...chd", p, bank_v)


def naive_fifo(q, u, score, weights: FIFOWeights, doc_ids: Optional[torch.Tensor] = None, *, chunk_size: int,
               initial_state=None, output_final_state: bool = False):
    """The FIFO memory token by token.

    q ``[B, S, H, D]`` (read queries), u ``[B, S, dim]`` (what a chunk summary pools),
    score ``[B, S]`` (pooling logits); doc_ids ``[B, S]``. initial_state: ``(bank [B, m, dim],
    tags [B, m])`` (tags: the document of each slot, fp64, NaN = empty; None: empty).
    Returns ``(y [B, S, H, D], final (bank, tags) or None)``: the bank after the last
    complete chunk.
    """
    B, S, H, D = q.shape
    C = chunk_size
    doc = doc_tensor(doc_ids, B, S, q.device)
    if initial_state is None:
        initial_state = empty_bank(B, weights.age.shape[0], u.shape[-1], u.dtype, u.device)
    bank, tags = initial_state
    buf_u, buf_s, buf_d = [], [], []
    ys = []
    for t in range(S):
        kx, vx = slots_kv(weights, bank, H, D)
        valid = (tags == doc[:, t].to(torch.float64)[:, None])[:, None, :]  # [B, 1, m]
        ys.append(read(q[:, t, None], kx, vx, valid)[:, 0])
        buf_u.append(u[:, t])
        buf_s.append(score[:, t])
        buf_d.append(doc[:, t])
        if t % C == C - 1:
            d_last = doc[:, t]
            sel = torch.stack(buf_d, 1) == d_last[:, None]
            w = masked_softmax(torch.stack(buf_s, 1), sel)
            summ = torch.einsum("bc,bcd->bd", w, torch.stack(buf_u, 1))
            g = gate(weights, summ)
            cont = (tags[:, -1] == d_last.to(torch.float64)).to(g.dtype)[:, None]
            cand = g * summ + (1 - g) * cont * bank[:, -1]
            bank = torch.cat([bank[:, 1:], cand[:, None]], dim=1)
            tags = torch.cat([tags[:, 1:], d_last.to(torch.float64)[:, None]], dim=1)
            buf_u, buf_s, buf_d = [], [], []
    y = torch.stack(ys, dim=1) if ys else q.new_zeros(B, 0, H, D)
    return y, ((bank, tags) if output_final_state else None)


__all__ = ["naive_fifo", "FIFOWeights", "empty_bank", "gate", "slots_kv", "read"]
