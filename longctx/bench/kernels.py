"""`longctx bench kernels`: local attention kernels, forward / backward / fwd+bwd.

Implementations, side by side in one run:
  - ``triton``: longctx's Triton kernels (``backend="triton"``), GPU only.
  - ``torch``: longctx's torch reference backend (chunked online softmax).
  - ``sdpa-flash`` / ``sdpa-cudnn`` / ``sdpa-efficient``: torch SDPA with one
    backend forced (GPU); ``sdpa``: torch SDPA's default choice (CPU).
    SDPA has no document-mask argument: documents use a dense boolean mask,
    which only the efficient / math backends take and which needs S^2 bytes,
    so they run up to ``--sdpa-mask-max`` tokens and are skipped (with a note)
    elsewhere.
  - ``flex``: FlexAttention (``torch.compile``d) with an equivalent block mask
    (GPU; compile time is excluded by a warm-up).

Masks: ``causal``; ``full`` (non-causal); ``docs``: causal inside documents
whose lengths are drawn from a long-tailed lognormal distribution (median
1024 tokens, sigma 1.5, clipped to [32, S]; a few long documents among many
short ones; fixed seed per row); ``window``: causal with a sliding window of
``--window`` tokens (Mistral's ``sliding_window``; SDPA gets it as a dense
mask, as documents).

FLOPs are counted on visible (query, key) pairs (ARCHITECTURE.md):
forward = 4 * B * H * D * pairs, backward = 2.5x, fwd+bwd = 3.5x. Times are
medians over ``--reps`` after warm-up (CUDA events on GPU; on CPU one timed
run, and no warm-up for the torch reference, which has nothing to warm up).

On a GPU the defaults are 4k-128k tokens, head dim 128, bf16, 16 heads, batch
1. Without a GPU the command still works: it runs the torch reference backend
and CPU SDPA at small sizes (1k-4k tokens, 2 heads, head dim 64, fp32) and
says so in the table title; the Triton kernels cannot be timed on CPU.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

DESCRIPTION = ("attention kernels: forward, backward, fwd+bwd for causal, full, document and window masks; "
               "Triton vs torch SDPA (flash/cuDNN/efficient) vs FlexAttention, TFLOP/s on visible pairs")
MASKS = ("causal", "full", "docs", "window")
MODES = ("fwd", "bwd", "fwd+bwd")
GPU_IMPLS = ("triton", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex")
CPU_IMPLS = ("torch", "sdpa")
BWD_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def add_arguments(p) -> None:
    p.add_argument("--seq-lens", default=None,
                   help="comma-separated sequence lengths (default: 4096..131072 on GPU, 1024,2048,4096 on CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="query heads (default 16 on GPU, 2 on CPU)")
    p.add_argument("--kv-heads", type=int, default=None, help="k/v heads (default = heads)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 on GPU, 64 on CPU")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--impls", default="all", help=f"comma-separated subset of {GPU_IMPLS + CPU_IMPLS}, or 'all'")
    p.add_argument("--masks", default=",".join(MASKS))
    p.add_argument("--window", type=int, default=None,
                   help="sliding window of the 'window' mask, in tokens (default: a quarter of each seq_len)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions after warm-up (default 10 on GPU, 1 on CPU; median reported)")
    p.add_argument("--sdpa-mask-max", type=int, default=16384,
                   help="largest S for which SDPA gets a dense document mask (S^2 bytes)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------


def long_tailed_doc_ids(seq_len: int, seed: int, median: float = 1024.0, sigma: float = 1.5,
                        min_len: int = 32) -> torch.Tensor:
    """Document ids [S] with lognormal lengths (median, sigma), clipped to [min_len, S]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(seq_len, dtype=torch.long)
    pos = doc = 0
    while pos < seq_len:
        length = math.exp(math.log(median) + sigma * float(torch.randn((), generator=g)))
        length = int(min(max(length, min_len), seq_len - pos))
        ids[pos:pos + length] = doc
        pos, doc = pos + length, doc + 1
    return ids


