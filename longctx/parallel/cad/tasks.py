"""CAD tasks: documents, query shards and their costs.

Core attention of a packed row decomposes by document. A *task* is a query
shard of one document -- a contiguous range ``[a, b)`` of the document's tokens
in document order -- plus the key/value range it may see: the document prefix
``[0, b)`` when causal, the whole document otherwise. A task therefore needs
no result from any other task (no log-sum-exp merge): it can run on any
attention server that receives its Q and the K/V it needs.

Documents are described by *runs*: maximal stretches of one document held
contiguously by one rank. With scope ``cp`` a long document spans several
ranks (several runs); with scope ``dp`` every rank holds whole rows, so a
document is one run. A document is identified by (row, batch row, doc id
value); tokens with the same id in one row belong to the same document even
when they are not adjacent (that is what the attention mask says).

Costs are counted in visible query-key pairs (attention FLOPs are
``4 * H * D * pairs`` forward, 2.5x that backward), traffic in bytes.

Sliding windows: a query sees only keys less than ``window`` tokens before it
(global token index, so tokens of one document that are not adjacent in the
row are as far apart as in the row). Pair counts follow (`Mask`); the key
range a task needs is still the document prefix (K/V outside the window are
delivered but masked), so traffic does not depend on the window.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch


def _tri(n: int) -> int:
    return n * (n + 1) // 2 if n > 0 else 0


def pairs_in(a: int, b: int, length: int, causal: bool, window: int | None = None) -> int:
    """Visible pairs of the queries ``[a, b)`` (document order) of a document of ``length``
    contiguous tokens, with an optional sliding ``window``."""
    if b <= a:
        return 0
    if window is None:
        if causal:  # query i sees keys 0..i: sum_{i=a}^{b-1} (i + 1)
            return _tri(b) - _tri(a)
        return (b - a) * length
    W = window
    if causal:  # query i sees min(i + 1, W) keys; F(n) = sum over the first n queries
        def F(n):
            return _tri(n) if n <= W else _tri(W) + (n - W) * W
        return F(b) - F(a)
    # query i sees keys [max(0, i - W + 1), length): length - max(0, i - W + 1)
    return (b - a) * length - (_tri(b - W) - _tri(a - W))


def kv_end(b: int, length: int, causal: bool) -> int:
    """End of the key range the queries ``[a, b)`` need (the range starts at 0)."""
    return b if causal else length


@dataclass(frozen=True)
class Run:
    """Tokens ``[doc_start, doc_start + length)`` (document order) of a document, held by
    ``rank`` at local flat positions ``[flat_start, flat_start + length)`` (flat = b * S_local + s).

    ``row_pos``: global token index (position in the row) of the run's first token;
    None = the document is contiguous and positions are document-order indices."""

    rank: int
    flat_start: int
    doc_start: int
    length: int
    row_pos: int | None = None

    @property
    def doc_end(self) -> int:
        return self.doc_start + self.length

    def position(self, x: int) -> int:
        """Global token index of document token ``x`` (inside this run): what the kernel masks with."""
        return (x if self.row_pos is None else self.row_pos + (x - self.doc_start))


class Doc:
    """One document of the group: ``key`` (dense id, same on every rank), ``length``, ``runs``."""

    __slots__ = ("key", "length", "runs", "_ranks", "contiguous", "_cum")

    def __init__(self, key: int, runs: list[Run]):
        self.key = key
        self.runs = runs
        self.length = sum(r.length for r in runs)
        self._ranks = {r.rank for r in runs}
        # Adjacent in the row (window distances = document-order distances)?
        self.contiguous = all(r.row_pos is None or s.row_pos is None or s.row_pos == r.row_pos + r.length
                              for r, s in zip(runs, runs[1:]))
        self._cum: dict = {}

    def pairs(self, a: int, b: int, causal: bool, window: int | None = None) -> int:
        """Visible pairs of the queries ``[a, b)`` (document order) of this document."""
        if window is None or self.contiguous:
            return pairs_in(a, b, self.length, causal, window)
        if b <= a:
            return 0
        cum = self._cum.get((causal, window))
        if cum is None:  # runs far apart in the row: count with the global positions
            pos = [r.position(x) for r in self.runs for x in range(r.doc_start, r.doc_end)]
            cum = [0]
            for i, p in enumerate(pos):
                lo = bisect.bisect_right(pos, p - window)  # first key inside the window
                cum.append(cum[-1] + (i + 1 if causal else self.length) - lo)
            self._cum[(causal, window)] = cum
        return cum[b] - cum[a]

    @property
    def ranks(self) -> set[int]:
        return self._ranks

    def local_count(self, rank: int, lo: int, hi: int) -> int:
        """Tokens of document range ``[lo, hi)`` held by ``rank``."""
        if rank not in self._ranks or hi <= lo:
            return 0
        n = 0
        for r in self.runs:
            if r.rank == rank:
                n += max(0, min(hi, r.doc_end) - max(lo, r.doc_start))
        return n

    def pieces(self, lo: int, hi: int):
        """(run, lo', hi') for every run overlapping document range ``[lo, hi)``."""
        for r in self.runs:
            s, e = max(lo, r.doc_start), min(hi, r.doc_end)
            if s < e:
                yield r, s, e

    def __repr__(self) -> str:
        return f"Doc(key={self.key}, length={self.length}, runs={self.runs})"


class Task:
    """Queries ``[a, b)`` of ``doc`` (all inside ``run``, so one owner) computed on ``server``
    in nano-batch ``nano``."""

    __slots__ = ("doc", "run", "a", "b", "server", "nano", "pairs")

    def __init__(self, doc: Doc, run: Run, a: int, b: int, server: int, causal: bool, nano: int = 0,
                 window: int | None = None):
        self.doc, self.run, self.a, self.b = doc, run, a, b
        self.server, self.nano = server, nano
        self.pairs = doc.pairs(a, b, causal, window)

    @property
    def owner(self) -> int:
        return self.run.rank

    def q_flat_start(self) -> int:
        return self.run.flat_start + (self.a - self.run.doc_start)

    def key(self) -> tuple:
        return (self.doc.key, self.a)

    def __repr__(self) -> str:
        return (f"Task(doc={self.doc.key}, [{self.a}, {self.b}), owner={self.owner}, "
                f"server={self.server}, nano={self.nano}, pairs={self.pairs})")


@dataclass(frozen=True)
class Mask:
    """Causal flag and sliding window of one call: pair counts and the cuts the planner makes."""

    causal: bool = True
    window: int | None = None

    def pairs(self, doc: Doc, a: int, b: int) -> int:
        return doc.pairs(a, b, self.causal, self.window)

    def task(self, doc: Doc, run: Run, a: int, b: int, server: int, nano: int = 0) -> "Task":
        return Task(doc, run, a, b, server, self.causal, nano, self.window)

    def head_end(self, doc: Doc, a: int, b: int, amt: int) -> int:
        """Largest m in [a, b] with pairs(a, m) <= amt."""
        if self.window is None:
            if self.causal:
                m = (math.isqrt(1 + 4 * (2 * amt + a * (a + 1))) - 1) // 2
            else:
                m = a + amt // max(doc.length, 1)
            return min(m, b)
        lo, hi = a, b
        while lo < hi:  # pairs(a, m) grows with m
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.pairs(doc, a, mid) <= amt else (lo, mid - 1)
        return lo

    def tail_start(self, doc: Doc, a: int, b: int, amt: int) -> int:
        """Smallest m in [a, b] with pairs(m, b) <= amt."""
        if self.window is None:
            if not self.causal:
                return max(b - amt // max(doc.length, 1), a)
            K = b * (b + 1) - 2 * amt
            m = 0
            if K > 0:
                m = (math.isqrt(1 + 4 * K) - 1) // 2
                while m * (m + 1) < K:
                    m += 1
            return max(m, a)
        lo, hi = a, b
        while lo < hi:  # pairs(m, b) shrinks as m grows
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.pairs(doc, mid, b) <= amt else (mid + 1, hi)
        return lo


@dataclass(frozen=True)
class CostModel:
    """Bytes per token moved, for one attention call (forward + backward).

    A query token computed away from its owner travels 4 times (Q and dOut to
    the server, Out and dQ back); a key/value token needed by a remote server
    twice (K,V there, dK,dV back).
    """

    q_token_bytes: int  # H * D * element size
    kv_token_bytes: int  # 2 * H_kv * D * element size

    @property
    def q_cost(self) -> int:
        return 4 * self.q_token_bytes

    @property
    def kv_cost(self) -> int:
        return 2 * self.kv_token_bytes

    @classmethod
    def for_shapes(cls, heads: int, kv_heads: int, head_dim: int, element_size: int) -> "CostModel":
        return cls(heads * head_dim * element_size, 2 * kv_heads * head_dim * element_size)


# ---------------------------------------------------------------------------
# documents from doc ids
# ---------------------------------------------------------------------------


def local_runs(doc_ids: torch.Tensor | None, batch: int, seq_local: int) -> torch.Tensor:
    """Run-length encoding of this rank's doc ids: int64 ``[n, 4]`` rows (b, start, length, value).

    Without doc ids every batch row is one document (value 0).
    """
    if doc_ids is None:
        b = torch.arange(batch, dtype=torch.int64)
        return torch.stack([b, torch.zeros_like(b), torch.full_like(b, seq_local), torch.zeros_like(b)], 1)
    d = doc_ids.detach().to("cpu", torch.int64)
    if seq_local == 0:
        return torch.zeros(0, 4, dtype=torch.int64)
    change = torch.ones(batch, seq_local, dtype=torch.bool)
    change[:, 1:] = d[:, 1:] != d[:, :-1]
    b_idx, s_idx = change.nonzero(as_tuple=True)  # row-major: sorted by flat position
    flat = b_idx * seq_local + s_idx
    ends = torch.cat([flat[1:], torch.tensor([batch * seq_local])])
    # A run never crosses a row: every row starts with a change.
    return torch.stack([b_idx, s_idx, ends - flat, d[b_idx, s_idx]], 1)


def docs_from_runs(rank_runs: list[list[tuple[int, int, int, int]]], seq_local: list[int],
                   row_size: int) -> list[Doc]:
    """Documents of the group from every rank's runs (same answer on every rank).

    ``row_size`` consecutive ranks share a row, holding contiguous slices in rank
    order (scope cp: the whole group; scope dp: 1). A document is identified by
    (row, batch row, doc id value); its runs are ordered by position in the row.
    """
    found: dict[tuple[int, int, int], list[tuple[int, int, int, int]]] = {}
    for rank, runs in enumerate(rank_runs):
        row, off = rank // row_size, (rank % row_size) * seq_local[rank]
        S = seq_local[rank]
        for b, s, n, value in runs:
            # (global position in the row, rank, flat start, length)
            found.setdefault((row, b, value), []).append((off + s, rank, b * S + s, n))
    docs = []
    for key in sorted(found):
        pieces = sorted(found[key])
        runs, pos = [], 0
        for row_pos, rank, flat, n in pieces:
            runs.append(Run(rank, flat, pos, n, row_pos))
            pos += n
        docs.append(Doc(len(docs), runs))
    return docs


def docs_from_lengths(rank_lengths: list[list[int]]) -> list[Doc]:
    """Scope-dp documents for simulation: rank r holds one row with documents of these lengths."""
    docs = []
    for rank, lengths in enumerate(rank_lengths):
        flat = 0
        for n in lengths:
            docs.append(Doc(len(docs), [Run(rank, flat, 0, int(n), flat)]))
            flat += int(n)
    return docs


def initial_tasks(docs: list[Doc], max_shard_tokens: int, causal: bool, window: int | None = None) -> list[Task]:
    """Query shards in place: each run cut at multiples of ``max_shard_tokens`` (document order)."""
    tasks = []
    step = max(1, int(max_shard_tokens))
    for doc in docs:
        for run in doc.runs:
            a = run.doc_start
            while a < run.doc_end:
                b = min(run.doc_end, (a // step + 1) * step)
                tasks.append(Task(doc, run, a, b, run.rank, causal, window=window))
                a = b
    return tasks


def ranges_to_index(starts: list[int], lengths: list[int], device=None) -> torch.Tensor:
    """Concatenation of ``arange(s, s + n)`` for each (s, n), as one int64 tensor.

    Built as a cumulative sum of steps (1 inside a range, a jump at each range
    start): one scatter and one cumsum, no per-range work.
    """
    pairs = [(s, n) for s, n in zip(starts, lengths) if n > 0]
    if not pairs:
        return torch.zeros(0, dtype=torch.int64, device=device)
    st = torch.tensor([p[0] for p in pairs], dtype=torch.int64, device=device)
    ln = torch.tensor([p[1] for p in pairs], dtype=torch.int64, device=device)
    ends = torch.cumsum(ln, 0)
    total = int(ends[-1])
    steps = torch.ones(total, dtype=torch.int64, device=device)
    steps[0] = st[0]
    if len(pairs) > 1:
        # at the first token of range i: jump from the last token of range i-1 to s_i
        steps[ends[:-1]] = st[1:] - (st[:-1] + ln[:-1] - 1)
    return torch.cumsum(steps, 0)


def repeat_values(values: list[int], counts: list[int], device=None) -> torch.Tensor:
    """``values[i]`` repeated ``counts[i]`` times, as one int64 tensor."""
    if not counts or sum(counts) == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.repeat_interleave(torch.tensor(values, dtype=torch.int64, device=device),
                                   torch.tensor(counts, dtype=torch.int64, device=device))
