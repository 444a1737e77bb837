"""A small cost model of the CP strategies, used by `parallel.strategy: auto` and `longctx bench cp`.

Per transformer layer, forward + backward, for the slowest rank:

    compute = visible pairs on that rank x 4*H*D x 3.5 (fwd + 2.5x bwd) / peak
    comm    = bytes crossing this rank's busiest link / that link's bandwidth

Communication volumes (per rank; L = S/N local tokens, b = bytes per element,
kv = B*L*H_kv*D*b, q = B*L*H*D*b; accumulators travel in fp32):

    ring, zigzag, striped   fwd (N-1)*2kv            bwd (N-1)*2kv + N*2kv*(4/b)
    burst (q-rotating bwd)  fwd (N-1)*2kv            bwd (N-1)*(2q + 2*B*H*L*4) + N*q*(4/b)
                            (falls back to the ring's bwd when that is smaller, i.e. GQA)
    ulysses                 fwd (N-1)/N*(2q + 2kv')  bwd the same (dout in, dq/dk/dv out)
                            kv' = kv * max(1, N/H_kv) (K/V heads replicated when N > H_kv)
    hybrid U x R            ulysses over U (heads), then a zigzag ring over R on H/U heads

The ring family overlaps each step's transfer with the previous block's compute,
so its time is max(compute, comm); Ulysses' all-to-alls are not overlapped, so
its time is compute + comm. A ring that spans nodes runs at the inter-node
bandwidth (every step waits for its slowest hop); burst's double ring sends
(node_size-1) of every node_size steps over the intra-node links.

Attention-FLOP imbalance (max/mean over ranks) is computed, not assumed: the
visible query-key pairs of each rank from its layout's token indices (contiguous,
zigzag, striped) over a sampled document mix (lognormal lengths with the
configured mean, sigma 1; one document per row when the mean is unknown). A
single causal document gives the known values (ring (2N-1)/N, zigzag and striped
~1); long-tailed packed documents unbalance zigzag too, while striped stays ~1.
Ulysses splits heads, not tokens, so it is balanced by construction. This is a
model for choosing, not a promise: `longctx bench cp` measures the real numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

CANDIDATES = ("ring", "zigzag", "striped", "burst", "ulysses", "hybrid")


@dataclass
class Workload:
    seq_len: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    cp: int
    batch: int = 1
    dtype_bytes: int = 2
    mean_doc_len: Optional[float] = None  # None: one document fills the row
    causal: bool = True
    node_size: int = 8
    intra_gbps: float = 450.0
    inter_gbps: float = 50.0
    peak_tflops: float = 400.0  # sustained attention throughput per device


@dataclass
class Prediction:
    strategy: str
    feasible: bool
    reason: str = ""
    bytes_per_rank: float = 0.0
    comm_ms: float = 0.0
    compute_ms: float = 0.0
    imbalance: float = 1.0
    step_ms: float = float("inf")
    options: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {"strategy": self.strategy, "feasible": "yes" if self.feasible else f"no: {self.reason}",
                "MiB/rank": self.bytes_per_rank / 2**20, "comm ms": self.comm_ms,
                "compute ms": self.compute_ms, "imbalance": self.imbalance, "predicted ms": self.step_ms}


def _visible_pairs(w: Workload) -> float:
    """Visible query-key pairs of one row (all heads share them)."""
    S = w.seq_len
    d = min(float(w.mean_doc_len or S), float(S))
    if not w.causal:
        return S * d  # each query sees its document
    return (S / d) * d * (d + 1) / 2


def _compute_ms(w: Workload, imbalance: float, heads: Optional[int] = None) -> float:
    pairs_per_rank = w.batch * _visible_pairs(w) / w.cp
    flops = pairs_per_rank * 4 * (heads or w.n_heads) * w.head_dim * 3.5
    return flops * imbalance / (w.peak_tflops * 1e12) * 1e3


LAYOUT_OF = {"ring": "contiguous", "zigzag": "zigzag", "striped": "striped", "burst": "zigzag",
             "hybrid": "zigzag"}
_IMBALANCE_TOKENS = 8192  # imbalance depends on shapes, not size: sample at most this many tokens


def _layout_index(layout: str, seq_len: int, n: int, rank: int):
    import torch

    if layout == "striped":
        return torch.arange(rank, seq_len, n)
    if layout == "zigzag":
        c = seq_len // (2 * n)
        return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                          torch.arange((2 * n - 1 - rank) * c, (2 * n - rank) * c)])
    per = seq_len // n
    return torch.arange(rank * per, (rank + 1) * per)


def _sample_doc_ids(seq_len: int, mean_len: Optional[float]):
    import math

    import torch

    if not mean_len or mean_len >= seq_len:
        return None
    g = torch.Generator().manual_seed(0)
    ids, pos, doc = torch.empty(seq_len, dtype=torch.long), 0, 0
    mu = math.log(mean_len) - 0.5  # lognormal with sigma 1 has mean exp(mu + 1/2)
    while pos < seq_len:
        length = int(min(max(1.0, math.exp(mu + float(torch.randn((), generator=g)))), seq_len - pos))
        ids[pos:pos + length] = doc
        pos, doc = pos + length, doc + 1
    return ids.unsqueeze(0)


def layout_imbalance(layout: str, w: Workload, n: int) -> float:
    """max/mean visible pairs over the n ranks of `layout` for w's mask."""
    import torch

    from longctx.kernels import visible_pairs

    if n == 1:
        return 1.0
    scale = max(1, w.seq_len // _IMBALANCE_TOKENS)
    S = max(2 * n, (w.seq_len // scale) // (2 * n) * (2 * n))
    docs = _sample_doc_ids(S, w.mean_doc_len / scale if w.mean_doc_len else None)
    keys = torch.arange(S)
    pairs = []
    for r in range(n):
        idx = _layout_index(layout, S, n, r)
        q_doc = None if docs is None else docs[:, idx]
        pairs.append(visible_pairs(idx, keys, q_doc, docs, w.causal, batch_size=1))
    return max(pairs) / (sum(pairs) / n) if sum(pairs) else 1.0


def _link_gbps(w: Workload, span: int) -> float:
    return w.intra_gbps if span <= w.node_size else w.inter_gbps


def _ring_bytes(w: Workload, n: int, heads_q: float, heads_kv: float, tokens: float, q_rotating: bool) -> float:
    if n == 1:
        return 0.0
    b = w.dtype_bytes
    kv = w.batch * tokens * heads_kv * w.head_dim * b
    q = w.batch * tokens * heads_q * w.head_dim * b
    fwd = (n - 1) * 2 * kv
    bwd_kv = (n - 1) * 2 * kv + n * 2 * kv * (4 / b)
    bwd_q = (n - 1) * (2 * q + 2 * w.batch * heads_q * tokens * 4) + n * q * (4 / b)
    return fwd + (min(bwd_q, bwd_kv) if q_rotating else bwd_kv)


def predict(name: str, w: Workload) -> Prediction:
    n, H, Hkv = w.cp, w.n_heads, w.n_kv_heads
    L = w.seq_len / n
    p = Prediction(name, True)
    if w.seq_len % (2 * n):
        return Prediction(name, False, f"seq_len not divisible by 2*cp={2 * n}")
    if name in ("ring", "zigzag", "striped", "burst"):
        p.imbalance = layout_imbalance(LAYOUT_OF[name], w, n)
        p.bytes_per_rank = _ring_bytes(w, n, H, Hkv, L, q_rotating=name == "burst")
        if name == "burst" and n > w.node_size:
            # Double ring: most steps stay inside a node.
            inner = (w.node_size - 1) / w.node_size
            p.comm_ms = p.bytes_per_rank * (inner / (w.intra_gbps * 1e9) + (1 - inner) / (w.inter_gbps * 1e9)) * 1e3
            p.options = {"node_size": w.node_size}
        else:
            p.comm_ms = p.bytes_per_rank / (_link_gbps(w, n) * 1e9) * 1e3
        p.compute_ms = _compute_ms(w, p.imbalance)
        p.step_ms = max(p.compute_ms, p.comm_ms)
        return p
    if name == "ulysses":
        if H % n:
            return Prediction(name, False, f"n_heads={H} not divisible by cp={n}")
        if Hkv % n and n % Hkv:
            return Prediction(name, False, f"n_kv_heads={Hkv} and cp={n} do not divide")
        p.bytes_per_rank = _ulysses_bytes(w, n, H, Hkv, L)
        cross = max(0.0, (n - w.node_size) / n)  # share of peers on other nodes
        p.comm_ms = p.bytes_per_rank * ((1 - cross) / (w.intra_gbps * 1e9) + cross / (w.inter_gbps * 1e9)) * 1e3
        p.compute_ms = _compute_ms(w, 1.0)
        p.step_ms = p.compute_ms + p.comm_ms
        return p
    if name == "hybrid":
        best = None
        for u in range(2, n):
            if n % u or H % u or (Hkv % u and u % Hkv):
                continue
            r = n // u
            ul = _ulysses_bytes(w, u, H, Hkv, L)
            ring = _ring_bytes(w, r, H / u, max(Hkv, u) / u, w.seq_len / r, q_rotating=False)
            comm = ul / (_link_gbps(w, u) * 1e9) * 1e3 + ring / (_link_gbps(w, n) * 1e9) * 1e3
            compute = _compute_ms(w, layout_imbalance("zigzag", w, n))
            step = max(compute, ring / (_link_gbps(w, n) * 1e9) * 1e3) + ul / (_link_gbps(w, u) * 1e9) * 1e3
            cand = Prediction(name, True, bytes_per_rank=ul + ring, comm_ms=comm, compute_ms=compute,
                              imbalance=layout_imbalance("zigzag", w, n), step_ms=step,
                              options={"ulysses_size": u})
            if best is None or cand.step_ms < best.step_ms:
                best = cand
        return best or Prediction(name, False, f"no ulysses x ring factorisation of cp={n} fits the heads")
    raise ValueError(f"the cost model knows {CANDIDATES}, not {name!r}")


def _ulysses_bytes(w: Workload, n: int, H: int, Hkv: int, L: float) -> float:
    b = w.dtype_bytes
    q = w.batch * L * H * w.head_dim * b
    kv = w.batch * L * Hkv * w.head_dim * b * max(1.0, n / Hkv)
    return 2 * (n - 1) / n * (2 * q + 2 * kv)


def choose(w: Workload, candidates=CANDIDATES, available=None) -> tuple[Prediction, list[Prediction]]:
    """The fastest feasible strategy (ties: fewer bytes), and every prediction."""
    preds = []
    for name in candidates:
        p = predict(name, w)
        if available is not None and name not in available and p.feasible:
            p.feasible, p.reason = False, "not in this version"  # keep the numbers: what it would give
        preds.append(p)
    feasible = [p for p in preds if p.feasible]
    if not feasible:
        raise ValueError("no CP strategy fits this workload: " + "; ".join(f"{p.strategy}: {p.reason}" for p in preds))
    if w.cp == 1:
        best = next(p for p in feasible if p.strategy == "ring")
    else:
        best = min(feasible, key=lambda p: (round(p.step_ms, 9), p.bytes_per_rank))
    return best, preds
