"""Context parallelism: the dp x cp mesh, sequence layouts and CP attention strategies.

    mesh = build_mesh(cp)                          # process groups, ranks, data assignment
    s = build_strategy("ring", group=mesh.cp_group, backend="auto")
    local = s.shard(full, dim=1); out = s.attention(q, k, v, doc_ids=local_docs)

See ARCHITECTURE.md, "Context parallelism".
"""

from .layouts import LAYOUTS, ContiguousLayout, Layout
from .mesh import Mesh, build_mesh
from .ring import RingAttention
from .strategy import STRATEGIES, CPStrategy, build_strategy

__all__ = [
    "STRATEGIES",
    "build_strategy",
    "CPStrategy",
    "RingAttention",
    "Mesh",
    "build_mesh",
    "Layout",
    "ContiguousLayout",
    "LAYOUTS",
]
