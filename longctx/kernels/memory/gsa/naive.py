"""Gated Slot Attention, token by token: the definition (see ``gsa/__init__.py``)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..common import check_retrieve, doc_tensor


def to_slots(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """State ``X = [K~^T ; V~^T]`` ``[B, H, 2D, M]`` -> (K~, V~) ``[B, H, M, D]`` each."""
    D = X.shape[-2] // 2
    return X[..., :D, :].transpose(-1, -2), X[..., D:, :].transpose(-1, -2)


def from_slots(Kt: torch.Tensor, Vt: torch.Tensor) -> torch.Tensor:
    return torch.cat([Kt.transpose(-1, -2), Vt.transpose(-1, -2)], dim=-2)


def naive_gsa(q, k, v, log_alpha, doc_ids: Optional[torch.Tensor] = None, *, chunk_size: int,
              initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
              retrieve: str = "current"):
    """The GSA recurrence token by token.

    q, k, v ``[B, H, S, D]``; log_alpha ``[B, H, S, M]`` (log forget gates, <= 0); doc_ids
    ``[B, S]``; chunk_size: the grid of ``retrieve="chunk_start"``. initial_state: the state
    ``X = [K~^T ; V~^T]`` ``[B, H, 2D, M]`` before token 0, belonging to token 0's document
    (None: zeros). Returns ``(y [B, H, S, D], final X or None)``.
    """
    check_retrieve(retrieve)
    B, H, S, D = q.shape
    M = log_alpha.shape[-1]
    doc = doc_tensor(doc_ids, B, S, q.device)
    C = chunk_size
    alpha, bb = torch.exp(log_alpha), -torch.expm1(log_alpha)
    if initial_state is None:
        Kt = q.new_zeros(B, H, M, D)
        Vt = q.new_zeros(B, H, M, D)
    else:
        Kt, Vt = to_slots(initial_state)
    K0, V0 = Kt, Vt
    scale = 1.0 / math.sqrt(D)
    ys = []
    for t in range(S):
        reset = (doc[:, t] != doc[:, t - 1]) if t > 0 else torch.zeros(B, dtype=torch.bool, device=q.device)
        rs = reset.view(B, 1, 1, 1)
        Kt = torch.where(rs, torch.zeros_like(Kt), Kt)
        Vt = torch.where(rs, torch.zeros_like(Vt), Vt)
        if t % C == 0:
            K0, V0 = Kt, Vt
        else:
            K0 = torch.where(rs, Kt, K0)
            V0 = torch.where(rs, Vt, V0)
        if retrieve == "chunk_start":
            p = torch.softmax(torch.einsum("bhmd,bhd->bhm", K0, q[:, :, t]) * scale, -1)
            ys.append(torch.einsum("bhmd,bhm->bhd", V0, p))
        a = alpha[:, :, t, :, None]
        b = bb[:, :, t, :, None]
        Kt = a * Kt + b * k[:, :, t, None, :]
        Vt = a * Vt + b * v[:, :, t, None, :]
        if retrieve == "current":
            p = torch.softmax(torch.einsum("bhmd,bhd->bhm", Kt, q[:, :, t]) * scale, -1)
            ys.append(torch.einsum("bhmd,bhm->bhd", Vt, p))
    y = torch.stack(ys, dim=2) if ys else q.new_zeros(B, H, 0, D)
    return y, (from_slots(Kt, Vt) if output_final_state else None)


__all__ = ["naive_gsa", "to_slots", "from_slots"]
