"""Striped ring attention (Brandon et al., 2023): the ring on the striped layout.

Rank r holds tokens r, r+N, r+2N, ... . At ring step s this rank's local row
i (token r + i*N) sees the local key j of block o (token o + j*N) iff
r + i*N >= o + j*N, i.e. j <= i when o <= r and j < i when o > r: every
block is a (near-)triangle, so causal work is balanced without special
cases -- it all follows from the global token indices the kernel receives.
Per rank, the causal visible pairs are S_l*(r+1) + N*S_l*(S_l-1)/2
(S_l = S/N): max/mean = 1 + O(1/S_l).

Bytes are the ring's: forward (N-1) x (K + V + doc ids), backward the same
plus N hops of fp32 dK/dV accumulators.
"""

from __future__ import annotations

from .layouts import StripedLayout
from .ring import RingAttention
from .strategy import register


@register("striped")
class StripedAttention(RingAttention):
    """Ring attention on `StripedLayout`."""

    name = "striped"
    layout_cls = StripedLayout
