"""The `cad` CP strategy: core attention disaggregation over a process group.

    s = build_strategy("cad", group, scope="cp", tolerance=0.05, max_shard_tokens=8192,
                       min_shard_tokens=128, ping_pong=True, backend="auto", row_size=None)
    out = s.attention(q, k, v, doc_ids=doc, causal=True)

Options: ``scope`` ("cp" | "dp"); ``tolerance``: planned attention FLOPs per
server stay below (1 + tolerance) x mean; ``max_shard_tokens``: long documents
are cut into query shards of at most this many tokens before planning;
``min_shard_tokens``: the planner cuts shards at multiples of this (finer for
short rows); ``ping_pong``: two nano-batches, communication of one overlapping
the kernel of the other; ``backend``: kernel backend; ``row_size`` (scope dp):
consecutive ranks sharing a row (default 1).

`last_stats` (per call; the backward completes the same dict): bytes_sent,
bytes_recv (and fwd_/bwd_ parts), attn_flops (+ _fwd, _bwd = 2.5 x fwd) and
visible_pairs of what this server computed, imbalance_before / imbalance_after
(max/mean planned attention FLOPs over the group, in place / planned),
planner_ms and plan_build_ms (of the plan in use), plan_cached (1 when reused),
tasks, moved_pairs_frac, exposed_comm_ms (+ fwd_/bwd_: time blocked waiting
on all-to-alls), fwd_compute_ms / bwd_compute_ms (kernel time).

Scopes:

- ``"cp"``: `group` is a CP group; the row is sharded contiguously (rank r holds
  tokens ``[r*S/N, (r+1)*S/N)``) and attention is exact over the whole row.
- ``"dp"``: `group` holds data-parallel ranks with DIFFERENT rows; each rank's
  q/k/v is its whole row (the layout is the identity) and attention stays
  inside each row. Tasks move between ranks only to balance attention FLOPs
  (the straggler case of DistCA). With ``row_size=c`` (> 1), `c` consecutive
  ranks of the group share a row, sharded contiguously (a dp x cp mesh with
  group = WORLD and row_size = cp): balancing then spans the whole mesh.

Each call: gather every rank's run-length-encoded doc ids (two small
all-gathers), plan (deterministic, same on every rank), build this rank's
index tensors, run the dispatch (`dispatch.CADAttention`). A sliding ``window``
is planned for (pair counts, hence the balance, are the window's) and masked by
the kernels with global token indices. Plans are cached:
when every rank's doc ids, shapes and dtype equal the previous call's (one
1-element all-reduce decides), the plan is reused -- so the layers of one step
plan once.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..layouts import ContiguousLayout
from ..stats import StrategyStats
from ..strategy import CPStrategy, register
from .dispatch import CADAttention, build_exchanges
from .planner import plan as make_plan
from .tasks import CostModel, docs_from_runs, local_runs

SCOPES = ("cp", "dp")


class RowLayout(ContiguousLayout):
    """Scope "dp": ``row_size`` consecutive ranks of the group share a row, each holding a
    contiguous slice in rank order (``row_size=1``: every rank holds its whole row, and
    shard/unshard are the identity)."""

    name = "row"

    def __init__(self, group=None, row_size: int = 1):
        super().__init__(group)
        self.group_size, self.group_rank = self.cp_size, self.cp_rank
        self.row_size = row_size
        self.cp_size, self.cp_rank = row_size, self.group_rank % row_size

    def shard(self, full: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return full if self.cp_size == 1 else super().shard(full, dim)

    def unshard(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        if self.cp_size == 1:
            return local
        local = local.detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(self.group_size)]
        dist.all_gather(parts, local, group=self.group)
        first = (self.group_rank // self.row_size) * self.row_size
        return torch.cat(parts[first:first + self.row_size], dim=dim)


class _Runtime:
    """A plan and this rank's exchanges, with the key that says when they can be reused."""

    def __init__(self, key, doc, plan, exchanges, planner_ms, build_ms):
        self.key, self.doc, self.plan, self.exchanges = key, doc, plan, exchanges
        self.planner_ms, self.build_ms = planner_ms, build_ms
        moved = sum(t.pairs for t in plan.tasks if t.owner != t.server)
        self.moved_frac = moved / max(sum(plan.loads_after), 1)


