"""Context parallelism: the dp x cp mesh, sequence layouts and CP attention strategies.

    mesh = build_mesh(cp)                          # process groups, ranks, data assignment
    s = build_strategy("ring", group=mesh.cp_group, backend="auto")
    local = s.shard(full, dim=1); out = s.attention(q, k, v, doc_ids=local_docs)

See ARCHITECTURE.md, "Context parallelism".
"""

from .layouts import LAYOUTS, ContiguousLayout, Layout, StripedLayout, ZigzagLayout
from .mesh import Mesh, build_mesh
from .ring import RingAttention
from .zigzag import ZigzagAttention
from .striped import StripedAttention
from .burst import BurstAttention
from .ulysses import UlyssesAttention
from .hybrid import HybridAttention, HybridLayout
from .cad.strategy import CADAttentionStrategy
from .strategy import STRATEGIES, CPStrategy, build_strategy
from .stats import StrategyStats
from .memory_state import context_parallel_memory

__all__ = [
    "CADAttentionStrategy",
    "STRATEGIES",
    "build_strategy",
    "CPStrategy",
    "StrategyStats",
    "RingAttention",
    "ZigzagAttention",
    "StripedAttention",
    "BurstAttention",
    "UlyssesAttention",
    "HybridAttention",
    "HybridLayout",
    "Mesh",
    "build_mesh",
    "Layout",
    "ContiguousLayout",
    "ZigzagLayout",
    "StripedLayout",
    "LAYOUTS",
    "context_parallel_memory",
]
