"""Zigzag ring attention: the ring algorithm on the zigzag layout.

The row is cut into 2N chunks; rank r holds chunks r and 2N-1-r (one early,
one late), so under causal masking every rank has exactly the same number of
visible (query, key) pairs: (2N-1) c^2 + c(c+1) for chunk size c.

The ring itself is `ring.RingAttention`'s: K/V travel, masks and skips come
from global token indices. `plan_block` trims every block to its visible
half, so at step s>0 a rank computes either all its queries against the
early chunk of the block it holds (block from an earlier rank) or its late
chunk's queries against the whole block (block from a later rank), both
without a causal mask; only its own block (step 0) is masked. Bytes are the
ring's: forward (N-1) x (K + V + doc ids), backward the same plus N hops of
fp32 dK/dV accumulators.
"""

from __future__ import annotations

from .layouts import ZigzagLayout
from .ring import RingAttention
from .strategy import register


@register("zigzag")
class ZigzagAttention(RingAttention):
    """Ring attention on `ZigzagLayout` (needs seq_len divisible by 2 * cp_size)."""

    name = "zigzag"
    layout_cls = ZigzagLayout
