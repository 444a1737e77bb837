"""Activation checkpointing, applied to a built model from outside (the model file knows nothing of it).

Each transformer block's forward is wrapped so autograd keeps only the block's
input and recomputes the rest in backward. The module tree (and so the state
dict) is unchanged, so checkpoints load with or without it. CP attention inside a
block is recomputed too, communication included; every rank recomputes the same
blocks in the same order, so the collectives stay matched.

`offload=True` also moves the kept inputs to CPU memory (pinned when the block runs on
CUDA) as they are saved and back to the block's device when backward needs them
(`torch.autograd.graph.save_on_cpu`): device memory then holds one block's activations,
whatever the depth. The copies are exact, so the gradients equal plain checkpointing's.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: torch.nn.Module, only: type | None = None, *, offload: bool = False) -> int:
    """Wraps every block in `model.layers` (of type `only`, if given); returns how many."""
    wrapped = 0
    for block in model.layers:
        if only is not None and not isinstance(block, only):
            continue
        wrapped += 1
        inner = block.forward

        @functools.wraps(inner)
        def forward(x, *args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():  # evaluation: nothing to save
                return _inner(x, *args, **kwargs)
            keep = (torch.autograd.graph.save_on_cpu(pin_memory=x.is_cuda) if offload
                    else contextlib.nullcontext())
            with keep:
                return checkpoint(_inner, x, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return wrapped
