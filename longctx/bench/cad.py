"""`longctx bench cad`: core attention disaggregation -- planner quality, traffic, time.

Simulated (no processes; the real planner on synthetic packed rows):

- scope dp: N ranks (8..512), each holding a different packed row of T tokens
  (128k..512k). Attention-FLOP imbalance (max/mean over ranks) in place and
  after planning, FLOPs moved, bytes each rank sends (one attention layer,
  forward + backward, Llama-3-8B attention shapes: H=32, H_kv=8, D=128,
  bf16), bytes per FLOP moved, planner time, and a modelled step time.
- scope cp: one row of T tokens over N ranks: ring (contiguous), zigzag and
  cad on the same documents, from each layout's visible pairs and traffic.
- planner time at 64 ranks with 1M tokens per row (and 1M tokens in all).

Document lengths (tokens; every row is packed greedily, the last document cut
to fit): ``lognormal`` -- median T/32, sigma 1.8 (most documents a few
thousand tokens, a few as long as the row); ``pareto`` -- T/128 x
Pareto(alpha = 1.1) (heavier tail: many short documents, rare very long ones).

Modelled time per layer (fwd+bwd) of a rank: linear part (6 x 218M FLOPs per
token: the Llama-3-8B layer's weights) + attention (4*H*D*3.5 FLOPs per
visible pair), both at --tflops, + exposed communication at --gbps per rank:
cad with ping-pong exposes max(0, comm - attention/2) (the other
nano-batch's attention hides the rest); ring/zigzag overlap every hop with a
block: max(attention, comm). The step waits for the slowest rank.

Measured (gloo processes on this machine): world size 4, one row sharded over
the group (scope cp: ring, zigzag, cad with and without ping-pong) and
different rows per rank (scope dp: local attention vs cad): fwd+bwd time
(median, slowest rank), bytes sent per rank, FLOP imbalance, exposed
communication and max error against fp64 single-device attention.
"""

from __future__ import annotations

import math
import random
import statistics
import time

import torch

DESCRIPTION = ("core attention disaggregation: imbalance before/after planning, bytes, planner time, "
               "modelled and measured step time, vs ring and zigzag")

# Llama-3-8B attention shapes for the simulated traffic and FLOPs.
SIM_H, SIM_HKV, SIM_D, SIM_BYTES = 32, 8, 128, 2
LINEAR_FLOPS_PER_TOKEN = 6 * 218.1e6  # fwd+bwd, one layer: dim 4096, GQA 32/8, FFN 14336
ATTN_FLOPS_PER_PAIR = 4 * SIM_H * SIM_D * 3.5


def add_arguments(p) -> None:
    p.add_argument("--ranks", default="8,32,128,512", help="simulated rank counts (default 8,32,128,512)")
    p.add_argument("--tokens", default="131072,524288", help="simulated tokens per row (default 128k,512k)")
    p.add_argument("--dists", default="lognormal,pareto", help="document length laws (lognormal, pareto)")
    p.add_argument("--cp-ranks", default="8,16,32,64", help="cp sizes for the simulated ring/zigzag/cad table")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--max-shard-tokens", type=int, default=8192)
    p.add_argument("--min-shard-tokens", type=int, default=128)
    p.add_argument("--tflops", type=float, default=400.0, help="modelled sustained TFLOP/s per rank")
    p.add_argument("--gbps", type=float, default=50.0, help="modelled network GB/s per rank and direction")
    p.add_argument("--world", type=int, default=4, help="gloo world size of the measured run (0 = skip)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row in the measured run")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--reps", type=int, default=2, help="timed repetitions after one warm-up (median)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------------------
# synthetic documents
# ---------------------------------------------------------------------------


def doc_length(rng: random.Random, dist: str, row: int) -> int:
    if dist == "lognormal":
        x = rng.lognormvariate(math.log(row / 32), 1.8)
    elif dist == "pareto":
        x = (row / 128) * rng.paretovariate(1.1)
    else:
        raise SystemExit(f"longctx: error: unknown document length law {dist!r} (lognormal, pareto)")
    return max(1, int(x))


