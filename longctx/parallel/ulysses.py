"""DeepSpeed-Ulysses: all-to-all from sequence-sharded to head-sharded attention.

Each rank holds ``S/N`` tokens of every head (``[B, S/N, H, D]``). One
all-to-all inside the CP group turns that into all ``S`` tokens of ``H/N``
heads (``[B, S, H/N, D]``); the local kernel runs full-sequence attention on
those heads; a second all-to-all brings the output back to
``[B, S/N, H, D]``. Backward is the mirror image: dout goes to the head
layout, the kernel's backward runs with the saved out/lse, and dq/dk/dv go
back to the sequence layout.

Layout: contiguous (rank r holds tokens ``[r*S/N, (r+1)*S/N)``). Nothing below
depends on it: the full sequence after the all-to-all is rank 0's tokens,
then rank 1's, ..., and its global token indices are read from the layout,
so a subclass may change ``layout_cls`` freely. Document ids are all-gathered
once per forward so the kernel sees the full row's documents.

Heads (query head ``h`` uses kv head ``h // (H/H_kv)``):

- ``H % N == 0`` is required; rank j gets query heads ``[j*H/N, (j+1)*H/N)``.
- ``H_kv % N == 0``: kv heads are split the same way (rank j gets kv heads
  ``[j*H_kv/N, (j+1)*H_kv/N)``, exactly those its query heads use).
- ``N % H_kv == 0`` (``N > H_kv``, e.g. MQA): each kv head is replicated
  ``N/H_kv`` times before the all-to-all, so rank j receives kv head
  ``j // (N/H_kv)``, the one its query heads use; backward sums the replicas'
  gradients back into the owner's kv head.
- otherwise a ValueError names H, H_kv and N.

Communication per rank (element sizes of the tensors sent; ``x`` bytes means
``numel * element_size`` of this rank's local tensor):

- forward: ``(N-1)/N`` of the local q, k and v bytes (k/v after replication,
  i.e. ``[B, S/N, max(H_kv, N), D]``), ``(N-1)/N`` of the head-sharded
  output bytes back (equal to the local output bytes), plus ``(N-1)`` x the
  local doc-id bytes for the all-gather of document ids when given;
- backward: ``(N-1)/N`` of the dout bytes, and ``(N-1)/N`` of the dq, dk, dv
  bytes back (dk/dv replicated as in forward).

Received bytes equal sent bytes. q, k, v travel in one packed all-to-all
(one collective instead of three), and so do dq, dk, dv.

FLOPs: ``4 * B * (H/N) * D * visible_pairs(full sequence)`` forward, 2.5x
that backward: every rank computes the same work when heads split evenly, so
the attention-FLOP imbalance is exactly 1.0 for any mask. A sliding window
goes to the kernel as is (every rank sees the whole sequence).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..kernels import attention_backward, attention_forward, visible_pairs
from .comm import ByteCounter, all_gather_cat, all_to_all
from .stats import StrategyStats
from .strategy import CPStrategy, mask_options, register


def kv_replication(num_heads: int, num_kv_heads: int, n: int, what: str = "ulysses") -> int:
    """How many times each kv head is replicated before an all-to-all over `n` ranks.

    1 when ``num_kv_heads % n == 0`` (kv heads are split), ``n // num_kv_heads``
    when ``n % num_kv_heads == 0``. Raises ValueError when the query heads
    cannot be split over `n` ranks or the kv heads fit neither rule.
    """
    H, H_kv = int(num_heads), int(num_kv_heads)
    if H_kv < 1 or H % H_kv != 0:
        raise ValueError(f"{what}: query heads H={H} must be a multiple of kv heads H_kv={H_kv}")
    if H % n != 0:
        raise ValueError(
            f"{what}: H={H} query heads cannot be split evenly over N={n} ranks "
            f"(H % N = {H % n}); use a number of ranks (or ulysses_size) that divides H={H}"
        )
    if H_kv % n == 0:
        return 1
    if n % H_kv == 0:
        return n // H_kv
    raise ValueError(
        f"{what}: H_kv={H_kv} kv heads cannot be distributed over N={n} ranks: "
        f"need H_kv % N == 0 (split kv heads) or N % H_kv == 0 (replicate each kv head "
        f"N/H_kv times); got H_kv % N = {H_kv % n}, N % H_kv = {n % H_kv}"
    )


# ---------------------------------------------------------------------------
# the two all-to-alls (plain functions on tensors; wrapped by autograd below)
# ---------------------------------------------------------------------------


def seq_to_heads(q, k, v, group, n: int, rep: int, counter: ByteCounter | None, order=None):
    """Sequence-sharded q ``[B, s, H, D]``, k/v ``[B, s, H_kv, D]`` -> head-sharded
    ``[B, n*s, H/n, D]`` and ``[B, n*s, H_kv*rep/n, D]`` (one packed all-to-all).

    The head-sharded sequence is rank 0's tokens, then rank 1's, ..., or, with
    `order` (positions in that sequence), ``gathered[:, order]``. With
    ``n == 1`` the inputs come back unchanged.
    """
    if n == 1:
        return q, k, v
    if rep > 1:
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
    hq, hk = q.shape[2] // n, k.shape[2] // n
    # [n, B, s, hq + 2 hk, D]: destination rank first, contiguous by construction.
    packed = torch.cat(
        [t.unflatten(2, (n, h)).movedim(2, 0) for t, h in ((q, hq), (k, hk), (v, hk))], dim=3
    )
    # Gather along the sequence: [1, B, n*s, h, D].
    full = all_to_all(packed, group, scatter_dim=0, gather_dim=2, counter=counter)[0]
    if order is not None:
        full = full.index_select(1, order)
    qh, kh, vh = full.split([hq, hk, hk], dim=2)
    return qh, kh, vh


def heads_to_seq(x, group, n: int, counter: ByteCounter | None, inverse=None):
    """Head-sharded ``[B, n*s, h, D]`` -> sequence-sharded ``[B, s, n*h, D]`` (contiguous).

    `inverse` undoes the `order` given to :func:`seq_to_heads` (``x[:, inverse]``
    is in rank order)."""
    if n == 1:
        return x
    if inverse is not None:
        x = x.index_select(1, inverse)
    return all_to_all(x, group, scatter_dim=1, gather_dim=2, counter=counter).contiguous()


def grads_to_seq(dq, dk, dv, group, n: int, rep: int, counter: ByteCounter | None, inverse=None):
    """Inverse of :func:`seq_to_heads` for the gradients (one packed all-to-all);
    the replicas' dk/dv are summed back into their kv head. `inverse` as in
    :func:`heads_to_seq`."""
    if n == 1:
        return dq, dk, dv
    hq, hk = dq.shape[2], dk.shape[2]
    packed = torch.cat([dq, dk.to(dq.dtype), dv.to(dq.dtype)], dim=2)  # [B, n*s, hq + 2 hk, D]
    if inverse is not None:
        packed = packed.index_select(1, inverse)
    local = all_to_all(packed, group, scatter_dim=1, gather_dim=2, counter=counter)  # [B, s, n*h, D]
    local = local.unflatten(2, (n, hq + 2 * hk))
    dq_l, dk_l, dv_l = (t.flatten(2, 3) for t in local.split([hq, hk, hk], dim=3))
    if rep > 1:
        acc = torch.float64 if dk_l.dtype == torch.float64 else torch.float32
        dk_l = dk_l.unflatten(2, (-1, rep)).to(acc).sum(3).to(dk.dtype)
        dv_l = dv_l.unflatten(2, (-1, rep)).to(acc).sum(3).to(dv.dtype)
    return dq_l.contiguous(), dk_l.contiguous(), dv_l.contiguous()


def full_index(layout, seq_len: int, n: int) -> torch.Tensor:
    """Global token indices of the head-sharded sequence: every rank's tokens in rank order."""
    return torch.cat([layout.token_index(seq_len, o) for o in range(n)])


