"""Dense fp64-friendly attention, the ground truth every CP strategy test compares against."""

from __future__ import annotations

import math

import torch


def doc_ids_from_lengths(rows: list[list[int]]) -> torch.Tensor:
    """[B, S] document ids from per-row document lengths."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


def reference_attention(q, k, v, doc=None, causal=True, softmax_scale=None, window=None):
    """Dense softmax attention in the inputs' dtype; returns (out, mask [B, S, S]).

    ``window``: keep only keys with ``i - j < window`` (sliding window), if given.
    """
    B, S, H, D = q.shape
    G = H // k.shape[2]
    k = k.repeat_interleave(G, dim=2)  # query head h uses kv head h // G
    v = v.repeat_interleave(G, dim=2)
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    idx = torch.arange(S)
    mask = torch.ones(B, S, S, dtype=torch.bool)
    if causal:
        mask &= idx[:, None] >= idx[None, :]
    if window is not None:
        mask &= idx[:, None] - idx[None, :] < window
    if doc is not None:
        mask &= doc[:, :, None] == doc[:, None, :]
    p = torch.softmax(s.masked_fill(~mask[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), mask
