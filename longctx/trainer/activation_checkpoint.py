"""Activation checkpointing, applied to a built model from outside (the model file knows nothing of it).

Each transformer block's forward is wrapped so autograd keeps only the block's
input and recomputes the rest in backward. The module tree (and so the state
dict) is unchanged, so checkpoints load with or without it. CP attention inside a
block is recomputed too, communication included; every rank recomputes the same
blocks in the same order, so the collectives stay matched.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: torch.nn.Module, only: type | None = None) -> int:
    """Wraps every block in `model.layers` (of type `only`, if given); returns how many."""
    wrapped = 0
    for block in model.layers:
        if only is not None and not isinstance(block, only):
            continue
        wrapped += 1
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():  # evaluation: nothing to save
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return wrapped
