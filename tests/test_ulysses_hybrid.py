"""Ulysses and Ulysses x ring (hybrid) context parallelism.

Distributed checks run in gloo processes on CPU, one spawn per world size (2
and 4), many cases per spawn. Cases and checks are in cp_cases.py: exactness
against the dense fp64 reference on each rank's local slices, bytes exactly
against the formulas in ulysses.py / hybrid.py, attention FLOPs against the
visible pairs of the dense mask.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from cp_cases import CASES, check_case, make_data
from distributed_utils import run_distributed

from longctx.parallel import build_mesh, build_strategy
from longctx.parallel.hybrid import HybridLayout, default_ulysses_size

# Long-tailed packed documents (one long, many short) for the imbalance report.
LONG_TAIL = {32: [[19, 1, 2, 1, 5, 3, 1], [2, 1, 1, 23, 4, 1]]}


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
