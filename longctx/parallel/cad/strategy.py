"""The `cad` CP strategy: core attention disaggregation over a process group.

    s = build_strategy("cad", group, scope="cp", tolerance=0.05, max_shard_tokens=8192,
                       min_shard_tokens=128, ping_pong=True, backend="auto")
    out = s.attention(q, k, v, doc_ids=doc, causal=True)

Scopes:

- ``"cp"``: `group` is a CP group; the row is sharded contiguously (rank r holds
  tokens ``[r*S/N, (r+1)*S/N)``) and attention is exact over the whole row.
- ``"dp"``: `group` holds data-parallel ranks with DIFFERENT rows; each rank's
  q/k/v is its whole row (the layout is the identity) and attention stays
  inside each row. Tasks move between ranks only to balance attention FLOPs
  (the straggler case of DistCA).

Each call: gather every rank's run-length-encoded doc ids (two small
all-gathers), plan (deterministic, same on every rank), build this rank's
index tensors, run the dispatch (`dispatch.CADAttention`). Plans are cached:
when every rank's doc ids, shapes and dtype equal the previous call's (one
1-element all-reduce decides), the plan is reused -- so the layers of one step
plan once.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..layouts import Layout
from ..strategy import CPStrategy, register
from .dispatch import CADAttention, build_exchanges
from .planner import plan as make_plan
from .tasks import CostModel, docs_from_runs, local_runs

SCOPES = ("cp", "dp")


class WholeRowLayout(Layout):
    """Every rank holds its whole row (scope "dp"): shard and unshard are the identity."""

    name = "whole_row"

    def __init__(self, group=None):
        super().__init__(group)
        self.cp_size, self.cp_rank = 1, 0  # nothing of a row lives on another rank

    def token_index(self, seq_len: int, rank: int | None = None, device=None) -> torch.Tensor:
        return torch.arange(seq_len, dtype=torch.int64, device=device)

    def shard(self, full: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return full

    def unshard(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return local


class _Runtime:
    """A plan and this rank's exchanges, with the key that says when they can be reused."""

    def __init__(self, key, doc, plan, exchanges, planner_ms, build_ms):
        self.key, self.doc, self.plan, self.exchanges = key, doc, plan, exchanges
        self.planner_ms, self.build_ms = planner_ms, build_ms


@register("cad")
class CADAttentionStrategy(CPStrategy):
    """Core attention disaggregation; see the module docstring and `longctx.parallel.cad`."""

    name = "cad"
    options = ("backend", "scope", "tolerance", "max_shard_tokens", "min_shard_tokens", "ping_pong")

    def __init__(self, group=None, *, backend: str = "auto", scope: str = "cp", tolerance: float = 0.05,
                 max_shard_tokens: int = 8192, min_shard_tokens: int = 128, ping_pong: bool = True):
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
        if scope == "dp":
            self.layout = WholeRowLayout(self.group)
        self._cache: _Runtime | None = None

    def __repr__(self) -> str:
        return (f"CADAttentionStrategy(scope={self.scope!r}, group_size={self.cp_size}, rank={self.cp_rank}, "
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

    def runtime(self, q, k, doc_ids, causal) -> tuple[_Runtime, bool]:
        """The plan and exchanges for this call (cached when nothing changed on any rank)."""
        B, S, H, D = q.shape
        key = (tuple(q.shape), tuple(k.shape), q.dtype, str(q.device), bool(causal), doc_ids is None)
        c = self._cache
        hit = c is not None and c.key == key and (
            doc_ids is None or (c.doc is not None and c.doc.shape == doc_ids.shape
                                and torch.equal(c.doc, doc_ids.detach().to(c.doc.device))))
        if self._all_agree(hit, q.device):
            return c, True
        t0 = time.perf_counter()
        runs = local_runs(doc_ids, B, S)
        all_runs, batches, seqs = self._gather_runs(runs, B, S, q.device)
        if self.scope == "cp" and len(set(seqs)) > 1:
            raise ValueError(f"cad scope 'cp': every rank must hold the same number of tokens, got {seqs}")
        row_size = self.cp_size if self.scope == "cp" else 1
        docs = docs_from_runs(all_runs, seqs, row_size)
        cost = CostModel.for_shapes(H, k.shape[2], D, q.element_size())
        p = make_plan(docs, self.cp_size, causal=causal, cost=cost, tolerance=self.tolerance,
                      max_shard_tokens=self.max_shard_tokens, min_shard_tokens=self.min_shard_tokens,
                      ping_pong=self.ping_pong)
        exchanges = build_exchanges(p, self.cp_rank, device=q.device)
        build_ms = (time.perf_counter() - t0) * 1e3
        doc_copy = None if doc_ids is None else doc_ids.detach().clone()
        self._cache = _Runtime(key, doc_copy, p, exchanges, p.planner_ms, build_ms)
        return self._cache, False

    # -- attention -----------------------------------------------------------------------------
    def attention(self, q, k, v, *, doc_ids=None, causal=True, softmax_scale=None):
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(
                f"q, k, v must be [B, S_local, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
            raise ValueError(f"cad: k and v must be [B, S_local, H_kv, D] like q {tuple(q.shape)}, "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        if q.shape[2] % k.shape[2] != 0:
            raise ValueError(f"cad: q heads ({q.shape[2]}) must be a multiple of k/v heads ({k.shape[2]})")
        if doc_ids is not None and tuple(doc_ids.shape) != tuple(q.shape[:2]):
            raise ValueError(f"doc_ids must be [B, S_local] = {tuple(q.shape[:2])}, got {tuple(doc_ids.shape)}")
        rt, cached = self.runtime(q, k, doc_ids, causal)
        p = rt.plan
        moved = sum(t.pairs for t in p.tasks if t.owner != t.server)
        self.last_stats = {
            "imbalance_before": p.imbalance_before,
            "imbalance_after": p.imbalance_after,
            "planner_ms": rt.planner_ms,
            "plan_build_ms": rt.build_ms,
            "plan_cached": int(cached),
            "tasks": len(p.tasks),
            "moved_pairs_frac": moved / max(sum(p.loads_after), 1),
        }
        return CADAttention.apply(q, k, v, rt.exchanges, self.group, self.cp_rank, self.cp_size, causal,
                                  softmax_scale, self.backend, self.ping_pong, self.last_stats)
