"""Ulysses and Ulysses x ring (hybrid) context parallelism.

Distributed checks run in gloo processes on CPU, one spawn per world size (2
and 4), many cases per spawn. Exactness is checked against a naive dense fp64
softmax written here (independent of longctx.kernels), on each rank's local
slices (selected with the strategy's token_index):

- fp64 inputs: atol = rtol = 1e-10
- fp32 inputs: atol = rtol = 1e-5 (reference still computed in fp64)

Bytes are asserted exactly against the formulas in ulysses.py / hybrid.py;
attention FLOPs against the visible pairs of the dense mask.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

try:
    from distributed_utils import run_distributed
except ImportError:  # tests imported as a package
    from tests.distributed_utils import run_distributed
from attention_reference import doc_ids_from_lengths, reference_attention  # noqa: E402

from longctx.parallel import build_mesh, build_strategy
from longctx.parallel.hybrid import HybridLayout, default_ulysses_size

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


# ---------------------------------------------------------------------------
# reference and cases
# ---------------------------------------------------------------------------


# Document lengths that do not line up with shard or chunk boundaries
# (shards: 12 tokens for S=24/cp=2, 8 for S=32/cp=4; chunks half of that).
DOCS = {
    24: [[5, 7, 9, 3], [13, 11]],
    32: [[5, 7, 9, 3, 8], [13, 11, 1, 7]],
}
# Long-tailed packed documents (one long, many short) for the imbalance report.
LONG_TAIL = {32: [[19, 1, 2, 1, 5, 3, 1], [2, 1, 1, 23, 4, 1]]}

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


def _noncontiguous(t):
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def expected_bytes(kind, U, R, B, S_l, H, H_kv, D, es, doc_bytes, acc_size):
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


def make_data(case, seq_len, seed, B=2, D=8, docs=None):
    name, H, H_kv, causal, use_docs, dtype, extra = case
    g = torch.Generator().manual_seed(seed)  # the same full tensors on every rank of the group
    q = torch.randn(B, seq_len, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, seq_len, H_kv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, seq_len, H_kv, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, seq_len, H, D, generator=g, dtype=torch.float64)
    doc = doc_ids_from_lengths((docs or DOCS)[seq_len]) if use_docs else None
    return q, k, v, dout, doc


def check_case(strat, case, seq_len, seed=0, B=2, D=8, docs=None):
    """Run one case; compare out and local dq/dk/dv to the dense reference; assert bytes and FLOPs."""
    name, H, H_kv, causal, use_docs, dtype, extra = case
    scale = extra.get("softmax_scale")
    N, r = strat.cp_size, strat.cp_rank
    q, k, v, dout, doc = make_data(case, seq_len, seed, B, D, docs)

    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out_ref, mask = reference_attention(qr, kr, vr, doc, causal, scale)
    out_ref.backward(dout)

    ql, kl, vl = (strat.shard(t).to(dtype) for t in (q, k, v))
    if extra.get("noncontig"):
        kl, vl = _noncontiguous(kl), _noncontiguous(vl)
        assert not kl.is_contiguous()
    ql, kl, vl = (t.requires_grad_() for t in (ql, kl, vl))
    docl = strat.shard(doc) if doc is not None else None
    out = strat.attention(ql, kl, vl, doc_ids=docl, causal=causal, softmax_scale=scale)
    fwd_stats = dict(strat.last_stats)
    out.backward(strat.shard(dout).to(dtype))
    stats = strat.last_stats

    tol = TOL[dtype]
    where = f"{strat!r}, case {name}, rank {r}"

    def close(got, ref, what):
        torch.testing.assert_close(got.double(), ref, **tol, msg=lambda d: f"{where}: {what}\n{d}")

    assert out.dtype == dtype and out.shape == ql.shape
    assert ql.grad.dtype == kl.grad.dtype == vl.grad.dtype == dtype
    close(out, strat.shard(out_ref.detach()), "out")
    close(strat.unshard(out.detach()), out_ref.detach(), "unshard(out)")
    for what, got, ref in (("dq", ql.grad, qr.grad), ("dk", kl.grad, kr.grad), ("dv", vl.grad, vr.grad)):
        close(got, strat.shard(ref), what)

    # Bytes, exactly.
    kind = strat.name
    U, R = (N, 1) if kind == "ulysses" else (strat.ulysses_size, strat.ring_size)
    es = ql.element_size()
    doc_bytes = docl.numel() * docl.element_size() if docl is not None else 0
    acc_size = 8 if dtype == torch.float64 else 4
    fwd, bwd = expected_bytes(kind, U, R, B, seq_len // N, H, H_kv, D, es, doc_bytes, acc_size)
    assert fwd_stats["fwd_bytes_sent"] == fwd_stats["bytes_sent"] == fwd, f"{where}: fwd {fwd} {fwd_stats}"
    assert stats["fwd_bytes_sent"] == stats["fwd_bytes_recv"] == fwd, f"{where}: fwd {fwd} {stats}"
    assert stats["bwd_bytes_sent"] == stats["bwd_bytes_recv"] == bwd, f"{where}: bwd {bwd} {stats}"
    assert stats["bytes_sent"] == stats["bytes_recv"] == fwd + bwd, f"{where}: {stats}"
    if kind == "ulysses" and U > 1 and docl is None:
        # The brief's formula spelled out: (N-1)/N of each local q, k, v, out.
        kv_rep = kl.numel() * es * (1 if H_kv % N == 0 else N // H_kv)
        assert fwd == (N - 1) * (2 * ql.numel() * es + 2 * kv_rep) // N
    if kind == "hybrid":  # total = pieces
        for d in ("fwd", "bwd"):
            assert stats[f"{d}_bytes_sent"] == stats[f"ulysses_{d}_bytes_sent"] + stats[f"ring_{d}_bytes_sent"]

    # FLOPs: visible pairs of this rank's query rows (full sequence for ulysses,
    # the inner group's ring chunk for hybrid) x this rank's heads.
    if kind == "ulysses":
        rows, heads = torch.arange(seq_len), H // N
    else:
        o = strat.ring_rank
        rows = torch.cat([strat.token_index(seq_len, o * U + u) for u in range(U)])
        heads = H // U
    pairs = int(mask[:, rows].sum())
    assert stats["attn_flops_fwd"] == 4 * B * heads * D * pairs, f"{where}: flops {stats}"
    assert stats["attn_flops_bwd"] == 2.5 * stats["attn_flops_fwd"]
    assert stats["attn_flops"] == 3.5 * stats["attn_flops_fwd"]
    return stats


def imbalance(strat, stats) -> float:
    """max / mean of attn_flops over the strategy's cp group."""
    t = torch.tensor([float(stats["attn_flops"])], dtype=torch.float64)
    parts = [torch.zeros_like(t) for _ in range(strat.cp_size)]
    dist.all_gather(parts, t, group=strat.group)
    f = torch.cat(parts)
    return float(f.max() / f.mean())


