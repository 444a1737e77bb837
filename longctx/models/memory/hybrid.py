"""Hybrid models: attention + gated memory layers (Titans' MAC / MAG / MAL), built from
`longctx.models.llama` pieces.

    model = build_hybrid_model(model_cfg, vocab_size, memory_cfg)
    logits = model(input_ids, position_ids, doc_ids)     # same signature as llama.Transformer
    model.set_attention(fn)          # full-attention layers call fn (e.g. the CP strategy)
    model.set_cp_group(group)        # memory layers pass state over this group; sliding-window
                                     # attention fetches its halo from the previous ranks

Layer kinds (`memory_cfg`, see `MemoryConfig`):
- plain layers: llama `TransformerBlock` (full attention through `fn`), or sliding-window
  attention for indices in `swa_layers`;
- memory layers (`layers`), by `variant`:
  * **MAL** (memory as a layer): ``x += Mem(norm x); x += Attn(norm x); x += FFN(norm x)``,
    Attn sliding-window (`window`) or full when window = 0.
  * **MAG** (memory as gate): ``a = Attn(n), m = Mem(n), g = sigmoid(W_g n)``,
    ``x += g * a + (1 - g) * m``; then the FFN.
  * **MAC** (memory as context): the row is cut into segments (= memory chunks); each
    segment attends (causally, within its document) to ``[persistent tokens ; memory
    tokens ; segment tokens]``, where memory token i is the memory read with query i
    from the memory *as it was at the segment start* (``retrieve="chunk_start"``), placed at
    token i's position (visible to queries j >= i). Attention is segment-local, so MAC needs
    no attention communication under CP.

Sliding-window attention: key j is visible to query i iff same document and
``0 <= pos_i - pos_j < window`` (positions restart at each document, so this is exactly
"causal and i - j < window" inside a document). Under CP (contiguous slices) each rank
all-gathers the last ``window - 1`` keys/values of every rank (differentiable) and uses its
predecessors' as a halo.

Context parallelism needs a contiguous layout (rank r holds the r-th slice), e.g. the
``ring`` strategy; Titans / FIFO / MAC need every rank's slice to be a multiple of the chunk
size (``HybridTransformer.seq_multiple(cp)``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longctx.config import ModelConfig, ffn_hidden, head_dim
from longctx.models.llama import (Attention, AttentionFn, FeedForward, RMSNorm, TransformerBlock, apply_rope,
                                  rope_cos_sin)

from . import MemoryConfig, build_memory
from .state_passing import all_gather_diff, group_info, tie

# ---------------------------------------------------------------------------- sliding window


def _halo(k, v, pos, doc, h, group):
    """(keys, values, positions, docs) of the (up to) h tokens just before this rank's slice,
    plus the gathered tensor (to `tie` into the output: its backward is a collective).

    Every rank takes part (the all-gather's backward is an all-reduce); slices have equal
    lengths, so the last min(h, S) tokens of each predecessor are contiguous."""
    world, rank = group_info(group)
    B, S = k.shape[:2]
    if world == 1 or h == 0:
        return None, None
    L = min(h, S)
    kv = torch.cat([k[:, S - L:], v[:, S - L:]], dim=-1).contiguous()  # one collective for k and v
    tkv = all_gather_diff(kv, group)  # [world, B, L, Hkv, 2D]
    meta = torch.stack([pos[:, S - L:], doc[:, S - L:]], -1).to(torch.long).contiguous()  # [B, L, 2]
    metas = [torch.empty_like(meta) for _ in range(world)]
    torch.distributed.all_gather(metas, meta, group=group)
    if rank == 0:
        return None, tkv
    D = k.shape[-1]
    halo_kv = torch.cat(list(tkv[:rank]), dim=1)[:, -h:]
    m = torch.cat(metas[:rank], dim=1)[:, -h:]
    return (halo_kv[..., :D], halo_kv[..., D:], m[..., 0], m[..., 1]), tkv


def sliding_window_attention(q, k, v, pos, doc, window: int, *, group=None, block: int = 128,
                             softmax_scale: Optional[float] = None):
    """Exact sliding-window attention. q [B,S,H,D], k/v [B,S,Hkv,D], pos/doc [B,S] -> [B,S,H,D].

    Query blocks of `block` tokens attend to the keys from `window - 1` before the block to
    its end, with the mask ``same doc and 0 <= pos_q - pos_k < window``.
    """
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    h = window - 1
    pos = pos.to(torch.long)
    doc = doc.to(torch.long)
    valid = torch.ones(B, S, dtype=torch.bool, device=q.device)
    halo, gathered = _halo(k, v, pos, doc, h, group)
    hk = halo[0].shape[1] if halo is not None else 0
    # ext = [invalid padding (h - hk) ; halo (hk) ; local (S) ; tail padding]
    Bq = max(1, min(block, S))
    nb = -(-S // Bq)
    tail = nb * Bq - S
    padk = lambda t, n, front: torch.cat([t.new_zeros(t.shape[0], n, *t.shape[2:]), t] if front  # noqa: E731
                                         else [t, t.new_zeros(t.shape[0], n, *t.shape[2:])], dim=1)
    parts_k, parts_v, parts_p, parts_d, parts_ok = [k], [v], [pos], [doc], [valid]
    if halo is not None:
        parts_k.insert(0, halo[0].to(k.dtype))
        parts_v.insert(0, halo[1].to(v.dtype))
        parts_p.insert(0, halo[2])
        parts_d.insert(0, halo[3])
        parts_ok.insert(0, torch.ones(B, hk, dtype=torch.bool, device=q.device))
    ek, ev = torch.cat(parts_k, 1), torch.cat(parts_v, 1)
    ep, ed, eok = torch.cat(parts_p, 1), torch.cat(parts_d, 1), torch.cat(parts_ok, 1)
    front = h - hk
    ek, ev = padk(padk(ek, front, True), tail, False), padk(padk(ev, front, True), tail, False)
    ep, ed = padk(padk(ep, front, True), tail, False), padk(padk(ed, front, True), tail, False)
    eok = padk(padk(eok, front, True), tail, False)
    qp = padk(q, tail, False)
    qpos, qdoc = padk(pos, tail, False), padk(doc, tail, False)
    W = Bq + h
    # blocks: queries [b*Bq, (b+1)*Bq), keys ext[b*Bq, b*Bq + W)
    kb = ek.unfold(1, W, Bq).permute(0, 1, 4, 2, 3)  # [B, nb, W, Hkv, D]
    vb = ev.unfold(1, W, Bq).permute(0, 1, 4, 2, 3)
    pb, db, okb = ep.unfold(1, W, Bq), ed.unfold(1, W, Bq), eok.unfold(1, W, Bq)  # [B, nb, W]
    qb = qp.view(B, nb, Bq, H, D)
    qpb, qdb = qpos.view(B, nb, Bq), qdoc.view(B, nb, Bq)
    dpos = qpb[..., :, None] - pb[..., None, :]
    mask = okb[..., None, :] & (qdb[..., :, None] == db[..., None, :]) & (dpos >= 0) & (dpos < window)
    mask[..., 0] |= ~mask.any(-1)  # padded query rows: any key, results are dropped
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qx = qb.reshape(B * nb, Bq, H, D).transpose(1, 2)
    kx = kb.reshape(B * nb, W, Hkv, D).transpose(1, 2)
    vx = vb.reshape(B * nb, W, Hkv, D).transpose(1, 2)
    out = F.scaled_dot_product_attention(qx, kx, vx, attn_mask=mask.reshape(B * nb, 1, Bq, W), scale=scale,
                                         enable_gqa=(H != Hkv))
    out = out.transpose(1, 2).reshape(B, nb * Bq, H, D)[:, :S]
    return out if gathered is None else tie(out, gathered)


# ---------------------------------------------------------------------------- attention variants


class WindowAttention(Attention):
    """llama `Attention` (same weights) that runs sliding-window attention when window > 0,
    and the handed attention function (full attention, e.g. the CP strategy) otherwise."""

    def __init__(self, cfg: ModelConfig, window: int):
        super().__init__(cfg)
        self.window = window
        self.group = None

    def forward(self, x, cos, sin, doc_ids, pos=None):
        if self.window <= 0:
            return super().forward(x, cos, sin, doc_ids)
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        doc = doc_ids if doc_ids is not None else torch.zeros(B, S, dtype=torch.long, device=x.device)
        out = sliding_window_attention(q, k, v, pos, doc, self.window, group=self.group)
        return self.wo(out.reshape(B, S, self.n_heads * self.head_dim))


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
        proj = lambda lin, t, h: lin(t).view(*t.shape[:-1], h, D)  # noqa: E731
        q = apply_rope(proj(self.wq, x, Hq), cos, sin)
        k = apply_rope(proj(self.wk, x, Hkv), cos, sin)
        v = proj(self.wv, x, Hkv)
        mk = apply_rope(proj(self.wk, mem, Hkv), cos, sin)
        mv = proj(self.wv, mem, Hkv)
        pk = proj(self.wk, self.persistent.to(x.dtype), Hkv)  # [P, Hkv, D], no rotation
        pv = proj(self.wv, self.persistent.to(x.dtype), Hkv)
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


# ---------------------------------------------------------------------------- blocks


class WindowBlock(nn.Module):
    """A llama block whose attention is sliding-window (plain SWA layers)."""

    kind = "swa"

    def __init__(self, cfg: ModelConfig, window: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = WindowAttention(cfg, window)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, ffn_hidden(cfg))

    def forward(self, x, cos, sin, doc_ids, pos=None, group=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, doc_ids, pos)
        return x + self.feed_forward(self.ffn_norm(x))


class MemoryBlock(nn.Module):
    """MAC / MAG / MAL block around a memory module."""

    def __init__(self, cfg: ModelConfig, mcfg: MemoryConfig):
        super().__init__()
        self.variant = mcfg.variant
        self.kind = mcfg.variant
        heads = mcfg.heads or cfg.n_heads
        chunk = mcfg.effective_chunk()
        self.memory = build_memory(mcfg.type, cfg.dim, heads, chunk_size=chunk, **dict(mcfg.options))
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, ffn_hidden(cfg))
        if self.variant == "mac":
            self.attention = SegmentContextAttention(cfg, chunk, mcfg.persistent_tokens)
        else:
            self.attention = WindowAttention(cfg, mcfg.window)
        if self.variant == "mal":
            self.memory_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if self.variant == "mag":
            self.gate = nn.Linear(cfg.dim, cfg.dim, bias=True)

    def forward(self, x, cos, sin, doc_ids, pos=None, group=None):
        if self.variant == "mal":
            x = x + self.memory(self.memory_norm(x), doc_ids, group)
            x = x + self.attention(self.attention_norm(x), cos, sin, doc_ids, pos)
        elif self.variant == "mag":
            h = self.attention_norm(x)
            a = self.attention(h, cos, sin, doc_ids, pos)
            m = self.memory(h, doc_ids, group)
            g = torch.sigmoid(self.gate(h))
            x = x + g * a + (1 - g) * m
        else:  # mac
            h = self.attention_norm(x)
            mem = self.memory(h, doc_ids, group, retrieve="chunk_start")
            x = x + self.attention(h, mem, cos, sin, doc_ids)
        return x + self.feed_forward(self.ffn_norm(x))


# ---------------------------------------------------------------------------- model


def _indices(spec, n_layers: int) -> list[int]:
    if spec is None:
        return list(range(n_layers))
    out = []
    for i in spec:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ValueError(f"layer index {i} out of range for {n_layers} layers")
        out.append(j)
    return sorted(set(out))


class HybridTransformer(nn.Module):
    """llama.Transformer with some layers replaced by memory (MAC/MAG/MAL) or sliding-window
    blocks. Same forward signature, `set_attention`, `init_weights`, `num_params`."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, memory_cfg=None):
        super().__init__()
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        mcfg = MemoryConfig.from_any(memory_cfg)
        self.cfg, self.memory_cfg, self.vocab_size = cfg, mcfg, vocab_size
        mem_layers = _indices(mcfg.layers, cfg.n_layers) if mcfg.type != "none" else []
        swa_layers = _indices(mcfg.swa_layers, cfg.n_layers)
        self.tok_embeddings = nn.Embedding(vocab_size, cfg.dim)
        layers = []
        for i in range(cfg.n_layers):
            if i in mem_layers:
                layers.append(MemoryBlock(cfg, mcfg))
            elif i in swa_layers:
                layers.append(WindowBlock(cfg, mcfg.window))
            else:
                layers.append(TransformerBlock(cfg))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, vocab_size, bias=False)
        self.group = None
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        self.tie_weights()
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, mean=0.0, std=std)
        for layer in self.layers:
            attn, mlp = layer.attention, layer.feed_forward
            for lin in (attn.wq, attn.wk, attn.wv, mlp.w1, mlp.w3):
                nn.init.normal_(lin.weight, mean=0.0, std=std)
            for lin in (attn.wo, mlp.w2):
                nn.init.normal_(lin.weight, mean=0.0, std=residual_std)
            for mod in layer.modules():
                if isinstance(mod, RMSNorm):
                    mod.reset_parameters()
            if isinstance(layer, MemoryBlock):
                layer.memory.reset_parameters()
                nn.init.normal_(layer.memory.wo.weight, mean=0.0, std=residual_std)
                if isinstance(layer.attention, SegmentContextAttention):
                    nn.init.normal_(layer.attention.persistent, mean=0.0, std=std)
                if hasattr(layer, "gate"):
                    nn.init.zeros_(layer.gate.weight)
                    nn.init.zeros_(layer.gate.bias)
        self.norm.reset_parameters()

    def set_attention(self, fn: AttentionFn) -> None:
        """Route every *full*-attention layer through `fn(q, k, v, doc_ids) -> out` (sliding-window
        and MAC attention are local and keep their own computation)."""
        for layer in self.layers:
            layer.attention.attn_fn = fn

    def needs_contiguous_cp(self) -> bool:
        """True when some layer passes state or halos between ranks (memory / sliding window)."""
        return any(not isinstance(l, TransformerBlock) for l in self.layers)

    def set_cp_group(self, group, layout=None) -> None:
        """The CP group over which memory layers pass state and sliding-window attention
        fetches its halo; None = single rank. Ranks must hold contiguous slices in rank order:
        give the strategy's `layout` to have that checked (e.g. zigzag is refused)."""
        if layout is not None and group is not None and self.needs_contiguous_cp():
            from longctx.parallel.layouts import ContiguousLayout

            if type(layout) is not ContiguousLayout:
                raise ValueError(
                    f"memory and sliding-window layers need a contiguous CP layout (rank r holds the r-th "
                    f"slice, e.g. parallel.strategy=ring); got {type(layout).__name__}")
        self.group = group
        for layer in self.layers:
            if isinstance(layer.attention, WindowAttention):
                layer.attention.group = group

    def seq_multiple(self, cp: int) -> int:
        """Rows must be padded to a multiple of this for `cp` ranks (chunk-aligned slices)."""
        chunk = self.memory_cfg.effective_chunk()
        needs = any(isinstance(l, MemoryBlock) and (l.memory.needs_chunk_aligned_cp or l.variant == "mac")
                    for l in self.layers)
        base = 2 * cp
        if needs and cp > 1:
            return math.lcm(base, cp * chunk)
        return base

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        cos, sin = rope_cos_sin(position_ids, head_dim(self.cfg), self.cfg.rope_theta)
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            if isinstance(layer, TransformerBlock):
                h = layer(h, cos, sin, doc_ids)
            else:
                h = layer(h, cos, sin, doc_ids, position_ids, self.group)
        return self.output(self.norm(h))

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n

    def layer_kinds(self) -> list[str]:
        return [getattr(l, "kind", "attn") for l in self.layers]


def build_hybrid_model(model_cfg: ModelConfig, vocab_size: int, memory_cfg=None) -> HybridTransformer:
    """A hybrid attention + memory model; `memory_cfg`: MemoryConfig, a dict/omegaconf node
    with its fields, or None (then it is a plain transformer)."""
    return HybridTransformer(model_cfg, vocab_size, memory_cfg)


__all__ = ["HybridTransformer", "build_hybrid_model", "sliding_window_attention", "MemoryBlock", "WindowBlock",
           "WindowAttention", "SegmentContextAttention"]