def _config(ns) -> dict:
    dev = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = dev.startswith("cuda")
    seqs = ns.seq_lens or ("4096,8192,16384,32768,65536,131072" if gpu else "1024,2048,4096")
    heads = ns.heads or (16 if gpu else 2)
    dtype = ns.dtype or ("bf16" if gpu else "fp32")
    impls = GPU_IMPLS if gpu else CPU_IMPLS
    if ns.impls != "all":
        impls = tuple(i.strip() for i in ns.impls.split(",") if i.strip())
    return dict(
        device=dev, gpu=gpu, seq_lens=[int(s) for s in seqs.split(",")], batch=ns.batch, heads=heads,
        kv_heads=ns.kv_heads or heads, head_dim=ns.head_dim or (128 if gpu else 64),
        dtype=dtype, torch_dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype],
        impls=impls, masks=[m.strip() for m in ns.masks.split(",")], modes=[m.strip() for m in ns.modes.split(",")],
        reps=ns.reps or (10 if gpu else 1), sdpa_mask_max=ns.sdpa_mask_max, window=ns.window,
    )


def _make(cfg, S, mask):
    B, H, Hkv, D = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    dev, dt = cfg["device"], cfg["torch_dtype"]
    g = torch.Generator(device="cpu").manual_seed(S)
    q = torch.randn(B, S, H, D, generator=g).to(dev, dt)
    k = torch.randn(B, S, Hkv, D, generator=g).to(dev, dt)
    v = torch.randn(B, S, Hkv, D, generator=g).to(dev, dt)
    dout = torch.randn(B, S, H, D, generator=g).to(dev, dt)
    docs = None
    if mask == "docs":
        docs = torch.stack([long_tailed_doc_ids(S, seed=b) for b in range(B)]).to(dev)
    window = (cfg["window"] or max(1, S // 4)) if mask == "window" else None
    return q, k, v, dout, docs, mask != "full", window


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------


def _sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, cfg, warmup=None):
    """Median milliseconds of fn() over cfg['reps'] runs after warm-up."""
    dev = cfg["device"]
    for _ in range(warmup if warmup is not None else (3 if cfg["gpu"] else 1)):
        fn()
    _sync(dev)
    times = []
    for _ in range(cfg["reps"]):
        if cfg["gpu"]:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


class Skip(Exception):
    """This implementation cannot run this case; the message goes in the row's note."""


# ---------------------------------------------------------------------------
# implementations: each returns {mode: callable}
# ---------------------------------------------------------------------------


def _longctx_fns(backend, q, k, v, dout, docs, causal, window):
    from longctx.kernels import attention_backward, attention_forward

    S = q.shape[1]
    idx = torch.arange(S, device=q.device)
    kw = dict(q_index=idx, k_index=idx, q_doc=docs, k_doc=docs, causal=causal, window=window, backend=backend)
    out, lse = attention_forward(q, k, v, **kw)

    def fwd():
        return attention_forward(q, k, v, **kw)

    def bwd():
        return attention_backward(dout, q, k, v, out, lse, **kw)

    def both():
        o, l = attention_forward(q, k, v, **kw)
        return attention_backward(dout, q, k, v, o, l, **kw)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def _autograd_fns(call, q, k, v, dout):
    """fwd / bwd / fwd+bwd for an autograd attention call on [B, H, S, D] leaves."""
    qt, kt, vt = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    dt = dout.transpose(1, 2).contiguous()

    def fwd():
        with torch.no_grad():
            return call(qt, kt, vt)

    out = call(qt, kt, vt)

    def bwd():
        qt.grad = kt.grad = vt.grad = None
        out.backward(dt, retain_graph=True)

    def both():
        qt.grad = kt.grad = vt.grad = None
        call(qt, kt, vt).backward(dt)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def _sdpa_fns(impl, cfg, q, k, v, dout, docs, causal, window):
    import torch.nn.functional as F

    S = q.shape[1]
    gqa = q.shape[2] != k.shape[2]
    backend = None
    if impl != "sdpa":
        from torch.nn.attention import SDPBackend

        backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                   "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}[impl]
    mask = None
    if docs is not None or window is not None:
        what = "document" if docs is not None else "window"
        if impl in ("sdpa-flash", "sdpa-cudnn"):
            raise Skip(f"no {what} masks (SDPA flash/cuDNN take no mask)")
        if S > cfg["sdpa_mask_max"]:
            raise Skip(f"dense {what} mask skipped above {cfg['sdpa_mask_max']} tokens (S^2 bytes)")
        i = torch.arange(S, device=q.device)
        mask = (i[:, None] >= i[None, :])[None, None]
        if docs is not None:
            mask = mask & (docs[:, :, None] == docs[:, None, :])[:, None]
        if window is not None:
            mask = mask & (i[:, None] - i[None, :] < window)[None, None]

    def call(qt, kt, vt):
        kw = dict(enable_gqa=True) if gqa else {}
        if mask is not None:
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, **kw)
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, **kw)

    if backend is None:
        return _autograd_fns(call, q, k, v, dout)

    from torch.nn.attention import sdpa_kernel

    def forced(qt, kt, vt):
        with sdpa_kernel(backend):
            return call(qt, kt, vt)

    try:
        fns = _autograd_fns(forced, q, k, v, dout)
    except RuntimeError as err:
        raise Skip(f"not available here: {str(err).splitlines()[0][:80]}") from None
    return fns


