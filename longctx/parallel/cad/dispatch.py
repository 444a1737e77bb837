"""CAD dispatch: all-to-all of tasks to attention servers, one batched kernel call each.

For every nano-batch, this rank

1. sends, to each server, the Q of its tokens whose tasks run there and the
   K/V of its tokens that those tasks need (one flat ``all_to_all_single``
   with uneven splits; per destination ``[Q tokens, K|V tokens]``);
2. as a server, runs ONE kernel call over everything it received: the tasks
   are concatenated along the sequence, every token carries its document-order
   index and its document key as doc id, so the document mask keeps tasks
   apart and the causal mask works inside each document. A document with
   several tasks on one server forms one segment whose key range is the
   union of theirs (a prefix): no K/V is sent twice to one server per
   nano-batch. A task sees its whole key range, so no LSE merge is needed;
3. sends the outputs back with the inverse all-to-all.

Backward: dOut goes to the servers like Q; they return dQ (to the query
owner) and dK/dV for every K/V token they used, which owners sum in fp32
(fp64 for fp64 inputs) into their K/V gradients.

Nothing about documents is sent: every rank computes the same plan, so both
ends of each transfer know its layout (counts, order, indices, doc keys).

Ping-pong: with two nano-batches both dispatches are posted at once
(``async_op=True``); nano 1's transfer overlaps nano 0's kernel, and nano
0's return overlaps nano 1's kernel. Backward walks the nano-batches in the
reverse order. The time spent waiting on communication is the exposed
communication reported in ``last_stats``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ...kernels import attention_backward, attention_forward
from .planner import Plan
from .tasks import ranges_to_index


@dataclass
class Exchange:
    """This rank's part of one nano-batch: what it sends (as owner) and computes (as server)."""

    nano: int
    # owner side, ordered by destination server
    send_q_idx: torch.Tensor  # local flat token positions
    send_q_counts: list[int]
    send_kv_idx: torch.Tensor
    send_kv_counts: list[int]
    # server side, counts by source rank
    recv_q_counts: list[int]
    recv_kv_counts: list[int]
    # kernel order (sorted by document, then index) = received order [perm]
    q_perm: torch.Tensor
    q_index: torch.Tensor
    q_doc: torch.Tensor
    kv_perm: torch.Tensor
    k_index: torch.Tensor
    k_doc: torch.Tensor
    pairs: int  # visible pairs this server computes in this nano-batch

    def to(self, device) -> "Exchange":
        for name in ("send_q_idx", "send_kv_idx", "q_perm", "q_index", "q_doc", "kv_perm", "k_index", "k_doc"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def build_exchanges(plan: Plan, rank: int, device=None) -> list[Exchange]:
    """Index tensors of every nano-batch for `rank` (same order as every other rank assumes)."""
    N = plan.num_servers
    segs = plan.segments()
    # tasks by (server, nano), in the plan's canonical order (doc key, a)
    by_sn: dict[tuple[int, int], list] = {}
    for t in plan.tasks:
        by_sn.setdefault((t.server, t.nano), []).append(t)
    for lst in by_sn.values():
        lst.sort(key=lambda t: (t.doc.key, t.a))
    out = []
    for n in range(plan.nanos):
        # -- owner side -------------------------------------------------------------
        sq_start, sq_len, sq_counts = [], [], [0] * N
        skv_start, skv_len, skv_counts = [], [], [0] * N
        for t_srv in range(N):
            for t in by_sn.get((t_srv, n), ()):
                if t.owner == rank:
                    sq_start.append(t.q_flat_start())
                    sq_len.append(t.b - t.a)
                    sq_counts[t_srv] += t.b - t.a
            for key in sorted(segs.get((t_srv, n), {})):
                doc, e = segs[(t_srv, n)][key]
                if rank not in doc.ranks:
                    continue
                for run, lo, hi in doc.pieces(0, e):
                    if run.rank == rank:
                        skv_start.append(run.flat_start + (lo - run.doc_start))
                        skv_len.append(hi - lo)
                        skv_counts[t_srv] += hi - lo
        # -- server side ------------------------------------------------------------
        mine = by_sn.get((rank, n), [])
        rq_counts = [0] * N
        rq_idx_start, rq_len, rq_doc = [[] for _ in range(N)], [[] for _ in range(N)], [[] for _ in range(N)]
        for t in mine:
            s = t.owner
            rq_idx_start[s].append(t.a)
            rq_len[s].append(t.b - t.a)
            rq_doc[s].append(t.doc.key)
            rq_counts[s] += t.b - t.a
        rkv_counts = [0] * N
        rkv_start, rkv_len, rkv_doc = [[] for _ in range(N)], [[] for _ in range(N)], [[] for _ in range(N)]
        my_segs = segs.get((rank, n), {})
        for key in sorted(my_segs):
            doc, e = my_segs[key]
            for run, lo, hi in doc.pieces(0, e):
                s = run.rank
                rkv_start[s].append(lo)
                rkv_len[s].append(hi - lo)
                rkv_doc[s].append(doc.key)
                rkv_counts[s] += hi - lo
        q_index, q_doc = _meta(rq_idx_start, rq_len, rq_doc)
        k_index, k_doc = _meta(rkv_start, rkv_len, rkv_doc)
        q_perm, q_index, q_doc = _kernel_order(q_index, q_doc)
        kv_perm, k_index, k_doc = _kernel_order(k_index, k_doc)
        ex = Exchange(
            nano=n,
            send_q_idx=ranges_to_index(sq_start, sq_len), send_q_counts=sq_counts,
            send_kv_idx=ranges_to_index(skv_start, skv_len), send_kv_counts=skv_counts,
            recv_q_counts=rq_counts, recv_kv_counts=rkv_counts,
            q_perm=q_perm, q_index=q_index, q_doc=q_doc,
            kv_perm=kv_perm, k_index=k_index, k_doc=k_doc,
            pairs=sum(t.pairs for t in mine),
        )
        out.append(ex.to(device) if device is not None else ex)
    return out


def _meta(starts, lengths, docs):
    """Per received token (in source order): document-order index and document key."""
    st = [x for s in starts for x in s]
    ln = [x for s in lengths for x in s]
    dk = [x for s in docs for x in s]
    index = ranges_to_index(st, ln)
    doc = torch.repeat_interleave(torch.tensor(dk, dtype=torch.int64), torch.tensor(ln, dtype=torch.int64)) \
        if ln else torch.zeros(0, dtype=torch.int64)
    return index, doc


def _kernel_order(index, doc):
    if index.numel() == 0:
        return torch.zeros(0, dtype=torch.int64), index, doc
    span = int(index.max()) + 1
    perm = torch.argsort(doc * span + index, stable=True)
    return perm, index[perm], doc[perm]


# ---------------------------------------------------------------------------
# communication
# ---------------------------------------------------------------------------


class _Comm:
    """Posts flat all-to-alls and accounts bytes and time spent waiting."""

    def __init__(self, group, rank: int, world: int, ping_pong: bool):
        self.group, self.rank, self.world = group, rank, world
        self.sent = self.recv = 0
        self.wait_s = 0.0
        self._cuda_waits: list = []

    def post(self, pieces: list[torch.Tensor], out_sizes: list[int], like: torch.Tensor):
        """Send pieces[j] (flat) to rank j; receive out_sizes[j] elements from rank j."""
        in_sizes = [p.numel() for p in pieces]
        esz = like.element_size()
        self.sent += esz * (sum(in_sizes) - in_sizes[self.rank])
        self.recv += esz * (sum(out_sizes) - out_sizes[self.rank])
        send = torch.cat(pieces) if pieces else like.new_zeros(0)
        if self.group is None or self.world == 1:
            return _Done(send)
        recv = like.new_empty(sum(out_sizes))
        # Always asynchronous: without ping-pong the caller waits at once, and the
        # wait is what we time.
        work = dist.all_to_all_single(recv, send.contiguous(), out_sizes, in_sizes, group=self.group,
                                      async_op=True)
        return _Pending(work, recv, send)

    def wait(self, pending) -> torch.Tensor:
        t0 = time.perf_counter()
        if pending.work is not None and pending.recv.is_cuda:
            ev0 = torch.cuda.Event(enable_timing=True)
            ev1 = torch.cuda.Event(enable_timing=True)
            ev0.record()
            pending.work.wait()
            ev1.record()
            self._cuda_waits.append((ev0, ev1))
            return pending.recv
        if pending.work is not None:
            pending.work.wait()
        self.wait_s += time.perf_counter() - t0
        return pending.recv

    def exposed_ms(self) -> float:
        ms = self.wait_s * 1e3
        if self._cuda_waits:
            self._cuda_waits[-1][1].synchronize()
            ms += sum(a.elapsed_time(b) for a, b in self._cuda_waits)
        return ms


class _Done:
    def __init__(self, recv):
        self.work, self.recv = None, recv


class _Pending:
    def __init__(self, work, recv, send):
        self.work, self.recv, self._send = work, recv, send  # keep the send buffer alive


def _split(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(flat, sizes)) if sizes else []


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------


class CADAttention(torch.autograd.Function):
    """out = exact attention of this rank's q over the key ranges of its tasks (see module doc)."""

    @staticmethod
    def forward(ctx, q, k, v, exchanges, group, rank, world, causal, softmax_scale, backend, ping_pong, stats):
        B, S, H, D = q.shape
        Hkv = k.shape[2]
        HD, KVD = H * D, 2 * Hkv * D
        q_flat = q.reshape(B * S, H, D)
        kv_flat = torch.cat([k, v], dim=2).reshape(B * S, 2 * Hkv, D)
        comm = _Comm(group, rank, world, ping_pong)
        opts = dict(causal=causal, softmax_scale=softmax_scale, backend=backend)
        t_start = time.perf_counter()

        # 1. post every nano-batch's dispatch
        posted = []
        for ex in exchanges:
            qs = q_flat.index_select(0, ex.send_q_idx)
            kvs = kv_flat.index_select(0, ex.send_kv_idx)
            q_parts = _split(qs.reshape(-1), [c * HD for c in ex.send_q_counts])
            kv_parts = _split(kvs.reshape(-1), [c * KVD for c in ex.send_kv_counts])
            # one flat buffer per destination: [Q | K,V]
            pieces = [torch.cat([q_parts[j], kv_parts[j]]) for j in range(world)]
            recv_sizes = [ex.recv_q_counts[j] * HD + ex.recv_kv_counts[j] * KVD for j in range(world)]
            posted.append(comm.post(pieces, recv_sizes, q))
            if not ping_pong:  # one at a time: wait now
                posted[-1] = _Done(comm.wait(posted[-1]))

        # 2. per nano-batch: wait, compute, post the return
        saved, returns = [], []
        compute_s = 0.0
        for ex, pend in zip(exchanges, posted):
            buf = comm.wait(pend)
            sizes = [x for j in range(world) for x in (ex.recv_q_counts[j] * HD, ex.recv_kv_counts[j] * KVD)]
            parts = _split(buf, sizes)
            q_recv = torch.cat(parts[0::2]).view(-1, H, D) if parts else q.new_zeros(0, H, D)
            kv_recv = torch.cat(parts[1::2]).view(-1, 2 * Hkv, D) if parts else q.new_zeros(0, 2 * Hkv, D)
            c0 = time.perf_counter()
            qk = q_recv.index_select(0, ex.q_perm).unsqueeze(0)
            kvk = kv_recv.index_select(0, ex.kv_perm)
            kk = kvk[:, :Hkv].unsqueeze(0)
            vk = kvk[:, Hkv:].unsqueeze(0)
            if qk.shape[1] > 0:
                out_k, lse = attention_forward(qk, kk, vk, q_index=ex.q_index, k_index=ex.k_index,
                                               q_doc=ex.q_doc.unsqueeze(0), k_doc=ex.k_doc.unsqueeze(0), **opts)
            else:
                out_k = qk.new_zeros(qk.shape)
                lse = qk.new_zeros(1, H, 0, dtype=_acc_dtype(q.dtype))
            out_recv = torch.empty_like(out_k[0])
            out_recv[ex.q_perm] = out_k[0]
            compute_s += time.perf_counter() - c0
            saved.append((qk, kk, vk, out_k, lse))
            ret = _split(out_recv.reshape(-1), [c * HD for c in ex.recv_q_counts])
            returns.append(comm.post(ret, [c * HD for c in ex.send_q_counts], q))
            if not ping_pong:
                returns[-1] = _Done(comm.wait(returns[-1]))

        # 3. collect the outputs at their owners
        out_flat = torch.zeros(B * S, H, D, dtype=q.dtype, device=q.device)
        for ex, pend in zip(exchanges, returns):
            buf = comm.wait(pend)
            out_flat.index_copy_(0, ex.send_q_idx, buf.view(-1, H, D))

        ctx.exchanges, ctx.saved_kernel = exchanges, saved
        ctx.comm_args = (group, rank, world, ping_pong)
        ctx.opts, ctx.shapes, ctx.stats = opts, (B, S, H, Hkv, D), stats
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        pairs = sum(ex.pairs for ex in exchanges)
        flops = 4.0 * H * D * pairs
        stats.update(
            visible_pairs=pairs,
            fwd_bytes_sent=comm.sent, fwd_bytes_recv=comm.recv, bwd_bytes_sent=0, bwd_bytes_recv=0,
            bytes_sent=comm.sent, bytes_recv=comm.recv,
            attn_flops_fwd=flops, attn_flops_bwd=0.0, attn_flops=flops,
            fwd_exposed_comm_ms=comm.exposed_ms(), bwd_exposed_comm_ms=0.0,
            fwd_compute_ms=compute_s * 1e3, fwd_ms=(time.perf_counter() - t_start) * 1e3,
        )
        stats["exposed_comm_ms"] = stats["fwd_exposed_comm_ms"]
        return out_flat.view(B, S, H, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        B, S, H, Hkv, D = ctx.shapes
        HD, KVD = H * D, 2 * Hkv * D
        group, rank, world, ping_pong = ctx.comm_args
        exchanges, saved, stats = ctx.exchanges, ctx.saved_kernel, ctx.stats
        qdt, kdt, vdt = ctx.dtypes
        comm = _Comm(group, rank, world, ping_pong)
        t_start = time.perf_counter()
        dout_flat = dout.reshape(B * S, H, D)
        order = list(reversed(range(len(exchanges))))  # nano-batches in reverse: received tasks first

        posted = {}
        for i in order:
            ex = exchanges[i]
            ds = dout_flat.index_select(0, ex.send_q_idx)
            posted[i] = comm.post(_split(ds.reshape(-1), [c * HD for c in ex.send_q_counts]),
                                  [c * HD for c in ex.recv_q_counts], dout)
            if not ping_pong:
                posted[i] = _Done(comm.wait(posted[i]))

        returns = {}
        compute_s = 0.0
        for i in order:
            ex = exchanges[i]
            qk, kk, vk, out_k, lse = saved[i]
            buf = comm.wait(posted[i])
            c0 = time.perf_counter()
            dok = buf.view(-1, H, D).index_select(0, ex.q_perm).unsqueeze(0).to(out_k.dtype)
            if qk.shape[1] > 0:
                dq_k, dk_k, dv_k = attention_backward(
                    dok, qk, kk, vk, out_k, lse, q_index=ex.q_index, k_index=ex.k_index,
                    q_doc=ex.q_doc.unsqueeze(0), k_doc=ex.k_doc.unsqueeze(0), **ctx.opts)
                dkv_k = torch.cat([dk_k, dv_k], dim=2)[0]
            else:
                dq_k = qk.new_zeros(qk.shape)
                dkv_k = kk.new_zeros(kk.shape[1], 2 * Hkv, D)
            dq_recv = torch.empty_like(dq_k[0])
            dq_recv[ex.q_perm] = dq_k[0]
            dkv_recv = torch.empty_like(dkv_k)
            dkv_recv[ex.kv_perm] = dkv_k
            compute_s += time.perf_counter() - c0
            q_parts = _split(dq_recv.reshape(-1), [c * HD for c in ex.recv_q_counts])
            kv_parts = _split(dkv_recv.reshape(-1), [c * KVD for c in ex.recv_kv_counts])
            pieces = [torch.cat([q_parts[j], kv_parts[j]]) for j in range(world)]
            out_sizes = [ex.send_q_counts[j] * HD + ex.send_kv_counts[j] * KVD for j in range(world)]
            returns[i] = comm.post(pieces, out_sizes, qk)
            if not ping_pong:
                returns[i] = _Done(comm.wait(returns[i]))
            saved[i] = None  # free the server's buffers as soon as possible

        acc = _acc_dtype(qdt)
        dq_flat = torch.zeros(B * S, H, D, dtype=qdt, device=dout.device)
        dkv_acc = torch.zeros(B * S, 2 * Hkv, D, dtype=acc, device=dout.device)
        for i in order:
            ex = exchanges[i]
            buf = comm.wait(returns[i])
            sizes = [x for j in range(world) for x in (ex.send_q_counts[j] * HD, ex.send_kv_counts[j] * KVD)]
            parts = _split(buf, sizes)
            if parts:
                dq_flat.index_copy_(0, ex.send_q_idx, torch.cat(parts[0::2]).view(-1, H, D).to(qdt))
                dkv_acc.index_add_(0, ex.send_kv_idx, torch.cat(parts[1::2]).view(-1, 2 * Hkv, D).to(acc))
        dkv = dkv_acc.view(B, S, 2 * Hkv, D)
        dk, dv = dkv[:, :, :Hkv].to(kdt), dkv[:, :, Hkv:].to(vdt)
        ctx.saved_kernel = None

        bwd_flops = 2.5 * stats["attn_flops_fwd"]
        stats.update(
            bwd_bytes_sent=comm.sent, bwd_bytes_recv=comm.recv,
            bytes_sent=stats["fwd_bytes_sent"] + comm.sent, bytes_recv=stats["fwd_bytes_recv"] + comm.recv,
            attn_flops_bwd=bwd_flops, attn_flops=stats["attn_flops_fwd"] + bwd_flops,
            bwd_exposed_comm_ms=comm.exposed_ms(), bwd_compute_ms=compute_s * 1e3,
            bwd_ms=(time.perf_counter() - t_start) * 1e3,
        )
        stats["exposed_comm_ms"] = stats["fwd_exposed_comm_ms"] + stats["bwd_exposed_comm_ms"]
        return (dq_flat.view(B, S, H, D), dk.contiguous(), dv.contiguous()) + (None,) * 9
