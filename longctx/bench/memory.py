"""`longctx bench memory`: gated memory modules — speed, and recall beyond the attention window.

1. Speed (this device): for each module (Titans linear, Titans MLP, GSA, gated FIFO), the
   fast chunk-parallel path (forward, and forward+backward) against its naive token loop
   (`reference`, forward) and against attention (full causal attention, the project's kernel,
   and sliding-window attention), at 1k..32k tokens. The reference loop only runs while its
   predicted forward time (1.5 x the worst per-token time measured so far, times the size)
   stays under --ref-budget seconds (default 20); larger sizes are reported as "-".
2. Capability: synthetic key-value recall at distances beyond the attention window. Small
   models of (nearly) equal parameter count — sliding-window attention only, full attention,
   and hybrids (sliding-window attention + one memory layer, MAL) with each memory — are
   trained for a fixed number of steps on the same stream, then evaluated on fresh
   documents whose queries are --eval-gaps tokens after the pairs (all beyond the window).

   Documents (own generator, token-level, so a tiny model learns in minutes on a CPU):
       k1 v1 k2 v2 ... kP vP  f f f ... f (gap filler)  QRY ki vi  QRY kj vj ...
   keys, values and filler come from disjoint token ranges; every key of the document is
   queried once, in random order. The loss (and the accuracy) is on the queried values only.
"""

from __future__ import annotations

import math
import random
import statistics
import time

import torch
import torch.nn.functional as F

DESCRIPTION = "memory modules: fast path vs reference vs attention speed; recall beyond the window"

MODULES = {
    "titans-linear": ("titans", {"memory": "linear"}, 64),
    "titans-mlp": ("titans", {"memory": "mlp"}, 64),
    "gsa": ("gsa", {"num_slots": 32}, 32),
    "fifo": ("fifo", {"num_slots": 8}, 64),
}


