"""`parallel.strategy: auto`: pick a CP strategy for a config with the cost model."""

from __future__ import annotations

from longctx.bench import format_table

from .cost_model import CANDIDATES, Workload, choose


def workload_from_config(cfg) -> Workload:
    from longctx.config import head_dim

    m, d, p = cfg.model, cfg.data, cfg.parallel
    mean_doc = None
    if d.source == "synthetic":  # document lengths are known; ~1 token per character with bytes
        chars = (d.min_doc_len + d.max_doc_len) / 2
        mean_doc = chars if d.tokenizer == "byte" else chars / 4
    gpu = cfg.ray.use_gpu or cfg.train.device == "cuda"
    return Workload(seq_len=d.seq_len, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, head_dim=head_dim(m),
                    cp=p.cp, batch=cfg.train.micro_batch_size, dtype_bytes=2 if cfg.train.dtype == "bf16" else 4,
                    mean_doc_len=mean_doc, node_size=p.node_size or (8 if gpu else p.cp),
                    intra_gbps=p.intra_node_gbps, inter_gbps=p.inter_node_gbps,
                    peak_tflops=400.0 if gpu else 0.05)


def resolve_auto(cfg) -> tuple[str, dict, str]:
    """(strategy, its options, a table of every prediction) for `cfg`."""
    from . import strategy as registry

    available = set(registry._implemented())
    best, preds = choose(workload_from_config(cfg), CANDIDATES, available)
    rows = [p.row() for p in preds]
    table = format_table(rows, ["strategy", "feasible", "MiB/rank", "comm ms", "compute ms", "imbalance",
                                "predicted ms"])
    options = {**best.options, **cfg.parallel.options}  # the user's options win
    text = (f"parallel.strategy=auto -> {best.strategy} {options or ''}\n"
            f"cost model, per layer fwd+bwd, slowest rank:\n{table}")
    return best.strategy, options, text


def apply_auto(cfg) -> str:
    """Replace `auto` in cfg by the chosen strategy; returns the explanation (empty if not auto)."""
    if cfg.parallel.strategy != "auto":
        return ""
    name, options, text = resolve_auto(cfg)
    cfg.parallel.strategy, cfg.parallel.options = name, options
    return text
