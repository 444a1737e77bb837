"""Gated memory modules: Titans neural memory, Gated Slot Attention, gated FIFO memory.

Contract (ARCHITECTURE.md, "Gated memory"):

    MEMORY_MODULES                       # ("titans", "gsa", "fifo")
    m = build_memory(name, dim, num_heads, chunk_size=..., **options)
    y = m(x, doc_ids=None)               # x [B, S, dim] -> [B, S, dim], chunk-parallel fast path
    y = m.reference(x, doc_ids=None)     # naive sequential loop, same semantics

    context_parallel_memory(m, group)    # (parallel package) hand m, or every memory module
                                         # in a model, its state passing over the CP group

- The modules hold the projections, gates and parameters; the recurrences are the ops of
  ``longctx.kernels.memory`` (``naive`` / ``chunk`` per module). A module passes its state
  through ``m.state_passing`` (default: one rank, `LocalStatePassing`); under context
  parallelism ranks hold contiguous slices in rank order and the result equals the
  single-rank one. Titans and FIFO chunks are a global grid: every rank but the last must
  hold a multiple of `chunk_size` tokens (``m.needs_chunk_aligned_cp``; GSA: any split).
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

Memory blocks of the Transformer (MAC / MAG / MAL, memory + attention): ``longctx.models.memory.blocks``.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Optional

from longctx.config import MemorySectionConfig

from .common import LocalStatePassing, MemoryModule
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


def validate_memory_config(m) -> None:
    """Value checks of `model.memory` (a MemorySectionConfig); ValueError names the key."""
    if m.type not in ("none",) + MEMORY_MODULES:
        raise ValueError(f"model.memory.type={m.type!r}: expected one of none, {', '.join(MEMORY_MODULES)}")
    if m.variant not in VARIANTS:
        raise ValueError(f"model.memory.variant={m.variant!r}: expected one of {', '.join(VARIANTS)}")
    for key in ("chunk_size", "window", "heads", "persistent_tokens"):
        if getattr(m, key) < 0:
            raise ValueError(f"model.memory.{key} must be >= 0")
    if m.swa_layers and m.window <= 0:
        raise ValueError("model.memory.swa_layers needs model.memory.window > 0 (the sliding window, in tokens)")
    if m.type != "none":
        unknown = sorted(set(m.options) - set(_OPTIONS[m.type]))
        if unknown:
            raise ValueError(f"model.memory.options: unknown {unknown} for {m.type!r}; "
                             f"accepted: {list(_OPTIONS[m.type])}")


class MemoryConfig(MemorySectionConfig):
    """`model.memory` (the schema's `MemorySectionConfig`, fields documented there), built
    from a dict and checked: for code that builds memory models without a full Config."""

    @classmethod
    def from_any(cls, obj) -> "MemoryConfig":
        """From a dict / omegaconf node, any dataclass with these fields, or None."""
        if obj is None:
            return cls()
        if dataclasses.is_dataclass(obj):
            obj = dataclasses.asdict(obj)
        elif not isinstance(obj, dict):
            from omegaconf import OmegaConf

            obj = OmegaConf.to_container(obj, resolve=True)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ValueError(f"unknown model.memory key(s) {unknown}; accepted: {sorted(names)}")
        cfg = cls(**obj)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        validate_memory_config(self)


__all__ = ["MEMORY_MODULES", "VARIANTS", "build_memory", "MemoryModule", "LocalStatePassing", "MemoryConfig",
           "TitansMemory", "GatedSlotAttention", "GatedFIFOMemory", "validate_memory_config"]
