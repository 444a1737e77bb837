"""CAD planner: assign attention tasks to attention servers with balanced FLOPs.

Every rank is an attention server, in place (as in DistCA). Tasks start on
the rank that owns their queries. The planner then moves work from servers
above ``(1 + tolerance) * mean`` to servers below the target
``(1 + fill * tolerance) * mean``, greedily, choosing each time the move with
the fewest bytes per FLOP moved:

- bytes = Q traffic (4 x Q bytes per query token: Q, Out, dOut, dQ) plus the
  K/V traffic (2 x K/V bytes per token: K,V and dK,dV) of the part of the
  key range the destination does not hold yet (its own tokens and K/V it
  already receives for the same document are free);
- a task bigger than the FLOPs to move is split: either its head (fewest K/V
  tokens) or its tail (fewest query tokens per FLOP), whichever is cheaper,
  cut at multiples of ``min_shard_tokens`` (finer for short rows, see
  `cut_granularity`).

A source stops at the target, or once it is within the tolerance and what is
left to move is below the cut granularity; only a source still above the cap
may fill destinations up to the cap.

Everything is deterministic (integer pair counts, explicit tie-breaks), so
every rank computes the same plan from the same gathered metadata without
exchanging it. Cost is O(tasks log tasks + moves * candidates).

After balancing, each server's tasks are split into two nano-batches of
equal FLOPs (ping-pong): its own tasks first, then the ones it received.

With a sliding window every pair count (loads, cuts, nano-batch halves) is the
window's (`tasks.Mask`), so the balance is that of the work really done.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from .tasks import CostModel, Doc, Mask, Task, initial_tasks, kv_end


@dataclass
class Plan:
    docs: list[Doc]
    tasks: list[Task]  # final: every query token in exactly one task
    num_servers: int
    causal: bool
    nanos: int
    cost: CostModel
    loads_before: list[int]  # visible pairs per server, tasks in place
    loads_after: list[int]
    planner_ms: float = 0.0
    moves: int = 0
    pairs_moved: int = 0
    notes: dict = field(default_factory=dict)
    window: int | None = None

    @staticmethod
    def _imbalance(loads: list[int]) -> float:
        total = sum(loads)
        return max(loads) * len(loads) / total if total > 0 else 1.0

    @property
    def imbalance_before(self) -> float:
        return self._imbalance(self.loads_before)

    @property
    def imbalance_after(self) -> float:
        return self._imbalance(self.loads_after)

    def kv_ends(self) -> dict[int, dict[int, tuple[Doc, list[int]]]]:
        """server -> {doc key: (doc, [end of the key range needed in nano 0, in nano 1, ...])}.

        A server receives each K/V token it needs once: nano-batch n delivers
        ``[max(E_0..E_{n-1}), max(E_0..E_n))`` and may also use what earlier
        nano-batches delivered.
        """
        ends: dict[int, dict[int, tuple[Doc, list[int]]]] = {}
        for t in self.tasks:
            d = ends.setdefault(t.server, {})
            if t.doc.key not in d:
                d[t.doc.key] = (t.doc, [0] * self.nanos)
            e = kv_end(t.b, t.doc.length, self.causal)
            lst = d[t.doc.key][1]
            if lst[t.nano] < e:
                lst[t.nano] = e
        return ends

    def traffic(self) -> tuple[list[int], list[int]]:
        """Exact bytes each rank sends and receives for one forward + backward
        (what the dispatch moves; a rank's traffic to itself is not counted).

        Per query token computed away from its owner: Q and dOut go to the
        server, Out and dQ come back; per K/V token a server needs from another
        rank: K,V go there once, dK,dV come back. Each direction carries half.
        """
        N = self.num_servers
        sent, recv = [0] * N, [0] * N
        q2, kv1 = 2 * self.cost.q_token_bytes, self.cost.kv_token_bytes
        for t in self.tasks:
            if t.owner != t.server:
                n = (t.b - t.a) * q2
                sent[t.owner] += n
                recv[t.server] += n
                sent[t.server] += n
                recv[t.owner] += n
        for server, docs in self.kv_ends().items():
            for doc, ends in docs.values():
                for run, lo, hi in doc.pieces(0, max(ends)):
                    if run.rank != server:
                        n = (hi - lo) * kv1
                        sent[run.rank] += n
                        recv[server] += n
                        sent[server] += n
                        recv[run.rank] += n
        return sent, recv


def plan(docs: list[Doc], num_servers: int, *, causal: bool = True, window: int | None = None, cost: CostModel,
         tolerance: float = 0.05, max_shard_tokens: int = 8192, min_shard_tokens: int = 128,
         ping_pong: bool = True, fill: float = 0.5, candidates: int = 8, dest_candidates: int = 4) -> Plan:
    """Plan one attention call for ``num_servers`` servers; see the module docstring."""
    t0 = time.perf_counter()
    N = num_servers
    mask = Mask(causal, window)
    tasks = initial_tasks(docs, max_shard_tokens, causal, window)
    loads = [0] * N
    for t in tasks:
        loads[t.server] += t.pairs
    before = list(loads)
    gran = cut_granularity(sum(d.length for d in docs), N, min_shard_tokens)
    bal = _Balancer(tasks, loads, N, mask, cost, tolerance, fill, gran, candidates, dest_candidates)
    bal.run()
    tasks = bal.tasks
    nanos = 2 if ping_pong else 1
    if ping_pong:
        tasks = _split_nanos(tasks, N, mask, gran)
    tasks.sort(key=lambda t: (t.server, t.nano, t.doc.key, t.a))
    ms = (time.perf_counter() - t0) * 1e3
    return Plan(docs, tasks, N, causal, nanos, cost, before, list(bal.loads), ms, bal.moves, bal.pairs_moved,
                window=window)


def cut_granularity(tokens: int, num_servers: int, min_shard_tokens: int) -> int:
    """Tasks are cut at multiples of this: ``min_shard_tokens``, or finer when a server holds
    fewer than 64 such pieces (short rows could not be balanced otherwise)."""
    per_server = tokens // max(num_servers, 1)
    return max(1, min(int(min_shard_tokens), per_server // 64))


class _Balancer:
    def __init__(self, tasks, loads, N, mask: Mask, cost, tolerance, fill, gran, candidates, dest_candidates):
        self.tasks, self.loads, self.N = tasks, loads, N
        self.mask, self.causal = mask, mask.causal
        self.qc, self.kc = cost.q_cost, cost.kv_cost
        self.gran, self.M, self.K = gran, candidates, dest_candidates
        total = sum(loads)
        self.mean = total / N if N else 0.0
        self.cap = self.mean * (1.0 + tolerance)
        self.hi = self.mean * (1.0 + fill * tolerance)
        self.moves = 0
        self.pairs_moved = 0
        # doc key -> {server: end of the key range that server already receives/holds}
        self.holders: dict[int, dict[int, int]] = {}
        for t in tasks:
            self._hold(t.doc.key, t.server, kv_end(t.b, t.doc.length, self.causal))

    def _hold(self, key, server, e):
        h = self.holders.setdefault(key, {})
        if h.get(server, 0) < e:
            h[server] = e

    # -- costs -----------------------------------------------------------------------------
    def bytes_for(self, task: Task, x: int, y: int, dest: int) -> int:
        """Traffic of computing queries [x, y) of `task` on `dest` (fwd + bwd)."""
        doc = task.doc
        q = self.qc * (y - x) if task.owner != dest else 0
        e = kv_end(y, doc.length, self.causal)
        have = self.holders.get(doc.key, {}).get(dest, 0)
        kv = 0
        if e > have:
            kv = self.kc * ((e - have) - doc.local_count(dest, have, e))
        return q + kv

    def generic_ratio(self, t: Task) -> float:
        """Bytes per pair of moving the whole task to a server holding nothing of its document."""
        e = kv_end(t.b, t.doc.length, self.causal)
        return (self.qc * (t.b - t.a) + self.kc * e) / max(t.pairs, 1)

    def _head_cut(self, t: Task, amt: int):
        """Largest m (multiple of gran) with pairs(a, m) <= amt, or None."""
        m = (self.mask.head_end(t.doc, t.a, t.b, amt) // self.gran) * self.gran
        return m if t.a < m < t.b else None

    def _tail_cut(self, t: Task, amt: int):
        """Smallest m (multiple of gran) with pairs(m, b) <= amt, or None."""
        m = -(-self.mask.tail_start(t.doc, t.a, t.b, amt) // self.gran) * self.gran
        return m if t.a < m < t.b else None

    def options(self, t: Task, dest: int, amt: int):
        """(bytes/pair, -pairs, x, y) candidates for moving at most `amt` pairs of `t` to `dest`."""
        if amt <= 0:
            return []
        if t.pairs <= amt:
            return [(self.bytes_for(t, t.a, t.b, dest) / t.pairs, -t.pairs, t.a, t.b)]
        out = []
        m = self._head_cut(t, amt)
        if m is not None:
            p = self.mask.pairs(t.doc, t.a, m)
            if p > 0:
                out.append((self.bytes_for(t, t.a, m, dest) / p, -p, t.a, m))
        m = self._tail_cut(t, amt)
        if m is not None:
            p = self.mask.pairs(t.doc, m, t.b)
            if p > 0:
                out.append((self.bytes_for(t, m, t.b, dest) / p, -p, m, t.b))
        return out

    # -- destinations ------------------------------------------------------------------------
    def _room(self, s: int) -> float:
        return self.hi - self.loads[s]

    def top_rooms(self) -> list[int]:
        got, keep = [], []
        while self._heap and len(got) < self.K:
            neg, s = heapq.heappop(self._heap)
            room = self._room(s)
            if room <= 0:
                continue
            if -neg != room:  # stale entry: re-file it with its current room
                heapq.heappush(self._heap, (-room, s))
                continue
            got.append(s)
            keep.append((neg, s))
        for e in keep:
            heapq.heappush(self._heap, e)
        return got

    # -- the greedy loop ---------------------------------------------------------------------
    def run(self) -> None:
        N, loads = self.N, self.loads
        if N <= 1 or not loads or max(loads) <= self.cap:
            return
        by_server: list[list[Task]] = [[] for _ in range(N)]
        for t in self.tasks:
            by_server[t.server].append(t)
        self._heap = [(-self._room(s), s) for s in range(N) if self._room(s) > 0]
        heapq.heapify(self._heap)
        sources = sorted((s for s in range(N) if loads[s] > self.cap), key=lambda s: (-loads[s], s))
        new_tasks: list[Task] = []
        for src in sources:
            cand = sorted(by_server[src], key=lambda t: (self.generic_ratio(t), t.doc.key, t.a))
            ptr = 0
            while loads[src] > self.hi:
                while ptr < len(cand) and (cand[ptr].server != src or cand[ptr].pairs == 0):
                    ptr += 1
                window = [t for t in cand[ptr:ptr + 4 * self.M] if t.server == src and t.pairs > 0][: self.M]
                if not window:
                    break
                rooms = self.top_rooms()
                best = self._best(src, window, rooms, strict=True)
                if best is None:
                    if loads[src] <= self.cap:
                        break  # within tolerance; what is left is below the cut granularity
                    # The cheapest tasks cannot be cut that small: look at all of them, and
                    # if nothing fits below the target, allow filling up to the cap.
                    rest = [t for t in cand[ptr:] if t.server == src and t.pairs > 0]
                    best = self._best(src, rest, rooms, strict=True) or self._best(src, rest, rooms, strict=False)
                if best is None:
                    break
                _, _, x, y, t, dest = best
                new = self._apply(src, t, x, y, dest)
                if new is not None:
                    new_tasks.append(new)
        self.tasks = self.tasks + new_tasks

    def _best(self, src, window, rooms, strict):
        best = None
        for i, t in enumerate(window):
            dests = set(rooms)
            for s in self.holders.get(t.doc.key, {}):
                if s != src and self._room(s) > 0:
                    dests.add(s)
            for s in t.doc.ranks:
                if s != src and self._room(s) > 0:
                    dests.add(s)
            dests.discard(src)
            for d in sorted(dests):
                if strict:
                    amt = int(min(self.loads[src] - self.hi, self.hi - self.loads[d]))
                else:
                    amt = int(min(self.loads[src] - self.mean, self.cap - self.loads[d]))
                for ratio, negp, x, y in self.options(t, d, amt):
                    key = (ratio, negp, i, d)
                    if best is None or key < best[0]:
                        best = (key, None, x, y, t, d)
        if best is None:
            return None
        key, _, x, y, t, d = best
        return key[0], key[1], x, y, t, d

    def _apply(self, src, t: Task, x: int, y: int, dest: int):
        causal = self.causal
        if x == t.a and y == t.b:
            moved, new = t, None
            t.server = dest
        else:
            new = self.mask.task(t.doc, t.run, x, y, dest)
            if x == t.a:
                t.a = y
            else:
                t.b = x
            t.pairs = self.mask.pairs(t.doc, t.a, t.b)
            moved = new
        self.loads[src] -= moved.pairs
        self.loads[dest] += moved.pairs
        self.pairs_moved += moved.pairs
        self.moves += 1
        self._hold(t.doc.key, dest, kv_end(y, t.doc.length, causal))
        room = self._room(dest)
        if room > 0:
            heapq.heappush(self._heap, (-room, dest))
        return new


def _split_nanos(tasks: list[Task], N: int, mask: Mask, gran: int) -> list[Task]:
    """Two nano-batches per server with (nearly) equal pairs: own tasks first, then received ones.

    At most one task per server is cut in two (at a multiple of ``gran``).
    """
    by_server: list[list[Task]] = [[] for _ in range(N)]
    for t in tasks:
        by_server[t.server].append(t)
    out = []
    for s in range(N):
        ts = sorted(by_server[s], key=lambda t: (t.owner != s, t.owner, t.doc.key, t.a))
        total = sum(t.pairs for t in ts)
        half = total / 2
        cum = 0
        for t in ts:
            if cum >= half:
                t.nano = 1
            elif cum + t.pairs <= half:
                t.nano = 0
            else:  # straddles the middle: cut it so both halves get their share
                m = (mask.head_end(t.doc, t.a, t.b, int(half - cum)) // gran) * gran
                if t.a < m < t.b:
                    head = mask.task(t.doc, t.run, t.a, m, s, nano=0)
                    t.a = m
                    t.pairs = mask.pairs(t.doc, t.a, t.b)
                    t.nano = 1
                    out.append(head)
                else:
                    t.nano = 0 if (half - cum) >= t.pairs / 2 else 1
            cum += t.pairs if t.nano == 0 else 0
            if t.nano == 1 and cum < half:
                cum = half  # everything after goes to nano 1
            out.append(t)
    return out