# ---------------------------------------------------------------------------
# the autograd Function
# ---------------------------------------------------------------------------


class _UlyssesAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc, strat, causal, window, softmax_scale, stats):
        N, group = strat.cp_size, strat.group
        B, S, H, D = q.shape
        rep = kv_replication(H, k.shape[2], N)
        index = full_index(strat.layout, S * N, N)  # CPU, for FLOP counting
        index_dev = index.to(q.device)
        mask = mask_options(causal, window)
        kernel_opts = dict(softmax_scale=softmax_scale, backend=strat.backend, **mask)

        counter = ByteCounter()
        doc_full = None if doc is None else all_gather_cat(doc, group, 1, counter)
        qh, kh, vh = seq_to_heads(q, k, v, group, N, rep, counter)
        out_h, lse = attention_forward(
            qh, kh, vh, q_index=index_dev, k_index=index_dev, q_doc=doc_full, k_doc=doc_full,
            **kernel_opts,
        )
        out = heads_to_seq(out_h, group, N, counter)

        ctx.save_for_backward(qh, kh, vh, doc_full, out_h, lse, index_dev)
        ctx.strat, ctx.rep, ctx.stats, ctx.kernel_opts = strat, rep, stats, kernel_opts
        doc_cpu = None if doc_full is None else doc_full.cpu()
        pairs = visible_pairs(index, index, doc_cpu, doc_cpu, **mask, batch_size=None if doc is not None else B)
        stats.add_forward(counter, flops=4.0 * B * (H // N) * D * pairs, heads_per_rank=H // N,
                          kv_heads_per_rank=kh.shape[2], kv_replication=rep, visible_pairs=pairs)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        qh, kh, vh, doc_full, out_h, lse, index_dev = ctx.saved_tensors
        N, group = ctx.strat.cp_size, ctx.strat.group
        counter = ByteCounter()
        dout_h = all_to_all(dout, group, scatter_dim=2, gather_dim=1, counter=counter) if N > 1 else dout
        dqh, dkh, dvh = attention_backward(
            dout_h, qh, kh, vh, out_h, lse, q_index=index_dev, k_index=index_dev,
            q_doc=doc_full, k_doc=doc_full, **ctx.kernel_opts,
        )
        dq, dk, dv = grads_to_seq(dqh, dkh, dvh, group, N, ctx.rep, counter)
        ctx.stats.add_backward(counter)
        return dq, dk, dv, None, None, None, None, None, None


@register("ulysses")
class UlyssesAttention(CPStrategy):
    """DeepSpeed-Ulysses on the contiguous layout: all-to-all to heads, full-sequence
    local attention, all-to-all back (see the module docstring for heads, GQA and bytes).

    Needs ``H % cp_size == 0`` and ``H_kv % cp_size == 0`` or ``cp_size % H_kv == 0``;
    otherwise ``attention`` raises a ValueError naming H, H_kv and N. With
    cp_size == 1 this is the local kernel without communication.
    """

    name = "ulysses"

    def attention(self, q, k, v, *, doc_ids=None, causal=True, window=None, softmax_scale=None):
        window = self.check_inputs(q, k, v, doc_ids, window)
        kv_replication(q.shape[2], k.shape[2], self.cp_size)  # clear error before any collective
        self.last_stats = StrategyStats()
        return _UlyssesAttention.apply(q, k, v, doc_ids, self, causal, window, softmax_scale, self.last_stats)
