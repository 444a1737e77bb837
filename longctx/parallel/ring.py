"""Ring attention, and the building blocks of the whole ring family.

`RingAttention` ("ring") runs on the contiguous layout; `zigzag` and
`striped` (zigzag.py, striped.py) are the same algorithm on other layouts,
and `burst` (burst.py) reuses the block helpers defined here.

Forward: K/V (and doc ids) travel around the ring of the CP group; at step s
this rank holds the block of rank (r - s) mod N, attends to it with the local
kernel and merges the partial result into a running (out, lse) in fp32. The
next block's transfer is posted before the current block is computed, so
communication overlaps compute (double buffering).

Backward: K/V travel the same way, together with fp32 dK/dV accumulators.
Each rank adds its contribution for the block it holds (computed from the
*final* out/lse) and passes the accumulator on. K/V make N-1 hops; the
accumulators make N, which brings each back to the rank that owns its block.
Both exchanges of a step are posted before that step's block is computed
(the K/V one at the top of the step, the dK/dV one is waited for only after
the block's gradients are computed).

Masks and skips follow from global token indices only, so the same code is
exact for any layout (contiguous, zigzag, striped, ...). `plan_block` skips a
block with no visible pair (causal: min(k) > max(q); sliding window W:
min(q) - max(k) >= W, or no query with a key in (q - W, q], e.g. striped
blocks of other ranks with W = 1) and trims the others to the rows and keys
that can see something: for sorted local indices (all our layouts) the
queries that see at least one key lie in one range (a suffix under causal
masking) and so do the keys seen by at least one query, so a zigzag block
shrinks to the half that is visible, and a block whose trimmed part is fully
visible runs without a mask (the causal and the window mask are dropped
separately). FLOPs are counted from the visible pairs of the trimmed block,
which are exactly the visible pairs of the block. With a window, K/V still
make the whole ring (bytes are the same as without); only compute is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ..kernels import attention_backward, attention_forward, merge_partials, visible_pairs
from .comm import ByteCounter, ring_exchange
from .stats import StrategyStats
from .strategy import CPStrategy, mask_options, register

# Distinct tag ranges: in backward a K/V exchange and a dK/dV exchange are in
# flight at the same time between the same pair of ranks.
_KV_TAGS, _DKV_TAGS = 0, 16


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for partial results: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_sorted(index: torch.Tensor) -> bool:
    return index.numel() < 2 or bool((index[1:] >= index[:-1]).all())


@dataclass(frozen=True)
class BlockPlan:
    """The part of a (local queries x key block) product that has visible pairs.

    Local query rows [q0, q1) and key positions [k0, k1); `masked` says
    whether the causal mask is needed inside that part (False = every pair of
    it is causally visible) and `window` whether the sliding-window mask is
    (None = every pair of it is within the window); document masks still apply.
    """

    q0: int
    q1: int
    k0: int
    k1: int
    masked: bool
    window: int | None = None

    def mask_kw(self) -> dict:
        """The mask options of this part for the kernels and `visible_pairs`."""
        return mask_options(self.masked, self.window)


def plan_block(q_index: torch.Tensor, k_index: torch.Tensor, causal: bool, window: int | None = None
               ) -> BlockPlan | None:
    """BlockPlan for queries `q_index` against keys `k_index` (CPU int64), None = skip.

    Exact for any index sets: a skipped block has no visible pair (causal:
    min(k) > max(q); window W: min(q) - max(k) >= W, or, for sorted indices,
    no query with a key in (q - W, q]), and trimmed rows/keys have none
    either. Trimming needs sorted indices (true for every layout here);
    unsorted ones are planned as a whole.
    """
    s_q, s_k = q_index.numel(), k_index.numel()
    if s_q == 0 or s_k == 0:
        return None
    if not causal and window is None:
        return BlockPlan(0, s_q, 0, s_k, False)
    q_min, q_max, k_min, k_max = (int(t) for t in (q_index.min(), q_index.max(), k_index.min(), k_index.max()))
    if (causal and k_min > q_max) or (window is not None and q_min - k_max >= window):
        return None
    q0, q1, k0, k1 = 0, s_q, 0, s_k
    if _is_sorted(q_index) and _is_sorted(k_index):
        if window is None:
            # Rows with q >= min(k) see something (a suffix); keys with k <= max(q) are seen (a prefix).
            q0 = int(torch.searchsorted(q_index, k_min, right=False))
            k1 = int(torch.searchsorted(k_index, q_max, right=True))
        else:
            # Row i sees keys [lo_i, hi_i): k > q_i - W and (causal) k <= q_i; both grow with i.
            lo = torch.searchsorted(k_index, q_index - window, right=True)
            hi = torch.searchsorted(k_index, q_index, right=True) if causal else torch.full_like(lo, s_k)
            sees = (hi > lo).nonzero()
            if sees.numel() == 0:
                return None
            q0, q1 = int(sees[0]), int(sees[-1]) + 1
            k0, k1 = int(lo[q0]), int(hi[q1 - 1])
        q_min, q_max = int(q_index[q0]), int(q_index[q1 - 1])
        k_min, k_max = int(k_index[k0]), int(k_index[k1 - 1])
    masked = causal and k_max > q_min
    needs_window = window is not None and q_max - k_min >= window
    return BlockPlan(q0, q1, k0, k1, masked, window if needs_window else None)


def block_indices(strat, s_local: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Global token indices (CPU) of every rank's block, for the skip decisions, and this rank's."""
    index = [strat.layout.token_index(s_local * strat.cp_size, o) for o in range(strat.cp_size)]
    return index, index[strat.cp_rank]