def add_arguments(p) -> None:
    p.add_argument("--part", choices=("all", "speed", "capability"), default="all")
    p.add_argument("--sizes", default="1024,2048,4096,8192,16384,32768", help="token counts for the speed part")
    p.add_argument("--dim", type=int, default=128, help="model dim for the speed part (default 128)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--reps", type=int, default=3,
                   help="timed forward repetitions (median; fwd+bwd is timed once), after one warm-up per series")
    p.add_argument("--ref-budget", type=float, default=20.0,
                   help="run the reference loop only where its predicted forward time is below this (s)")
    p.add_argument("--attn-max", type=int, default=32768, help="largest size for the attention baselines")
    p.add_argument("--modules", default="all", help="comma-separated subset of " + ",".join(MODULES))
    # capability
    p.add_argument("--steps", type=int, default=200, help="training steps per model (default 200)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=160, help="training row length")
    p.add_argument("--window", type=int, default=16, help="sliding-window size")
    p.add_argument("--pairs", type=int, default=4, help="key-value pairs per document")
    p.add_argument("--train-gap", default="24,96", help="filler length range while training")
    p.add_argument("--eval-gaps", default="32,64,128,256", help="filler lengths to evaluate at")
    p.add_argument("--eval-docs", type=int, default=128)
    p.add_argument("--models", default="swa,full,titans,gsa,fifo",
                   help="capability models (swa, full, titans, titans-mlp, titans-mac, titans-mag, gsa, fifo)")
    p.add_argument("--seed", type=int, default=0)


# ============================================================================ speed


def _timed(fn, reps: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def speed(ns) -> dict:
    from longctx.kernels import attention
    from longctx.models.memory import build_memory

    dev = _device()
    sizes = [int(s) for s in ns.sizes.split(",") if s]
    names = list(MODULES) if ns.modules == "all" else ns.modules.split(",")
    rows = []
    for name in names:
        kind, opts, chunk = MODULES[name]
        torch.manual_seed(0)
        m = build_memory(kind, ns.dim, ns.heads, chunk_size=chunk, **opts).to(dev)
        ref_per_token = None
        for S in sizes:
            x = torch.randn(1, S, ns.dim, device=dev)
            xg = x.clone().requires_grad_()

            def fwd():
                with torch.no_grad():
                    m(x)
                _sync(dev)

            def fwdbwd():
                m(xg).sum().backward()
                _sync(dev)

            row = {"module": name, "tokens": S, "chunk": chunk}
            first = S == sizes[0]  # warm up once per series (first-call overheads)
            row["fast fwd s"] = _timed(fwd, ns.reps, first)
            row["fast fwd+bwd s"] = _timed(fwdbwd, 1, first)
            m.zero_grad(set_to_none=True)
            # conservative: the worst per-token rate so far, with a margin (timings on a shared CPU vary)
            predicted = 1.5 * ref_per_token * S if ref_per_token is not None else 0.0
            if predicted <= ns.ref_budget:
                def ref():
                    with torch.no_grad():
                        m.reference(x)
                    _sync(dev)
                t0 = time.perf_counter()
                ref()
                row["ref fwd s"] = time.perf_counter() - t0
                ref_per_token = max(ref_per_token or 0.0, row["ref fwd s"] / S)
                row["speedup fwd"] = row["ref fwd s"] / row["fast fwd s"]
            else:
                row["ref fwd s"] = float("nan")
                row["speedup fwd"] = float("nan")
            rows.append(row)
    # attention baselines at the same sizes (heads x head_dim = dim)
    D = ns.dim // ns.heads
    for S in sizes:
        if S > ns.attn_max:
            continue
        q, k, v = (torch.randn(1, S, ns.heads, D, device=dev, requires_grad=True) for _ in range(3))
        for label, fn in (("attention (full)", lambda: attention(q, k, v, causal=True)),
                          ("attention (swa 512)", lambda: attention(q, k, v, causal=True, window=512))):
            def f_fwd(fn=fn):
                with torch.no_grad():
                    fn()
                _sync(dev)

            def f_fb(fn=fn):
                fn().sum().backward()
                _sync(dev)
            first = S == sizes[0]
            rows.append({"module": label, "tokens": S, "chunk": 0, "fast fwd s": _timed(f_fwd, 1, first),
                         "fast fwd+bwd s": _timed(f_fb, 1, first), "ref fwd s": float("nan"),
                         "speedup fwd": float("nan")})
    cols = ["module", "tokens", "chunk", "fast fwd s", "fast fwd+bwd s", "ref fwd s", "speedup fwd"]
    at8k = {r["module"]: r["speedup fwd"] for r in rows if r["tokens"] == 8192 and not math.isnan(r["speedup fwd"])}
    notes = (f"B=1, dim={ns.dim}, heads={ns.heads}; fast = chunk-parallel path, ref = token loop "
             f"(run while its predicted forward stays under {ns.ref_budget:g} s; '-' = skipped). "
             "Attention rows: full causal attention (longctx.kernels, auto backend) and sliding-window "
             "attention (window 512), same heads x head_dim.")
    if at8k:
        notes += "\nspeedup at 8k tokens (forward): " + ", ".join(f"{k} {v:.0f}x" for k, v in at8k.items())
    return {"title": f"memory speed — {dev}", "columns": cols, "rows": rows, "notes": notes}


# ============================================================================ capability


class RecallTask:
    """Token ids: 0 pad, 1 query marker, then keys, values, filler (disjoint ranges)."""

    def __init__(self, n_keys=24, n_values=24, n_filler=16, pairs=4):
        self.n_keys, self.n_values, self.n_filler, self.pairs = n_keys, n_values, n_filler, pairs
        self.QRY = 1
        self.key0 = 2
        self.val0 = self.key0 + n_keys
        self.fil0 = self.val0 + n_values
        self.vocab = self.fil0 + n_filler

    def document(self, rng: random.Random, gap: int):
        keys = rng.sample(range(self.n_keys), self.pairs)
        vals = [rng.randrange(self.n_values) for _ in keys]
        toks, answer = [], []
        for k, v in zip(keys, vals):
            toks += [self.key0 + k, self.val0 + v]
            answer += [False, False]
        toks += [self.fil0 + rng.randrange(self.n_filler) for _ in range(gap)]
        answer += [False] * gap
        for i in rng.sample(range(self.pairs), self.pairs):
            toks += [self.QRY, self.key0 + keys[i], self.val0 + vals[i]]
            answer += [False, False, True]
        return toks, answer

    def rows(self, rng: random.Random, batch: int, seq_len: int, gap_range):
        """Packed rows: input_ids, labels (answers only, -100 elsewhere), position_ids, doc_ids."""
        ids = torch.zeros(batch, seq_len, dtype=torch.long)
        labels = torch.full((batch, seq_len), -100, dtype=torch.long)
        pos = torch.zeros(batch, seq_len, dtype=torch.long)
        docs = torch.zeros(batch, seq_len, dtype=torch.long)
        for b in range(batch):
            t, d = 0, 0
            while t < seq_len:
                toks, ans = self.document(rng, rng.randint(*gap_range))
                n = min(len(toks), seq_len - t)
                ids[b, t:t + n] = torch.tensor(toks[:n])
                pos[b, t:t + n] = torch.arange(n)
                docs[b, t:t + n] = d
                for i in range(n - 1):
                    if ans[i + 1]:
                        labels[b, t + i] = toks[i + 1]
                t, d = t + n, d + 1
        return ids, labels, pos, docs

    def eval_rows(self, rng: random.Random, n_docs: int, gap: int):
        docs = [self.document(rng, gap) for _ in range(n_docs)]
        L = len(docs[0][0])
        ids = torch.tensor([d[0] for d in docs])
        labels = torch.full((n_docs, L), -100, dtype=torch.long)
        for b, (toks, ans) in enumerate(docs):
            for i in range(L - 1):
                if ans[i + 1]:
                    labels[b, i] = toks[i + 1]
        pos = torch.arange(L).expand(n_docs, L)
        return ids, labels, pos, torch.zeros(n_docs, L, dtype=torch.long)


def _model_specs(window: int, chunk: int) -> dict:
    swa_all = list(range(2))
    return {
        "swa": {"type": "none", "window": window, "swa_layers": swa_all},
        "full": {"type": "none"},
        "titans": {"type": "titans", "variant": "mal", "layers": [1], "window": window, "swa_layers": [0],
                   "chunk_size": chunk, "options": {"memory": "linear"}},
        "titans-mlp": {"type": "titans", "variant": "mal", "layers": [1], "window": window, "swa_layers": [0],
                       "chunk_size": chunk, "options": {"memory": "mlp"}},
        "titans-mac": {"type": "titans", "variant": "mac", "layers": [1], "window": window, "swa_layers": [0],
                       "chunk_size": chunk, "options": {"memory": "linear"}},
        "titans-mag": {"type": "titans", "variant": "mag", "layers": [1], "window": window, "swa_layers": [0],
                       "chunk_size": chunk, "options": {"memory": "linear"}},
        "gsa": {"type": "gsa", "variant": "mal", "layers": [1], "window": window, "swa_layers": [0],
                "chunk_size": chunk, "options": {"num_slots": 16}},
        "fifo": {"type": "fifo", "variant": "mal", "layers": [1], "window": window, "swa_layers": [0],
                 "chunk_size": chunk, "options": {"num_slots": 8}},
    }


def _build(spec: dict, vocab: int, dim: int, ffn: int):
    from longctx.config import ModelConfig
    from longctx.models.llama import Transformer
    from longctx.models.memory import MemoryConfig

    cfg = ModelConfig(dim=dim, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=ffn, init_std=0.02,
                      attention_backend="torch", memory=MemoryConfig.from_any(spec))
    return Transformer(cfg, vocab)


def _equal_size(spec, vocab, dim, target):
    """The FFN width (multiple of 8) whose model is closest to `target` parameters."""
    best = None
    for ffn in range(8, 8 * dim, 8):
        n = _build(spec, vocab, dim, ffn).num_params()
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (ffn, n)
        if n > target:
            break
    return best


def _accuracy(model, batch) -> float:
    ids, labels, pos, docs = batch
    with torch.no_grad():
        logits = model(ids, pos, docs)
    sel = labels != -100
    return (logits.argmax(-1)[sel] == labels[sel]).float().mean().item()


def capability(ns) -> dict:
    torch.manual_seed(ns.seed)
    task = RecallTask(pairs=ns.pairs)
    dim, chunk = 64, ns.window
    specs = _model_specs(ns.window, chunk)
    names = [n for n in ns.models.split(",") if n]
    gap_range = tuple(int(g) for g in ns.train_gap.split(","))
    eval_gaps = [int(g) for g in ns.eval_gaps.split(",")]
    # equal size: every model's FFN is sized to the largest model at the default FFN width
    base_ffn = 4 * dim
    target = max(_build(specs[n], task.vocab, dim, base_ffn).num_params() for n in names)
    evals = {g: task.eval_rows(random.Random(10_000 + g), ns.eval_docs, g) for g in eval_gaps}
    rows = []
    for name in names:
        ffn, n_params = _equal_size(specs[name], task.vocab, dim, target)
        torch.manual_seed(ns.seed)
        model = _build(specs[name], task.vocab, dim, ffn)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.0)
        def lr_factor(s, total=ns.steps):  # 20 warm-up steps, cosine to 10%
            return min(1.0, (s + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / total))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        rng = random.Random(ns.seed)
        t0 = time.perf_counter()
        loss_hist = []
        for step in range(ns.steps):
            ids, labels, pos, docs = task.rows(rng, ns.batch, ns.seq_len, gap_range)
            logits = model(ids, pos, docs)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_hist.append(loss.item())
        train_s = time.perf_counter() - t0
        model.eval()
        row = {"model": name, "params": n_params, "train s": train_s,
               "final loss": statistics.mean(loss_hist[-20:])}
        for g in eval_gaps:
            row[f"acc@gap{g}"] = _accuracy(model, evals[g])
        rows.append(row)
    cols = ["model", "params", "train s", "final loss"] + [f"acc@gap{g}" for g in eval_gaps]
    chance = 1.0 / task.n_values
    notes = (f"Key-value recall, {ns.pairs} pairs per document, {task.n_values} possible values (chance "
             f"{chance:.3f}); sliding window {ns.window} tokens; queries come >= gap tokens after their pair "
             f"(every evaluated gap is beyond the window). 2 layers, dim {dim}, 4 heads; hybrids = "
             f"[SWA layer, MAL memory layer (memory + SWA)], memory chunk {chunk}. Training: {ns.steps} steps "
             f"x {ns.batch} rows x {ns.seq_len} tokens (packed documents, gaps {gap_range[0]}-{gap_range[1]}), "
             f"AdamW 3e-3, loss on queried values only; FFN widths chosen so parameter counts match.")
    return {"title": "memory capability — recall beyond the sliding window", "columns": cols, "rows": rows,
            "notes": notes}


# ============================================================================ entry points


def run(ns) -> dict:
    tables = []
    if ns.part in ("all", "speed"):
        tables.append(speed(ns))
    if ns.part in ("all", "capability"):
        tables.append(capability(ns))
    return {"title": "longctx bench memory", "device": str(_device()), "tables": tables}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = {t["title"].split(" —")[0]: t for t in result["tables"]}
    panels = len(tables)
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), dpi=110, squeeze=False)
    axes = axes[0]
    i = 0
    if "memory speed" in tables:
        ax = axes[i]
        i += 1
        rows = tables["memory speed"]["rows"]
        for name in dict.fromkeys(r["module"] for r in rows):
            rs = [r for r in rows if r["module"] == name]
            ax.plot([r["tokens"] for r in rs], [r["fast fwd+bwd s"] for r in rs], marker="o", label=f"{name}")
            ref = [(r["tokens"], r["ref fwd s"]) for r in rs if not math.isnan(r["ref fwd s"])]
            if ref:
                ax.plot(*zip(*ref), ls="--", marker="x", label=f"{name} reference (fwd)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("seconds (fast: fwd+bwd)")
        ax.set_title("speed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if "memory capability" in tables:
        ax = axes[i]
        t = tables["memory capability"]
        gaps = [c for c in t["columns"] if c.startswith("acc@gap")]
        width = 0.8 / max(1, len(t["rows"]))
        for j, r in enumerate(t["rows"]):
            ax.bar([x + j * width for x in range(len(gaps))], [r[g] for g in gaps], width, label=r["model"])
        ax.set_xticks([x + width * (len(t["rows"]) - 1) / 2 for x in range(len(gaps))],
                      [g.replace("acc@gap", "gap ") for g in gaps])
        ax.set_ylabel("recall accuracy")
        ax.set_ylim(0, 1)
        ax.set_title("recall beyond the sliding window")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"longctx bench memory — {result.get('device', '')}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
