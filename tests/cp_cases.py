"""The case table and the one `check_case` shared by the CP strategy tests.

test_ring.py, test_ring_family.py, test_ulysses_hybrid.py, test_cad.py and
test_cp_window.py run cases from here inside gloo processes (or in a single
process, cp_size 1). Exactness is checked against the naive dense fp64
softmax of tests/attention_reference.py (independent of longctx.kernels), on
each rank's local slices (the rows the strategy's `token_index` names):

- fp64 inputs: atol = rtol = 1e-10
- fp32 inputs: atol = rtol = 1e-5 (reference still computed in fp64)

Communication is asserted to the byte from `last_stats` against the formulas
in ring.py / burst.py / ulysses.py / hybrid.py (or CAD's plan), attention FLOPs
against the visible pairs of the dense mask (window included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_reference import doc_ids_from_lengths, reference_attention

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}

# Document lengths that do not line up with shard or zigzag-chunk boundaries
# (shards of 12 tokens for S=24 / cp=2, 8 for S=32 / cp=4 or S=16 / cp=2; chunks half of that).
DOCS = {
    16: [[5, 7, 4], [3, 13]],
    24: [[5, 7, 9, 3], [13, 11]],
    32: [[5, 7, 9, 3, 8], [13, 11, 1, 7]],
}

# name, H, H_kv, causal, docs, dtype, extra options
CASES = [
    ("causal", 4, 4, True, False, torch.float64, {}),
    ("noncausal_scale", 4, 4, False, False, torch.float64, {"softmax_scale": 0.3}),
    ("causal_docs", 4, 4, True, True, torch.float64, {}),
    ("noncausal_docs", 4, 4, False, True, torch.float64, {}),
    ("gqa2_causal_docs_noncontig", 4, 2, True, True, torch.float64, {"noncontig": True}),
    ("mqa_causal", 4, 1, True, False, torch.float64, {}),
    ("fp32_gqa2_causal_docs", 4, 2, True, True, torch.float32, {}),
]
_BY_NAME = {c[0]: c for c in CASES}
# The ring family's table: two more cases.
FAMILY_CASES = CASES[:6] + [
    ("mqa_noncausal_docs", 4, 1, False, True, torch.float64, {}),
    _BY_NAME["fp32_gqa2_causal_docs"],
    ("fp32_causal_docs", 4, 4, True, True, torch.float32, {}),
]

RING_FAMILY = ("ring", "zigzag", "striped", "burst")


def noncontiguous(t):
    """Same values and shape, non-contiguous strides ([B, S, H, D] stored as [B, H, S, D])."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def nbytes(t):
    return 0 if t is None else t.numel() * t.element_size()


