"""BurstAttention (Sun et al., 2024): a topology-aware double ring on the zigzag layout.

    s = build_strategy("burst", group, backend="auto", node_size=0, backward="auto")

Layout: zigzag (rank r holds chunks r and 2N-1-r of 2N), so causal work is
balanced exactly, as for `zigzag`.

Forward: a ring over the zigzag layout with K/V (and doc ids) travelling.
Each step attends the local queries to the block held and folds the result
into the running fp32 (out, lse) *inside the kernel call*
(`attention_forward(..., acc=(out, lse))`, the kernels' accumulating mode:
the merge is fused with the local attention step). With option
`fused_merge=False` the step merges with `merge_partials` instead.

Backward, q-mode (BurstAttention's global attention optimisation): K, V,
dK, dV stay at their owner. What travels is the query side of each rank:
Q, dO, and the fp32 rows LSE and delta = rowsum(dO * O) (so O itself never
travels), plus doc ids, together with an fp32 dQ accumulator that visits
every rank and ends at the owner. kv-mode is the ring's backward: K, V, doc
ids travel with fp32 dK/dV accumulators, dQ stays local.

Double ring. The N = n * L ranks of the group form n "nodes" of L
consecutive ranks (node a, local l = group rank a*L + l; the mesh puts a CP
group on consecutive ranks, which fill a node first). L comes from option
`node_size`: 0 = the launch's LOCAL_WORLD_SIZE (gcd with N, so an inner ring
never leaves a node), unset env = the whole group is one node; an explicit
value lets one machine emulate several nodes (world 4, node_size=2: two
"nodes" of two ranks). Schedule, for rank (a, l), holding bundle B(x, y) =
the travelling tensors of rank (x, y):

    seed = B(a, l)
    for o in 0 .. n-1:                         # outer steps (inter-node)
        post seed -> (a+1, l), receive <- (a-1, l)      [if o < n-1]
        cur = seed
        for i in 0 .. L-1:                     # inner steps (intra-node)
            post cur -> (a, l+1), receive <- (a, l-1)   [if i < L-1]
            compute on cur = B(a-o, l-i)
            cur = received inner bundle
        seed = received outer bundle   (= B(a-o-1, l))

Every rank sees every bundle exactly once (B(a-o, l-i) over all o, i). The
inter-node transfer of the next seed is posted at the start of an outer step
and overlaps its L inner steps (compute + intra-node transfers); every inner
transfer is posted before the compute of the current block (double
buffering). Hops per rank: n*(L-1) intra-node + (n-1) inter-node = N-1.

Travelling accumulators (dQ in q-mode, dK/dV in kv-mode) follow the same
schedule without forking: within outer step o the node-a accumulator for
B(a-o, j) starts at (a, j+1) at inner step 1, is passed along the inner ring
after each step and reaches (a, j) after step L-1 (L-1 hops), where (a, j)
adds its own step-0 contribution: the node's partial sum for B(a-o, j) now
sits at local index j, the same as the bundle's owner (a-o, j). The node
partials then travel the outer ring (a+1, j), (a+2, j), ... adding up, one
hop per outer step (posted at the end of outer step o, waited for at the end
of step o+1: overlapped with a whole inner round), and the last hop brings
the sum to the owner, who adds its own node's partial (outer step 0). So an
accumulator makes N-1 hops too (n*(L-1) intra + (n-1) inter), one fewer than
the plain ring's dK/dV (N): the owner's own contribution never travels.

Bytes per rank (B batch, S = S_local, H_q / H_kv heads, D head dim, e =
input element size, a = accumulator size: 4, or 8 for fp64 inputs; doc =
B*S*8 with doc ids, else 0), all with h = N-1 hops:

    forward          h * (2*B*S*H_kv*D*e + doc)
    backward q-mode  h * (2*B*S*H_q*D*e + 2*B*H_q*S*a + doc + B*S*H_q*D*a)
                          Q, dO            LSE, delta          dQ acc
    backward kv-mode h * (2*B*S*H_kv*D*e + doc + 2*B*S*H_kv*D*a)
                          K, V                     dK, dV acc

of which (n-1)/(N-1) crosses nodes. The ring (and zigzag/striped) backward
is (N-1) * (2*B*S*H_kv*D*e + doc) + N * 2*B*S*H_kv*D*a.

GQA rule (option `backward`): "q" and "kv" force a mode; "auto" computes
both byte counts above for the actual tensors and takes the smaller (q-mode
on a tie). Per token, q-mode moves H_q*(2De + Da + 2a) and kv-mode
H_kv*(2De + 2Da) bytes, so q-mode wins while

    H_q / H_kv  <  (2De + 2Da) / (2De + Da + 2a)

which is 16D/(12D+8) ~ 1.33 in fp32 (and fp64), 12D/(8D+8) ~ 1.49 in bf16/fp16
with fp32 accumulators (D=128: 1.33 and 1.49). So q-mode for multi-head
attention (H_q == H_kv: ~25% (fp32) to ~33% (bf16) fewer backward bytes than
kv-mode, more against the ring's N-hop accumulators), kv-mode for any GQA
with at least two query heads per KV head. The choice and both predicted
counts are in `last_stats` (`bwd_mode`, `bwd_bytes_q_mode`,
`bwd_bytes_kv_mode`).

Sliding windows: every block (forward, and both backward modes) is planned
with `ring.plan_block`, so blocks entirely outside the window are skipped and
the others trimmed; bytes are those above (the schedule does not change).

`last_stats`: bytes_sent/recv (fwd_/bwd_ split, and intra_node_/inter_node_
bytes_sent), attn_flops (fwd, bwd = 2.5x fwd, total), visible_pairs, steps
(= N blocks per pass), blocks_computed, inner_steps (L), outer_steps (n),
node_size, num_nodes, bwd_mode, fused_merge.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .comm import ByteCounter, PeerExchange
from .layouts import ZigzagLayout
from .ring import OutMerger, _acc_dtype, block_backward, block_indices, plan_block
from .stats import StrategyStats
from .strategy import CPStrategy, register

# The kernels' accumulating mode: attention_forward(..., acc=(out, lse)).

BACKWARD_MODES = ("auto", "q", "kv")

# Tag ranges: up to four exchanges are in flight at once (bundle inner/outer,
# accumulator inner/outer), possibly between the same pair of ranks.
_INNER, _OUTER, _ACC_INNER, _ACC_OUTER = 0, 8, 16, 24


def resolve_node_size(node_size: int | None, cp_size: int) -> int:
    """Ranks per (emulated) node inside a CP group of `cp_size`; see the module docstring."""
    if node_size is None or node_size == 0:
        env = os.environ.get("LOCAL_WORLD_SIZE")
        if env is None or not env.strip():
            return cp_size
        try:
            local = int(env)
        except ValueError:
            raise ValueError(f"LOCAL_WORLD_SIZE={env!r} is not an integer") from None
        return math.gcd(cp_size, max(local, 1))
    if isinstance(node_size, bool) or not isinstance(node_size, int) or node_size < 0:
        raise ValueError(f"burst: node_size must be a non-negative integer (0 = from the launch), got {node_size!r}")
    if cp_size % node_size != 0 and node_size % cp_size != 0:
        raise ValueError(
            f"burst: node_size={node_size} and cp_size={cp_size}: one must divide the other "
            "(the CP group is split into equal nodes of consecutive ranks)"
        )
    return min(node_size, cp_size)


@dataclass(frozen=True)
class DoubleRing:
    """The double-ring schedule for one rank: peers and who owns what at each step."""

    cp_size: int
    cp_rank: int
    node_size: int

    @property
    def num_nodes(self) -> int:
        return self.cp_size // self.node_size

    def peer(self, d_node: int, d_local: int) -> int:
        """Group rank of (node + d_node, local + d_local), both cyclic; this rank is (node, local)."""
        node, local = divmod(self.cp_rank, self.node_size)
        return ((node + d_node) % self.num_nodes) * self.node_size + (local + d_local) % self.node_size

    def owner(self, o: int, i: int) -> int:
        """Owner of the bundle held at outer step o, inner step i."""
        return self.peer(-o, -i)

    def order(self) -> list[int]:
        """Owners of the blocks in the order this rank computes them."""
        return [self.owner(o, i) for o in range(self.num_nodes) for i in range(self.node_size)]


def _add(acc: list, contrib) -> None:
    """acc[j][:, s:e] += t for each (t, s, e) of contrib (None = nothing)."""
    if contrib is None:
        return
    for a, (t, s, e) in zip(acc, contrib):
        a[:, s:e] += t


def run_double_ring(sched: DoubleRing, group, bundle, step, inner_ctr, outer_ctr, acc_templates=None):
    """Run `step(bundle_held, owner)` on every rank's bundle, in the double-ring order.

    Without `acc_templates` bundles only travel (forward). With them
    (a list of (shape, dtype, device)), `step` returns the contributions to
    the holder's travelling accumulators, [(tensor, start, end), ...] rows
    along dim 1, or None, and the function returns the accumulators of this
    rank's own bundle, summed over all ranks. See the module docstring.
    """
    n, L = sched.num_nodes, sched.node_size
    travel = acc_templates is not None

    def inner(tensors, tag):  # to the next rank of this node, from the previous one
        return PeerExchange(tensors, group, sched.peer(0, 1), sched.peer(0, -1), inner_ctr, tag)

    def outer(tensors, tag):  # to the same local rank of the next node, from the previous node
        return PeerExchange(tensors, group, sched.peer(1, 0), sched.peer(-1, 0), outer_ctr, tag)

    def zeros():
        return [torch.zeros(shape, dtype=dt, device=dev) for shape, dt, dev in acc_templates]

    seed = [None if t is None else t.contiguous() for t in bundle]
    own = None
    outer_acc_ex = None
    for o in range(n):
        outer_ex = outer(seed, _OUTER) if o < n - 1 else None
        cur = seed
        inner_acc_ex = None
        local0 = None
        for i in range(L):
            inner_ex = inner(cur, _INNER) if i < L - 1 else None
            contrib = step(cur, sched.owner(o, i))
            if travel:
                if i == 0:
                    local0 = contrib  # our part for our seed: added when its accumulator comes back
                else:
                    acc = zeros() if i == 1 else inner_acc_ex.wait()
                    _add(acc, contrib)
                    inner_acc_ex = inner(acc, _ACC_INNER)
            if inner_ex is not None:
                cur = inner_ex.wait()
        if travel:
            # This node's partial sum for our seed B(node - o, local).
            part = inner_acc_ex.wait() if L > 1 else zeros()
            _add(part, local0)
            if o == 0:
                own = part
            else:
                if o >= 2:
                    prev = outer_acc_ex.wait()
                    for p, q in zip(part, prev):
                        p += q
                outer_acc_ex = outer(part, _ACC_OUTER)
        if outer_ex is not None:
            seed = outer_ex.wait()
    if travel and n > 1:
        for p, q in zip(own, outer_acc_ex.wait()):
            p += q
    return own


def backward_bytes(q, k, doc, cp_size: int) -> dict:
    """Predicted backward bytes per rank of both modes (see the module docstring).

    {"q", "kv"}: totals over the N-1 hops; {"q_step", "kv_step"}: per hop.
    """
    B, S, H, D = q.shape
    H_kv = k.shape[2]
    e = q.element_size()
    a = torch.empty((), dtype=_acc_dtype(q.dtype)).element_size()
    doc_b = 0 if doc is None else doc.numel() * doc.element_size()
    hops = cp_size - 1
    q_step = 2 * B * S * H * D * e + 2 * B * H * S * a + doc_b + B * S * H * D * a
    kv_step = 2 * B * S * H_kv * D * e + doc_b + 2 * B * S * H_kv * D * a
    return {"q": hops * q_step, "kv": hops * kv_step, "q_step": q_step, "kv_step": kv_step}


class _BurstAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc, strat, causal, window, softmax_scale, stats):
        B, S, H, D = q.shape
        index, own_index = block_indices(strat, S)
        sched = strat.schedule
        kernel_opts = dict(softmax_scale=softmax_scale, backend=strat.backend)

        merger = OutMerger(q, fused=strat.fused_merge)
        counts = {"pairs": 0, "blocks": 0}

        def step(bundle, owner):
            k_blk, v_blk, d_blk = bundle
            plan = plan_block(own_index, index[owner], causal, window)
            if plan is not None:
                counts["pairs"] += merger.fold(q, k_blk, v_blk, doc, d_blk, own_index, index[owner], plan, kernel_opts)
                counts["blocks"] += 1

        inner, outer = ByteCounter(), ByteCounter()
        run_double_ring(sched, strat.group, [k, v, doc], step, inner, outer)
        out_acc, lse_acc = merger.result()
        out = out_acc.to(q.dtype)  # cast once, at the end

        costs = backward_bytes(q, k, doc, strat.cp_size)
        mode = strat.backward_mode
        if mode == "auto":
            # Per hop, so the choice depends on shapes only (and holds at cp=1 too).
            mode = "q" if costs["q_step"] <= costs["kv_step"] else "kv"

        ctx.save_for_backward(q, k, v, doc, out, lse_acc)
        ctx.strat, ctx.mask, ctx.stats, ctx.mode = strat, (causal, window), stats, mode
        ctx.kernel_opts = kernel_opts
        stats.add_forward(
            inner, outer, flops=4.0 * B * H * D * counts["pairs"],
            steps=strat.cp_size, inner_steps=sched.node_size, outer_steps=sched.num_nodes,
            node_size=sched.node_size, num_nodes=sched.num_nodes,
            blocks_computed=counts["blocks"], visible_pairs=counts["pairs"], fused_merge=strat.fused_merge,
            bwd_mode=mode, bwd_bytes_q_mode=costs["q"], bwd_bytes_kv_mode=costs["kv"],
            intra_node_bytes_sent=inner.sent, inter_node_bytes_sent=outer.sent,
        )
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, doc, out, lse = ctx.saved_tensors
        strat, stats, mode = ctx.strat, ctx.stats, ctx.mode
        index, own_index = block_indices(strat, q.shape[1])
        dev = q.device
        acc_dt = _acc_dtype(q.dtype)
        opts = ctx.kernel_opts
        dout = dout.contiguous()
        # rowsum(dout * out) with the final out: the same for every key block.
        delta = (dout.to(acc_dt) * out.to(acc_dt)).sum(dim=-1).transpose(1, 2)
        inner, outer = ByteCounter(), ByteCounter()

        if mode == "q":
            # K, V stay; dK, dV accumulate locally. Q-side bundles travel.
            dk = torch.zeros(k.shape, dtype=acc_dt, device=dev)
            dv = torch.zeros(v.shape, dtype=acc_dt, device=dev)
            lse_delta = torch.stack([lse.to(acc_dt), delta])  # one message for both rows

            def step(bundle, owner):
                q_o, do_o, ld_o, qd_o = bundle
                plan = plan_block(index[owner], own_index, *ctx.mask)
                if plan is None:
                    return None
                dq_b, dk_b, dv_b = block_backward(
                    do_o, q_o, k, v, None, ld_o[0], ld_o[1], qd_o, doc, index[owner], own_index, plan, opts
                )
                dk[:, plan.k0 : plan.k1] += dk_b
                dv[:, plan.k0 : plan.k1] += dv_b
                return [(dq_b, plan.q0, plan.q1)]

            bundle = [q, dout, lse_delta, doc]
            (dq,) = run_double_ring(
                strat.schedule, strat.group, bundle, step, inner, outer, [(q.shape, acc_dt, dev)]
            )
        else:
            # The ring's backward: K/V travel with dK/dV accumulators, dQ stays.
            dq = torch.zeros(q.shape, dtype=acc_dt, device=dev)

            def step(bundle, owner):
                k_o, v_o, kd_o = bundle
                plan = plan_block(own_index, index[owner], *ctx.mask)
                if plan is None:
                    return None
                dq_b, dk_b, dv_b = block_backward(
                    dout, q, k_o, v_o, out, lse, delta, doc, kd_o, own_index, index[owner], plan, opts
                )
                dq[:, plan.q0 : plan.q1] += dq_b
                return [(dk_b, plan.k0, plan.k1), (dv_b, plan.k0, plan.k1)]

            dk, dv = run_double_ring(
                strat.schedule, strat.group, [k, v, doc], step, inner, outer,
                [(k.shape, acc_dt, dev), (v.shape, acc_dt, dev)],
            )

        stats.add_backward(
            inner, outer,
            intra_node_bytes_sent=stats["intra_node_bytes_sent"] + inner.sent,
            inter_node_bytes_sent=stats["inter_node_bytes_sent"] + outer.sent,
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


@register("burst")
class BurstAttention(CPStrategy):
    """BurstAttention on the zigzag layout; see the module docstring.

    Options: `backend` (kernel backend), `node_size` (ranks per node for the
    double ring; 0 = LOCAL_WORLD_SIZE from the launch, the whole group when
    unset), `backward` ("auto" | "q" | "kv"), `fused_merge` (None or True = the
    kernels' accumulating mode, False = merge_partials).
    """

    name = "burst"
    layout_cls = ZigzagLayout
    options = ("backend", "node_size", "backward", "fused_merge")

    def __init__(self, group=None, *, backend: str = "auto", node_size: int = 0, backward: str = "auto",
                 fused_merge: bool | None = None):
        super().__init__(group, backend=backend)
        if backward not in BACKWARD_MODES:
            raise ValueError(f"burst: backward must be one of {BACKWARD_MODES}, got {backward!r}")
        self.backward_mode = backward
        self.fused_merge = True if fused_merge is None else bool(fused_merge)
        self.schedule = DoubleRing(self.cp_size, self.cp_rank, resolve_node_size(node_size, self.cp_size))

    def attention(self, q, k, v, *, doc_ids=None, causal=True, window=None, softmax_scale=None):
        window = self.check_inputs(q, k, v, doc_ids, window)
        self.last_stats = StrategyStats()
        return _BurstAttention.apply(q, k, v, doc_ids, self, causal, window, softmax_scale, self.last_stats)

    def __repr__(self) -> str:
        s = self.schedule
        return (
            f"BurstAttention(cp_size={self.cp_size}, cp_rank={self.cp_rank}, backend={self.backend!r}, "
            f"node_size={s.node_size}, num_nodes={s.num_nodes}, backward={self.backward_mode!r}, "
            f"fused_merge={self.fused_merge})"
        )
