"""CAD dispatch: all-to-all of tasks to attention servers, one batched kernel call each.

For every nano-batch, this rank

1. sends, to each server, the Q of its tokens whose tasks run there and the
   K/V of its tokens that those tasks need (one flat ``all_to_all_single``
   with uneven splits; per destination ``[Q tokens, K|V tokens]``);
2. as a server, runs ONE kernel call over everything it received: the tasks
   are concatenated along the sequence, every token carries its global token
   index and its document key as doc id, so the document mask keeps tasks
   apart and the causal (and sliding-window) mask works inside each document. A document with
   several tasks on one server forms one segment whose key range is the
   union of theirs (a prefix). A task sees its whole key range, so no LSE
   merge is needed;
3. sends the outputs back with the inverse all-to-all.

K/V reach a server once per call: nano-batch n delivers only the part of a
document's prefix that earlier nano-batches did not, and its kernel reads
the server's K/V store (everything delivered so far).

Backward: dOut goes to the servers like Q; they return dQ (to the query
owner) and dK/dV for every K/V token they received (summed over the
nano-batches that used it, in fp32 / fp64), which owners sum in fp32 (fp64
for fp64 inputs) into their K/V gradients. Walking the nano-batches in
reverse makes nano n's part of the store final right after its kernel.

Nothing about documents is sent: every rank computes the same plan, so both
ends of each transfer know its layout (counts, order, indices, doc keys).

Ping-pong: with two nano-batches both dispatches are posted at once
(``async_op=True``); nano 1's transfer overlaps nano 0's kernel, and nano
0's return overlaps nano 1's kernel (the planner puts a server's own tasks
in nano 0, so nano 0 needs little data). The time spent waiting on
communication is the exposed communication reported in ``last_stats``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ...kernels import attention_backward, attention_forward
from ..ring import _acc_dtype
from ..strategy import mask_options
from .planner import Plan
from .tasks import ranges_to_index, repeat_values


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
    # kernel order (by document key, then document-order index):
    q_gather: torch.Tensor  # kernel Q = received Q [q_gather]
    q_index: torch.Tensor
    q_doc: torch.Tensor
    kv_gather: torch.Tensor  # kernel K/V = K/V store [kv_gather]; store = received K/V of nanos 0..n
    k_index: torch.Tensor
    k_doc: torch.Tensor
    kv_store_offset: int  # where this nano-batch's received K/V starts in the store
    pairs: int  # visible pairs this server computes in this nano-batch


def build_exchanges(plan: Plan, rank: int, device=None) -> list[Exchange]:
    """Index tensors of every nano-batch for `rank` (the same layout every other rank assumes).

    Canonical orders, known to both ends of every transfer:
    - Q from owner s to server t, nano n: tasks of (t, n) owned by s, by (doc key, a);
    - K/V from s to t, nano n: documents of t by key; for each, the pieces held by
      s of the range nano n delivers, ``[max(E_0..E_{n-1}), max(E_0..E_n))``.
    """
    N, nanos = plan.num_servers, plan.nanos
    ends = plan.kv_ends()
    by_sn: dict[tuple[int, int], list] = {}
    for t in plan.tasks:
        by_sn.setdefault((t.server, t.nano), []).append(t)
    for lst in by_sn.values():
        lst.sort(key=lambda t: (t.doc.key, t.a))

    def idx(starts, lengths):
        return ranges_to_index(starts, lengths, device)

    def kv_pieces(srv_ends, holder, n):
        """(key, run, x, y): pieces of the K/V nano n delivers to a server (its `srv_ends`) held by `holder`."""
        for key in sorted(srv_ends):
            doc, e = srv_ends[key]
            if holder not in doc.ranks:
                continue
            lo = max(e[:n], default=0)
            for run, x, y in doc.pieces(lo, max(lo, e[n])):
                if run.rank == holder:
                    yield key, run, x, y

    out = []
    store_pieces: dict[int, list[tuple[int, int, int]]] = {}  # doc key -> (lo, hi, store offset)
    store_len = 0
    my_ends = ends.get(rank, {})
    for n in range(nanos):
        # -- owner side -------------------------------------------------------------
        sq_start, sq_len, sq_counts = [], [], [0] * N
        skv_start, skv_len, skv_counts = [], [], [0] * N
        for srv in range(N):
            for t in by_sn.get((srv, n), ()):
                if t.owner == rank:
                    sq_start.append(t.q_flat_start())
                    sq_len.append(t.b - t.a)
                    sq_counts[srv] += t.b - t.a
            for _, run, x, y in kv_pieces(ends.get(srv, {}), rank, n):
                skv_start.append(run.flat_start + (x - run.doc_start))
                skv_len.append(y - x)
                skv_counts[srv] += y - x
        # -- server side: where each received token lands -----------------------------
        mine = by_sn.get((rank, n), [])
        rq_counts = [0] * N
        q_off: dict[int, int] = {}  # id(task) -> offset in the received Q
        by_owner: dict[int, list] = {}
        for t in mine:
            by_owner.setdefault(t.owner, []).append(t)
        off = 0
        for s in sorted(by_owner):
            for t in by_owner[s]:
                q_off[id(t)] = off
                off += t.b - t.a
                rq_counts[s] += t.b - t.a
        rkv_counts = [0] * N
        kv_store_offset = store_len
        for s in range(N):
            for key, run, x, y in kv_pieces(my_ends, s, n):
                store_pieces.setdefault(key, []).append((x, y, store_len, run.position(x)))
                store_len += y - x
                rkv_counts[s] += y - x
        # -- kernel order ----------------------------------------------------------------
        qg_start, qg_len, qi_start, q_keys = [], [], [], []
        for t in mine:  # already by (doc key, a)
            qg_start.append(q_off[id(t)])
            qg_len.append(t.b - t.a)
            qi_start.append(t.run.position(t.a))
            q_keys.append(t.doc.key)
        kg_start, kg_len, ki_start, k_keys = [], [], [], []
        for key in sorted(my_ends):
            doc, e = my_ends[key]
            need = e[n]
            if need == 0:
                continue
            for x, y, so, pos in sorted(store_pieces.get(key, ())):
                if x >= need:
                    break
                kg_start.append(so)
                kg_len.append(min(y, need) - x)
                ki_start.append(pos)
                k_keys.append(key)
        ex = Exchange(
            nano=n,
            send_q_idx=idx(sq_start, sq_len), send_q_counts=sq_counts,
            send_kv_idx=idx(skv_start, skv_len), send_kv_counts=skv_counts,
            recv_q_counts=rq_counts, recv_kv_counts=rkv_counts,
            q_gather=idx(qg_start, qg_len), q_index=idx(qi_start, qg_len),
            q_doc=repeat_values(q_keys, qg_len, device),
            kv_gather=idx(kg_start, kg_len), k_index=idx(ki_start, kg_len),
            k_doc=repeat_values(k_keys, kg_len, device),
            kv_store_offset=kv_store_offset,
            pairs=sum(t.pairs for t in mine),
        )
        out.append(ex)
    return out


# ---------------------------------------------------------------------------
# communication
# ---------------------------------------------------------------------------


class _Comm:
    """Posts flat all-to-alls and accounts bytes and time spent waiting."""

    def __init__(self, group, rank: int, world: int):
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


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------


class CADAttention(torch.autograd.Function):
    """out = exact attention of this rank's q over the key ranges of its tasks (see module doc)."""

    @staticmethod
    def forward(ctx, q, k, v, exchanges, group, rank, world, causal, window, softmax_scale, backend, ping_pong,
                stats):
        B, S, H, D = q.shape
        Hkv = k.shape[2]
        HD, KVD = H * D, 2 * Hkv * D
        q_flat = q.reshape(B * S, H, D)
        kv_flat = torch.cat([k, v], dim=2).reshape(B * S, 2 * Hkv, D)
        comm = _Comm(group, rank, world)
        opts = dict(softmax_scale=softmax_scale, backend=backend, **mask_options(causal, window))

        # 1. post every nano-batch's dispatch: per destination one flat buffer [Q | K,V]
        posted = []
        for ex in exchanges:
            q_parts = _split(q_flat.index_select(0, ex.send_q_idx).reshape(-1), [c * HD for c in ex.send_q_counts])
            kv_parts = _split(kv_flat.index_select(0, ex.send_kv_idx).reshape(-1),
                              [c * KVD for c in ex.send_kv_counts])
            pieces = [torch.cat([q_parts[j], kv_parts[j]]) for j in range(world)]
            recv_sizes = [ex.recv_q_counts[j] * HD + ex.recv_kv_counts[j] * KVD for j in range(world)]
            posted.append(comm.post(pieces, recv_sizes, q))
            if not ping_pong:  # one at a time: wait now
                posted[-1] = _Done(comm.wait(posted[-1]))

        # 2. per nano-batch: wait, one kernel call, post the return
        saved, returns, store = [], [], []
        compute_s = 0.0
        for ex, pend in zip(exchanges, posted):
            buf = comm.wait(pend)
            sizes = [x for j in range(world) for x in (ex.recv_q_counts[j] * HD, ex.recv_kv_counts[j] * KVD)]
            parts = _split(buf, sizes)
            q_recv = torch.cat(parts[0::2]).view(-1, H, D)
            store.append(torch.cat(parts[1::2]).view(-1, 2 * Hkv, D))
            c0 = time.perf_counter()
            kv_store = torch.cat(store) if len(store) > 1 else store[0]
            qk = q_recv.index_select(0, ex.q_gather).unsqueeze(0)
            kvk = kv_store.index_select(0, ex.kv_gather)
            if qk.shape[1] > 0:
                out_k, lse = attention_forward(
                    qk, kvk[:, :Hkv].unsqueeze(0), kvk[:, Hkv:].unsqueeze(0), q_index=ex.q_index,
                    k_index=ex.k_index, q_doc=ex.q_doc.unsqueeze(0), k_doc=ex.k_doc.unsqueeze(0), **opts)
            else:
                out_k = qk.new_zeros(qk.shape)
                lse = torch.zeros(1, H, 0, dtype=_acc_dtype(q.dtype), device=q.device)
            out_recv = torch.empty_like(q_recv).index_copy_(0, ex.q_gather, out_k[0])
            compute_s += time.perf_counter() - c0
            saved.append((qk, out_k, lse))
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
        ctx.kv_store = torch.cat(store) if len(store) > 1 else store[0]
        ctx.comm_args = (group, rank, world, ping_pong)
        ctx.opts, ctx.shapes, ctx.stats = opts, (B, S, H, Hkv, D), stats
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        pairs = sum(ex.pairs for ex in exchanges)
        exposed = comm.exposed_ms()
        stats.add_forward(comm, flops=4.0 * H * D * pairs, visible_pairs=pairs, fwd_exposed_comm_ms=exposed,
                          bwd_exposed_comm_ms=0.0, exposed_comm_ms=exposed, fwd_compute_ms=compute_s * 1e3)
        return out_flat.view(B, S, H, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        B, S, H, Hkv, D = ctx.shapes
        HD, KVD = H * D, 2 * Hkv * D
        group, rank, world, ping_pong = ctx.comm_args
        exchanges, saved, stats, kv_store = ctx.exchanges, ctx.saved_kernel, ctx.stats, ctx.kv_store
        qdt, kdt, vdt = ctx.dtypes
        acc = _acc_dtype(qdt)
        comm = _Comm(group, rank, world)
        dout_flat = dout.reshape(B * S, H, D)
        # Nano-batches in reverse: nano n's K/V-store slice only gets gradients from
        # nano-batches >= n, so it is complete (and can go back) right after nano n.
        order = list(reversed(range(len(exchanges))))

        posted = {}
        for i in order:
            ex = exchanges[i]
            ds = dout_flat.index_select(0, ex.send_q_idx)
            posted[i] = comm.post(_split(ds.reshape(-1), [c * HD for c in ex.send_q_counts]),
                                  [c * HD for c in ex.recv_q_counts], dout)
            if not ping_pong:
                posted[i] = _Done(comm.wait(posted[i]))

        d_store = torch.zeros(kv_store.shape, dtype=acc, device=kv_store.device)
        returns = {}
        compute_s = 0.0
        for i in order:
            ex = exchanges[i]
            qk, out_k, lse = saved[i]
            buf = comm.wait(posted[i])
            c0 = time.perf_counter()
            dq_recv = torch.zeros(buf.numel() // HD, H, D, dtype=qdt, device=dout.device)
            if qk.shape[1] > 0:
                dok = buf.view(-1, H, D).index_select(0, ex.q_gather).unsqueeze(0).to(out_k.dtype)
                kvk = kv_store.index_select(0, ex.kv_gather)
                dq_k, dk_k, dv_k = attention_backward(
                    dok, qk, kvk[:, :Hkv].unsqueeze(0), kvk[:, Hkv:].unsqueeze(0), out_k, lse,
                    q_index=ex.q_index, k_index=ex.k_index,
                    q_doc=ex.q_doc.unsqueeze(0), k_doc=ex.k_doc.unsqueeze(0), **ctx.opts)
                d_store.index_add_(0, ex.kv_gather, torch.cat([dk_k, dv_k], dim=2)[0].to(acc))
                dq_recv.index_copy_(0, ex.q_gather, dq_k[0].to(qdt))
            n_kv = sum(ex.recv_kv_counts)
            dkv_recv = d_store[ex.kv_store_offset:ex.kv_store_offset + n_kv].to(kdt)
            compute_s += time.perf_counter() - c0
            q_parts = _split(dq_recv.reshape(-1), [c * HD for c in ex.recv_q_counts])
            kv_parts = _split(dkv_recv.reshape(-1), [c * KVD for c in ex.recv_kv_counts])
            pieces = [torch.cat([q_parts[j], kv_parts[j]]) for j in range(world)]
            out_sizes = [ex.send_q_counts[j] * HD + ex.send_kv_counts[j] * KVD for j in range(world)]
            returns[i] = comm.post(pieces, out_sizes, dq_recv)
            if not ping_pong:
                returns[i] = _Done(comm.wait(returns[i]))
            saved[i] = None  # free the server's buffers as soon as possible

        dq_flat = torch.zeros(B * S, H, D, dtype=qdt, device=dout.device)
        dkv_acc = torch.zeros(B * S, 2 * Hkv, D, dtype=acc, device=dout.device)
        for i in order:
            ex = exchanges[i]
            buf = comm.wait(returns[i])
            sizes = [x for j in range(world) for x in (ex.send_q_counts[j] * HD, ex.send_kv_counts[j] * KVD)]
            parts = _split(buf, sizes)
            dq_flat.index_copy_(0, ex.send_q_idx, torch.cat(parts[0::2]).view(-1, H, D))
            dkv_acc.index_add_(0, ex.send_kv_idx, torch.cat(parts[1::2]).view(-1, 2 * Hkv, D).to(acc))
        dkv = dkv_acc.view(B, S, 2 * Hkv, D)
        dk, dv = dkv[:, :, :Hkv].to(kdt), dkv[:, :, Hkv:].to(vdt)
        ctx.saved_kernel = ctx.kv_store = None

        exposed = comm.exposed_ms()
        stats.add_backward(comm, bwd_exposed_comm_ms=exposed, bwd_compute_ms=compute_s * 1e3,
                           exposed_comm_ms=stats["fwd_exposed_comm_ms"] + exposed)
        return (dq_flat.view(B, S, H, D), dk.contiguous(), dv.contiguous()) + (None,) * 10
