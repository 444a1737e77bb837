"""`StrategyStats`: what one attention call (forward + backward) did on this rank.

Every CP strategy fills one per call and exposes it as ``s.last_stats``:

    stats = StrategyStats()
    stats.add_forward(counter, flops=f, steps=N)      # in forward: bytes, FLOPs, extras
    stats.add_backward(counter)                       # in backward: bytes; FLOPs = 2.5 x forward
    stats["bytes_sent"], stats.get("plan_cached"), dict(stats)

Fields: ``bytes_sent`` / ``bytes_recv`` (this rank, forward + backward) and
``attn_flops`` (``4 * B * H * D * visible pairs`` forward, 2.5x that backward).
``extras`` holds everything else, by name: the forward/backward split that
`add_forward` / `add_backward` maintain (``fwd_bytes_sent``, ``fwd_bytes_recv``,
``bwd_bytes_sent``, ``bwd_bytes_recv``, ``attn_flops_fwd``, ``attn_flops_bwd``)
and strategy-specific values (``steps``, ``visible_pairs``, burst's ``bwd_mode``,
CAD's ``imbalance_before`` / ``plan_cached`` / ``moved_pairs_frac``, ...).

It is a read-only ``collections.abc.Mapping`` over the fields (first) and the
extras, so ``stats[key]``, ``stats.get(key)``, ``dict(stats)`` and ``==`` with a
dict work as with the plain dict it replaces. A forward fills a fresh object
and its backward completes the same one: code holding ``last_stats`` after a
forward sees the backward's numbers once it has run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .comm import ByteCounter

_SPLIT = {
    "fwd": ("fwd_bytes_sent", "fwd_bytes_recv", "attn_flops_fwd"),
    "bwd": ("bwd_bytes_sent", "bwd_bytes_recv", "attn_flops_bwd"),
}


@dataclass(eq=False)
class StrategyStats(Mapping):
    """Bytes and attention FLOPs of one call on this rank, plus named extras (see module doc)."""

    bytes_sent: int = 0
    bytes_recv: int = 0
    attn_flops: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)

    # -- filling --------------------------------------------------------------------------
    def _add(self, phase: str, traffic, flops: float, extras: dict) -> "StrategyStats":
        sent_key, recv_key, flops_key = _SPLIT[phase]
        sent = sum(t.sent for t in traffic)
        recv = sum(t.recv for t in traffic)
        x = self.extras
        for phase_keys in _SPLIT.values():  # the split is always complete
            x.setdefault(phase_keys[0], 0)
            x.setdefault(phase_keys[1], 0)
            x.setdefault(phase_keys[2], 0.0)
        x[sent_key] += sent
        x[recv_key] += recv
        x[flops_key] += flops
        self.bytes_sent += sent
        self.bytes_recv += recv
        self.attn_flops += flops
        x.update(extras)
        return self

    def add_forward(self, *traffic, flops: float = 0.0, **extras) -> "StrategyStats":
        """Add a forward contribution: bytes of each `traffic` (anything with ``sent`` and
        ``recv``: a ByteCounter, another stats' `fwd`), attention FLOPs, and extras (set)."""
        return self._add("fwd", traffic, flops, extras)

    def add_backward(self, *traffic, flops: float | None = None, **extras) -> "StrategyStats":
        """Add a backward contribution; FLOPs default to 2.5 x the forward's."""
        if flops is None:
            flops = 2.5 * self.extras.get("attn_flops_fwd", 0.0)
        return self._add("bwd", traffic, flops, extras)

    def note(self, **extras) -> "StrategyStats":
        """Set extras only (no bytes, no FLOPs)."""
        self.extras.update(extras)
        return self

    # -- reading --------------------------------------------------------------------------
    @property
    def fwd(self) -> ByteCounter:
        """Forward bytes (sent, recv), e.g. to add one strategy's stats into another's."""
        return ByteCounter(self.extras.get("fwd_bytes_sent", 0), self.extras.get("fwd_bytes_recv", 0))

    @property
    def bwd(self) -> ByteCounter:
        return ByteCounter(self.extras.get("bwd_bytes_sent", 0), self.extras.get("bwd_bytes_recv", 0))

    def prefixed(self, prefix: str, keys: Iterable[str]) -> dict[str, Any]:
        """``{prefix + key: self.get(key, 0)}`` for `keys` (to report a sub-strategy's numbers)."""
        return {prefix + k: self.get(k, 0) for k in keys}

    _FIELDS = ("bytes_sent", "bytes_recv", "attn_flops")

    def __getitem__(self, key: str):
        if key in self._FIELDS:
            return getattr(self, key)
        return self.extras[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._FIELDS
        yield from (k for k in self.extras if k not in self._FIELDS)

    def __len__(self) -> int:
        return len(self._FIELDS) + sum(1 for k in self.extras if k not in self._FIELDS)

    def __repr__(self) -> str:
        return f"StrategyStats({dict(self)!r})"

    # -- many calls -----------------------------------------------------------------------
    SUMMED = _FIELDS

    @classmethod
    def total(cls, calls: Iterable[Mapping]) -> "StrategyStats":
        """One step's numbers from many calls (layers, micro-batches, recomputation).

        ``bytes_sent``, ``bytes_recv`` and ``attn_flops`` are summed over the calls;
        every other numeric extra (not bool) is averaged over the calls that report
        it (e.g. CAD's ``planner_ms``; ``plan_cached`` becomes the fraction of calls
        that reused a plan). Non-numeric extras (burst's ``bwd_mode``) are dropped.
        Calls may be StrategyStats or plain mappings. This is what the trainer logs
        as ``cp/<key>`` per step.
        """
        calls = list(calls)
        out = cls(**{k: sum(c.get(k, 0) for c in calls) for k in cls.SUMMED})
        out.attn_flops = float(out.attn_flops)
        seen: dict[str, list[float]] = {}
        for c in calls:
            for k, v in c.items():
                if k not in cls.SUMMED and isinstance(v, (int, float)) and not isinstance(v, bool):
                    seen.setdefault(k, []).append(float(v))
        out.extras = {k: sum(vals) / len(vals) for k, vals in sorted(seen.items())}
        return out

