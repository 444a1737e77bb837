"""`longctx bench cp`: every CP strategy, measured side by side in one run, plus the cost model.

Measured (gloo processes on this machine, or NCCL ranks unchanged on GPUs): for each
world size, strategy and mask, forward+backward time (median of --reps), bytes sent
per rank (from `last_stats`), attention-FLOP imbalance (max/mean over ranks) and the
max error of out/dq/dk/dv against single-device fp64 attention.

Masks: causal; documents (causal, lengths drawn from a lognormal distribution with
median seq/16 and sigma 1.2, clipped to [16, seq]: long-tailed, a few long documents
among many short ones); full (non-causal, one document).

Modelled: the `auto` cost model for one node of 8 GPUs and for 4 such nodes.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

DESCRIPTION = "context-parallel strategies: time, bytes, FLOP imbalance, error; plus the modelled cluster table"
MASKS = ("causal", "docs", "full")


def add_arguments(p) -> None:
    p.add_argument("--world-sizes", default="2,4", help="comma-separated cp sizes to measure (default 2,4)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up (median reported)")
    p.add_argument("--strategies", default="all", help="comma-separated names, or 'all' available")
    p.add_argument("--backend", default="auto", help="attention kernel backend (auto | torch | triton)")
    p.add_argument("--intra-gbps", type=float, default=450.0, help="modelled intra-node bandwidth, GB/s per rank")
    p.add_argument("--inter-gbps", type=float, default=50.0, help="modelled inter-node bandwidth, GB/s per rank")


def long_tailed_doc_ids(seq_len: int, seed: int) -> torch.Tensor:
    """Document ids for one row: lognormal lengths (median seq/16, sigma 1.2), clipped to [16, seq]."""
    g = torch.Generator().manual_seed(seed)
    ids, pos, doc = torch.empty(seq_len, dtype=torch.long), 0, 0
    while pos < seq_len:
        length = math.exp(math.log(seq_len / 16) + 1.2 * float(torch.randn((), generator=g)))
        length = int(min(max(length, 16), seq_len - pos))
        ids[pos:pos + length] = doc
        pos, doc = pos + length, doc + 1
    return ids


def _inputs(cfg: dict, mask: str):
    g = torch.Generator().manual_seed(cfg["seed"])
    B, S, H, Hkv, D = 1, cfg["seq_len"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    q = torch.randn(B, S, H, D, generator=g)
    k = torch.randn(B, S, Hkv, D, generator=g)
    v = torch.randn(B, S, Hkv, D, generator=g)
    dout = torch.randn(B, S, H, D, generator=g)
    docs = long_tailed_doc_ids(S, cfg["seed"]).unsqueeze(0) if mask == "docs" else None
    return q, k, v, dout, docs, mask != "full"


def _reference(q, k, v, dout, docs, causal):
    from longctx.kernels import attention

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, q_doc=docs, k_doc=docs, causal=causal, backend="torch")
    out.backward(dout.double())
    return [out.detach()] + [t.grad for t in leaves]


def _measure_worker(rank: int, world: int, cfg: dict) -> list[dict]:
    import torch.distributed as dist

    from longctx.parallel import build_strategy

    rows = []
    for mask in MASKS:
        q, k, v, dout, docs, causal = _inputs(cfg, mask)
        ref = _reference(q, k, v, dout, docs, causal) if rank == 0 else None
        for name in cfg["strategies"]:
            s = build_strategy(name, group=None, backend=cfg["backend"])
            local = [s.shard(t, dim=1).contiguous().requires_grad_() for t in (q, k, v)]
            ldout, ldocs = s.shard(dout, dim=1).contiguous(), None if docs is None else s.shard(docs, dim=1)
            times = []
            for rep in range(cfg["reps"] + 1):
                for t in local:
                    t.grad = None
                dist.barrier()
                t0 = time.perf_counter()
                out = s.attention(*local, doc_ids=ldocs, causal=causal)
                out.backward(ldout)
                dist.barrier()
                if rep:  # the first run warms caches and allocators
                    times.append(time.perf_counter() - t0)
            stats = dict(s.last_stats)
            flops = torch.tensor([float(stats.get("attn_flops", 0.0))], dtype=torch.float64)
            all_flops = [torch.zeros_like(flops) for _ in range(world)]
            dist.all_gather(all_flops, flops)
            sent = torch.tensor([float(stats.get("bytes_sent", 0.0))], dtype=torch.float64)
            dist.all_reduce(sent, op=dist.ReduceOp.MAX)
            full = [s.unshard(t.detach(), dim=1) for t in (out, *(x.grad for x in local))]
            if rank == 0:
                err = max(float((f.double() - r).abs().max() / r.abs().max().clamp(min=1e-30))
                          for f, r in zip(full, ref))
                per_rank = torch.cat(all_flops)
                rows.append({"world": world, "strategy": name, "mask": mask,
                             "fwd+bwd ms": statistics.median(times) * 1e3,
                             "MiB sent/rank (max)": float(sent) / 2**20,
                             "imbalance": float(per_rank.max() / per_rank.mean().clamp(min=1e-30)),
                             "max rel err": err})
    return rows


def _modelled(ns) -> list[dict]:
    from longctx.parallel.cost_model import CANDIDATES, Workload, choose

    rows = []
    shapes = [("1 node x 8 GPUs", 8), ("4 nodes x 8 GPUs", 32)]
    for label, cp in shapes:
        for mask, doc in (("causal", None), ("docs (mean 8k)", 8192.0)):
            w = Workload(seq_len=131072, n_heads=32, n_kv_heads=8, head_dim=128, cp=cp, dtype_bytes=2,
                         mean_doc_len=doc, node_size=8, intra_gbps=ns.intra_gbps, inter_gbps=ns.inter_gbps)
            best, preds = choose(w, CANDIDATES)
            for p in preds:
                rows.append({"cluster": label, "mask": mask, **p.row(),
                             "choice": "<- auto" if p.strategy == best.strategy else ""})
    return rows


def run(ns) -> dict:
    from longctx.bench.spawn import run_gloo
    from longctx.parallel import strategy as registry

    available = [n for n in registry.STRATEGIES if n in registry._implemented()]
    wanted = available if ns.strategies == "all" else [x.strip() for x in ns.strategies.split(",")]
    missing = [n for n in wanted if n not in available]
    if missing:
        raise SystemExit(f"longctx: error: strategies {missing} are not available; available: {available}")
    cfg = {"seq_len": ns.seq_len, "heads": ns.heads, "kv_heads": ns.kv_heads, "head_dim": ns.head_dim,
           "reps": ns.reps, "backend": ns.backend, "strategies": wanted, "seed": 0}
    measured = []
    for world in (int(x) for x in ns.world_sizes.split(",")):
        measured += run_gloo(_measure_worker, world, cfg)[0]
    device = "CPU, gloo" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    return {
        "device": device,
        "config": cfg,
        "tables": [
            {"title": f"measured on {device}: seq {ns.seq_len}, H={ns.heads}, H_kv={ns.kv_heads}, D={ns.head_dim}, "
                      f"fp32, median of {ns.reps}; error vs fp64 single-device attention",
             "columns": ["world", "strategy", "mask", "fwd+bwd ms", "MiB sent/rank (max)", "imbalance",
                         "max rel err"],
             "rows": measured,
             "notes": "docs = lognormal document lengths, median seq/16, sigma 1.2, clipped to [16, seq]"},
            {"title": f"modelled (cost model of parallel.strategy=auto): 128k tokens, H=32, H_kv=8, D=128, bf16, "
                      f"per layer fwd+bwd; intra {ns.intra_gbps:g} GB/s, inter {ns.inter_gbps:g} GB/s",
             "columns": ["cluster", "mask", "strategy", "feasible", "MiB/rank", "comm ms", "compute ms",
                         "imbalance", "predicted ms", "choice"],
             "rows": _modelled(ns)},
        ],
    }


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = result["tables"][0]["rows"]
    world = max(r["world"] for r in measured)
    rows = [r for r in measured if r["world"] == world]
    names = list(dict.fromkeys(r["strategy"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    width = 0.8 / len(MASKS)
    for panel, (key, label) in zip(axes, [("fwd+bwd ms", "fwd+bwd time (ms)"),
                                          ("MiB sent/rank (max)", "MiB sent per rank"),
                                          ("imbalance", "attention-FLOP imbalance (max/mean)")]):
        for i, mask in enumerate(MASKS):
            vals = [next((r[key] for r in rows if r["strategy"] == n and r["mask"] == mask), float("nan"))
                    for n in names]
            panel.bar([x + i * width for x in range(len(names))], vals, width, label=mask)
        panel.set_xticks([x + width * (len(MASKS) - 1) / 2 for x in range(len(names))], names, rotation=20)
        panel.set_title(f"{label}, cp={world}")
        panel.grid(axis="y", alpha=0.3)
    axes[2].axhline(1.0, color="k", lw=0.8)
    axes[0].legend()
    fig.suptitle(f"longctx bench cp — {result['device']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
