"""Ulysses x ring (USP, Fang & Zhao 2024): a 2-D context-parallel group.

The cp group of size ``N = U x R`` is viewed as ``R`` inner groups of ``U``
consecutive ranks: cp rank ``c = o*U + u`` is member ``u`` of inner group
``o`` and member (ring rank) ``o`` of outer group ``u``.

1. Ulysses inside each inner group: one all-to-all turns the U ranks'
   sequence shards of all H heads into head shards (``H/U`` heads) of the
   union of their tokens -- ring rank ``o``'s "ring chunk".
2. A zigzag ring across the R ranks of each outer group (same heads, different
   ring chunks) computes exact attention of the ring chunk against the whole
   sequence. This is ``ring.py``'s ring Function, driven through a small
   adapter that carries the outer group and the ring chunks' token indices.
   The ring chunk is handed over in sorted token order (a local permutation
   of the gathered sequence, undone before step 3), so the ring's causal
   block planning can trim each block to its visible part.
3. An all-to-all inside the inner group brings the output back to the
   sequence layout.

A sliding window is the ring's: its blocks are planned on the ring chunks'
global token indices (`ring.plan_block`), skipping the ones outside it.

Layout (:class:`HybridLayout`): the sequence is cut into ``2N`` chunks and cp
rank ``c`` holds chunks ``c`` and ``2N-1-c`` (the zigzag layout over all N
ranks). The U ranks of inner group ``o`` then hold 2N-chunks
``oU .. oU+U-1`` and ``2N-U-oU .. 2N-1-oU``, i.e. exactly chunks ``o`` and
``2R-1-o`` of the 2R-chunk split: the zigzag chunk pair of ring rank ``o``.
(Rank ``(o, u)`` holds part ``u`` of 2R-chunk ``o`` and part ``U-1-u`` of
2R-chunk ``2R-1-o``.) This holds for every U dividing N, so the layout does
not depend on ``ulysses_size`` and ``shard`` can be called before the heads
are known. Causal work is exactly balanced: every ring rank's queries are a
zigzag pair, and every rank of an inner group has the same number of heads.

Options:

- ``ulysses_size`` (U): must divide N. Default: the largest divisor U of N
  with ``H % U == 0`` and ``H_kv % U == 0 or U % H_kv == 0`` (Ulysses moves
  ``O(1/U)`` of the activations per rank, the ring ``O(R)`` blocks of K/V, so
  more Ulysses is cheaper as long as the heads allow it); ``U = 1`` (a pure
  zigzag ring) always qualifies, and ``R = N/U >= 1``.
- ``num_heads``, ``num_kv_heads``: hints for the default. Without
  ``ulysses_size`` and ``num_heads`` the choice is made at the first
  ``attention`` call from q's and k's head counts.

Process groups: ``dist.new_group`` is collective over the whole world, so
every rank of the world creates every inner and outer group of every cp
group, in the same order: the cp groups are found with an
``all_gather_object`` over WORLD, deduplicated and sorted. Consequently every
rank of the world must set up its hybrid strategy at the same time (at
construction when U is known then, else at the first ``attention`` call) --
the trainer builds and runs the same model on every rank, so this holds.

Communication per rank = Ulysses pieces inside the inner group (see
``ulysses.py``; with U in place of N, plus ``(U-1)`` x the local doc-id bytes
for the doc-id all-gather) + ring pieces across the outer group on the
head-sharded ring chunk (see ``ring.py``: forward ``(R-1)`` x (k + v + doc
bytes of the ring chunk), backward the same plus ``R`` hops of the fp32
(fp64 for fp64) dK/dV accumulators). ``last_stats`` reports the totals and
the pieces (``ulysses_*``, ``ring_*``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .comm import ByteCounter, all_gather_cat, all_to_all
from .layouts import Layout, ZigzagLayout
from .ring import _RingAttention
from .stats import StrategyStats
from .strategy import CPStrategy, register
from .ulysses import grads_to_seq, heads_to_seq, kv_replication, seq_to_heads


class HybridLayout(ZigzagLayout):
    """Rank c holds chunks c and 2N-1-c of the sequence cut into 2N equal chunks
    (the zigzag layout over all N ranks; ``token_index``, ``shard`` and
    ``unshard`` are ZigzagLayout's).

    For every factorisation N = U x R, inner group o (ranks oU .. oU+U-1) holds
    exactly the zigzag pair (o, 2R-1-o) of the 2R-chunk split: rank (o, u) has
    part u of 2R-chunk o and part U-1-u of 2R-chunk 2R-1-o.
    """

    name = "hybrid"


def default_ulysses_size(cp_size: int, num_heads: int, num_kv_heads: int | None = None) -> int:
    """Largest divisor U of cp_size that the heads allow (see the module docstring)."""
    for u in sorted((d for d in range(1, cp_size + 1) if cp_size % d == 0), reverse=True):
        if num_heads % u != 0:
            continue
        if num_kv_heads is not None and not (num_kv_heads % u == 0 or u % num_kv_heads == 0):
            continue
        return u
    return 1


class _RingChunkLayout:
    """Duck-types the layout the ring reads: ring rank o holds the union of inner
    group o's tokens (the zigzag pair (o, 2R-1-o) of the 2R split), sorted.

    Sorted indices let the ring trim causal blocks to their visible part
    (``ring.plan_block``); the hybrid permutes the head-sharded sequence into
    this order right after the inner all-to-all and back before the return one.
    """

    def __init__(self, layout: Layout, ulysses_size: int):
        self.layout, self.U = layout, ulysses_size

    def gathered_index(self, seq_len: int, rank: int) -> torch.Tensor:
        """Token indices of ring rank `rank` in the order the inner all-to-all gathers them."""
        return torch.cat([self.layout.token_index(seq_len, rank * self.U + u) for u in range(self.U)])

    def token_index(self, seq_len: int, rank: int | None = None, device=None) -> torch.Tensor:
        return self.gathered_index(seq_len, rank).sort().values.to(device)


class _RingView:
    """What ring.py's autograd Function reads from a strategy: the outer group."""

    fused_merge = False

    def __init__(self, group, size, rank, layout, backend):
        self.group, self.cp_size, self.cp_rank = group, size, rank
        self.layout, self.backend = layout, backend


class _CallStats:
    """Byte counters of the Ulysses pieces and the ring's own stats for one forward (+ its
    backward); ``out`` is the call's ``last_stats``, completed at the end of the forward
    and again of the backward. Each call gets its own record, so the backward of an
    earlier call (another layer) never mixes with a later one."""

    _RING_KEYS = ("fwd_bytes_sent", "fwd_bytes_recv", "bwd_bytes_sent", "bwd_bytes_recv", "steps", "blocks_computed")

    def __init__(self, ulysses_size: int, ring_size: int):
        self.U, self.R = ulysses_size, ring_size
        self.fwd, self.bwd = ByteCounter(), ByteCounter()
        self.ring = StrategyStats()
        self.out = StrategyStats()

    def _pieces(self) -> dict:
        return dict(
            ulysses_fwd_bytes_sent=self.fwd.sent, ulysses_fwd_bytes_recv=self.fwd.recv,
            ulysses_bwd_bytes_sent=self.bwd.sent, ulysses_bwd_bytes_recv=self.bwd.recv,
            **self.ring.prefixed("ring_", self._RING_KEYS),
        )

    def forward_done(self) -> None:
        ring = self.ring
        self.out.add_forward(self.fwd, ring.fwd, flops=ring.get("attn_flops_fwd", 0.0), ulysses_size=self.U,
                             ring_size=self.R, visible_pairs=ring.get("visible_pairs", 0), **self._pieces())

    def backward_done(self) -> None:
        self.out.add_backward(self.bwd, self.ring.bwd, flops=self.ring.get("attn_flops_bwd", 0.0), **self._pieces())


class _SeqToHeads(torch.autograd.Function):
    """Ulysses all-to-all inside the inner group; backward is the inverse (and
    sums the replicated kv heads' gradients). Its backward runs last, so it
    finalises the strategy's stats."""

    @staticmethod
    def forward(ctx, q, k, v, strat, rep, rec, order, inverse):
        ctx.strat, ctx.rep, ctx.rec, ctx.inverse = strat, rep, rec, inverse
        qh, kh, vh = seq_to_heads(q, k, v, strat.inner_group, strat.ulysses_size, rep, rec.fwd, order)
        if strat.ulysses_size == 1:
            qh, kh, vh = qh.view_as(qh), kh.view_as(kh), vh.view_as(vh)
        return qh, kh, vh

    @staticmethod
    @once_differentiable
    def backward(ctx, dqh, dkh, dvh):
        strat = ctx.strat
        dq, dk, dv = grads_to_seq(
            dqh, dkh, dvh, strat.inner_group, strat.ulysses_size, ctx.rep, ctx.rec.bwd, ctx.inverse
        )
        ctx.rec.backward_done()
        return dq, dk, dv, None, None, None, None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_h, strat, rec, order, inverse):
        ctx.strat, ctx.rec, ctx.order = strat, rec, order
        out = heads_to_seq(out_h, strat.inner_group, strat.ulysses_size, rec.fwd, inverse)
        return out.view_as(out) if out is out_h else out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        strat = ctx.strat
        if strat.ulysses_size == 1:
            return dout, None, None, None, None
        dout_h = all_to_all(dout, strat.inner_group, scatter_dim=2, gather_dim=1, counter=ctx.rec.bwd)
        if ctx.order is not None:
            dout_h = dout_h.index_select(1, ctx.order)
        return dout_h, None, None, None, None


