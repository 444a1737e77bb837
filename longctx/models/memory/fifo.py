"""Gated FIFO memory: a bank of m slots written once per chunk, read by cross-attention.

(The memory of recurrent memory-augmented transformers with chunked attention.) For
each chunk c of C tokens (a global grid of positions):

    s_c    = sum_t softmax_t(w_s . x_t) u_t,   u_t = W_u x_t     (attention-pooled summary
                                                                  of the chunk's last document)
    g_c    = sigmoid(W_g s_c + b_g)                               (per-channel write gate)
    cand_c = g_c * s_c + (1 - g_c) * cand_{c-1}                   (sigmoid-gated blend with the
                                                                  newest slot, same document only)
    bank_c = [bank_{c-1}[1:], cand_c]                             (FIFO: the oldest slot drops)

A token of chunk c reads ``bank_{c-1}`` (the state before its own chunk, so nothing leaks
from the future): softmax attention of ``q_t = W_q x_t`` over the slots of its own
document, keys ``W_k slot + age embedding``, values ``W_v slot``; no visible slot gives 0.
Documents: a slot belongs to the document of its chunk's last token; a token sees only
slots of its own document, and the blend restarts at a new document (the state resets).

Fast path: all summaries and gates at once; the blend is a diagonal linear recurrence
over chunks (``longctx.kernels.recurrence.affine_scan``); the bank seen by chunk c is
the window of the m previous candidates, gathered for all chunks at once; one batched
cross-attention. Context parallelism: the bank (m slots and their documents) passes rank
to rank.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from longctx.kernels.recurrence import affine_scan

from .common import HeadRMSNorm, MemoryModule, compute_dtype, doc_tensor, masked_softmax, pad_seq
from .state_passing import group_info, recv_prev, send_next


class GatedFIFOMemory(MemoryModule):
    name = "fifo"

    def __init__(self, dim: int, num_heads: int, chunk_size: int = 64, *, num_slots: int = 8,
                 head_dim: Optional[int] = None, backend: str = "auto", gate_bias: float = 0.0):
        super().__init__(dim, num_heads, chunk_size, head_dim, backend)
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        H, D = num_heads, self.head_dim
        self.wu = nn.Linear(dim, dim, bias=False)
        self.ws = nn.Linear(dim, 1, bias=False)
        self.wg = nn.Linear(dim, dim, bias=True)
        self.wq = nn.Linear(dim, H * D, bias=False)
        self.wk = nn.Linear(dim, H * D, bias=False)
        self.wv = nn.Linear(dim, H * D, bias=False)
        self.age = nn.Parameter(torch.zeros(num_slots, H * D))
        self.wo = nn.Linear(H * D, dim, bias=False)
        self.norm = HeadRMSNorm(D)
        self._gate_bias = gate_bias
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: Optional[float] = None) -> None:
        std = std or 1.0 / math.sqrt(self.dim)
        for lin in (self.wu, self.ws, self.wg, self.wq, self.wk, self.wv, self.wo):
            nn.init.normal_(lin.weight, std=std)
        self.wg.bias.fill_(self._gate_bias)
        nn.init.normal_(self.age, std=std)
        self.norm.weight.fill_(1.0)

    def _empty_bank(self, B, dtype, device):
        bank = torch.zeros(B, self.num_slots, self.dim, dtype=dtype, device=device)
        tags = torch.full((B, self.num_slots), float("nan"), dtype=torch.float64, device=device)
        return bank, tags

    def _read(self, q, bank_k, bank_v, valid):
        """q [..., C, H, D]; bank_k/v [..., m, H, D]; valid [..., C, m] -> [..., C, H, D]."""
        scores = torch.einsum("...chd,...ahd->...hca", q, bank_k) / math.sqrt(self.head_dim)
        p = masked_softmax(scores, valid.unsqueeze(-3))
        return torch.einsum("...hca,...ahd->...chd", p, bank_v)

    def _slots_kv(self, slots):
        """slots [..., m, dim] (oldest..newest) -> keys (with age embedding), values [..., m, H, D]."""
        H, D, m = self.num_heads, self.head_dim, self.num_slots
        age = self.age.to(slots.dtype).flip(0).view(m, H, D)  # newest slot has age 0
        sp = self._in(slots)
        k = self.wk(sp).to(slots.dtype).view(*slots.shape[:-1], H, D) + age
        v = self.wv(sp).to(slots.dtype).view(*slots.shape[:-1], H, D)
        return k, v

    def _output(self, y, x):
        B, S = y.shape[:2]
        return self.wo(self.norm(y).reshape(B, S, -1).to(self._param_dtype())).to(x.dtype)

    def forward(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, group=None, *,
                retrieve: str = "current") -> torch.Tensor:
        # The bank a token reads is always the chunk-start one: both modes coincide.
        self._check_x(x)
        self._check_retrieve(retrieve)
        B, S, _ = x.shape
        world, rank = group_info(group)
        self._check_cp_alignment(S, world, rank)
        doc = doc_tensor(doc_ids, B, S, x.device)
        H, D, m, C = self.num_heads, self.head_dim, self.num_slots, self.chunk_size
        with torch.autocast(device_type=x.device.type, enabled=False):
            cdt = compute_dtype(x)
            xf = self._in(x)
            bank, tags = self._empty_bank(B, cdt, x.device)
            if world > 1:
                got = recv_prev([bank, tags], group)
                if got is not None:
                    bank, tags = got
            n = -(-S // C)
            pad = n * C - S
            u = pad_seq(self.wu(xf).to(cdt), pad, 0.0)
            score = pad_seq(self.ws(xf).squeeze(-1).to(cdt), pad, 0.0)
            q = pad_seq(self.wq(xf).to(cdt), pad, 0.0).view(B, n, C, H, D)
            doc_p = pad_seq(doc, pad, None).view(B, n, C)
            real = (torch.arange(n * C, device=x.device) < S).view(1, n, C)
            last = doc_p[..., -1]  # [B, n] document of each chunk's last token
            sel = (doc_p == last[..., None]) & real
            w = masked_softmax(score.view(B, n, C), sel)
            summ = torch.einsum("bnc,bncd->bnd", w, u.view(B, n, C, -1))  # [B, n, dim]
            g = torch.sigmoid(self.wg(self._in(summ)).to(cdt))
            lastf = last.to(torch.float64)
            prev_tag = torch.cat([tags[:, -1:], lastf[:, :-1]], dim=1)  # [B, n]
            cont = (lastf == prev_tag).to(cdt)[..., None]
            starts, final = affine_scan(bank[:, -1:, :], (g * summ)[:, :, None, :],
                                        gamma=(1 - g) * cont, backend=self.backend)
            cands = torch.cat([starts[:, 1:, 0], final], dim=1)  # [B, n, dim]: cand_c
            ext = torch.cat([bank, cands], dim=1)  # [B, m + n, dim]
            ext_tags = torch.cat([tags, lastf], dim=1)
            idx = torch.arange(n, device=x.device)[:, None] + torch.arange(m, device=x.device)[None, :]
            # chunk c reads ext[c : c + m] (oldest..newest = the m slots before its own candidate)
            kx, vx = self._slots_kv(ext[:, idx])  # [B, n, m, H, D]
            valid = ext_tags[:, idx][:, :, None, :] == doc_p[..., None].to(torch.float64)  # [B, n, C, m]
            y = self._read(q, kx, vx, valid).reshape(B, n * C, H, D)[:, :S]
            out = self._output(y, x)
            # final state: the bank after the last *complete* chunk
            keep = n if pad == 0 else n - 1
            fin_bank = ext[:, keep:keep + m].contiguous()
            fin_tags = ext_tags[:, keep:keep + m].contiguous()
        if world > 1:
            out = send_next(out, [fin_bank, fin_tags], group)
        return out

    def reference(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, *,
                  retrieve: str = "current") -> torch.Tensor:
        self._check_x(x)
        self._check_retrieve(retrieve)
        B, S, _ = x.shape
        doc = doc_tensor(doc_ids, B, S, x.device)
        H, D, C = self.num_heads, self.head_dim, self.chunk_size
        with torch.autocast(device_type=x.device.type, enabled=False):
            cdt = compute_dtype(x)
            xf = self._in(x)
            bank, tags = self._empty_bank(B, cdt, x.device)
            buf_u, buf_s, buf_d = [], [], []
            ys = []
            for t in range(S):
                xt = xf[:, t]
                kx, vx = self._slots_kv(bank)
                valid = (tags == doc[:, t].to(torch.float64)[:, None])[:, None, :]  # [B, 1, m]
                ys.append(self._read(self.wq(xt).to(cdt).view(B, 1, H, D), kx, vx, valid)[:, 0])
                buf_u.append(self.wu(xt).to(cdt))
                buf_s.append(self.ws(xt).squeeze(-1).to(cdt))
                buf_d.append(doc[:, t])
                if t % C == C - 1:
                    d_last = doc[:, t]
                    sel = torch.stack(buf_d, 1) == d_last[:, None]
                    w = masked_softmax(torch.stack(buf_s, 1), sel)
                    summ = torch.einsum("bc,bcd->bd", w, torch.stack(buf_u, 1))
                    g = torch.sigmoid(self.wg(self._in(summ)).to(cdt))
                    cont = (tags[:, -1] == d_last.to(torch.float64)).to(cdt)[:, None]
                    cand = g * summ + (1 - g) * cont * bank[:, -1]
                    bank = torch.cat([bank[:, 1:], cand[:, None]], dim=1)
                    tags = torch.cat([tags[:, 1:], d_last.to(torch.float64)[:, None]], dim=1)
                    buf_u, buf_s, buf_d = [], [], []
            y = torch.stack(ys, dim=1)
            return self._output(y, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_slots={self.num_slots}"
