"""Gated memory modules: Titans neural memory, Gated Slot Attention, gated FIFO memory.

Contract (ARCHITECTURE.md, "Gated memory"):

    MEMORY_MODULES                       # ("titans", "gsa", "fifo")
    m = build_memory(name, dim, num_heads, chunk_size=..., **options)
    y = m(x, doc_ids=None, group=None)   # x [B, S, dim] -> [B, S, dim], chunk-parallel fast path
    y = m.reference(x, doc_ids=None)     # naive sequential loop, same semantics

- `group`: CP process group (None = one rank); ranks hold contiguous slices in rank
  order and the module passes its recurrent state so the result equals the single-rank
  one. Titans and FIFO chunks are a global grid: every rank but the last must hold a
  multiple of `chunk_size` tokens (GSA: any split).
- Memory state resets at document boundaries (`doc_ids`).
- Both paths also take ``retrieve="chunk_start"`` (read the memory as it was at the start of
  the token's chunk; what MAC prepends to a segment).

Options per module:
- titans: memory ("linear" | "mlp"), expansion (MLP hidden = expansion * head_dim), head_dim,
  backend, max_lr (inner learning-rate cap, default (1 - eta_max) / chunk_size), eta_max
  (momentum cap, default 0.5), theta_bias / alpha_bias /
  eta_bias (initial gate logits)
- gsa: num_slots, gate_temperature, head_dim, backend, block_chunks
- fifo: num_slots, head_dim, backend, gate_bias

Hybrid models (MAC / MAG / MAL, memory + attention): ``longctx.models.memory.hybrid``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

from .common import MemoryModule
from .fifo import GatedFIFOMemory
from .gsa import GatedSlotAttention
from .titans import TitansMemory

MEMORY_MODULES = ("titans", "gsa", "fifo")
VARIANTS = ("mac", "mag", "mal")

_REGISTRY = {"titans": TitansMemory, "gsa": GatedSlotAttention, "fifo": GatedFIFOMemory}
_OPTIONS = {
    "titans": ("memory", "expansion", "head_dim", "backend", "max_lr", "eta_max", "theta_bias", "alpha_bias",
               "eta_bias"),
    "gsa": ("num_slots", "gate_temperature", "head_dim", "backend", "block_chunks"),
    "fifo": ("num_slots", "head_dim", "backend", "gate_bias"),
}
DEFAULT_CHUNK = {"titans": 64, "gsa": 32, "fifo": 64}


def build_memory(name: str, dim: int, num_heads: int, chunk_size: Optional[int] = None,
                 **options) -> MemoryModule:
    """Build the memory module `name` (see MEMORY_MODULES); unknown names/options fail clearly."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), MEMORY_MODULES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown memory module {name!r}{hint} Valid names: {', '.join(MEMORY_MODULES)}")
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for memory {name!r}; accepted: {list(_OPTIONS[name])}")
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK[name]
    return _REGISTRY[name](dim, num_heads, chunk_size, **options)


@dataclass
class MemoryConfig:
    """What `model.memory` in the YAML holds (see `hybrid.build_hybrid_model`).

    type: "none" (plain transformer) or a MEMORY_MODULES name.
    variant: how memory layers use it: "mac" (memory as context), "mag" (memory as gate),
      "mal" (memory as a layer).
    layers: indices of the memory layers (negative = from the end); None = every layer.
    chunk_size: the memory's chunk (also MAC's segment length); 0 = the module's default.
    window: sliding-window size of the attention inside MAG/MAL blocks; 0 = full attention
      (through the model's attention function, i.e. the CP strategy).
    swa_layers: indices of plain (non-memory) layers that use sliding-window attention of
      `window` tokens instead of full attention (e.g. a sliding-window-only baseline).
    heads: memory heads; 0 = model.n_heads.
    persistent_tokens: MAC's learned persistent tokens per segment.
    options: module options passed to build_memory (e.g. {memory: mlp}, {num_slots: 32}).
    """

    type: str = "none"
    variant: str = "mal"
    layers: Optional[list[int]] = None
    chunk_size: int = 0
    window: int = 0
    swa_layers: list[int] = field(default_factory=list)
    heads: int = 0
    persistent_tokens: int = 4
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_any(cls, obj) -> "MemoryConfig":
        """From a MemoryConfig, a dict / omegaconf node, any dataclass with these fields, or None."""
        if obj is None:
            return cls()
        if isinstance(obj, cls):
            return obj
        if dataclasses.is_dataclass(obj):
            obj = dataclasses.asdict(obj)
        elif not isinstance(obj, dict):
            try:
                from omegaconf import OmegaConf

                obj = OmegaConf.to_container(obj, resolve=True)
            except Exception:
                obj = dict(obj)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ValueError(f"unknown model.memory key(s) {unknown}; accepted: {sorted(names)}")
        cfg = cls(**obj)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.type not in ("none",) + MEMORY_MODULES:
            raise ValueError(f"model.memory.type={self.type!r}: expected one of none, {', '.join(MEMORY_MODULES)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"model.memory.variant={self.variant!r}: expected one of {', '.join(VARIANTS)}")
        for key in ("chunk_size", "window", "heads", "persistent_tokens"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.memory.{key} must be >= 0")
        if self.swa_layers and self.window <= 0:
            raise ValueError("model.memory.swa_layers needs model.memory.window > 0")
        if self.type != "none":
            unknown = sorted(set(self.options) - set(_OPTIONS[self.type]))
            if unknown:
                raise ValueError(f"model.memory.options: unknown {unknown} for {self.type!r}; "
                                 f"accepted: {list(_OPTIONS[self.type])}")

    def effective_chunk(self) -> int:
        return self.chunk_size or DEFAULT_CHUNK.get(self.type, 64)


def __getattr__(name):  # lazy: hybrid imports llama, which is heavier
    if name in ("build_hybrid_model", "HybridTransformer"):
        from . import hybrid

        return getattr(hybrid, name)
    raise AttributeError(name)


__all__ = ["MEMORY_MODULES", "VARIANTS", "build_memory", "MemoryModule", "MemoryConfig", "TitansMemory",
           "GatedSlotAttention", "GatedFIFOMemory", "build_hybrid_model", "HybridTransformer"]