@register("hybrid")
class HybridAttention(CPStrategy):
    """Ulysses (inner groups of ``ulysses_size`` consecutive ranks) x zigzag ring
    (across the ``cp_size / ulysses_size`` inner groups); see the module docstring.

    Fields after setup: ``ulysses_size`` (U), ``ring_size`` (R), ``inner_rank``
    (u), ``ring_rank`` (o), ``inner_group`` / ``outer_group`` (None when trivial).
    """

    name = "hybrid"
    layout_cls = HybridLayout
    options = ("backend", "ulysses_size", "num_heads", "num_kv_heads")

    def __init__(self, group=None, *, backend="auto", ulysses_size=None, num_heads=None, num_kv_heads=None):
        super().__init__(group, backend=backend)
        N = self.cp_size
        for name, val in (("ulysses_size", ulysses_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ValueError(f"hybrid: {name} must be a positive integer, got {val!r}")
        if ulysses_size is not None and N % ulysses_size != 0:
            raise ValueError(
                f"hybrid: ulysses_size={ulysses_size} must divide cp_size={N}; "
                f"choose among {[d for d in range(1, N + 1) if N % d == 0]}"
            )
        if num_heads is not None and num_kv_heads is not None and num_heads % num_kv_heads != 0:
            raise ValueError(f"hybrid: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.requested_ulysses_size = ulysses_size
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.ulysses_size = self.ring_size = None
        self.inner_group = self.outer_group = None
        if ulysses_size is not None or num_heads is not None:
            self._setup(num_heads, num_kv_heads)

    # -- process groups --------------------------------------------------------
    def _setup(self, num_heads, num_kv_heads) -> None:
        """Choose U and create the inner/outer groups (collective over WORLD when distributed)."""
        N = self.cp_size
        U = self.requested_ulysses_size
        if U is None:
            U = default_ulysses_size(N, num_heads, num_kv_heads)
        if num_heads is not None:  # fail early, naming the heads
            kv_replication(num_heads, num_kv_heads or num_heads, U, what=f"hybrid (ulysses_size={U})")
        R = N // U
        self.ulysses_size, self.ring_size = U, R
        self.ring_rank, self.inner_rank = divmod(self.cp_rank, U)
        if self.group is not None:
            self._create_groups(U)
        self._ring_view = _RingView(
            self.outer_group, R, self.ring_rank, _RingChunkLayout(self.layout, U), self.backend
        )

    def _create_groups(self, U: int) -> None:
        me = dist.get_process_group_ranks(self.group)
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, (tuple(me), U))
        plans: dict[tuple, int] = {}
        for ranks, u in found:
            if plans.setdefault(ranks, u) != u:
                raise ValueError(f"hybrid: ranks of cp group {list(ranks)} chose different ulysses_size")
        for ranks in sorted(plans):
            u = plans[ranks]
            r = len(ranks) // u
            inner = [[ranks[o * u + i] for i in range(u)] for o in range(r)]  # consecutive ranks
            outer = [[ranks[o * u + i] for o in range(r)] for i in range(u)]  # stride u
            for attr, groups, mine in (("inner_group", inner, self.ring_rank), ("outer_group", outer, self.inner_rank)):
                if len(groups[0]) < 2:
                    continue  # trivial (size-1) groups are never used: skipped the same way on every rank
                for j, members in enumerate(groups):
                    g = dist.new_group(members)
                    if ranks == tuple(me) and j == mine:
                        setattr(self, attr, g)

    # -- attention -------------------------------------------------------------
    def attention(self, q, k, v, *, doc_ids=None, causal=True, window=None, softmax_scale=None):
        window = self.check_inputs(q, k, v, doc_ids, window)
        H, H_kv = q.shape[2], k.shape[2]
        if self.ulysses_size is None:
            self._setup(H, H_kv)
        U = self.ulysses_size
        rep = kv_replication(H, H_kv, U, what=f"hybrid (ulysses_size={U})")
        self._ring_view.backend = self.backend
        rec = _CallStats(U, self.ring_size)
        self.last_stats = rec.out  # the backward of this call completes the same dict
        # The head-sharded ring chunk goes to the ring in sorted token order.
        order = inverse = None
        if U > 1:
            order = self._ring_view.layout.gathered_index(q.shape[1] * self.cp_size, self.ring_rank).argsort()
            inverse = order.argsort().to(q.device)
            order = order.to(q.device)
        doc_h = None
        if doc_ids is not None:
            doc_h = all_gather_cat(doc_ids, self.inner_group, 1, rec.fwd)
            doc_h = doc_h if order is None else doc_h.index_select(1, order)
        qh, kh, vh = _SeqToHeads.apply(q, k, v, self, rep, rec, order, inverse)
        out_h = _RingAttention.apply(qh, kh, vh, doc_h, self._ring_view, causal, window, softmax_scale, rec.ring)
        out = _HeadsToSeq.apply(out_h, self, rec, order, inverse)
        rec.forward_done()
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(cp_size={self.cp_size}, cp_rank={self.cp_rank}, "
            f"ulysses_size={self.ulysses_size}, ring_size={self.ring_size}, backend={self.backend!r})"
        )