def check_hybrid_layout(strat, seq_len):
    N = strat.cp_size
    layout = strat.layout
    # A permutation of the sequence, S/N tokens per rank.
    allidx = torch.cat([layout.token_index(seq_len, c) for c in range(N)])
    assert torch.equal(allidx.sort().values, torch.arange(seq_len))
    # For every U | N: inner group o holds exactly the zigzag pair (o, 2R-1-o) of the 2R split.
    for U in (d for d in range(1, N + 1) if N % d == 0):
        R, C = N // U, seq_len // (2 * (N // U))
        for o in range(R):
            got = torch.cat([layout.token_index(seq_len, o * U + u) for u in range(U)]).sort().values
            want = torch.cat([torch.arange(o * C, (o + 1) * C), torch.arange((2 * R - 1 - o) * C, (2 * R - o) * C)])
            assert torch.equal(got, want), (U, o)
    full = torch.arange(3 * seq_len * 5, dtype=torch.float32).reshape(3, seq_len, 5)
    local = strat.shard(full, dim=1)
    assert local.is_contiguous()
    assert torch.equal(local, full[:, strat.token_index(seq_len)])
    assert torch.equal(strat.unshard(local, dim=1), full)
    with pytest.raises(ValueError, match="not divisible by 2 \\* cp_size"):
        strat.shard(torch.zeros(1, 2 * N + N), dim=1)


def check_errors(N):
    """Clear errors, raised on every rank before any collective."""
    u = build_strategy("ulysses", backend="torch")
    B, S = 1, 4 * N
    if N == 4:
        with pytest.raises(ValueError, match=r"H=6 .*N=4"):
            u.attention(torch.randn(B, S, 6, 8), torch.randn(B, S, 6, 8), torch.randn(B, S, 6, 8))
        with pytest.raises(ValueError, match=r"H_kv=3 .*N=4"):
            u.attention(torch.randn(B, S, 12, 8), torch.randn(B, S, 3, 8), torch.randn(B, S, 3, 8))
        with pytest.raises(ValueError, match=r"H=6 .*N=4"):
            build_strategy("hybrid", ulysses_size=4, num_heads=6)
        h = build_strategy("hybrid", ulysses_size=4, backend="torch")
        with pytest.raises(ValueError, match=r"H_kv=3 .*N=4"):
            h.attention(torch.randn(B, S, 12, 8), torch.randn(B, S, 3, 8), torch.randn(B, S, 3, 8))
        with pytest.raises(ValueError, match="ulysses_size=3 must divide cp_size=4"):
            build_strategy("hybrid", ulysses_size=3)
    with pytest.raises(ValueError, match="doc_ids must be"):
        u.attention(torch.randn(B, S, 4, 8), torch.randn(B, S, 4, 8), torch.randn(B, S, 4, 8),
                    doc_ids=torch.zeros(B, S + 1, dtype=torch.long))
    # Default ulysses_size: the largest divisor of N the heads allow.
    assert default_ulysses_size(4, 4) == 4 and default_ulysses_size(4, 6) == 2
    assert default_ulysses_size(4, 12, 3) == 1 and default_ulysses_size(4, 4, 1) == 4
    assert default_ulysses_size(8, 8, 2) == 8 and default_ulysses_size(8, 12, 6) == 2


