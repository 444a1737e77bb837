"""`longctx bench train`: whole training steps over a grid of seq_len x cp x strategy.

Each configuration is the real thing a worker runs: the model of the config, the CP
strategy, the loss and the engine (`longctx.trainer.loop.Trainer`, `train_step()`), in a
FRESH process group of `cp` spawned processes (gloo on CPU; on CUDA one GPU per rank with
NCCL, skipped with a reason when there are fewer GPUs than ranks). A fresh group per
configuration makes its peak memory its own. Reported per configuration: tokens/s and step
time (median of --steps timed steps after --warmup steps; each step's time is the slowest
rank's), MFU where the device's peak is known (`longctx.models.estimate.peak_flops`), and
peak memory per rank (the maximum over ranks, and each rank's):

- CUDA: `torch.cuda.max_memory_allocated`; the baseline (before the model is built) is
  what the process holds then (about nothing).
- CPU: the peak resident set (VmHWM, reset when the baseline is taken) of each rank. The
  baseline is the resident set after every import the step needs (torch, DeepSpeed, the
  optimizer's lazy imports), just before the model is built: "over base" is what this
  configuration itself needs (weights, gradients, optimizer states, activations), the
  fixed cost of a Python process with torch is not. glibc's mmap threshold is pinned at
  64 KiB in the ranks (MALLOC_MMAP_THRESHOLD_) so that freed tensors go back to the
  system and the peak is the peak of live memory, not of the allocator's cache.

Skipped (with the reason in the table): seq_len not divisible by 2*cp; strategies at cp=1
beyond the first (one rank runs the local kernel whatever the strategy: measured once);
head counts a strategy cannot split (Ulysses); configurations the config schema rejects;
ranks that need more GPUs than the machine has.

`--max-mem-gib X`: for each (cp, strategy), the longest seq_len whose per-rank peak
(--mem-basis: peak, or over-baseline) is at most X. Searched by doubling (or halving)
from the longest grid seq_len that fits, then bisection, on multiples of
2 * cp * --search-block tokens (the granularity); every probe is a fresh process group
(one warm-up step and one measured step, so optimizer states exist during the measured
forward/backward); a probe that runs out of memory, fails or exceeds X does not fit.

Defaults: on CPU the built-in tiny preset with 6 layers (its 128-900-token documents keep
attention cheap, so activation memory grows linearly with tokens), 2048 and 8192 tokens,
cp 1, 2, 4, ring, and a search under 0.15 GiB over baseline (about 2 minutes on 2
shared cores); on a GPU a ~1.0B Llama (the llama-1b-32k shape with a 32k vocabulary, bf16,
activation checkpointing, one synthetic document per row: causal attention over the whole
row, as in long-context training) at 8k-32k tokens, cp 1, 2, 4, 8, ring and zigzag, and no
search unless --max-mem-gib is given.

CPU ranks are forked from a fork server that has imported torch, the trainer and (for
--engine deepspeed) DeepSpeed: a rank starts in well under a second and is still a fresh
process. They run one torch thread each (--threads): on a shared 2-core machine more threads
per rank mostly wait for each other, so CPU tokens/s say little about scaling.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import torch

from longctx.bench.spawn import launch

DESCRIPTION = ("whole training steps (model, CP strategy, loss, engine) over seq_len x cp x strategy: "
               "tokens/s, step time, peak memory per rank, MFU; longest seq_len under --max-mem-gib")

# Model and run settings the defaults add to the config, per device.
CPU_OVERRIDES = ["model.n_layers=6"]
GPU_OVERRIDES = ["model.vocab_size=32000", "model.dim=2048", "model.n_layers=16", "model.n_heads=32",
                 "model.n_kv_heads=8", "model.ffn_hidden=8192", "model.rope_theta=500000.0",
                 "train.dtype=bf16", "train.activation_checkpointing=true", "train.device=cuda"]
DEFAULTS = {
    "cpu": dict(seq_lens="2048,8192", cps="1,2,4", strategies="ring", steps=2, warmup=1, block=256,
                max_mem_gib=0.15, search_max=32768, docs="config", overrides=CPU_OVERRIDES),
    "cuda": dict(seq_lens="8192,16384,32768", cps="1,2,4,8", strategies="ring,zigzag", steps=3, warmup=1,
                 block=1024, max_mem_gib=None, search_max=1 << 20, docs="row", overrides=GPU_OVERRIDES),
}
# CPU ranks are forked from a server that imported these once (see the module docstring)
PRELOAD = ["torch", "torch._dynamo", "longctx.trainer.loop", "longctx.bench.train"]


def add_arguments(p) -> None:
    p.add_argument("args", nargs="*", metavar="key=value",
                   help="config overrides, as for `longctx train` (e.g. model.dim=256 train.dtype=bf16)")
    p.add_argument("--config", metavar="CONFIG.yaml", default=None,
                   help="a YAML preset (default: the built-in tiny preset, with 6 layers on CPU and at ~1B scale "
                        "on a GPU)")
    p.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="key=value",
                   help="one config override (repeatable); same as a positional key=value")
    p.add_argument("--seq-lens", default=None, help="comma-separated tokens per row (default: CPU 2048,8192; "
                                                     "GPU 8192,16384,32768)")
    p.add_argument("--cps", default=None, help="comma-separated cp sizes, one process per rank (default: CPU 1,2,4; "
                                                "GPU 1,2,4,8, those above the GPU count skipped)")
    p.add_argument("--strategies", default=None,
                   help="comma-separated CP strategies, 'auto' (the cost model's pick per config) or 'all' "
                        "(default: CPU ring; GPU ring,zigzag)")
    p.add_argument("--engine", default=None, help="deepspeed | ddp (default: the config's train.engine)")
    p.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (default: CPU 2, GPU 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1)")
    p.add_argument("--docs", choices=("config", "row"), default=None,
                   help="synthetic documents: the config's lengths, or one document per row (causal attention "
                        "over the whole row) (default: CPU config, GPU row)")
    p.add_argument("--max-mem-gib", type=float, default=None,
                   help="search, per (cp, strategy), the longest seq_len whose per-rank peak is at most this "
                        "(default: CPU 0.15 over baseline; GPU none); 0 = no search")
    p.add_argument("--mem-basis", choices=("peak", "over-baseline"), default=None,
                   help="what --max-mem-gib limits: the per-rank peak, or the peak over the pre-model baseline "
                        "(default: CPU over-baseline, GPU peak)")
    p.add_argument("--search-block", type=int, default=None,
                   help="search granularity: multiples of 2 * cp * this many tokens (default: CPU 256, GPU 1024)")
    p.add_argument("--search-max", type=int, default=None,
                   help="longest seq_len the search probes (default: CPU 32768, GPU 1048576)")
    p.add_argument("--search-cps", default=None, help="comma-separated cp sizes to search (default: every --cps)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank on CPU (default 1: on a shared machine several threads "
                        "per rank oversubscribe the cores and time is mostly spent waiting)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one configuration may take (default 900)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")


# ============================================================================ options


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"longctx: error: {what} expects comma-separated positive integers, got {text!r}")
    return values


def _strategies(text: str) -> list[str]:
    from longctx.parallel import strategy as registry

    available = [n for n in registry.STRATEGIES if n in registry._implemented()]
    if text == "all":
        return available
    wanted = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in wanted if n not in available and n != "auto"]
    if bad or not wanted:
        raise SystemExit(f"longctx: error: unknown CP strategy {', '.join(repr(b) for b in bad) or repr(text)} "
                         f"for --strategies; available: {', '.join(available)}, auto, all")
    return list(dict.fromkeys(wanted))


def _options(ns) -> dict:
    from longctx.trainer.engine import ENGINES

    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("longctx: error: --device cuda but no CUDA device is visible")
    d = DEFAULTS[device]
    pick = lambda value, key: d[key] if value is None else value  # noqa: E731
    engine = ns.engine
    if engine is not None and engine not in ENGINES:
        raise SystemExit(f"longctx: error: unknown engine {engine!r} for --engine; available: {', '.join(ENGINES)}")
    steps, warmup = pick(ns.steps, "steps"), pick(ns.warmup, "warmup")
    if steps < 1 or warmup < 0:
        raise SystemExit("longctx: error: --steps must be >= 1 and --warmup >= 0")
    limit = pick(ns.max_mem_gib, "max_mem_gib")
    cps = _ints(pick(ns.cps, "cps"), "--cps")
    search_cps = _ints(ns.search_cps, "--search-cps") if ns.search_cps else cps
    block = pick(ns.search_block, "block")
    if block < 1:
        raise SystemExit("longctx: error: --search-block must be positive")
    user = list(ns.args or []) + list(ns.set_overrides or [])
    for item in user:
        if "=" not in item:
            raise SystemExit(f"longctx: error: override {item!r} is not of the form key=value")
    return dict(
        device=device, seq_lens=_ints(pick(ns.seq_lens, "seq_lens"), "--seq-lens"), cps=cps,
        strategies=_strategies(pick(ns.strategies, "strategies")), engine=engine, steps=steps, warmup=warmup,
        docs=pick(ns.docs, "docs"), limit=limit if limit else None,
        basis=ns.mem_basis or ("peak" if device == "cuda" else "over-baseline"),
        block=block, search_max=pick(ns.search_max, "search_max"), search_cps=search_cps,
        threads=ns.threads, timeout=ns.timeout, config=ns.config,
        # the device's defaults only apply to the built-in preset
        device_overrides=list(d["overrides"]) if ns.config is None else [], user_overrides=user,
    )


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ============================================================================ configs


def build_config(opts: dict, seq_len: int, cp: int, strategy: str):
    """The resolved Config of one configuration (ConfigError if the schema rejects it)."""
    from longctx.config import load_config
    from longctx.launch.resolve import resolve_config

    # the configured warmup, clamped into this short run (train.steps - 1) as the schedule always did
    warmup = load_config(opts["config"], opts["device_overrides"] + opts["user_overrides"]).optim.warmup_steps
    run = [f"parallel.cp={cp}", f"ray.num_workers={cp}", f"parallel.strategy={strategy}",
           f"data.seq_len={seq_len}", f"train.steps={opts['warmup'] + opts['steps'] + 1}", "launcher=ray",
           f"optim.warmup_steps={min(warmup, opts['warmup'] + opts['steps'])}",
           "logging.mlflow=false", "checkpoint.every=0", "train.eval_every=0"]
    if opts["engine"]:
        run.append(f"train.engine={opts['engine']}")
    if opts["device"] == "cuda":
        run.append("train.device=cuda")
    user_keys = {o.split("=", 1)[0] for o in opts["user_overrides"]}
    if opts["docs"] == "row" and not user_keys & {"data.min_doc_len", "data.max_doc_len"}:
        run += [f"data.min_doc_len={4 * seq_len}", f"data.max_doc_len={4 * seq_len}"]
    # the device's defaults, the user's overrides over them, and the grid point's own keys last
    cfg = load_config(opts["config"], opts["device_overrides"] + opts["user_overrides"] + run)
    cfg, _ = resolve_config(cfg)
    return cfg


def skip_reason(cfg, seq_len: int, cp: int, opts: dict) -> str | None:
    """Why this configuration cannot run here (None = it can)."""
    if seq_len % (2 * cp):
        return f"seq_len {seq_len} is not divisible by 2*cp = {2 * cp} (every strategy's row multiple)"
    if opts["device"] == "cuda" and cp > torch.cuda.device_count():
        return f"needs {cp} GPUs (one per rank), {torch.cuda.device_count()} visible"
    if cfg.parallel.strategy == "ulysses" and cp > 1:
        from longctx.parallel.ulysses import kv_replication

        try:
            kv_replication(cfg.model.n_heads, cfg.model.n_kv_heads, cp)
        except ValueError as err:
            return str(err)
    return None


# ============================================================================ one configuration, in its ranks


def _proc_gib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20  # kB -> GiB
    except OSError:
        pass
    return None


class PeakMemory:
    """This process's memory from now on: `baseline`, `current()`, `peak()` in GiB (see the
    module docstring: CUDA allocator on GPU, resident set on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device) / 2**30
            return
        self.hwm = False
        try:  # "5" resets the peak resident set (VmHWM) to the current one (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm = _proc_gib("VmHWM") is not None
        except OSError:
            pass
        self.baseline = self.current()

    def current(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated() / 2**30
        rss = _proc_gib("VmRSS")
        return rss if rss is not None else self._maxrss()

    def peak(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        return _proc_gib("VmHWM") if self.hwm else self._maxrss()

    @staticmethod
    def _maxrss() -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _warm_imports(cfg, device: torch.device) -> None:
    """Everything a step imports lazily, so the baseline holds it: the engine (DeepSpeed)
    and the optimizer's first step (it pulls in torch._dynamo, ~140 MiB)."""
    import longctx.trainer.activation_checkpoint  # noqa: F401
    import longctx.trainer.engine  # noqa: F401

    if cfg.train.engine == "deepspeed":
        import deepspeed  # noqa: F401
    w = torch.nn.Parameter(torch.zeros(4, device=device))
    opt = torch.optim.AdamW([w], lr=1e-3)
    w.sum().backward()
    opt.step()
    del opt, w


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, getattr(torch.cuda, "OutOfMemoryError", MemoryError))) or \
        "out of memory" in str(err).lower()


