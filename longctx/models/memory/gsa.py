"""Gated Slot Attention (Zhang et al., "Gated Slot Attention for Efficient Linear-Time
Sequence Modeling").

Per head, two slot memories of M slots with a slot-wise forget gate
``alpha_t = sigmoid(w x_t + b) ** (1 / tau)`` (in (0, 1)^M; tau damps it, as in the paper):

    K~_t = diag(alpha_t) K~_{t-1} + (1 - alpha_t) k_t^T          [M, d_k]
    V~_t = diag(alpha_t) V~_{t-1} + (1 - alpha_t) v_t^T          [M, d_v]
    o_t  = V~_t^T softmax(K~_t q_t / sqrt(d_k))

i.e. two gated linear-attention passes (the first reads the keys with q, the second reads
the values with the slot probabilities) joined by a softmax over the slots.

The recurrence is the op ``longctx.kernels.memory.gsa`` (``naive_gsa``: `reference`;
``chunk_gsa`` / ``GSAChunks``: the fast path, chunked with ``affine_scan``; the chunked
form is described there). States reset to 0 at document starts.

Context parallelism: affine fold through `state_passing` (one all-gather of every rank's
(gate product, state from zero); the state is independent of the queries, so both passes
fold at once).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longctx.kernels.memory.gsa import GSAChunks, naive_gsa

from .common import HeadRMSNorm, MemoryModule, compute_dtype


class GatedSlotAttention(MemoryModule):
    name = "gsa"
    needs_chunk_aligned_cp = False  # exact for any chunking: the chunk size is only a compute tile

    def __init__(self, dim: int, num_heads: int, chunk_size: int = 32, *, num_slots: int = 32,
                 gate_temperature: float = 8.0, head_dim: Optional[int] = None, backend: str = "auto",
                 block_chunks: int = 64):
        super().__init__(dim, num_heads, chunk_size, head_dim, backend)
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots, self.tau, self.block_chunks = num_slots, float(gate_temperature), block_chunks
        H, D, M = num_heads, self.head_dim, num_slots
        self.wq = nn.Linear(dim, H * D, bias=False)
        self.wk = nn.Linear(dim, H * D, bias=False)
        self.wv = nn.Linear(dim, H * D, bias=False)
        self.wf = nn.Linear(dim, H * M, bias=True)  # slot forget-gate logits
        self.wo = nn.Linear(H * D, dim, bias=False)
        self.norm = HeadRMSNorm(D)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: Optional[float] = None) -> None:
        std = std or 1.0 / math.sqrt(self.dim)
        for lin in (self.wq, self.wk, self.wv, self.wo, self.wf):
            nn.init.normal_(lin.weight, std=std)
        # alpha = sigmoid(b)^(1/tau) spread over slots: some fast, some slow slots
        self.wf.bias.copy_(torch.linspace(0.0, 6.0, self.num_slots).repeat(self.num_heads))
        self.norm.weight.fill_(1.0)

    def _project(self, x):
        B, S, _ = x.shape
        H, D, M = self.num_heads, self.head_dim, self.num_slots
        cdt = compute_dtype(x)
        x = self._in(x)
        heads = lambda t, d: t.view(B, S, H, d).transpose(1, 2).to(cdt)  # noqa: E731
        q, k, v = heads(self.wq(x), D), heads(self.wk(x), D), heads(self.wv(x), D)
        return q, k, v, F.logsigmoid(heads(self.wf(x), M)) / self.tau  # log alpha [B,H,S,M]

    def forward(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, *,
                retrieve: str = "current") -> torch.Tensor:
        # "chunk_start" reads chunk-start states: then the chunk grid must be global
        doc = self._begin(x, doc_ids, retrieve, aligned=retrieve == "chunk_start")
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v, log_alpha = self._project(x)
            chunks = GSAChunks(q, k, v, log_alpha, doc, chunk_size=self.chunk_size, backend=self.backend)
            x0 = self.state_passing.fold(chunks.affine_map, chunks.reset, doc[:, 0], doc[:, -1])
            y, _ = chunks.output(x0, retrieve=retrieve, block_chunks=self.block_chunks)
            return self._heads_out(y.transpose(1, 2), x)

    def reference(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, *,
                  retrieve: str = "current") -> torch.Tensor:
        doc = self._begin(x, doc_ids, retrieve)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v, log_alpha = self._project(x)
            y, _ = naive_gsa(q, k, v, log_alpha, doc, chunk_size=self.chunk_size, retrieve=retrieve)
            return self._heads_out(y.transpose(1, 2), x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_slots={self.num_slots}, tau={self.tau}"