# ---------------------------------------------------------------------------
# bodies run in each gloo process
# ---------------------------------------------------------------------------


def _body(rank, world, seq_len):
    N = world
    strats = [build_strategy("ulysses", backend="torch")]
    sizes = [(2, 1), (1, 2)] if N == 2 else [(2, 2), (4, 1), (1, 4)]
    strats += [build_strategy("hybrid", ulysses_size=u, backend="torch") for u, _ in sizes]
    for s, (u, r) in zip(strats[1:], sizes):
        assert (s.ulysses_size, s.ring_size, s.inner_rank, s.ring_rank) == (u, r, rank % u, rank // u)
    check_hybrid_layout(strats[1], seq_len)
    report = {}
    for s in strats:
        for case in CASES:
            stats = check_case(s, case, seq_len)
            if case[0] == "causal":
                report[(repr(s), "causal")] = imbalance(s, stats)
        stats = check_case(s, ("causal_longtail", 4, 4, True, True, torch.float64, {}), seq_len, docs=LONG_TAIL) \
            if seq_len in LONG_TAIL else None
        if stats is not None:
            report[(repr(s), "longtail")] = imbalance(s, stats)
    # Causal attention-FLOP imbalance: ulysses splits heads evenly over the full
    # sequence (exactly 1.0); hybrid's zigzag ring balances its chunk pairs.
    for (what, mask), value in report.items():
        if mask == "causal":
            if what.startswith("Ulysses"):
                assert value == 1.0, (what, value)
            else:
                assert value <= 1.02, (what, value)

    # Default ulysses_size chosen at the first call (collective setup over WORLD), H=6:
    # U=2 at N=4 (6 % 4 != 0), U=2 at N=2; kv heads 2 split over U=2.
    lazy = build_strategy("hybrid", backend="torch")
    assert lazy.ulysses_size is None
    stats = check_case(lazy, ("lazy_h6_gqa2", 6, 2, True, True, torch.float64, {}), seq_len, seed=3)
    assert (lazy.ulysses_size, lazy.ring_size) == (2, N // 2)
    # From a num_heads hint at construction (MQA: replicate the one kv head).
    hinted = build_strategy("hybrid", num_heads=4, num_kv_heads=1, backend="torch")
    assert hinted.ulysses_size == N
    check_case(hinted, CASES[5], seq_len, seed=4)

    # Two calls (two layers) then one backward: last_stats is the last call's fwd + bwd.
    s = strats[1]
    q, k, v, _, _ = make_data(CASES[0], seq_len, 5)
    ql, kl, vl = (s.shard(t).requires_grad_() for t in (q, k, v))
    o1 = s.attention(ql, kl, vl)
    o2 = s.attention(o1, kl, vl)
    o2.sum().backward()
    assert s.last_stats["bwd_bytes_sent"] > 0 and s.last_stats["attn_flops_bwd"] > 0

    check_errors(N)
    if N == 4:
        _check_subgroups(rank)
    return report


def _check_subgroups(rank):
    """Hybrid and ulysses on the cp sub-groups of a dp=2 x cp=2 mesh: sub-groups of
    every cp group are created by every rank; each dp group attends over its own data."""
    mesh = build_mesh(2)
    for u in (2, 1):
        h = build_strategy("hybrid", group=mesh.cp_group, ulysses_size=u, backend="torch")
        assert (h.cp_size, h.cp_rank) == (2, rank % 2)
        for case in (CASES[2], CASES[4]):
            check_case(h, case, 24, seed=mesh.dp_rank)
    uly = build_strategy("ulysses", group=mesh.cp_group, backend="torch")
    check_case(uly, CASES[5], 24, seed=mesh.dp_rank)


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


@pytest.mark.distributed
def test_ulysses_hybrid_world2():
    """cp=2: ulysses, hybrid U=2xR=1 and U=1xR=2: every case, bytes, FLOPs, errors."""
    run_distributed(_body, 2, 24, timeout=150)


@pytest.mark.distributed
def test_ulysses_hybrid_world4():
    """cp=4: ulysses, hybrid 2x2, 4x1, 1x4, lazy default, imbalance, errors, cp sub-groups."""
    reports = run_distributed(_body, 4, 32, timeout=240)
    for (what, mask), value in sorted(reports[0].items()):
        print(f"imbalance cp=4 {mask:9s} {what}: {value:.4f}")


def test_single_process():
    """Without torch.distributed: cp_size 1, exact, no communication."""
    for s in (build_strategy("ulysses", backend="torch"), build_strategy("hybrid", backend="torch")):
        for case in CASES:
            stats = check_case(s, case, 24)
            assert stats["bytes_sent"] == stats["bytes_recv"] == 0
    assert HybridLayout().token_index(8).tolist() == list(range(8))