def random_qkv(H, H_kv, seq_len, seed, B=2, D=8):
    """Full fp64 q, k, v, dout: the same on every rank given the same seed."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, seq_len, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, seq_len, H_kv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, seq_len, H_kv, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, seq_len, H, D, generator=g, dtype=torch.float64)
    return q, k, v, dout


def make_data(case, seq_len, seed, B=2, D=8, docs=None):
    """(q, k, v, dout, doc ids or None) for a case of the table; `docs`: {seq_len: rows} (default DOCS)."""
    _, H, H_kv, _, use_docs, _, _ = case
    doc = doc_ids_from_lengths((docs or DOCS)[seq_len]) if use_docs else None
    return (*random_qkv(H, H_kv, seq_len, seed, B, D), doc)


@dataclass
class Run:
    """One strategy call (forward + backward) on local shards, compared with the reference."""

    strat: object
    name: str
    dtype: torch.dtype
    causal: bool
    window: int | None
    ql: torch.Tensor
    kl: torch.Tensor
    vl: torch.Tensor
    docl: torch.Tensor | None
    out: torch.Tensor
    fwd_stats: dict  # last_stats right after the forward
    stats: object  # last_stats after the backward
    mask: torch.Tensor  # dense [B, S, S] visibility of the full row
    where: str

    @property
    def shape(self):
        """(B, S_local, H, H_kv, D)."""
        B, S, H, D = self.ql.shape
        return B, S, H, self.kl.shape[2], D


def run_and_compare(strat, name, q, k, v, dout, doc, dtype, *, causal, scale=None, window=None, noncontig=False):
    """Run `strat` on its shards of the full (q, k, v, doc) in `dtype`; assert out,
    unshard(out) and the local dq/dk/dv equal the dense reference. Returns the Run."""
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out_ref, mask = reference_attention(qr, kr, vr, doc, causal, scale, window=window)
    out_ref.backward(dout)

    ql, kl, vl = (strat.shard(t).to(dtype) for t in (q, k, v))
    if noncontig:
        kl, vl = noncontiguous(kl), noncontiguous(vl)
        assert not kl.is_contiguous()
    ql, kl, vl = (t.requires_grad_() for t in (ql, kl, vl))
    docl = strat.shard(doc) if doc is not None else None
    out = strat.attention(ql, kl, vl, doc_ids=docl, causal=causal, window=window, softmax_scale=scale)
    fwd_stats = dict(strat.last_stats)
    out.backward(strat.shard(dout).to(dtype))

    where = f"{strat!r}, case {name}, rank {strat.cp_rank}" + (f", window {window}" if window is not None else "")
    tol = TOL[dtype]

    def close(got, ref, what):  # keep torch's mismatch details after our prefix
        torch.testing.assert_close(got.double(), ref, **tol, msg=lambda details: f"{where}: {what}\n{details}")

    assert out.dtype == dtype and out.shape == ql.shape
    assert ql.grad.dtype == kl.grad.dtype == vl.grad.dtype == dtype
    close(out, strat.shard(out_ref.detach()), "out")
    close(strat.unshard(out.detach()), out_ref.detach(), "unshard(out)")
    for what, got, ref in (("dq", ql.grad, qr.grad), ("dk", kl.grad, kr.grad), ("dv", vl.grad, vr.grad)):
        close(got, strat.shard(ref), what)
    return Run(strat, name, dtype, causal, window, ql, kl, vl, docl, out, fwd_stats, strat.last_stats, mask, where)


# ---------------------------------------------------------------------------
# per-strategy bytes and FLOPs
# ---------------------------------------------------------------------------


def assert_bytes(run: Run, fwd: int, bwd: int) -> None:
    s, f, where = run.stats, run.fwd_stats, run.where
    assert f["fwd_bytes_sent"] == f["bytes_sent"] == fwd, f"{where}: fwd bytes {fwd} {f}"
    assert s["fwd_bytes_sent"] == s["fwd_bytes_recv"] == fwd, f"{where}: fwd bytes {fwd} {s}"
    assert s["bwd_bytes_sent"] == s["bwd_bytes_recv"] == bwd, f"{where}: bwd bytes {bwd} {s}"
    assert s["bytes_sent"] == s["bytes_recv"] == fwd + bwd, f"{where}: bytes {s}"


def assert_flops(run: Run, rows: torch.Tensor, heads: int) -> int:
    """attn_flops = 4 * B * heads * D * (visible pairs of query `rows`) forward, 2.5x backward."""
    s, where = run.stats, run.where
    B, _, _, _, D = run.shape
    pairs = int(run.mask[:, rows].sum())
    assert s["visible_pairs"] == pairs, f"{where}: {s}"
    assert s["attn_flops_fwd"] == 4 * B * heads * D * pairs, f"{where}: flops {s}"
    assert s["attn_flops_bwd"] == 2.5 * s["attn_flops_fwd"], f"{where}: flops {s}"
    assert s["attn_flops"] == 3.5 * s["attn_flops_fwd"], f"{where}: flops {s}"
    return pairs


def ring_family_bytes(strat, ql, kl, docl):
    """(fwd, bwd, inter-node part of fwd+bwd or None, bwd_mode or None) per rank, by formula."""
    N = strat.cp_size
    e = kl.element_size()
    a = 8 if kl.dtype == torch.float64 else 4
    B, S, H, D = ql.shape
    H_kv = kl.shape[2]
    doc = nbytes(docl)
    kv = 2 * B * S * H_kv * D * e
    fwd = (N - 1) * (kv + doc)
    if strat.name != "burst":
        # The ring's: K/V N-1 hops, dK/dV accumulators (fp32, fp64 for fp64) N hops to their owner.
        bwd = (N - 1) * (kv + doc) + (N * 2 * B * S * H_kv * D * a if N > 1 else 0)
        return fwd, bwd, None, None
    q_step = 2 * B * S * H * D * e + 2 * B * H * S * a + doc + B * S * H * D * a  # Q, dO, LSE+delta, doc, dQ
    kv_step = kv + doc + 2 * B * S * H_kv * D * a  # K, V, doc, dK+dV
    mode = strat.backward_mode
    if mode == "auto":
        mode = "q" if q_step <= kv_step else "kv"
    step = q_step if mode == "q" else kv_step
    bwd = (N - 1) * step
    n = strat.schedule.num_nodes
    inter = (n - 1) * (kv + doc) + (n - 1) * step
    return fwd, bwd, inter, mode


def blocks_with_pairs(strat, seq_len, causal, window) -> int:
    """Ring blocks (owners) holding a causally/window-visible pair for this rank's queries (docs ignored)."""
    qi = strat.token_index(seq_len)
    n = 0
    for o in range(strat.cp_size):
        d = qi[:, None] - strat.token_index(seq_len, o)[None, :]
        vis = torch.ones_like(d, dtype=torch.bool)
        if causal:
            vis &= d >= 0
        if window is not None:
            vis &= d < window
        n += bool(vis.any())
    return n