def _rows(t, a, b):
    """Rows [a, b) of a [B, S, ...] tensor (None stays None)."""
    return None if t is None else t[:, a:b]


class OutMerger:
    """Running (out, lse) over the key blocks seen so far, in fp32 (fp64 for fp64).

    `fold` attends the planned part of a block and merges it in. With
    `fused=True` the merge happens inside the kernel call
    (`attention_forward(..., acc=(out, lse))`, the kernels' accumulating
    mode); otherwise with `merge_partials`.
    """

    def __init__(self, q: torch.Tensor, fused: bool = False):
        self.B, self.S, self.H, self.D = q.shape
        self.dev = q.device
        self.acc_dt = _acc_dtype(q.dtype)
        self.fused = fused
        self.out = self.lse = None

    def _alloc(self):
        self.out = torch.zeros(self.B, self.S, self.H, self.D, dtype=self.acc_dt, device=self.dev)
        self.lse = torch.full((self.B, self.H, self.S), float("-inf"), dtype=self.acc_dt, device=self.dev)

    def fold(self, q, k, v, q_doc, k_doc, q_index, k_index, plan: BlockPlan, kernel_opts):
        """Attend q[plan rows] to k/v[plan keys], merge; returns the visible pair count."""
        q0, q1, k0, k1 = plan.q0, plan.q1, plan.k0, plan.k1
        qi, ki = q_index[q0:q1], k_index[k0:k1]
        qd, kd = _rows(q_doc, q0, q1), _rows(k_doc, k0, k1)
        args = (q[:, q0:q1], k[:, k0:k1], v[:, k0:k1])
        kw = dict(q_index=qi.to(self.dev), k_index=ki.to(self.dev), q_doc=qd, k_doc=kd, **plan.mask_kw(),
                  **kernel_opts)
        whole = q0 == 0 and q1 == self.S
        if self.out is None and whole:
            out_b, lse_b = attention_forward(*args, **kw)
            self.out, self.lse = out_b.to(self.acc_dt), lse_b.to(self.acc_dt)
        else:
            if self.out is None:
                self._alloc()
            acc_out = self.out if whole else self.out[:, q0:q1]
            acc_lse = self.lse if whole else self.lse[:, :, q0:q1]
            if self.fused:
                o, l = attention_forward(*args, acc=(acc_out, acc_lse), **kw)
            else:
                o, l = merge_partials(acc_out, acc_lse, *attention_forward(*args, **kw))
            if whole:
                self.out, self.lse = o.to(self.acc_dt), l.to(self.acc_dt)
            else:
                self.out[:, q0:q1] = o
                self.lse[:, :, q0:q1] = l
        return visible_pairs(qi, ki, qd, kd, **plan.mask_kw(), batch_size=None if qd is not None else self.B)

    def result(self):
        if self.out is None:  # no block had a visible pair
            self._alloc()
        return self.out, self.lse


def block_backward(dout, q, k, v, out, lse, delta, q_doc, k_doc, q_index, k_index, plan: BlockPlan, kernel_opts):
    """Gradients of the planned part of a block: (dq for rows [q0,q1), dk, dv for keys [k0,k1)).

    `out` may be None (then `delta` must be given): the kernels only use it
    to compute delta.
    """
    q0, q1, k0, k1 = plan.q0, plan.q1, plan.k0, plan.k1
    dev = q.device
    return attention_backward(
        dout[:, q0:q1], q[:, q0:q1], k[:, k0:k1], v[:, k0:k1],
        None if out is None else out[:, q0:q1], lse[:, :, q0:q1],
        q_index=q_index[q0:q1].to(dev), k_index=k_index[k0:k1].to(dev),
        q_doc=_rows(q_doc, q0, q1), k_doc=_rows(k_doc, k0, k1),
        delta=delta[:, :, q0:q1], **plan.mask_kw(), **kernel_opts,
    )


