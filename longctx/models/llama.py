"""A decoder-only Llama-style transformer, in one readable file.

In the spirit of torchtitan's `models/llama3/model.py`: RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP, optional tied embeddings. The model contains no parallelism:
every attention layer calls a function it is handed (`Transformer.set_attention`),
and the parallel layer decides what that function does (a local kernel, a ring
exchange, an all-to-all, ...). Per-token tensors (`input_ids`, `position_ids`,
`doc_ids`) may therefore be this rank's shard of a row; nothing here cares.

Packed rows: `position_ids` restart at 0 at each document, so RoPE angles are
computed from them on the fly (never from `arange(S)`), and `doc_ids` is handed to
the attention function, which masks keys of other documents. Together they make a
document inside a packed row see exactly what it would see alone.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longctx.config import ModelConfig, ffn_hidden, head_dim
from longctx.models.rope import rope_frequencies

# fn(q [B,S,H,D], k [B,S,H_kv,D], v [B,S,H_kv,D], doc_ids [B,S] | None, *, window=None) -> out [B,S,H,D]
AttentionFn = Callable[..., torch.Tensor]


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: Optional[torch.Tensor], *,
                    window: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """Single-device causal attention with the document (and window) mask: the default attention fn.

    Imported lazily so that this file imports even where the kernel package does not
    (e.g. while building on the meta device for a dry run).
    """
    from longctx.kernels import attention

    return attention(q, k, v, q_doc=doc_ids, k_doc=doc_ids, causal=True, window=window,
                     softmax_scale=1.0 / math.sqrt(q.shape[-1]), backend=backend)


def default_attention(cfg: ModelConfig) -> AttentionFn:
    # A partial of a module-level function (not a closure) so the model stays picklable.
    return functools.partial(local_attention, backend=cfg.attention_backend)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: the mean of squares loses too much precision in bf16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotary angles for each token: `[B, S, 1, dim/2]`, fp32, times `scale`
    (YaRN's attention factor; 1 otherwise). `inv_freq` from `longctx.models.rope`.

    Computed from the position ids on every call instead of cached per `arange(S)`,
    because positions restart inside packed rows and are arbitrary under CP layouts.
    Cheap next to the matmuls, and fp32 because bf16 angles are wrong by whole
    radians at long positions.
    """
    angles = position_ids.float()[..., None] * inv_freq.to(position_ids.device)  # [B, S, dim/2]
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos[:, :, None, :], sin[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of `x [B, S, H, D]` (the "rotate half" layout)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    """Grouped-query attention with RoPE. `window` (None = full) makes it sliding-window
    attention: the mask is the attention function's business (a kernel or a CP strategy),
    so a window layer costs no special code here."""

    def __init__(self, cfg: ModelConfig, window: Optional[int] = None):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = head_dim(cfg)
        self.window = window
        bias = cfg.family == "qwen2"  # Qwen2: biases on the q/k/v projections (not on wo)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        # Qwen3: RMSNorm over each head's q and k, before RoPE.
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.family == "qwen3" else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.family == "qwen3" else None
        # Not a submodule or a buffer: the parallel layer swaps it without touching state dicts.
        self.attn_fn: AttentionFn = default_attention(cfg)

    def heads(self, lin: nn.Linear, x: torch.Tensor, n: int) -> torch.Tensor:
        """`lin(x)` split into `n` heads: `[..., dim] -> [..., n, head_dim]`."""
        return lin(x).view(*x.shape[:-1], n, self.head_dim)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q `[B,S,H,D]`, k and v `[B,S,H_kv,D]`, q and k rotated."""
        q, k = self.heads(self.wq, x, self.n_heads), self.heads(self.wk, x, self.n_kv_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), self.heads(self.wv, x, self.n_kv_heads)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        # K/V keep their H_kv heads: the kernels handle GQA, and CP strategies then
        # move H/H_kv times fewer bytes than if we repeated them here.
        # `window` is passed only to window layers, so any fn(q, k, v, doc_ids) serves full attention.
        out = self.attn_fn(q, k, v, doc_ids) if self.window is None else \
            self.attn_fn(q, k, v, doc_ids, window=self.window)
        return self.wo(out.reshape(B, S, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@torch.no_grad()
def init_attention_ffn(attn: Attention, mlp: FeedForward, std: float, residual_std: float) -> None:
    """normal(0, std) for the projections into a block, `residual_std` for the two that
    write into the residual stream (attention wo, MLP w2)."""
    for lin in (attn.wq, attn.wk, attn.wv, mlp.w1, mlp.w3):
        nn.init.normal_(lin.weight, mean=0.0, std=std)
    for lin in (attn.wo, mlp.w2):
        nn.init.normal_(lin.weight, mean=0.0, std=residual_std)
    for lin in (attn.wq, attn.wk, attn.wv):
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)
    for norm in (attn.q_norm, attn.k_norm):
        if norm is not None:
            norm.reset_parameters()


class TransformerBlock(nn.Module):
    """Pre-norm attention + SwiGLU block; `window` makes its attention sliding-window ("swa")."""

    def __init__(self, cfg: ModelConfig, window: Optional[int] = None):
        super().__init__()
        self.kind = "swa" if window else "attn"
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, window)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, ffn_hidden(cfg))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, doc_ids)
        return x + self.feed_forward(self.ffn_norm(x))

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        init_attention_ffn(self.attention, self.feed_forward, std, residual_std)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()


def layer_specs(cfg: ModelConfig) -> list[str]:
    """The block kind of each layer: "attn", "swa" (sliding window) or a memory variant
    ("mac" / "mag" / "mal"), from `cfg.memory` (memory layers win over swa layers)."""
    mem = cfg.memory
    n = cfg.n_layers

    def indices(spec) -> set[int]:
        if spec is None:
            return set(range(n))
        out = set()
        for i in spec:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise ValueError(f"model.memory: layer index {i} out of range for {n} layers")
            out.add(j)
        return out

    memory_layers = indices(mem.layers) if mem.type != "none" else set()
    swa_layers = indices(mem.swa_layers)
    return [mem.variant if i in memory_layers else "swa" if i in swa_layers else "attn" for i in range(n)]


def build_block(cfg: ModelConfig, kind: str) -> nn.Module:
    if kind in ("attn", "swa"):
        return TransformerBlock(cfg, cfg.memory.window if kind == "swa" else None)
    # Memory blocks are built only when configured (and import this file's pieces).
    from longctx.models.memory.blocks import MemoryBlock

    return MemoryBlock(cfg)


class LMHead(nn.Linear):
    """The output projection (`nn.Linear(dim, vocab, bias=False)`, state-dict name
    `output.weight`). Called with `labels` it returns the per-token fp32 cross-entropy and
    the argmax prediction instead of logits, `chunk_size` tokens at a time
    (`longctx.kernels.linear_cross_entropy`), so the `[tokens, vocab]` logits never exist;
    `chunk_size = 0` computes the full logits first (the plain reference)."""

    chunk_size: Optional[int] = None  # None = sized by the vocabulary; 0 = full logits

    def forward(self, h: torch.Tensor, labels: Optional[torch.Tensor] = None):
        if labels is None:
            return super().forward(h)
        if self.chunk_size == 0:
            logits = super().forward(h).float()
            losses = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none")
            return losses.view(labels.shape), logits.argmax(-1)
        from longctx.kernels.linear_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(h, self.weight, labels, chunk_size=self.chunk_size)


class Transformer(nn.Module):
    """The one decoder-only model: embeddings, a stack of blocks, final norm, lm head.

    Each layer's block kind comes from `cfg.memory` (`layer_specs`): plain attention,
    sliding-window attention, or a gated-memory block (MAC / MAG / MAL, see
    `longctx.models.memory.blocks`). Every block has `kind`, `forward(x, cos, sin,
    doc_ids)` and `init_weights(std, residual_std)`.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size} (resolve it from the tokenizer first)")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.tok_embeddings = nn.Embedding(vocab_size, cfg.dim)
        self.layers = nn.ModuleList(build_block(cfg, kind) for kind in layer_specs(cfg))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = LMHead(cfg.dim, vocab_size, bias=False)
        # RoPE frequencies: computed once, on the CPU, never a parameter or a state-dict entry.
        self.inv_freq, self.rope_scale = rope_frequencies(cfg)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Make the lm head share the embedding table (when configured). Called again by
        `init_weights` because `to_empty()` after a meta-device build unties them."""
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, gather: Optional[Callable] = None) -> None:
        """normal(0, init_std) for embeddings and linears; the projections that write into
        the residual stream scaled by 1/sqrt(2 * n_layers) so the residual's variance does
        not grow with depth (GPT-2); norms to 1. Each block initialises its own parts.

        Public so a model built on the meta device can be materialised with
        `to_empty(device=...)` and then initialised (this also re-ties the lm head).
        `gather(params)`, when given, is a context manager that makes a list of parameters
        whole while they are written (ZeRO-3's partitioned build: one block at a time).
        """
        whole = gather if gather is not None else (lambda params: contextlib.nullcontext())
        self.tie_weights()
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        with whole([self.tok_embeddings.weight]):
            nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        if not self.cfg.tie_embeddings:
            with whole([self.output.weight]):
                nn.init.normal_(self.output.weight, mean=0.0, std=std)
        for layer in self.layers:
            with whole(list(layer.parameters())):
                layer.init_weights(std, residual_std)
        with whole([self.norm.weight]):
            self.norm.reset_parameters()

    def set_attention(self, fn: AttentionFn) -> None:
        """Route every attention layer through `fn(q, k, v, doc_ids, *, window=None) -> out`
        (MAC's segment attention is local to a segment and keeps its own computation)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.attn_fn = fn

    def layer_kinds(self) -> list[str]:
        return [layer.kind for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                doc_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None):
        """input_ids, position_ids, doc_ids: `[B, S]` -> logits `[B, S, vocab]` in the lm head's dtype.

        With `labels [B, S]` (`-100` = no target): `(losses, predictions)`, the fp32
        cross-entropy of each token (0 where ignored) and the argmax token, computed by
        the lm head without materialising the logits (`LMHead`)."""
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, self.rope_scale)
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, doc_ids)
        return self.output(self.norm(h), labels)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count, a tied tensor counted once. `exclude_embedding` drops the
        token embedding table (with tied embeddings that is the lm head too)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n


__all__ = ["Transformer", "LMHead", "TransformerBlock", "Attention", "FeedForward", "RMSNorm", "rope_cos_sin",
           "apply_rope", "init_attention_ffn", "local_attention", "default_attention", "AttentionFn", "layer_specs", "build_block"]
