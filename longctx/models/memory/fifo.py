"""Gated FIFO memory: a bank of m slots written once per chunk, read by cross-attention.

Per chunk of C tokens (a global grid of positions), an attention-pooled summary of the
chunk's last document (``s_c = sum_t softmax_t(w_s . x_t) W_u x_t``) is blended through a
sigmoid write gate with the newest slot and pushed into the bank (the oldest slot drops); a
token reads, with ``q_t = W_q x_t``, the bank as it was before its own chunk, over the
slots of its own document (keys ``W_k slot + age embedding``, values ``W_v slot``).

The recurrence is the op ``longctx.kernels.memory.fifo`` (the definition is there;
``naive_fifo``: `reference`; ``chunk_fifo``: the fast path, all summaries and gates at once,
the blend a diagonal ``affine_scan`` over chunks, one batched cross-attention). Context
parallelism: the bank (m slots and their documents) passes rank to rank through
`state_passing`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from longctx.kernels.memory.fifo import FIFOWeights, chunk_fifo, empty_bank, naive_fifo

from .common import HeadRMSNorm, MemoryModule, compute_dtype


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

    def _project(self, x):
        """q ``[B, S, H, D]``, u ``[B, S, dim]``, score ``[B, S]`` (compute dtype) and the weights."""
        B, S, _ = x.shape
        cdt = compute_dtype(x)
        xf = self._in(x)
        q = self.wq(xf).to(cdt).view(B, S, self.num_heads, self.head_dim)
        weights = FIFOWeights(self.wg.weight, self.wg.bias, self.wk.weight, self.wv.weight, self.age)
        return q, self.wu(xf).to(cdt), self.ws(xf).squeeze(-1).to(cdt), weights

    def forward(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, *,
                retrieve: str = "current") -> torch.Tensor:
        # The bank a token reads is always the chunk-start one: both modes coincide.
        doc = self._begin(x, doc_ids, retrieve, aligned=self.needs_chunk_aligned_cp)
        sp = self.state_passing
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, u, score, weights = self._project(x)
            state = sp.recv_prev(empty_bank(x.shape[0], self.num_slots, self.dim, u.dtype, x.device))
            y, final = chunk_fifo(q, u, score, weights, doc, chunk_size=self.chunk_size, initial_state=state,
                                  output_final_state=True, backend=self.backend)
            out = self._heads_out(y, x)
        return sp.send_next(out, final)

    def reference(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, *,
                  retrieve: str = "current") -> torch.Tensor:
        doc = self._begin(x, doc_ids, retrieve)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, u, score, weights = self._project(x)
            y, _ = naive_fifo(q, u, score, weights, doc, chunk_size=self.chunk_size)
            return self._heads_out(y, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_slots={self.num_slots}"