def check_ring_family(run: Run, seq_len: int) -> None:
    strat, s, where = run.strat, run.stats, run.where
    N, r = strat.cp_size, strat.cp_rank
    fwd, bwd, inter, mode = ring_family_bytes(strat, run.ql, run.kl, run.docl)
    assert_bytes(run, fwd, bwd)
    if strat.name == "burst":
        assert s["bwd_mode"] == mode, f"{where}: {s}"
        assert s["inter_node_bytes_sent"] == inter, f"{where}: inter-node bytes {s}"
        assert s["intra_node_bytes_sent"] + inter == fwd + bwd, f"{where}: {s}"
        assert s["bwd_bytes_" + mode + "_mode"] == bwd
        assert s["fused_merge"] == strat.fused_merge
        sched = strat.schedule
        assert (s["inner_steps"], s["outer_steps"]) == (sched.node_size, sched.num_nodes)
        assert s["inner_steps"] * s["outer_steps"] == N
    H = run.ql.shape[2]
    assert_flops(run, strat.token_index(seq_len), H)
    assert s["steps"] == N, f"{where}: {s}"
    if run.window is None and strat.name == "ring":
        # Contiguous + causal: blocks of later ranks are skipped.
        assert s["blocks_computed"] == (r + 1 if run.causal else N), f"{where}: blocks {s}"
    elif run.window is None:
        # No zigzag/striped block is ever entirely in the causal future.
        assert s["blocks_computed"] == N, f"{where}: {s}"
    else:
        # Blocks entirely outside the window (or in the causal future) are skipped.
        want = blocks_with_pairs(strat, seq_len, run.causal, run.window)
        assert s["blocks_computed"] == want, f"{where}: blocks {want} {s}"