_FLEX = {}


def _flex_fns(cfg, q, k, v, dout, docs, causal, window):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        raise Skip("FlexAttention not in this torch") from None
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    B, S = q.shape[0], q.shape[1]
    if docs is not None:
        d = docs

        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (d[b, qi] == d[b, ki])

        block_mask = create_block_mask(mask_mod, B, None, S, S, device=q.device)
    elif window is not None:
        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (qi - ki < window)

        block_mask = create_block_mask(mask_mod, None, None, S, S, device=q.device)
    elif causal:
        def mask_mod(b, h, qi, ki):
            return qi >= ki

        block_mask = create_block_mask(mask_mod, None, None, S, S, device=q.device)
    else:
        block_mask = None
    gqa = q.shape[2] != k.shape[2]
    fn = _FLEX["fn"]

    def call(qt, kt, vt):
        return fn(qt, kt, vt, block_mask=block_mask, enable_gqa=gqa)

    return _autograd_fns(call, q, k, v, dout)


def _fns(impl, cfg, q, k, v, dout, docs, causal, window):
    if impl == "triton":
        if not cfg["gpu"]:
            raise Skip("Triton kernels need a GPU (CPU: interpreter only, for tests)")
        return _longctx_fns("triton", q, k, v, dout, docs, causal, window)
    if impl == "torch":
        return _longctx_fns("torch", q, k, v, dout, docs, causal, window)
    if impl.startswith("sdpa"):
        return _sdpa_fns(impl, cfg, q, k, v, dout, docs, causal, window)
    if impl == "flex":
        if not cfg["gpu"]:
            raise Skip("FlexAttention skipped on CPU (torch.compile time)")
        return _flex_fns(cfg, q, k, v, dout, docs, causal, window)
    raise Skip(f"unknown implementation {impl!r}")


# ---------------------------------------------------------------------------
# run / plot
# ---------------------------------------------------------------------------


