"""Context-parallel strategy base class and factory.

A strategy owns a layout (which tokens each rank holds) and an attention
function that is exact with respect to single-device attention on the full row.
"""

from __future__ import annotations

import abc

import difflib

import torch

from .comm import resolve_group
from .layouts import ContiguousLayout, Layout

# Contract: every name a user may put in the config, in this order.
STRATEGIES = ("ring", "zigzag", "striped", "burst", "ulysses", "hybrid", "cad")


class CPStrategy(abc.ABC):
    """Base class: shard/unshard/token_index come from the layout.

    Fields: `group` (the CP ProcessGroup, None without torch.distributed),
    `cp_size`, `cp_rank`, `layout`, `backend` (kernel backend) and
    `last_stats` (the last forward+backward on this rank).
    """

    name = "base"
    layout_cls: type[Layout] = ContiguousLayout
    options = ("backend",)  # keyword options build_strategy accepts

    def __init__(self, group=None, *, backend: str = "auto"):
        self.group, self.cp_size, self.cp_rank = resolve_group(group)
        self.layout = self.layout_cls(self.group)
        self.backend = backend
        self.last_stats: dict = {}

    def shard(self, full: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return self.layout.shard(full, dim)

    def unshard(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return self.layout.unshard(local, dim)

    def token_index(self, seq_len: int, rank: int | None = None, device=None) -> torch.Tensor:
        return self.layout.token_index(seq_len, rank, device=device)

    @abc.abstractmethod
    def attention(self, q, k, v, *, doc_ids=None, causal=True, softmax_scale=None):
        """Exact attention over the whole sequence for this rank's local q, k, v."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cp_size={self.cp_size}, cp_rank={self.cp_rank}, backend={self.backend!r})"


_REGISTRY: dict[str, type[CPStrategy]] = {}


def register(name: str):
    """Class decorator: make a strategy buildable by name. Each strategy module
    registers itself; `longctx/parallel/__init__.py` imports them all."""
    if name not in STRATEGIES:
        raise ValueError(f"{name!r} is not in STRATEGIES; add it there first (it is the public list)")

    def deco(cls: type[CPStrategy]) -> type[CPStrategy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _implemented() -> dict[str, type[CPStrategy]]:
    import longctx.parallel  # noqa: F401  (importing the package registers every strategy)

    return _REGISTRY


def build_strategy(name: str, group=None, **options) -> CPStrategy:
    """Build the CP strategy `name` over `group` (None = WORLD; trivial without dist)."""
    impl = _implemented()
    if name not in STRATEGIES:
        close = difflib.get_close_matches(str(name), STRATEGIES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ValueError(f"unknown CP strategy {name!r}{hint} Valid names: {', '.join(STRATEGIES)}")
    if name not in impl:
        raise ValueError(
            f"CP strategy {name!r} is not available in this version; "
            f"available: {', '.join(n for n in STRATEGIES if n in impl)}"
        )
    cls = impl[name]
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for CP strategy {name!r}; accepted: {list(cls.options)}"
        )
    return cls(group, **options)
