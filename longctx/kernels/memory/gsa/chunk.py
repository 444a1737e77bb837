"""Gated Slot Attention, chunk-parallel (see ``gsa/__init__.py``). Same arguments and state
layout as ``naive.naive_gsa``; `GSAChunks` also gives the slice's affine map (diagonal)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from ..common import check_retrieve, chunk_geometry, doc_tensor, pad_seq, zero_diagonal
from ..scan import affine_scan

#: The factorised intra-chunk form multiplies exp(G_t) by exp(-G_i); it is used for a block of
#: chunks whose cumulative log-decay stays above this (exp(60) is far from fp32 overflow).
FACTORISE_MIN_LOG_DECAY = -60.0


def _intra(qc, kc, vc, Gam, bb, mask, contf, XK, XV, scale, retrieve):
    """Outputs of a block of chunks. qc/kc/vc [B,H,n,C,D], Gam/bb [B,H,n,C,M], mask [B,1,n,C,C],
    contf [B,1,n,C], XK/XV [B,H,n,D,M] chunk-start states."""
    cf = contf[..., None]
    eG = torch.exp(Gam)
    if retrieve == "chunk_start":
        s = cf * (qc @ XK) * scale
        p = torch.softmax(s, dim=-1)
        return cf * (p @ XV.transpose(-1, -2))
    diff = zero_diagonal(Gam[..., :, None, :] - Gam[..., None, :, :], (-3, -2))  # see decay_matrix
    diff = diff.masked_fill(~mask[..., None], float("-inf"))
    Dm = torch.exp(diff)  # [B,H,n,C,C,M]
    DB = Dm * bb[..., None, :, :]
    QK = qc @ kc.transpose(-1, -2)
    s_loc = torch.einsum("bhnti,bhntim->bhntm", QK, DB)
    s_car = cf * eG * (qc @ XK)
    p = torch.softmax((s_loc + s_car) * scale, dim=-1)
    A2 = torch.einsum("bhntm,bhntim->bhnti", p, DB)
    return A2 @ vc + cf * ((p * eG) @ XV.transpose(-1, -2))


def _intra_factorised(qc, kc, vc, Gam, bb, mask, contf, XK, XV, scale):
    """`_intra` as GEMMs: exp(G_t - G_i) = exp(G_t) exp(-G_i), valid while -G stays small."""
    cf = contf[..., None]
    eG = torch.exp(Gam)
    bt = bb * torch.exp(-Gam)  # [B,H,n,C,M]
    maskf = mask.to(qc.dtype)  # [B,1,n,C,C]
    QK = (qc @ kc.transpose(-1, -2)) * maskf
    s = eG * (QK @ bt + cf * (qc @ XK))
    p = torch.softmax(s * scale, dim=-1)
    pe = p * eG
    A2 = (pe @ bt.transpose(-1, -2)) * maskf
    return A2 @ vc + cf * (pe @ XV.transpose(-1, -2))


class GSAChunks:
    """The chunk maps of one slice, built once: ``.output(initial_state)`` -> (y, final state);
    ``.affine_map()`` -> the slice's map ``X_out = X_in * T[..., None, :] + B`` from a zero
    state (T ``[B, H, M]``, B ``[B, H, 2D, M]``); ``.reset``: the zero state."""

    def __init__(self, q, k, v, log_alpha, doc_ids=None, *, chunk_size: int, backend: str = "auto"):
        B, H, S, D = q.shape
        M = log_alpha.shape[-1]
        C = chunk_size
        doc = doc_tensor(doc_ids, B, S, q.device)
        bb = -torch.expm1(log_alpha)  # 1 - alpha, accurate near alpha = 1
        n = -(-S // C)
        pad = n * C - S
        q, k, v = (pad_seq(t, pad, 0.0, dim=2) for t in (q, k, v))
        lg, bb = pad_seq(log_alpha, pad, 0.0, dim=2), pad_seq(bb, pad, 0.0, dim=2)  # neutral: alpha=1, no write
        doc_p = pad_seq(doc, pad, None, dim=1)
        cont, mask, _ = chunk_geometry(doc_p, C)
        self.contf = cont[:, None].to(q.dtype)  # [B,1,n,C]
        self.mask = mask
        self.qc, self.kc, self.vc = (t.reshape(B, H, n, C, D) for t in (q, k, v))
        self.bbc = bb.reshape(B, H, n, C, M)
        self.Gam = Gam = torch.cumsum(lg.reshape(B, H, n, C, M), dim=3)
        # chunk-end state contributions and the chunk transition (diagonal over slots)
        endm = mask[:, :, -1, :][:, None, :, :, None]  # [B,1,n,C,1]: same doc as the chunk's last token
        dlast = Gam[..., -1:, :] - Gam
        dlast = torch.cat([dlast[..., :-1, :], torch.zeros_like(dlast[..., -1:, :])], dim=-2)  # exact 0, no grad
        dC = torch.exp(dlast.masked_fill(~endm, float("-inf")))  # [B,H,n,C,M]
        wb = self.bbc * dC
        Bm = torch.einsum("bhnir,bhnim->bhnrm", torch.cat([self.kc, self.vc], -1), wb)  # [B,H,n,2D,M]
        gamma = torch.exp(Gam[..., -1, :]) * self.contf[..., -1:]  # [B,H,n,M]
        self.Bm = Bm.reshape(B * H, n, 2 * D, M)
        self.gamma = gamma.reshape(B * H, n, M)
        self.reset = q.new_zeros(B, H, 2 * D, M)
        self.shape, self.n, self.C, self.backend = (B, H, S, D, M), n, C, backend

    def affine_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, S, D, M = self.shape
        _, B_r = affine_scan(self.reset.reshape(B * H, 2 * D, M), self.Bm, gamma=self.gamma, backend=self.backend)
        return torch.prod(self.gamma, dim=1).view(B, H, M), B_r.view(B, H, 2 * D, M)

    def output(self, initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
               retrieve: str = "current", block_chunks: int = 64):
        """(y ``[B, H, S, D]``, final ``X [B, H, 2D, M]`` or None); `block_chunks` chunks at a time."""
        check_retrieve(retrieve)
        B, H, S, D, M = self.shape
        n, C = self.n, self.C
        x0 = (self.reset if initial_state is None else initial_state).reshape(B * H, 2 * D, M)
        starts, final = affine_scan(x0, self.Bm, gamma=self.gamma, backend=self.backend)
        starts = starts.view(B, H, n, 2 * D, M)
        XK, XV = starts[..., :D, :], starts[..., D:, :]
        scale = 1.0 / math.sqrt(D)
        Gam = self.Gam
        outs = []
        step = max(1, block_chunks)
        for c0 in range(0, n, step):
            sl = slice(c0, min(n, c0 + step))
            args = (self.qc[:, :, sl], self.kc[:, :, sl], self.vc[:, :, sl], Gam[:, :, sl], self.bbc[:, :, sl],
                    self.mask[:, None, sl], self.contf[:, :, sl], XK[:, :, sl], XV[:, :, sl])
            if retrieve == "current" and bool(Gam[:, :, sl, -1].min() > FACTORISE_MIN_LOG_DECAY):
                outs.append(_intra_factorised(*args, scale))
            elif torch.is_grad_enabled() and retrieve == "current":
                outs.append(checkpoint(_intra, *args, scale, retrieve, use_reentrant=False))
            else:
                outs.append(_intra(*args, scale, retrieve))
        y = torch.cat(outs, dim=2).reshape(B, H, n * C, D)[:, :, :S] if outs else self.qc.new_zeros(B, H, 0, D)
        return y, (final.view(B, H, 2 * D, M) if output_final_state else None)


def chunk_gsa(q, k, v, log_alpha, doc_ids=None, *, chunk_size: int, initial_state: Optional[torch.Tensor] = None,
              output_final_state: bool = False, retrieve: str = "current", block_chunks: int = 64,
              backend: str = "auto"):
    """Gated Slot Attention, chunk-parallel: (y ``[B, H, S, D]``, final X or None)."""
    chunks = GSAChunks(q, k, v, log_alpha, doc_ids, chunk_size=chunk_size, backend=backend)
    return chunks.output(initial_state, output_final_state, retrieve, block_chunks)


__all__ = ["GSAChunks", "chunk_gsa", "FACTORISE_MIN_LOG_DECAY"]