def rank_worker(rank: int, world: int, cfg, warmup: int, steps: int, run_dir: str) -> dict:
    """One rank of one configuration: build the Trainer, run warm-up + timed steps."""
    from longctx.trainer.loop import RunContext, Trainer

    device = torch.device("cuda", rank) if cfg.train.device == "cuda" else torch.device("cpu")
    _warm_imports(cfg, device)
    mem = PeakMemory(device)
    out = {"rank": rank, "baseline_gib": mem.baseline, "oom": False}
    try:
        trainer = Trainer(cfg, RunContext(run_dir=run_dir, checkpoint_dir=os.path.join(run_dir, "checkpoints"),
                                          launch_id="bench"))
        out["built_gib"] = mem.current()
        timed = []
        for i in range(warmup + steps):
            m = trainer.train_step()
            if i >= warmup:
                timed.append({"step_time_s": m["perf/step_time_s"], "loss": m["train/loss"],
                              "mfu": m.get("perf/mfu"), "attn_tflops": m.get("perf/attn_tflops"),
                              "bytes_sent": m.get("cp/bytes_sent", 0.0)})
        out["steps"] = timed
        out["tokens_per_step"] = cfg.train.micro_batch_size * cfg.train.grad_accum * trainer.mesh.dp_size \
            * cfg.data.seq_len
    except BaseException as err:  # an OOM is a result (does not fit), anything else an error
        if not _is_oom(err):
            raise
        out.update(oom=True, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    out["peak_gib"] = mem.peak()
    return out


# ============================================================================ measuring


def measure(opts: dict, cfg, warmup: int, steps: int) -> dict:
    """One configuration in its own process group: a row of numbers, or status/message."""
    cp = cfg.parallel.cp
    run_dir = tempfile.mkdtemp(prefix="longctx-bench-train-")
    threads = opts["threads"] or 1
    t0 = time.perf_counter()
    try:
        res = launch(rank_worker, cp, cfg, warmup, steps, run_dir, device=opts["device"], threads=threads,
                     timeout=opts["timeout"], engine=cfg.train.engine, preload=PRELOAD)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    out = {"status": res["status"], "message": res["message"], "wall_s": time.perf_counter() - t0}
    ranks = res["ranks"]
    if ranks:
        out["peak_gib_per_rank"] = [r["peak_gib"] for r in ranks]
        out["over_baseline_gib_per_rank"] = [r["peak_gib"] - r["baseline_gib"] for r in ranks]
        out["baseline_gib_per_rank"] = [r["baseline_gib"] for r in ranks]
    if res["status"] != "ok":
        return out
    # each step takes as long as its slowest rank
    times = [max(r["steps"][i]["step_time_s"] for r in ranks) for i in range(steps)]
    step_s = statistics.median(times)
    median = lambda key: statistics.median(  # noqa: E731
        [s[key] for s in ranks[0]["steps"] if s.get(key) is not None] or [float("nan")])
    out.update(step_s=step_s, tokens_per_s=ranks[0]["tokens_per_step"] / step_s,
               mfu=median("mfu"), attn_tflops_per_rank=median("attn_tflops"),
               loss=ranks[0]["steps"][-1]["loss"],
               mib_sent_per_rank=max(r["steps"][-1]["bytes_sent"] for r in ranks) / 2**20,
               peak_gib=max(out["peak_gib_per_rank"]), over_baseline_gib=max(out["over_baseline_gib_per_rank"]),
               step_times_s=times)
    return out


def _by_rank(values) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def _fits(m: dict, opts: dict) -> bool:
    if m["status"] != "ok":
        return False
    value = m["peak_gib"] if opts["basis"] == "peak" else m["over_baseline_gib"]
    return value <= opts["limit"]


def _basis_value(m: dict, opts: dict) -> float:
    key = "peak_gib_per_rank" if opts["basis"] == "peak" else "over_baseline_gib_per_rank"
    return max(m[key]) if m.get(key) else float("nan")


# ============================================================================ max-memory search


def search(opts: dict, cp: int, strategy: str, known: dict[int, dict], log) -> dict:
    """The longest seq_len (a multiple of 2*cp*block) whose per-rank peak fits the limit.

    `known` holds grid measurements of this (cp, strategy) by seq_len: they count as probes."""
    gran = 2 * cp * opts["block"]
    probes: dict[int, dict] = {s: m for s, m in known.items() if s % gran == 0}
    order = []

    def fits(S: int) -> bool:
        if S not in probes:
            cfg = build_config(opts, S, cp, strategy)
            log(f"  search cp={cp} {strategy}: probing seq_len {S} ...")
            probes[S] = measure(opts, cfg, warmup=1, steps=1)
        order.append(S)
        return _fits(probes[S], opts)

    cap = max(gran, opts["search_max"] // gran * gran)
    # start from the longest grid seq_len that fits (else the shortest measured, else one granule)
    fitting = [s for s, m in known.items() if _fits(m, opts)]
    start = max(fitting) if fitting else min(known, default=gran)
    start = min(cap, max(gran, start // gran * gran))
    lo = hi = None
    note = ""
    if fits(start):  # doubling up
        lo, S = start, start * 2
        while S <= cap and fits(S):
            lo, S = S, S * 2
        if S <= cap:
            hi = S
        elif lo < cap and not fits(cap):
            hi = cap
        else:
            lo = cap
            note = f"capped: --search-max {opts['search_max']} fits"
    else:  # halving down
        hi, S = start, (start // 2) // gran * gran
        while S >= gran:
            if fits(S):
                lo = S
                break
            hi, S = S, (S // 2) // gran * gran
    if lo is None:
        note = f"even {gran} tokens (the granularity) do not fit"
    while lo is not None and hi is not None and hi - lo > gran:
        mid = lo + (hi - lo) // gran // 2 * gran
        if fits(mid):
            lo = mid
        else:
            hi = mid
    best = probes.get(lo) if lo is not None else None
    seen = sorted(set(order))
    return {
        "cp": cp, "strategy": strategy, "limit_gib": opts["limit"], "basis": opts["basis"], "granularity": gran,
        "max_seq_len": lo, "its_gib": _basis_value(best, opts) if best else float("nan"),
        "first_not_fitting": hi, "probes_run": sum(1 for s in seen if s not in known),
        "probes": [{"seq_len": s, "status": probes[s]["status"], "gib": _basis_value(probes[s], opts),
                    "fits": _fits(probes[s], opts), "from_grid": s in known} for s in seen],
        "note": note,
    }


# ============================================================================ run


def _device_name(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} x {torch.cuda.device_count()}"
    import platform

    return f"CPU ({platform.machine()}, {_usable_cores()} cores)"


def run(ns) -> dict:
    import sys

    from longctx.config import ConfigError, load_config
    from longctx.models.estimate import count_params
    from longctx.trainer.tokenizer import build_tokenizer

    opts = _options(ns)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731  (progress; the table goes to stdout)
    t_start = time.perf_counter()
    # the config and overrides themselves first: a wrong key or value is the user's error (ConfigError)
    load_config(opts["config"], opts["device_overrides"] + opts["user_overrides"])
    rows, skipped, measured = [], [], {}
    base_cfg = None
    for seq in opts["seq_lens"]:
        for cp in opts["cps"]:
            for strategy in opts["strategies"]:
                key = {"seq_len": seq, "cp": cp, "strategy": strategy}
                try:
                    cfg = build_config(opts, seq, cp, strategy)
                except ConfigError as err:  # this grid point only (e.g. a memory model with zigzag)
                    skipped.append({**key, "reason": str(err)})
                    continue
                base_cfg = base_cfg or cfg
                name = cfg.parallel.strategy if strategy != "auto" else f"auto->{cfg.parallel.strategy}"
                key["strategy"] = name
                reason = skip_reason(cfg, seq, cp, opts)
                first = opts["strategies"][0]
                if reason is None and cp == 1 and strategy != first:
                    reason = f"cp=1: one rank runs the local attention kernel whatever the strategy (measured as {first})"
                if reason:
                    skipped.append({**key, "reason": reason})
                    continue
                log(f"bench train: seq_len {seq}, cp {cp}, {name} ...")
                m = measure(opts, cfg, opts["warmup"], opts["steps"])
                measured[(seq, cp, strategy)] = m
                row = {**key, "status": m["status"], "wall_s": m["wall_s"]}
                row.update({k: v for k, v in m.items() if k not in ("status", "wall_s")})
                row.setdefault("tokens_per_s", float("nan"))
                row.setdefault("step_s", float("nan"))
                row.setdefault("mfu", float("nan"))
                row.setdefault("attn_tflops_per_rank", float("nan"))
                row.setdefault("peak_gib", max(m.get("peak_gib_per_rank") or [float("nan")]))
                row.setdefault("over_baseline_gib", max(m.get("over_baseline_gib_per_rank") or [float("nan")]))
                row["peak GiB by rank"] = _by_rank(m.get("peak_gib_per_rank", []))
                row["over base by rank"] = _by_rank(m.get("over_baseline_gib_per_rank", []))
                if opts["limit"]:
                    row["fits"] = "yes" if _fits(m, opts) else "no"
                if m["status"] != "ok":
                    row["note"] = f"{m['status']}: {m['message']}"
                rows.append(row)
    if base_cfg is None:
        raise SystemExit("longctx: error: no configuration of the grid can run: "
                         + "; ".join(f"{s['seq_len']}/{s['cp']}/{s['strategy']}: {s['reason']}" for s in skipped))

    searches = []
    if opts["limit"]:
        for cp in opts["search_cps"]:
            for strategy in opts["strategies"]:
                if cp == 1 and strategy != opts["strategies"][0]:
                    continue
                try:
                    cfg = build_config(opts, opts["seq_lens"][0], cp, strategy)
                except ConfigError:
                    continue
                if skip_reason(cfg, 2 * cp * opts["block"], cp, opts):
                    continue
                known = {s: m for (s, c, st), m in measured.items() if c == cp and st == strategy}
                searches.append(search(opts, cp, strategy, known, log))

    m = base_cfg.model
    vocab = m.vocab_size or build_tokenizer(base_cfg.data.tokenizer).vocab_size
    params = count_params(m, vocab)
    device = _device_name(opts["device"])
    engine = base_cfg.train.engine
    model_text = (f"{params / 1e6:.1f}M params (dim {m.dim}, {m.n_layers} layers, {m.n_heads}/{m.n_kv_heads} heads, "
                  f"vocab {vocab}), {base_cfg.train.dtype}, engine {engine}"
                  + (f" ZeRO-{base_cfg.deepspeed.zero_stage}" if engine == "deepspeed" else "")
                  + (", activation checkpointing" if base_cfg.train.activation_checkpointing else ""))
    mem_text = ("peak = torch.cuda.max_memory_allocated per rank" if opts["device"] == "cuda" else
                "peak = resident set (VmHWM) per rank; over base = peak minus the rank's resident set after "
                "imports, before the model is built")
    columns = ["seq_len", "cp", "strategy", "tokens_per_s", "step_s", "mfu", "peak_gib", "over_baseline_gib",
               "peak GiB by rank"]
    if any(r["attn_tflops_per_rank"] == r["attn_tflops_per_rank"] for r in rows):  # not all NaN
        columns.insert(6, "attn_tflops_per_rank")
    if opts["limit"]:
        columns.append("fits")
    if any("note" in r for r in rows):
        columns.append("note")
    tables = [{"title": f"longctx bench train on {device}: {model_text}; median of {opts['steps']} steps after "
                        f"{opts['warmup']} warm-up, each configuration in a fresh process group",
               "columns": columns, "rows": rows,
               "notes": f"{mem_text}. MFU (the trainer's: 6 x matmul params per token + the visible attention "
                        f"pairs the strategy computed) only where the device's peak FLOP/s is known (not on CPU)."}]
    if skipped:
        tables.append({"title": "skipped configurations", "columns": ["seq_len", "cp", "strategy", "reason"],
                       "rows": skipped})
    if searches:
        srows = [{**s, "probes (seq_len:GiB)": " ".join(
            f"{p['seq_len']}:{p['gib']:.3f}{'' if p['fits'] else '!'}" for p in s["probes"])} for s in searches]
        tables.append({"title": f"longest seq_len with per-rank {opts['basis']} <= {opts['limit']:g} GiB "
                                f"(doubling, then bisection on multiples of 2*cp*{opts['block']} tokens; "
                                f"a fresh process group per probe)",
                       "columns": ["cp", "strategy", "granularity", "max_seq_len", "its_gib", "first_not_fitting",
                                   "probes_run", "probes (seq_len:GiB)", "note"],
                       "rows": srows,
                       "notes": "probes: '!' = did not fit (over the limit, out of memory or failed); grid "
                                "measurements count as probes"})
    return {"device": device, "where": opts["device"], "model": model_text, "engine": engine,
            "options": {k: v for k, v in opts.items() if k != "user_overrides"},
            "tables": tables, "configs": rows, "skipped": skipped, "search": searches,
            "wall_s": time.perf_counter() - t_start}


# ============================================================================ plot


def plot(result: dict, path: str) -> None:
    from longctx.plots import pyplot, save_line_plot

    plt = pyplot()
    rows = [r for r in result["configs"] if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), dpi=110)
    series = {}
    for r in rows:
        series.setdefault((r["strategy"], r["cp"]), []).append(r)
    panels = [("tokens_per_s", "tokens/s"), ("peak_gib", "peak GiB per rank (max over ranks)"),
              ("over_baseline_gib", "GiB over the pre-model baseline per rank (max)")]
    colors = {}
    for (strategy, cp), pts in sorted(series.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        pts = sorted(pts, key=lambda r: r["seq_len"])
        label = f"cp={cp}" if cp == 1 else f"{strategy} cp={cp}"
        for ax, (key, _) in zip(axes, panels):
            line, = ax.plot([r["seq_len"] for r in pts], [r[key] for r in pts], marker="o", label=label)
            colors[(strategy, cp)] = line.get_color()
    opts = result["options"]
    basis_ax = axes[1] if opts["basis"] == "peak" else axes[2]
    if result["search"]:
        basis_ax.axhline(opts["limit"], color="k", lw=0.8, ls="--", label=f"limit {opts['limit']:g} GiB")
        for s in result["search"]:
            color = colors.get((s["strategy"], s["cp"]), "k")
            probes = [p for p in s["probes"] if not p["from_grid"] and p["gib"] == p["gib"]]
            basis_ax.plot([p["seq_len"] for p in probes], [p["gib"] for p in probes], marker="x", ls="none",
                          color=color, alpha=0.6)
            if s["max_seq_len"]:
                basis_ax.plot([s["max_seq_len"]], [s["its_gib"]], marker="*", ms=13, ls="none", color=color,
                              label=f"longest under the limit, cp={s['cp']} {s['strategy']}: {s['max_seq_len']}")
    for ax, (_, label) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plt.matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlabel("seq_len (tokens per row; x = search probes)" if ax is basis_ax and result["search"]
                      else "seq_len (tokens per row)")
        ax.set_title(label, fontsize=10)
        if ax is not axes[-1]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"longctx bench train — {result['device']}: {result['model']}", fontsize=10)
    axes[-1].legend(fontsize=7)
    save_line_plot(fig, axes[-1], path)


__all__ = ["DESCRIPTION", "add_arguments", "run", "plot", "build_config", "measure", "search", "launch",
           "PeakMemory", "rank_worker", "skip_reason"]