def ulysses_hybrid_bytes(kind, U, R, B, S_l, H, H_kv, D, es, doc_bytes, acc_size):
    """(fwd, bwd) bytes sent per rank; ulysses = hybrid with (U, R) = (N, 1) and no ring.

    Ulysses piece over U ranks: (U-1)/U of q, k, v (k/v after replication to
    max(H_kv, U) heads) and of the output, plus (U-1) x local doc ids;
    backward (U-1)/U of dout, dq, dk, dv.
    Ring piece over R ranks on [B, U*S_l, heads/U, D] blocks (ring.py):
    forward (R-1) x (k + v + doc), backward the same + R hops of dK/dV in acc dtype.
    """
    rep = 1 if H_kv % U == 0 else U // H_kv
    q = B * S_l * H * D * es
    kv = B * S_l * H_kv * rep * D * es  # one of k / v, replicated, = one ring block of k
    fwd = (U - 1) * (q + 2 * kv + q) // U + (U - 1) * doc_bytes
    bwd = (U - 1) * (q + q + 2 * kv) // U
    if kind == "hybrid" and R > 1:
        doc_h = U * doc_bytes
        fwd += (R - 1) * (2 * kv + doc_h)
        bwd += (R - 1) * (2 * kv + doc_h) + R * 2 * (kv // es) * acc_size
    return fwd, bwd


def check_ulysses_hybrid(run: Run, seq_len: int) -> None:
    strat, s = run.strat, run.stats
    N, kind = strat.cp_size, strat.name
    B, S_l, H, H_kv, D = run.shape
    U, R = (N, 1) if kind == "ulysses" else (strat.ulysses_size, strat.ring_size)
    es = run.ql.element_size()
    acc_size = 8 if run.dtype == torch.float64 else 4
    fwd, bwd = ulysses_hybrid_bytes(kind, U, R, B, S_l, H, H_kv, D, es, nbytes(run.docl), acc_size)
    assert_bytes(run, fwd, bwd)
    if kind == "ulysses" and U > 1 and run.docl is None:
        # The brief's formula spelled out: (N-1)/N of each local q, k, v, out.
        kv_rep = run.kl.numel() * es * (1 if H_kv % N == 0 else N // H_kv)
        assert fwd == (N - 1) * (2 * run.ql.numel() * es + 2 * kv_rep) // N
    if kind == "hybrid":  # total = pieces
        for d in ("fwd", "bwd"):
            assert s[f"{d}_bytes_sent"] == s[f"ulysses_{d}_bytes_sent"] + s[f"ring_{d}_bytes_sent"]
    # FLOPs: visible pairs of this rank's query rows (full sequence for ulysses,
    # the inner group's ring chunk for hybrid) x this rank's heads.
    if kind == "ulysses":
        rows, heads = torch.arange(seq_len), H // N
    else:
        o = strat.ring_rank
        rows = torch.cat([strat.token_index(seq_len, o * U + u) for u in range(U)])
        heads = H // U
    assert_flops(run, rows, heads)


def check_cad(run: Run, seq_len: int) -> None:
    """Traffic exactly as planned (Q/Out/dOut/dQ and K,V/dK,dV of moved work); FLOPs of the
    server's planned pairs; scope cp: the plan's pairs are all visible pairs of the rows."""
    strat, s, where = run.strat, run.stats, run.where
    p, r = strat._cache.plan, strat.cp_rank
    B, _, H, _, D = run.shape
    sent, recv = p.traffic()
    assert s["bytes_sent"] == sent[r] and s["bytes_recv"] == recv[r], \
        f"{where}: bytes {s}, planned sent {sent} recv {recv}"
    assert s["bytes_sent"] == s["fwd_bytes_sent"] + s["bwd_bytes_sent"]
    assert s["attn_flops_fwd"] == 4 * H * D * p.loads_after[r], f"{where}: flops {s}"
    assert s["attn_flops_bwd"] == 2.5 * s["attn_flops_fwd"]
    assert s["attn_flops"] == 3.5 * s["attn_flops_fwd"]
    if strat.scope == "cp":
        assert sum(p.loads_after) == int(run.mask.sum()), f"{where}: planned pairs {p.loads_after}"
    for key in ("imbalance_before", "imbalance_after", "planner_ms", "exposed_comm_ms", "fwd_exposed_comm_ms",
                "bwd_exposed_comm_ms", "plan_cached", "bytes_recv"):
        assert key in s, f"{where}: missing {key}"
    assert s["imbalance_after"] <= s["imbalance_before"] + 1e-12


def check_stats(run: Run, seq_len: int) -> None:
    """The strategy's byte and FLOP assertions for `run`."""
    name = run.strat.name
    if name in RING_FAMILY:
        check_ring_family(run, seq_len)
    elif name in ("ulysses", "hybrid"):
        check_ulysses_hybrid(run, seq_len)
    else:
        assert name == "cad", name
        check_cad(run, seq_len)


def check_case(strat, case, seq_len, seed=0, B=2, D=8, docs=None, window=None):
    """Run one case of the table on `strat`'s group: out, unshard(out) and local dq/dk/dv
    against the dense reference, then bytes and FLOPs. Returns `last_stats`."""
    name, H, H_kv, causal, use_docs, dtype, extra = case
    q, k, v, dout, doc = make_data(case, seq_len, seed, B, D, docs)
    run = run_and_compare(strat, name, q, k, v, dout, doc, dtype, causal=causal, scale=extra.get("softmax_scale"),
                          window=window, noncontig=extra.get("noncontig", False))
    check_stats(run, seq_len)
    return run.stats