def _device_name(cfg) -> str:
    if cfg["gpu"]:
        return torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(ns) -> dict:
    from longctx.kernels import visible_pairs

    cfg = _config(ns)
    B, H, D = cfg["batch"], cfg["heads"], cfg["head_dim"]
    rows = []
    for S in cfg["seq_lens"]:
        for mask in cfg["masks"]:
            q, k, v, dout, docs, causal, window = _make(cfg, S, mask)
            idx = torch.arange(S)
            pairs = visible_pairs(idx, idx, None if docs is None else docs.cpu(), None if docs is None else docs.cpu(),
                                  causal, window=window, batch_size=None if docs is not None else B)
            fwd_flops = 4.0 * H * D * pairs
            for impl in cfg["impls"]:
                try:
                    fns = _fns(impl, cfg, q, k, v, dout, docs, causal, window)
                    err = None
                except Skip as s:
                    fns, err = None, str(s)
                except Exception as e:  # keep the table going; say what failed
                    fns, err = None, f"error: {type(e).__name__}: {str(e).splitlines()[0][:90]}"
                for mode in cfg["modes"]:
                    row = dict(impl=impl, mask=mask, seq=S, mode=mode, ms=float("nan"), tflops=float("nan"), note="")
                    if fns is None:
                        row["note"] = err
                    else:
                        try:
                            # the torch reference on CPU has nothing to warm up (no compile, no autotune)
                            ms = _time(fns[mode], cfg, warmup=0 if (impl == "torch" and not cfg["gpu"]) else None)
                            row["ms"] = ms
                            row["tflops"] = fwd_flops * BWD_FACTOR[mode] / (ms * 1e-3) / 1e12
                        except Exception as e:
                            row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:90]}"
                    rows.append(row)
                fns = None
                if cfg["gpu"]:
                    torch.cuda.empty_cache()
            del q, k, v, dout

    where = "GPU" if cfg["gpu"] else "CPU"
    title = (f"longctx bench kernels on {_device_name(cfg)}: B={B}, H={H}, H_kv={cfg['kv_heads']}, D={D}, "
             f"{cfg['dtype']}; TFLOP/s on visible pairs (fwd 4*B*H*D*pairs, bwd 2.5x)")
    if not cfg["gpu"]:
        title += ("\nCPU run: torch reference backend and CPU SDPA at small sizes so the command always works; "
                  "the Triton kernels and FlexAttention need a GPU (no GPU figures here)")
    notes = ("docs: causal within documents, lengths lognormal(median 1024, sigma 1.5) clipped to [32, S]. "
             f"window: causal, sliding window of {cfg['window'] or 'S/4'} tokens. "
             "SDPA flash/cuDNN take no document or window mask.")
    table = dict(title=title, columns=["impl", "mask", "seq", "mode", "ms", "tflops", "note"], rows=rows,
                 notes=notes)
    tables = [table]
    cmp = _comparison(rows, cfg)
    if cmp["rows"]:
        tables.append(cmp)
    return dict(tables=tables, device=_device_name(cfg), where=where,
                config={k: v for k, v in cfg.items() if k != "torch_dtype"})


def _comparison(rows, cfg) -> dict:
    """Ours vs the best SDPA backend and vs FlexAttention, per (mask, seq, mode)."""
    ours = "triton" if cfg["gpu"] else "torch"
    out = []
    keys = list(dict.fromkeys((r["mask"], r["seq"], r["mode"]) for r in rows))
    for mask, seq, mode in keys:
        sel = {r["impl"]: r for r in rows if (r["mask"], r["seq"], r["mode"]) == (mask, seq, mode)}
        if ours not in sel or math.isnan(sel[ours]["tflops"]):
            continue
        sdpa = [r for n, r in sel.items() if n.startswith("sdpa") and not math.isnan(r["tflops"])]
        best = max(sdpa, key=lambda r: r["tflops"]) if sdpa else None
        flex = sel.get("flex")
        out.append(dict(
            mask=mask, seq=seq, mode=mode, ours_tflops=sel[ours]["tflops"],
            best_sdpa=best["impl"] if best else "-",
            vs_best_sdpa=sel[ours]["tflops"] / best["tflops"] if best else float("nan"),
            vs_flex=(sel[ours]["tflops"] / flex["tflops"]) if flex and not math.isnan(flex["tflops"]) else float("nan"),
        ))
    return dict(title=f"{ours} relative to torch SDPA's best backend and FlexAttention (x = speed ratio)",
                columns=["mask", "seq", "mode", "ours_tflops", "best_sdpa", "vs_best_sdpa", "vs_flex"], rows=out)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["tables"][0]["rows"]
    masks = list(dict.fromkeys(r["mask"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(len(modes), len(masks), figsize=(4.6 * len(masks), 3.4 * len(modes)), dpi=110,
                             squeeze=False)
    for i, mode in enumerate(modes):
        for j, mask in enumerate(masks):
            ax = axes[i][j]
            for impl in impls:
                pts = sorted((r["seq"], r["tflops"]) for r in rows
                             if r["impl"] == impl and r["mask"] == mask and r["mode"] == mode
                             and not math.isnan(r["tflops"]))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode}, {mask}")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s (visible pairs)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"longctx bench kernels — {result.get('device', '')}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
