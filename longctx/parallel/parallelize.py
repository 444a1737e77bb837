"""`parallelize`: apply everything that depends on the mesh to a built model, in one order.

The model (`longctx.models`) contains no parallelism; this is the one place that turns it
into what a worker trains (torchtitan's `parallelize.py` split). In order:

1. **Attention strategy.** Every attention layer calls the CP strategy
   (`StrategyAttention`), which records each call's `last_stats` for the step.
2. **Memory state passing.** Memory layers pass their recurrent state over the cp group
   (`context_parallel_memory`); they need the contiguous layout (rank r holds the r-th slice).
3. **Row multiple.** Rows are padded to a multiple of `2 * cp` (every strategy's
   requirement) and, for chunk-aligned memory, of `cp * chunk` (`row_multiple`).
4. **Activation checkpointing.** Plain attention blocks only: recomputing a memory block
   would repeat its rank-to-rank state exchange inside backward.
5. **Engine.** DeepSpeed ZeRO or DDP wraps the model and reduces gradients over dp x cp
   (skipped for evaluation, which needs no optimizer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from longctx.models.llama import Transformer, TransformerBlock
from longctx.models.memory.blocks import MemoryBlock

from .layouts import ContiguousLayout
from .memory_state import context_parallel_memory
from .strategy import CPStrategy, build_strategy


def strategy_for(cfg, mesh) -> CPStrategy:
    """The attention strategy of this worker, over the group it spans.

    Normally the cp group. CAD with `parallel.cad_scope=dp` instead balances core attention
    across data-parallel ranks that hold different whole rows (cp=1), so it spans the dp group.
    """
    if cfg.parallel.strategy == "auto":
        raise ValueError("parallel.strategy=auto must be resolved on the driver (longctx.launch.resolve) "
                         "before workers build their strategy")
    options = {"backend": cfg.model.attention_backend, **cfg.parallel.options}
    group = mesh.cp_group
    if cfg.parallel.strategy == "cad":
        options.setdefault("scope", cfg.parallel.cad_scope)
        if cfg.parallel.cad_scope == "dp":
            group = mesh.dp_group
    return build_strategy(cfg.parallel.strategy, group=group, **options)


class StrategyAttention:
    """The attention function handed to the model: `fn(q, k, v, doc_ids, *, window=None)` runs the
    strategy (causal) and keeps each call's stats; `drain()` returns and forgets them.

    A strategy fills a call's stats in forward and again in the matching backward, so they
    are read after the step. A class, not a closure, so the model stays picklable."""

    def __init__(self, strategy: CPStrategy):
        self.strategy = strategy
        self.calls: list = []

    def __call__(self, q, k, v, doc_ids, *, window=None):
        out = self.strategy.attention(q, k, v, doc_ids=doc_ids, causal=True, window=window)
        self.calls.append(self.strategy.last_stats)
        return out

    def drain(self) -> list:
        calls, self.calls = self.calls, []
        return calls


def memory_blocks(model: Transformer) -> list[MemoryBlock]:
    return [layer for layer in model.layers if isinstance(layer, MemoryBlock)]


def row_multiple(model: Transformer, cp: int) -> int:
    """Rows are padded to a multiple of this for `cp` ranks: `2 * cp` for every strategy,
    and `cp * chunk` where a memory layer needs chunk-aligned slices."""
    base = 2 * cp
    chunk = math.lcm(1, *(block.cp_chunk for block in memory_blocks(model)))
    return math.lcm(base, cp * chunk) if cp > 1 and chunk > 1 else base


@dataclass
class Parallelized:
    """What `parallelize` made: call `engine.module` (or `model` without an engine)."""

    model: Transformer
    strategy: CPStrategy
    attention: StrategyAttention
    row_multiple: int
    checkpointed_blocks: int
    engine: Optional[object] = None


def apply_strategy(model: Transformer, strategy: CPStrategy) -> StrategyAttention:
    """Step 1: every attention layer calls `strategy`; returns the hook that keeps its stats."""
    attention = StrategyAttention(strategy)
    model.set_attention(attention)
    return attention


def apply_memory_state_passing(model: Transformer, strategy: CPStrategy, group) -> None:
    """Step 2: memory layers pass their state over `group` (the strategy's ranks must hold
    contiguous slices in rank order). Nothing to do without memory layers or with one rank."""
    if not memory_blocks(model) or strategy.cp_size == 1:
        return
    if type(strategy.layout) is not ContiguousLayout:
        raise ValueError(f"memory layers need a contiguous CP layout (rank r holds the r-th slice, e.g. "
                         f"parallel.strategy=ring); got {type(strategy.layout).__name__}")
    context_parallel_memory(model, group)


def parallelize(model: Transformer, mesh, cfg, device: torch.device, *, strategy: Optional[CPStrategy] = None,
                engine: bool = True) -> Parallelized:
    """Apply the strategy, memory state passing, row multiple, activation checkpointing and
    the engine to `model`, in that order (see the module docstring)."""
    strategy = strategy if strategy is not None else strategy_for(cfg, mesh)
    attention = apply_strategy(model, strategy)
    apply_memory_state_passing(model, strategy, mesh.cp_group)
    multiple = row_multiple(model, mesh.cp_size)
    wrapped = 0
    if cfg.train.activation_checkpointing:
        from longctx.trainer.activation_checkpoint import apply_activation_checkpointing

        wrapped = apply_activation_checkpointing(model, only=TransformerBlock,
                                                 offload=cfg.train.activation_checkpointing == "offload")
    built = None
    if engine:
        from longctx.trainer.engine import build_engine

        built = build_engine(cfg, model, mesh, device)
    else:
        model.to(device)
    return Parallelized(model=model, strategy=strategy, attention=attention, row_multiple=multiple,
                        checkpointed_blocks=wrapped, engine=built)


__all__ = ["parallelize", "Parallelized", "StrategyAttention", "strategy_for", "apply_strategy",
           "apply_memory_state_passing", "row_multiple", "memory_blocks"]
