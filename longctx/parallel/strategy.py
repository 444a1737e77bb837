"""Context-parallel strategy base class and factory.

A strategy owns a layout (which tokens each rank holds) and an attention
function that is exact with respect to single-device attention on the full row.
"""

from __future__ import annotations

import abc
import difflib
import numbers

import torch

from .comm import resolve_group
from .layouts import ContiguousLayout, Layout
from .stats import StrategyStats

# Contract: every name a user may put in the config, in this order.
STRATEGIES = ("ring", "zigzag", "striped", "burst", "ulysses", "hybrid", "cad")


def mask_options(causal: bool, window: int | None) -> dict:
    """The mask keywords of the kernels and ``visible_pairs``."""
    return {"causal": causal, "window": window}


class CPStrategy(abc.ABC):
    """Base class: shard/unshard/token_index come from the layout.

    Fields: `group` (the CP ProcessGroup, None without torch.distributed),
    `cp_size`, `cp_rank`, `layout`, `backend` (kernel backend) and
    `last_stats` (a `StrategyStats`: the last forward+backward on this rank).
    """

    name = "base"
    fused_merge = False  # ring-family merge inside the kernel call (burst turns it on)
    layout_cls: type[Layout] = ContiguousLayout
    options = ("backend",)  # keyword options build_strategy accepts

    def __init__(self, group=None, *, backend: str = "auto"):
        self.group, self.cp_size, self.cp_rank = resolve_group(group)
        self.layout = self.layout_cls(self.group)
        self.backend = backend
        self.last_stats = StrategyStats()

    def shard(self, full: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return self.layout.shard(full, dim)

    def unshard(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return self.layout.unshard(local, dim)

    def token_index(self, seq_len: int, rank: int | None = None, device=None) -> torch.Tensor:
        return self.layout.token_index(seq_len, rank, device=device)

    @abc.abstractmethod
    def attention(self, q, k, v, *, doc_ids=None, causal=True, window=None, softmax_scale=None):
        """Exact attention over the whole sequence for this rank's local q, k, v.

        Key j is visible to query i when (not causal or idx_i >= idx_j), they are in the
        same document, and (window is None or idx_i - idx_j < window); idx = global token index.
        """

    def check_inputs(self, q, k, v, doc_ids=None, window=None) -> int | None:
        """ValueError (naming the strategy) unless q [B, S, H, D], k = v [B, S, H_kv, D] with
        H % H_kv == 0, doc_ids [B, S] or None, window a positive int or None (raised on
        every rank before any collective). Returns the window as an int (or None)."""
        what = self.name
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(
                f"{what}: q, k, v must be [B, S_local, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
            raise ValueError(
                f"{what}: k and v must be [B, S_local, H_kv, D] matching q {tuple(q.shape)}, "
                f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if q.shape[2] % k.shape[2] != 0:
            raise ValueError(f"{what}: q heads ({q.shape[2]}) must be a multiple of k/v heads ({k.shape[2]})")
        if doc_ids is not None and tuple(doc_ids.shape) != tuple(q.shape[:2]):
            raise ValueError(
                f"{what}: doc_ids must be [B, S_local] = {tuple(q.shape[:2])}, got {tuple(doc_ids.shape)}"
            )
        if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1):
            raise ValueError(f"{what}: window must be a positive integer or None, got {window!r}")
        return None if window is None else int(window)

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
