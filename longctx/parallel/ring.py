"""Ring attention over the contiguous layout.

Forward: K/V (and doc ids) travel around the ring of the CP group; at step s
this rank holds the block of rank (r - s) mod N, attends to it with the local
kernel and merges the partial result into a running (out, lse) in fp32. The
next block's transfer is posted before the current block is computed, so
communication overlaps compute.

Backward: K/V travel the same way, together with fp32 dK/dV accumulators.
Each rank adds its contribution for the block it holds (computed from the
*final* out/lse) and passes the accumulator on. K/V make N-1 hops; the
accumulators make N, which brings each back to the rank that owns its block.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..kernels import attention_backward, attention_forward, merge_partials, visible_pairs
from .comm import ByteCounter, ring_exchange
from .strategy import CPStrategy, register

# Distinct tag ranges: in backward a K/V exchange and a dK/dV exchange are in
# flight at the same time between the same pair of ranks.
_KV_TAGS, _DKV_TAGS = 0, 16


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for partial results: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_plan(q_index: torch.Tensor, k_index: torch.Tensor, causal: bool):
    """(compute?, causal mask needed?) for a block, from CPU token indices.

    A block whose keys all come after every query is invisible under causal
    masking: skip it. A block whose keys all come at or before every query
    needs no causal mask, which lets the kernel skip masking work.
    """
    if not causal:
        return True, False
    if int(k_index.min()) > int(q_index.max()):
        return False, False
    return True, int(k_index.max()) > int(q_index.min())


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc, strat, causal, softmax_scale, stats):
        N, r, group = strat.cp_size, strat.cp_rank, strat.group
        B, S, H, D = q.shape
        seq_len = S * N
        # Token indices of every rank's block, on CPU for the skip decisions.
        index = [strat.layout.token_index(seq_len, o) for o in range(N)]
        q_index = index[r]
        dev = q.device
        q_index_dev = q_index.to(dev)
        acc_dt = _acc_dtype(q.dtype)
        kernel_opts = dict(softmax_scale=softmax_scale, backend=strat.backend)

        counter = ByteCounter()
        k_blk, v_blk, d_blk = k.contiguous(), v.contiguous(), None if doc is None else doc.contiguous()
        out_acc = lse_acc = None
        pairs = 0
        computed = 0
        for step in range(N):
            owner = (r - step) % N
            # Post the next block's transfer first, then compute on the current one.
            ex = (
                ring_exchange([k_blk, v_blk, d_blk], group, counter, _KV_TAGS)
                if step < N - 1
                else None
            )
            run, masked = _block_plan(q_index, index[owner], causal)
            if run:
                out_b, lse_b = attention_forward(
                    q, k_blk, v_blk, q_index=q_index_dev, k_index=index[owner].to(dev),
                    q_doc=doc, k_doc=d_blk, causal=masked, **kernel_opts,
                )
                if out_acc is None:
                    out_acc, lse_acc = out_b.to(acc_dt), lse_b.to(acc_dt)
                else:
                    out_acc, lse_acc = merge_partials(out_acc, lse_acc, out_b, lse_b)
                pairs += visible_pairs(
                    q_index, index[owner], doc, d_blk, masked,
                    batch_size=None if doc is not None else B,
                )
                computed += 1
            if ex is not None:
                k_blk, v_blk, d_blk = ex.wait()

        if out_acc is None:  # cannot happen for layouts where a rank sees its own tokens
            out_acc = torch.zeros(B, S, H, D, dtype=acc_dt, device=dev)
            lse_acc = torch.full((B, H, S), float("-inf"), dtype=acc_dt, device=dev)
        out = out_acc.to(q.dtype)  # cast once, at the end

        ctx.save_for_backward(q, k, v, doc, out, lse_acc)
        ctx.strat, ctx.causal, ctx.stats = strat, causal, stats
        ctx.kernel_opts = kernel_opts
        flops = 4.0 * B * H * D * pairs
        stats.update(
            steps=N,
            blocks_computed=computed,
            visible_pairs=pairs,
            fwd_bytes_sent=counter.sent,
            fwd_bytes_recv=counter.recv,
            bwd_bytes_sent=0,
            bwd_bytes_recv=0,
            bytes_sent=counter.sent,
            bytes_recv=counter.recv,
            attn_flops_fwd=flops,
            attn_flops_bwd=0.0,
            attn_flops=flops,
        )
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, doc, out, lse = ctx.saved_tensors
        strat, causal, stats = ctx.strat, ctx.causal, ctx.stats
        N, r, group = strat.cp_size, strat.cp_rank, strat.group
        B, S, H, D = q.shape
        seq_len = S * N
        index = [strat.layout.token_index(seq_len, o) for o in range(N)]
        q_index = index[r]
        dev = q.device
        q_index_dev = q_index.to(dev)
        acc_dt = _acc_dtype(q.dtype)

        # rowsum(dout * out) with the final out: the same for every block.
        delta = (dout.to(acc_dt) * out.to(acc_dt)).sum(dim=-1).transpose(1, 2).contiguous()
        dq = torch.zeros(q.shape, dtype=acc_dt, device=dev)
        counter = ByteCounter()
        k_blk, v_blk, d_blk = k.contiguous(), v.contiguous(), None if doc is None else doc.contiguous()
        dkv_ex = None
        for step in range(N):
            owner = (r - step) % N
            kv_ex = (
                ring_exchange([k_blk, v_blk, d_blk], group, counter, _KV_TAGS)
                if step < N - 1
                else None
            )
            run, masked = _block_plan(q_index, index[owner], causal)
            dk_b = dv_b = None
            if run:
                dq_b, dk_b, dv_b = attention_backward(
                    dout, q, k_blk, v_blk, out, lse,
                    q_index=q_index_dev, k_index=index[owner].to(dev),
                    q_doc=doc, k_doc=d_blk, causal=masked, delta=delta, **ctx.kernel_opts,
                )
                dq += dq_b
            # The accumulators for the block we hold: fresh at step 0 (our own
            # block), otherwise they arrive from the previous rank.
            if step == 0:
                dk_acc = torch.zeros(k.shape, dtype=acc_dt, device=dev)
                dv_acc = torch.zeros(v.shape, dtype=acc_dt, device=dev)
            else:
                dk_acc, dv_acc = dkv_ex.wait()
            if run:
                dk_acc += dk_b
                dv_acc += dv_b
            if N > 1:
                # Pass them on; after the last step's hop they are at their owner.
                dkv_ex = ring_exchange([dk_acc, dv_acc], group, counter, _DKV_TAGS)
            if kv_ex is not None:
                k_blk, v_blk, d_blk = kv_ex.wait()
        if N > 1:
            dk_acc, dv_acc = dkv_ex.wait()

        bwd_flops = 2.5 * stats["attn_flops_fwd"]
        stats.update(
            bwd_bytes_sent=counter.sent,
            bwd_bytes_recv=counter.recv,
            bytes_sent=stats["fwd_bytes_sent"] + counter.sent,
            bytes_recv=stats["fwd_bytes_recv"] + counter.recv,
            attn_flops_bwd=bwd_flops,
            attn_flops=stats["attn_flops_fwd"] + bwd_flops,
        )
        return dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype), None, None, None, None, None


@register("ring")
class RingAttention(CPStrategy):
    """Ring attention on the contiguous layout (rank r holds tokens [r*S/N, (r+1)*S/N)).

    With causal masking the work is unbalanced (rank r computes r+1 of N
    blocks); zigzag/striped layouts fix that. With cp_size == 1 this is just
    the local kernel, without any communication.
    """

    name = "ring"

    def attention(self, q, k, v, *, doc_ids=None, causal=True, softmax_scale=None):
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(
                f"q, k, v must be [B, S_local, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if k.shape[1] != q.shape[1]:
            raise ValueError(
                f"ring attention needs q and k/v with the same local length, got {q.shape[1]} and {k.shape[1]}"
            )
        if doc_ids is not None and tuple(doc_ids.shape) != tuple(q.shape[:2]):
            raise ValueError(
                f"doc_ids must be [B, S_local] = {tuple(q.shape[:2])}, got {tuple(doc_ids.shape)}"
            )
        # A fresh dict per forward; the matching backward fills in the same dict.
        self.last_stats = {}
        return _RingAttention.apply(q, k, v, doc_ids, self, causal, softmax_scale, self.last_stats)