@register("cad")
class CADAttentionStrategy(CPStrategy):
    """Core attention disaggregation; see the module docstring and `longctx.parallel.cad`."""

    name = "cad"
    options = ("backend", "scope", "tolerance", "max_shard_tokens", "min_shard_tokens", "ping_pong", "row_size")

    def __init__(self, group=None, *, backend: str = "auto", scope: str = "cp", tolerance: float = 0.05,
                 max_shard_tokens: int = 8192, min_shard_tokens: int = 128, ping_pong: bool = True,
                 row_size: int | None = None):
        super().__init__(group, backend=backend)
        if scope not in SCOPES:
            raise ValueError(f"cad: scope must be one of {SCOPES}, got {scope!r}")
        if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
            raise ValueError(f"cad: tolerance must be a number >= 0, got {tolerance!r}")
        for name, val in (("max_shard_tokens", max_shard_tokens), ("min_shard_tokens", min_shard_tokens)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"cad: {name} must be a positive integer, got {val!r}")
        self.scope = scope
        self.tolerance = float(tolerance)
        self.max_shard_tokens = max_shard_tokens
        self.min_shard_tokens = min_shard_tokens
        self.ping_pong = bool(ping_pong)
        if scope == "cp":
            if row_size not in (None, self.cp_size):
                raise ValueError(f"cad: scope 'cp' shards one row over the whole group ({self.cp_size} ranks); "
                                 f"row_size={row_size} is for scope 'dp'")
            self.row_size = self.cp_size
        else:
            row_size = 1 if row_size is None else row_size
            if isinstance(row_size, bool) or not isinstance(row_size, int) or row_size < 1 \
                    or self.cp_size % row_size:
                raise ValueError(f"cad: row_size must be a positive divisor of the group size {self.cp_size}, "
                                 f"got {row_size!r}")
            self.row_size = row_size
            self.layout = RowLayout(self.group, row_size)
        self._cache: _Runtime | None = None

    def __repr__(self) -> str:
        return (f"CADAttentionStrategy(scope={self.scope!r}, group_size={self.cp_size}, rank={self.cp_rank}, "
                f"row_size={self.row_size}, "
                f"tolerance={self.tolerance}, ping_pong={self.ping_pong}, backend={self.backend!r})")

    # -- planning ------------------------------------------------------------------------------
    def _gather_runs(self, runs: torch.Tensor, batch: int, seq_local: int, device):
        """Every rank's (runs, batch, seq_local), in rank order."""
        N = self.cp_size
        if self.group is None or N == 1:
            return [runs.tolist()], [batch], [seq_local]
        head = torch.tensor([runs.shape[0], batch, seq_local], dtype=torch.int64, device=device)
        heads = [torch.empty_like(head) for _ in range(N)]
        dist.all_gather(heads, head, group=self.group)
        heads = [h.cpu().tolist() for h in heads]
        width = max(h[0] for h in heads)
        padded = torch.zeros(width, 4, dtype=torch.int64)
        padded[: runs.shape[0]] = runs
        padded = padded.to(device)
        parts = [torch.empty_like(padded) for _ in range(N)]
        dist.all_gather(parts, padded, group=self.group)
        all_runs = [p.cpu()[: h[0]].tolist() for p, h in zip(parts, heads)]
        return all_runs, [h[1] for h in heads], [h[2] for h in heads]

    def _all_agree(self, local_hit: bool, device) -> bool:
        if self.group is None or self.cp_size == 1:
            return local_hit
        flag = torch.tensor([1 if local_hit else 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def runtime(self, q, k, doc_ids, causal, window=None) -> tuple[_Runtime, bool]:
        """The plan and exchanges for this call (cached when nothing changed on any rank)."""
        B, S, H, D = q.shape
        key = (tuple(q.shape), tuple(k.shape), q.dtype, str(q.device), bool(causal), window, doc_ids is None)
        c = self._cache
        hit = c is not None and c.key == key and (
            doc_ids is None or (c.doc is not None and c.doc.shape == doc_ids.shape
                                and torch.equal(c.doc, doc_ids.detach().to(c.doc.device))))
        if self._all_agree(hit, q.device):
            return c, True
        t0 = time.perf_counter()
        runs = local_runs(doc_ids, B, S)
        all_runs, batches, seqs = self._gather_runs(runs, B, S, q.device)
        R = self.row_size
        for first in range(0, self.cp_size, R):
            if len(set(seqs[first:first + R])) > 1 or len(set(batches[first:first + R])) > 1:
                raise ValueError(f"cad: the {R} ranks sharing a row must hold the same number of tokens and rows, "
                                 f"got seq {seqs[first:first + R]}, batch {batches[first:first + R]}")
        docs = docs_from_runs(all_runs, seqs, R)
        cost = CostModel.for_shapes(H, k.shape[2], D, q.element_size())
        p = make_plan(docs, self.cp_size, causal=causal, window=window, cost=cost, tolerance=self.tolerance,
                      max_shard_tokens=self.max_shard_tokens, min_shard_tokens=self.min_shard_tokens,
                      ping_pong=self.ping_pong)
        exchanges = build_exchanges(p, self.cp_rank, device=q.device)
        build_ms = (time.perf_counter() - t0) * 1e3
        doc_copy = None if doc_ids is None else doc_ids.detach().clone()
        self._cache = _Runtime(key, doc_copy, p, exchanges, p.planner_ms, build_ms)
        return self._cache, False

    # -- attention -----------------------------------------------------------------------------
    def attention(self, q, k, v, *, doc_ids=None, causal=True, window=None, softmax_scale=None):
        window = self.check_inputs(q, k, v, doc_ids, window)
        rt, cached = self.runtime(q, k, doc_ids, causal, window)
        p = rt.plan
        self.last_stats = StrategyStats().note(
            imbalance_before=p.imbalance_before, imbalance_after=p.imbalance_after, planner_ms=rt.planner_ms,
            plan_build_ms=rt.build_ms, plan_cached=int(cached), tasks=len(p.tasks), moved_pairs_frac=rt.moved_frac,
        )
        return CADAttention.apply(q, k, v, rt.exchanges, self.group, self.cp_rank, self.cp_size, causal, window,
                                  softmax_scale, self.backend, self.ping_pong, self.last_stats)
