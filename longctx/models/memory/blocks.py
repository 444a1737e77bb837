"""Gated-memory blocks of the Transformer (Titans' MAC / MAG / MAL), built from llama pieces.

`longctx.models.llama.Transformer` builds one for each layer listed in `model.memory.layers`;
`model.memory.variant` says how the block combines its memory module (`build_memory`) with
attention:

* **MAL** (memory as a layer): ``x += Mem(norm x); x += Attn(norm x); x += FFN(norm x)``.
* **MAG** (memory as gate): ``a = Attn(n), m = Mem(n), g = sigmoid(W_g n)``,
  ``x += g * a + (1 - g) * m``; then the FFN.
* **MAC** (memory as context): the row is cut into segments (= memory chunks); each segment
  attends (causally, within its document) to ``[persistent tokens ; memory tokens ; segment
  tokens]``, where memory token i is the memory read with query i from the memory *as it was
  at the segment start* (``retrieve="chunk_start"``), placed at token i's position (visible to
  queries j >= i). That attention is segment-local, so MAC needs no attention communication.

MAG / MAL attention is the model's attention function with `model.memory.window` (0 = full
attention): sliding-window attention is a mask of the kernels and CP strategies, not code
here. Memory state passing under context parallelism is handed to the memory module from
outside (`context_parallel_memory`, in the parallel package).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from longctx.config import ModelConfig, ffn_hidden
from longctx.models.llama import Attention, FeedForward, RMSNorm, apply_rope, init_attention_ffn

from . import DEFAULT_CHUNK, build_memory


class SegmentContextAttention(Attention):
    """MAC attention: each segment of C tokens attends to [persistent; memory tokens; itself]."""

    def __init__(self, cfg: ModelConfig, segment: int, n_persistent: int):
        super().__init__(cfg)
        self.segment = segment
        self.persistent = nn.Parameter(torch.zeros(n_persistent, cfg.dim))

    def forward(self, x, mem, cos, sin, doc_ids):
        B, S, _ = x.shape
        C, Hq, Hkv, D = self.segment, self.n_heads, self.n_kv_heads, self.head_dim
        P = self.persistent.shape[0]
        n = -(-S // C)
        pad = n * C - S
        q, k, v = self.qkv(x, cos, sin)
        mk = apply_rope(self.heads(self.wk, mem, Hkv), cos, sin)
        mv = self.heads(self.wv, mem, Hkv)
        persistent = self.persistent.to(x.dtype)
        pk, pv = self.heads(self.wk, persistent, Hkv), self.heads(self.wv, persistent, Hkv)  # [P, Hkv, D], no rotation
        doc = doc_ids if doc_ids is not None else torch.zeros(B, S, dtype=torch.long, device=x.device)
        padt = lambda t: torch.cat([t, t.new_zeros(B, pad, *t.shape[2:])], 1) if pad else t  # noqa: E731
        q, k, v, mk, mv = (padt(t).view(B * n, C, *t.shape[2:]) for t in (q, k, v, mk, mv))
        d = torch.cat([doc, doc.new_full((B, pad), -1)], 1).view(B * n, C) if pad else doc.view(B * n, C)
        keys = torch.cat([pk.expand(B * n, P, Hkv, D), mk, k], 1)
        vals = torch.cat([pv.expand(B * n, P, Hkv, D), mv, v], 1)
        causal = torch.ones(C, C, dtype=torch.bool, device=x.device).tril()
        same = (d[:, :, None] == d[:, None, :]) & causal  # [B*n, C, C]
        mask = torch.cat([torch.ones(B * n, C, P, dtype=torch.bool, device=x.device), same, same], -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2),
                                             attn_mask=mask[:, None], scale=1.0 / math.sqrt(D),
                                             enable_gqa=(Hq != Hkv))
        out = out.transpose(1, 2).reshape(B, n * C, Hq * D)[:, :S]
        return self.wo(out)


def memory_chunk(cfg: ModelConfig) -> int:
    """The memory's chunk (MAC's segment): `model.memory.chunk_size`, or the module's default."""
    return cfg.memory.chunk_size or DEFAULT_CHUNK[cfg.memory.type]


class MemoryBlock(nn.Module):
    """MAC / MAG / MAL block around a memory module (`cfg.memory`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        mcfg = cfg.memory
        self.kind = self.variant = mcfg.variant
        chunk = memory_chunk(cfg)
        self.memory = build_memory(mcfg.type, cfg.dim, mcfg.heads or cfg.n_heads, chunk_size=chunk,
                                   **dict(mcfg.options))
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, ffn_hidden(cfg))
        if self.variant == "mac":
            self.attention = SegmentContextAttention(cfg, chunk, mcfg.persistent_tokens)
        else:
            self.attention = Attention(cfg, mcfg.window or None)
        if self.variant == "mal":
            self.memory_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if self.variant == "mag":
            self.gate = nn.Linear(cfg.dim, cfg.dim, bias=True)

    @property
    def cp_chunk(self) -> int:
        """Under context parallelism every rank's slice must be a multiple of this (1 = any)."""
        aligned = self.memory.needs_chunk_aligned_cp or self.variant == "mac"
        return self.memory.chunk_size if aligned else 1

    def forward(self, x, cos, sin, doc_ids):
        if self.variant == "mal":
            x = x + self.memory(self.memory_norm(x), doc_ids)
            x = x + self.attention(self.attention_norm(x), cos, sin, doc_ids)
        elif self.variant == "mag":
            h = self.attention_norm(x)
            a = self.attention(h, cos, sin, doc_ids)
            m = self.memory(h, doc_ids)
            g = torch.sigmoid(self.gate(h))
            x = x + g * a + (1 - g) * m
        else:  # mac
            h = self.attention_norm(x)
            mem = self.memory(h, doc_ids, retrieve="chunk_start")
            x = x + self.attention(h, mem, cos, sin, doc_ids)
        return x + self.feed_forward(self.ffn_norm(x))

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        """Attention and FFN as in a plain block; the memory's own init, with its output
        projection (which writes into the residual stream) at `residual_std`; MAG's gate
        starts at 0 (an even mix of attention and memory)."""
        init_attention_ffn(self.attention, self.feed_forward, std, residual_std)
        for mod in self.modules():
            if isinstance(mod, RMSNorm):
                mod.reset_parameters()
        self.memory.reset_parameters()
        nn.init.normal_(self.memory.wo.weight, mean=0.0, std=residual_std)
        if self.variant == "mac":
            nn.init.normal_(self.attention.persistent, mean=0.0, std=std)
        if self.variant == "mag":
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)


__all__ = ["MemoryBlock", "SegmentContextAttention", "memory_chunk"]