def ring_steps(strat, tensors, counter: ByteCounter):
    """Yield (step, owner, blocks): the ring's N steps over `tensors` (K, V, doc ids).

    The next block's transfer is posted before each yield, so the caller's
    compute on `blocks` overlaps it (double buffering); K/V make N-1 hops.
    """
    N, r = strat.cp_size, strat.cp_rank
    blocks = [None if t is None else t.contiguous() for t in tensors]
    for step in range(N):
        ex = ring_exchange(blocks, strat.group, counter, _KV_TAGS) if step < N - 1 else None
        yield step, (r - step) % N, blocks
        if ex is not None:
            blocks = ex.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc, strat, causal, window, softmax_scale, stats):
        B, S, H, D = q.shape
        index, q_index = block_indices(strat, S)
        kernel_opts = dict(softmax_scale=softmax_scale, backend=strat.backend)

        counter = ByteCounter()
        merger = OutMerger(q, fused=strat.fused_merge)
        pairs = computed = 0
        for _, owner, (k_blk, v_blk, d_blk) in ring_steps(strat, [k, v, doc], counter):
            plan = plan_block(q_index, index[owner], causal, window)
            if plan is not None:
                pairs += merger.fold(q, k_blk, v_blk, doc, d_blk, q_index, index[owner], plan, kernel_opts)
                computed += 1

        out_acc, lse_acc = merger.result()
        out = out_acc.to(q.dtype)  # cast once, at the end

        ctx.save_for_backward(q, k, v, doc, out, lse_acc)
        ctx.strat, ctx.causal, ctx.window, ctx.stats = strat, causal, window, stats
        ctx.kernel_opts = kernel_opts
        stats.add_forward(counter, flops=4.0 * B * H * D * pairs, steps=strat.cp_size, blocks_computed=computed,
                          visible_pairs=pairs)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, doc, out, lse = ctx.saved_tensors
        strat = ctx.strat
        N = strat.cp_size
        index, q_index = block_indices(strat, q.shape[1])
        dev = q.device
        acc_dt = _acc_dtype(q.dtype)

        # rowsum(dout * out) with the final out: the same for every block.
        delta = (dout.to(acc_dt) * out.to(acc_dt)).sum(dim=-1).transpose(1, 2).contiguous()
        dq = torch.zeros(q.shape, dtype=acc_dt, device=dev)
        counter = ByteCounter()
        dkv_ex = None
        for step, owner, (k_blk, v_blk, d_blk) in ring_steps(strat, [k, v, doc], counter):
            plan = plan_block(q_index, index[owner], ctx.causal, ctx.window)
            grads = None
            if plan is not None:
                grads = block_backward(
                    dout, q, k_blk, v_blk, out, lse, delta, doc, d_blk, q_index, index[owner], plan, ctx.kernel_opts
                )
                dq[:, plan.q0 : plan.q1] += grads[0]
            # The accumulators for the block we hold: fresh at step 0 (our own
            # block), otherwise they arrive from the previous rank (that
            # transfer was posted during the previous step's compute).
            if step == 0:
                dk_acc = torch.zeros(k.shape, dtype=acc_dt, device=dev)
                dv_acc = torch.zeros(v.shape, dtype=acc_dt, device=dev)
            else:
                dk_acc, dv_acc = dkv_ex.wait()
            if grads is not None:
                dk_acc[:, plan.k0 : plan.k1] += grads[1]
                dv_acc[:, plan.k0 : plan.k1] += grads[2]
            if N > 1:
                # Pass them on; after the last step's hop they are at their owner.
                dkv_ex = ring_exchange([dk_acc, dv_acc], strat.group, counter, _DKV_TAGS)
        if N > 1:
            dk_acc, dv_acc = dkv_ex.wait()

        ctx.stats.add_backward(counter)
        return dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype), None, None, None, None, None, None


@register("ring")
class RingAttention(CPStrategy):
    """Ring attention on the contiguous layout (rank r holds tokens [r*S/N, (r+1)*S/N)).

    With causal masking the work is unbalanced (rank r computes r+1 of N
    blocks); zigzag/striped layouts fix that. With cp_size == 1 this is just
    the local kernel, without any communication.

    Subclasses change `layout_cls` only: the algorithm, the skip/trim
    decisions and the accounting follow from the layout's token indices.

    Communication per rank (B, S_local, H_kv, D; e = element size, a = 4
    (8 for fp64) the accumulator size; doc = B*S_local*8 with doc ids):
    forward (N-1) * (2*B*S_local*H_kv*D*e + doc); backward the same plus
    N * 2*B*S_local*H_kv*D*a for the dK/dV accumulators (with or without a
    window: a window only skips compute).
    """

    name = "ring"

    def attention(self, q, k, v, *, doc_ids=None, causal=True, window=None, softmax_scale=None):
        window = self.check_inputs(q, k, v, doc_ids, window)
        # A fresh record per forward; the matching backward completes the same one.
        self.last_stats = StrategyStats()
        return _RingAttention.apply(q, k, v, doc_ids, self, causal, window, softmax_scale, self.last_stats)