def packed_rows(n_rows: int, row: int, dist: str, seed: int) -> list[list[int]]:
    """Rows of exactly `row` tokens: documents drawn in order, the last one cut to fit."""
    rng = random.Random(f"{dist}-{row}-{seed}")
    rows = []
    for _ in range(n_rows):
        lengths, total = [], 0
        while total < row:
            n = min(doc_length(rng, dist, row), row - total)
            lengths.append(n)
            total += n
        rows.append(lengths)
    return rows


def doc_ids_from_lengths(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


# ---------------------------------------------------------------------------
# simulation
# ---------------------------------------------------------------------------


def _cost():
    from longctx.parallel.cad import CostModel

    return CostModel.for_shapes(SIM_H, SIM_HKV, SIM_D, SIM_BYTES)


def _imb(x: list[float]) -> float:
    return max(x) * len(x) / sum(x) if sum(x) > 0 else 1.0


def simulate_dp(N: int, T: int, dist: str, ns, seed: int) -> dict:
    from longctx.parallel.cad import docs_from_lengths, plan

    docs = docs_from_lengths(packed_rows(N, T, dist, seed))
    p = plan(docs, N, cost=_cost(), tolerance=ns.tolerance, max_shard_tokens=ns.max_shard_tokens,
             min_shard_tokens=ns.min_shard_tokens, ping_pong=True)
    sent, recv = p.traffic()
    moved = sum(t.pairs for t in p.tasks if t.owner != t.server)
    peak, bw = ns.tflops * 1e12, ns.gbps * 1e9
    lin = T * LINEAR_FLOPS_PER_TOKEN / peak
    before = [lin + x * ATTN_FLOPS_PER_PAIR / peak for x in p.loads_before]
    after = []
    for r in range(N):
        attn = p.loads_after[r] * ATTN_FLOPS_PER_PAIR / peak
        comm = max(sent[r], recv[r]) / bw
        after.append(lin + attn + max(0.0, comm - attn / 2))
    return {
        "scope": "dp", "dist": dist, "ranks": N, "tokens/row": T, "docs": len(docs), "tasks": len(p.tasks),
        "imb before": p.imbalance_before, "imb after": p.imbalance_after,
        "FLOPs moved %": 100.0 * moved / sum(p.loads_after),
        "MiB sent/rank mean": sum(sent) / N / 2**20, "MiB sent/rank max": max(sent) / 2**20,
        "B/FLOP moved": sum(sent) / max(moved * ATTN_FLOPS_PER_PAIR, 1.0),
        "planner ms": p.planner_ms,
        "step ms before": max(before) * 1e3, "step ms after": max(after) * 1e3,
        "speedup": max(before) / max(after),
    }


def _layout_pairs(doc: torch.Tensor, index_per_rank: list[torch.Tensor]) -> list[int]:
    """Causal visible pairs of each rank's query tokens in one row (doc ids `doc`)."""
    S = doc.numel()
    start = torch.ones(S, dtype=torch.bool)
    start[1:] = doc[1:] != doc[:-1]
    pos = torch.arange(S)
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values
    seen = pos - first + 1  # keys visible to each query (contiguous documents)
    return [int(seen[idx].sum()) for idx in index_per_rank]


def simulate_cp(N: int, T: int, dist: str, ns, seed: int) -> list[dict]:
    from longctx.parallel.cad import docs_from_runs, local_runs, plan

    lengths = packed_rows(1, T, dist, seed)[0]
    doc = doc_ids_from_lengths(lengths)
    S = T // N
    peak, bw = ns.tflops * 1e12, ns.gbps * 1e9
    lin = S * LINEAR_FLOPS_PER_TOKEN / peak
    kv_local = S * 2 * SIM_HKV * SIM_D * SIM_BYTES
    # ring family: forward N-1 hops of local K,V (+ int64 doc ids); backward the same plus
    # N hops of fp32 dK,dV accumulators (longctx.parallel.ring)
    ring_bytes = 2 * (N - 1) * (kv_local + 8 * S) + N * S * 2 * SIM_HKV * SIM_D * 4
    rows = []
    contiguous = [torch.arange(r * S, (r + 1) * S) for r in range(N)]
    c = T // (2 * N)
    zigzag = [torch.cat([torch.arange(r * c, (r + 1) * c), torch.arange((2 * N - 1 - r) * c, (2 * N - r) * c)])
              for r in range(N)]
    for name, idx in (("ring", contiguous), ("zigzag", zigzag)):
        pairs = _layout_pairs(doc, idx)
        t = [lin + max(p * ATTN_FLOPS_PER_PAIR / peak, ring_bytes / bw) for p in pairs]
        rows.append({"strategy": name, "imb": _imb(pairs), "MiB sent/rank max": ring_bytes / 2**20,
                     "step ms": max(t) * 1e3})
    runs = [local_runs(doc[r * S:(r + 1) * S].unsqueeze(0), 1, S).tolist() for r in range(N)]
    docs = docs_from_runs(runs, [S] * N, row_size=N)
    p = plan(docs, N, cost=_cost(), tolerance=ns.tolerance, max_shard_tokens=ns.max_shard_tokens,
             min_shard_tokens=ns.min_shard_tokens, ping_pong=True)
    sent, recv = p.traffic()
    t = []
    for r in range(N):
        attn = p.loads_after[r] * ATTN_FLOPS_PER_PAIR / peak
        t.append(lin + attn + max(0.0, max(sent[r], recv[r]) / bw - attn / 2))
    rows.append({"strategy": "cad", "imb": p.imbalance_after, "MiB sent/rank max": max(sent) / 2**20,
                 "step ms": max(t) * 1e3, "planner ms": p.planner_ms,
                 "note": f"in place {p.imbalance_before:.2f}"})
    for r in rows:
        r.update({"scope": "cp", "dist": dist, "ranks": N, "tokens/row": T, "docs": len(lengths)})
    return rows


def planner_timing(ns, seed: int) -> list[dict]:
    from longctx.parallel.cad import docs_from_lengths, plan

    rows = []
    for N, T in ((64, 1 << 20), (64, (1 << 20) // 64)):
        for dist in ("lognormal", "pareto"):
            docs = docs_from_lengths(packed_rows(N, T, dist, seed))
            times = []
            for _ in range(2):
                p = plan(docs, N, cost=_cost(), tolerance=ns.tolerance, max_shard_tokens=ns.max_shard_tokens,
                         min_shard_tokens=ns.min_shard_tokens, ping_pong=True)
                times.append(p.planner_ms)
            rows.append({"ranks": N, "tokens/row": T, "tokens total": N * T, "dist": dist, "docs": len(docs),
                         "tasks": len(p.tasks), "moves": p.moves, "imb before": p.imbalance_before,
                         "imb after": p.imbalance_after, "planner ms": min(times)})
    return rows


# ---------------------------------------------------------------------------
# measured run (gloo)
# ---------------------------------------------------------------------------


def _reference(q, k, v, dout, docs):
    from longctx.kernels import attention

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, q_doc=docs, k_doc=docs, causal=True, backend="torch")
    out.backward(dout.double())
    return [out.detach()] + [t.grad for t in leaves]


def _timed(fn, reps, dist):
    times = []
    for rep in range(reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        if rep:
            times.append(float(t))
    return statistics.median(times) * 1e3


def _group_stats(stats: dict, dist, world) -> dict:
    flops = torch.tensor([float(stats.get("attn_flops", 0.0))], dtype=torch.float64)
    parts = [torch.zeros_like(flops) for _ in range(world)]
    dist.all_gather(parts, flops)
    vals = torch.tensor([[float(stats.get("bytes_sent", 0.0)), float(stats.get("exposed_comm_ms", 0.0))]],
                        dtype=torch.float64)
    dist.all_reduce(vals, op=dist.ReduceOp.MAX)
    per = torch.cat(parts)
    return {"imbalance": float(per.max() / per.mean().clamp(min=1e-30)),
            "MiB sent/rank max": float(vals[0, 0]) / 2**20,
            # only cad measures it (time spent waiting on its all-to-alls, slowest rank)
            "exposed comm ms": float(vals[0, 1]) if "exposed_comm_ms" in stats else float("nan")}


def _measure_worker(rank: int, world: int, cfg: dict) -> list[dict]:
    import torch.distributed as dist

    from longctx.kernels import attention
    from longctx.parallel import build_strategy

    S, H, Hkv, D = cfg["seq_len"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    rows = []

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(1, S, H, D, generator=g)
        k = torch.randn(1, S, Hkv, D, generator=g)
        v = torch.randn(1, S, Hkv, D, generator=g)
        dout = torch.randn(1, S, H, D, generator=g)
        docs = doc_ids_from_lengths(packed_rows(1, S, cfg["dist"], seed)[0]).unsqueeze(0)
        return q, k, v, dout, docs

    # -- scope cp: one row sharded over the group ---------------------------------------------
    q, k, v, dout, docs = inputs(cfg["seed"])
    ref = _reference(q, k, v, dout, docs) if rank == 0 else None
    for label, name, opts in cfg["cp_strategies"]:
        try:
            s = build_strategy(name, backend=cfg["backend"], **opts)
        except ValueError as err:  # e.g. zigzag not in this version
            if rank == 0:
                rows.append({"scope": "cp", "strategy": label, "note": f"not available: {err}"})
            continue
        local = [s.shard(t, dim=1).contiguous().requires_grad_() for t in (q, k, v)]
        ldout, ldocs = s.shard(dout, dim=1).contiguous(), s.shard(docs, dim=1).contiguous()
        holder = {}

        def step():
            for t in local:
                t.grad = None
            out = s.attention(*local, doc_ids=ldocs, causal=True)
            out.backward(ldout)
            holder["out"] = out

        ms = _timed(step, cfg["reps"], dist)
        row = {"scope": "cp", "strategy": label, "fwd+bwd ms": ms, **_group_stats(s.last_stats, dist, world)}
        full = [s.unshard(t.detach(), dim=1) for t in (holder["out"], *(x.grad for x in local))]
        if name == "cad":
            row["note"] = (f"in place {s.last_stats['imbalance_before']:.2f}, "
                           f"planner {s._cache.planner_ms:.1f} ms")
        if rank == 0:
            row["max abs err"] = max(float((f.double() - r).abs().max()) for f, r in zip(full, ref))
            rows.append(row)

    # -- scope dp: a different row on every rank ----------------------------------------------
    q, k, v, dout, docs = inputs(cfg["seed"] + 1 + rank)
    ref = _reference(q, k, v, dout, docs)
    for label in ("local (no balancing)", "cad"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        holder = {}
        if label == "cad":
            s = build_strategy("cad", backend=cfg["backend"], scope="dp", **cfg["cad_opts"])

            def attn(a, b, c):
                return s.attention(a, b, c, doc_ids=docs, causal=True)
        else:
            s = None

            def attn(a, b, c):
                return attention(a, b, c, q_doc=docs, k_doc=docs, causal=True, backend=cfg["backend"])

        def step():
            for t in leaves:
                t.grad = None
            out = attn(*leaves)
            out.backward(dout)
            holder["out"] = out

        ms = _timed(step, cfg["reps"], dist)
        if s is not None:
            extra = _group_stats(s.last_stats, dist, world)
            extra["note"] = f"in place {s.last_stats['imbalance_before']:.2f}"
        else:
            pairs = attention_pairs(docs)
            extra = _group_stats({"attn_flops": 3.5 * 4 * H * D * pairs}, dist, world)
        err = torch.tensor([max(float((a.detach().double() - b).abs().max())
                                for a, b in zip([holder["out"]] + [x.grad for x in leaves], ref))],
                           dtype=torch.float64)
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        if rank == 0:
            rows.append({"scope": "dp", "strategy": label, "fwd+bwd ms": ms, **extra, "max abs err": float(err)})
    return rows


def attention_pairs(docs: torch.Tensor) -> int:
    from longctx.kernels import visible_pairs

    S = docs.shape[1]
    idx = torch.arange(S)
    return visible_pairs(idx, idx, docs, docs, True)


# ---------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------


def run(ns) -> dict:
    ranks = [int(x) for x in ns.ranks.split(",") if x]
    tokens = [int(x) for x in ns.tokens.split(",") if x]
    dists = [x.strip() for x in ns.dists.split(",") if x.strip()]
    t0 = time.perf_counter()
    dp_rows = [simulate_dp(N, T, d, ns, ns.seed) for d in dists for T in tokens for N in ranks]
    cp_rows = []
    for N in (int(x) for x in ns.cp_ranks.split(",") if x):
        cp_rows += simulate_cp(N, max(tokens), dists[0], ns, ns.seed)
    timing = planner_timing(ns, ns.seed)
    sim_s = time.perf_counter() - t0

    tables = [
        {"title": f"simulated scope dp: different packed rows per rank; tolerance {ns.tolerance}, "
                  f"shards {ns.max_shard_tokens} (cut at multiples of {ns.min_shard_tokens}); traffic per "
                  f"attention layer fwd+bwd, H=32 H_kv=8 D=128 bf16; model {ns.tflops:g} TFLOP/s, "
                  f"{ns.gbps:g} GB/s",
         "columns": ["dist", "ranks", "tokens/row", "docs", "tasks", "imb before", "imb after", "FLOPs moved %",
                     "MiB sent/rank mean", "MiB sent/rank max", "B/FLOP moved", "planner ms", "step ms before",
                     "step ms after", "speedup"],
         "rows": dp_rows,
         "notes": "lognormal: median T/32, sigma 1.8; pareto: T/128 x Pareto(1.1); rows packed greedily, "
                  "last document cut. B/FLOP moved = bytes sent (all ranks) / attention FLOPs (fwd+bwd) "
                  "computed away from their owner."},
        {"title": f"simulated scope cp: one row of {max(tokens)} tokens ({dists[0]}) over N ranks -- "
                  "ring, zigzag, cad on the same documents",
         "columns": ["ranks", "strategy", "imb", "MiB sent/rank max", "step ms", "planner ms", "note"],
         "rows": cp_rows,
         "notes": "ring/zigzag: 2(N-1) hops of local K,V + doc ids and N hops of fp32 dK,dV; step = linear + "
                  "max(attention, comm). cad: exact planned traffic; step = linear + attention + "
                  "max(0, comm - attention/2)."},
        {"title": "planner time (one plan per step; every rank computes the same plan)",
         "columns": ["ranks", "tokens/row", "tokens total", "dist", "docs", "tasks", "moves", "imb before",
                     "imb after", "planner ms"],
         "rows": timing},
    ]
    measured = []
    if ns.world > 0:
        from longctx.bench.spawn import run_gloo

        cad_opts = {"tolerance": ns.tolerance, "max_shard_tokens": min(ns.max_shard_tokens, ns.seq_len // 8),
                    "min_shard_tokens": min(ns.min_shard_tokens, 16)}
        cfg = {"seq_len": ns.seq_len, "heads": ns.heads, "kv_heads": ns.kv_heads, "head_dim": ns.head_dim,
               "reps": ns.reps, "backend": ns.backend, "seed": ns.seed, "dist": dists[0], "cad_opts": cad_opts,
               "cp_strategies": [("ring", "ring", {}), ("zigzag", "zigzag", {}),
                                 ("cad", "cad", {"scope": "cp", **cad_opts}),
                                 ("cad (no ping-pong)", "cad", {"scope": "cp", "ping_pong": False, **cad_opts})]}
        t1 = time.perf_counter()
        measured = run_gloo(_measure_worker, ns.world, cfg)[0]
        device = "CPU, gloo" if not torch.cuda.is_available() else torch.cuda.get_device_name()
        tables.append({
            "title": f"measured on {device}, world {ns.world}: {ns.seq_len} tokens per row ({dists[0]} documents), "
                     f"H={ns.heads} H_kv={ns.kv_heads} D={ns.head_dim} fp32, median of {ns.reps}, slowest rank",
            "columns": ["scope", "strategy", "fwd+bwd ms", "MiB sent/rank max", "imbalance", "exposed comm ms",
                        "max abs err", "note"],
            "rows": measured,
            "notes": f"error: max |x - ref| over out, dq, dk, dv against fp64 single-device attention. "
                     f"cad options {cad_opts}. exposed comm = time blocked in cad's all-to-all waits "
                     f"(slowest rank; includes waiting for slower peers). {ns.world} processes share this "
                     f"machine's cores, so balancing cannot shorten wall time here the way it does with one "
                     f"accelerator per rank. Measured in {time.perf_counter() - t1:.0f} s."})
    acc = _acceptance(dp_rows, ns.tolerance)
    tables[0]["notes"] += (f"\nacceptance: {acc['rows with in-place imbalance >= 1.5']} configurations with "
                           f"in-place imbalance >= 1.5; max imbalance after planning "
                           f"{acc['max imbalance after planning among them']:.4f} (target <= 1.05): "
                           f"{'PASS' if acc['passed'] else 'FAIL'}. Simulation took {sim_s:.1f} s.")
    return {"title": "longctx bench cad", "tables": tables, "simulation_s": sim_s, "acceptance": acc}


def _acceptance(dp_rows, tol) -> dict:
    hard = [r for r in dp_rows if r["imb before"] >= 1.5]
    return {"rows with in-place imbalance >= 1.5": len(hard),
            "max imbalance after planning among them": max((r["imb after"] for r in hard), default=float("nan")),
            "target": 1.05, "tolerance": tol,
            "passed": all(r["imb after"] <= 1.05 for r in hard) and bool(hard)}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = result["tables"][0]["rows"]
    cp = result["tables"][1]["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), dpi=100)
    series = sorted({(r["dist"], r["tokens/row"]) for r in dp})
    for dist, T in series:
        rs = sorted((r for r in dp if r["dist"] == dist and r["tokens/row"] == T), key=lambda r: r["ranks"])
        x = [r["ranks"] for r in rs]
        lab = f"{dist}, {T // 1024}k"
        l0, = axes[0, 0].plot(x, [r["imb before"] for r in rs], "--o", label=f"{lab} in place")
        axes[0, 0].plot(x, [r["imb after"] for r in rs], "-s", color=l0.get_color(), label=f"{lab} planned")
        axes[0, 1].plot(x, [r["MiB sent/rank max"] / 1024 for r in rs], "-o", color=l0.get_color(), label=lab)
        axes[1, 0].plot(x, [r["planner ms"] for r in rs], "-o", color=l0.get_color(), label=lab)
    axes[0, 0].axhline(1.05, color="k", lw=0.8, ls=":")
    axes[0, 0].set(xscale="log", yscale="log", xlabel="ranks (scope dp)", ylabel="attention-FLOP max/mean",
                   title="imbalance: in place (dashed) vs planned")
    axes[0, 1].set(xscale="log", xlabel="ranks (scope dp)", ylabel="GiB sent, busiest rank",
                   title="traffic per layer (fwd+bwd)")
    axes[1, 0].set(xscale="log", xlabel="ranks (scope dp)", ylabel="ms", title="planner time")
    for ax in (axes[0, 0], axes[0, 1], axes[1, 0]):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    names = list(dict.fromkeys(r["strategy"] for r in cp))
    Ns = sorted({r["ranks"] for r in cp})
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = [next(r["step ms"] for r in cp if r["ranks"] == N and r["strategy"] == n) for N in Ns]
        axes[1, 1].bar([j + i * w for j in range(len(Ns))], vals, w, label=n)
    axes[1, 1].set_xticks([j + w * (len(names) - 1) / 2 for j in range(len(Ns))], [str(N) for N in Ns])
    axes[1, 1].set(xlabel="cp ranks (one row)", ylabel="modelled ms per layer (fwd+bwd)",
                   title="scope cp: ring vs zigzag vs cad, same documents")
    axes[1, 1].legend()
    axes[1, 1].grid(axis="y", alpha=0.3)
    fig.suptitle("longctx bench cad")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
