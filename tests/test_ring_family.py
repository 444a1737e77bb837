"""The ring family beyond `ring`: zigzag, striped and burst (BurstAttention).

Distributed checks run in gloo processes on CPU, one spawn per world size
(2 and 4) with every case inside. Cases and checks are in cp_cases.py:
each rank's local out/dq/dk/dv against the rows of the dense fp64
reference that the strategy's `token_index` names, communication to the
byte from `last_stats` against the formulas in ring.py / burst.py, attention
FLOPs against the visible pairs of the dense mask. At cp=4 also the causal
FLOP imbalance (max/mean over the group) and burst's backward bytes against
ring's.
"""

from __future__ import annotations

import queue
import threading

import pytest
import torch
from cp_cases import FAMILY_CASES as CASES
from cp_cases import check_case
from distributed_utils import run_distributed

from longctx.parallel import build_strategy
from longctx.parallel import burst as burst_mod

# (label, strategy name, options, case names to run; None = all)
VARIANTS = [
    ("zigzag", "zigzag", {}, None),
    ("striped", "striped", {}, None),
    ("burst", "burst", {}, None),
    ("burst_q", "burst", {"backward": "q"}, ["gqa2_causal_docs_noncontig", "mqa_causal", "fp32_gqa2_causal_docs"]),
    ("burst_kv", "burst", {"backward": "kv"}, ["causal_docs", "noncausal_scale", "fp32_causal_docs"]),
    ("burst_unfused", "burst", {"fused_merge": False}, ["causal_docs", "gqa2_causal_docs_noncontig"]),
]
VARIANTS4 = VARIANTS + [
    # Two emulated nodes of two ranks (double ring), and four nodes of one rank (outer ring only).
    ("burst_node2", "burst", {"node_size": 2}, None),
    ("burst_node2_kv", "burst", {"node_size": 2, "backward": "kv"}, ["causal_docs", "fp32_causal_docs"]),
    ("burst_node1", "burst", {"node_size": 1}, ["causal_docs", "mqa_causal", "fp32_causal_docs"]),
]


def check_layouts(world, rank, seq_len):
    """token_index, shard/unshard round trips of the two new layouts."""
    N = world
    z = build_strategy("zigzag")
    s = build_strategy("striped")
    c = seq_len // (2 * N)
    for o in range(N):
        late = 2 * N - 1 - o
        want = list(range(o * c, (o + 1) * c)) + list(range(late * c, (late + 1) * c))
        assert z.token_index(seq_len, o).tolist() == want
        assert s.token_index(seq_len, o).tolist() == list(range(o, seq_len, N))
    for strat in (z, s, build_strategy("burst")):
        idx = strat.token_index(seq_len)
        assert idx.dtype == torch.int64 and idx.numel() == seq_len // N
        # The ranks' indices partition the row.
        allidx = torch.cat([strat.token_index(seq_len, o) for o in range(N)])
        assert torch.equal(allidx.sort().values, torch.arange(seq_len))
        full = torch.arange(3 * seq_len * 5, dtype=torch.float32).reshape(3, seq_len, 5)
        local = strat.shard(full, dim=1)
        assert local.is_contiguous() and torch.equal(local, full[:, idx])
        assert torch.equal(strat.unshard(local, dim=1), full)
        ids = torch.arange(seq_len * 2).reshape(seq_len, 2)
        assert torch.equal(strat.unshard(strat.shard(ids, dim=0), dim=0), ids)
        assert torch.equal(strat.unshard(strat.shard(full, dim=-2), dim=-2), full)
        # Differentiable shard.
        x = torch.randn(2, seq_len, 3, requires_grad=True)
        strat.shard(x).sum().backward()
        want = torch.zeros_like(x)
        want[:, idx] = 1
        assert torch.equal(x.grad, want)
    with pytest.raises(ValueError, match="not divisible by 2 \\* cp_size"):
        z.shard(torch.zeros(1, 2 * N * 3 + N), dim=1)
    with pytest.raises(ValueError, match="not divisible"):
        s.shard(torch.zeros(1, N * 3 + 1), dim=1)


# ---------------------------------------------------------------------------
# bodies run in each gloo process
# ---------------------------------------------------------------------------


def _run_variants(variants, seq_len):
    by_name = {c[0]: c for c in CASES}
    for label, name, opts, cases in variants:
        strat = build_strategy(name, backend="torch", **opts)
        for case_name in cases or list(by_name):
            check_case(strat, by_name[case_name], seq_len)


def _imbalance_runs(B=1, H=2, D=16, seq_len=512):
    """Causal fwd+bwd with each strategy at a longer row; returns last_stats per strategy."""
    out = {}
    g = torch.Generator().manual_seed(1)
    full = [torch.randn(B, seq_len, H, D, generator=g) for _ in range(4)]
    for name, opts in (("ring", {}), ("zigzag", {}), ("striped", {}), ("burst", {}), ("burst_kv", {"backward": "kv"})):
        strat = build_strategy(name.split("_")[0], backend="torch", **opts)
        q, k, v = (strat.shard(t).requires_grad_() for t in full[:3])
        strat.attention(q, k, v, causal=True).backward(strat.shard(full[3]))
        out[name] = dict(strat.last_stats)
    return out


def _check_subgroups():
    """On the cp=2 groups of a dp=2 x cp=2 mesh: peers are addressed by global rank."""
    from longctx.parallel import build_mesh

    mesh = build_mesh(2)
    case = next(c for c in CASES if c[0] == "gqa2_causal_docs_noncontig")
    for name, opts in (("zigzag", {}), ("striped", {}), ("burst", {}), ("burst", {"node_size": 1, "backward": "q"})):
        strat = build_strategy(name, group=mesh.cp_group, backend="torch", **opts)
        assert (strat.cp_size, strat.cp_rank) == (2, mesh.cp_rank)
        check_case(strat, case, 16, seed=mesh.dp_rank)


def _body(rank, world, seq_len):
    check_layouts(world, rank, seq_len)
    _run_variants(VARIANTS4 if world == 4 else VARIANTS, seq_len)
    if world == 4:
        _check_subgroups()
        return _imbalance_runs()
    return None


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


@pytest.mark.distributed
def test_ring_family_world2():
    """Layouts + every case for zigzag, striped, burst (q/kv/unfused) at cp=2, S=24."""
    run_distributed(_body, 2, 24, timeout=150)


@pytest.fixture(scope="module")
def world4():
    """One cp=4 spawn: layouts, every case (incl. burst double ring), then causal stats per strategy."""
    return run_distributed(_body, 4, 32, timeout=240)


@pytest.mark.distributed
def test_ring_family_world4(world4):
    assert len(world4) == 4


def _imbalance(world4, name):
    flops = [r[name]["attn_flops"] for r in world4]
    return max(flops) / (sum(flops) / len(flops))


@pytest.mark.distributed
def test_causal_flop_imbalance_cp4(world4):
    """max/mean attention FLOPs over the cp=4 group, causal, S=512."""
    imb = {name: _imbalance(world4, name) for name in ("ring", "zigzag", "striped", "burst")}
    print("causal attn-FLOP imbalance at cp=4:", {k: round(x, 4) for k, x in imb.items()})
    assert abs(imb["ring"] - 1.75) < 0.01  # (2N-1)/N
    for name in ("zigzag", "striped", "burst"):
        assert imb[name] <= 1.02, imb
    assert imb["zigzag"] == imb["burst"] == 1.0  # exactly balanced


@pytest.mark.distributed
def test_burst_backward_bytes_vs_ring(world4):
    """H_q == H_kv: burst's auto backward (q-mode) sends >= 20% fewer bytes per rank than ring's."""
    for r, stats in enumerate(world4):
        assert stats["burst"]["bwd_mode"] == "q"
        ring, burst, burst_kv = (stats[n]["bwd_bytes_sent"] for n in ("ring", "burst", "burst_kv"))
        ratio = burst / ring
        print(f"rank {r}: burst/ring backward bytes = {burst}/{ring} = {ratio:.3f}; "
              f"burst q-mode/kv-mode = {burst / burst_kv:.3f}")
        assert ratio <= 0.8
        assert burst < burst_kv  # auto picked the cheaper mode
        assert stats["burst"]["bwd_bytes_sent"] == stats["burst"]["bwd_bytes_q_mode"]


def test_single_process_strategies():
    """Without torch.distributed: cp_size 1, exact, no communication."""
    for label, name, opts, cases in VARIANTS:
        strat = build_strategy(name, backend="torch", **opts)
        assert strat.cp_size == 1
        for case in CASES:
            stats = check_case(strat, case, 16)
            assert stats["bytes_sent"] == stats["bytes_recv"] == 0


def test_burst_options():
    with pytest.raises(ValueError, match="backward must be one of"):
        build_strategy("burst", backward="dq")
    with pytest.raises(ValueError, match="unknown option"):
        build_strategy("zigzag", node_size=2)
    assert burst_mod.resolve_node_size(2, 4) == 2
    assert burst_mod.resolve_node_size(8, 4) == 4
    with pytest.raises(ValueError, match="one must divide the other"):
        burst_mod.resolve_node_size(3, 4)


def test_node_size_from_launch(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert burst_mod.resolve_node_size(0, 8) == 8  # unknown: the group is one node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert burst_mod.resolve_node_size(0, 8) == 4
    assert burst_mod.resolve_node_size(0, 2) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert burst_mod.resolve_node_size(0, 12) == 4  # inner rings never leave a node


def test_gqa_rule_crossover():
    """auto picks q-mode for H_q == H_kv and kv-mode from 2 query heads per KV head (fp32, bf16)."""
    for dtype in (torch.float32, torch.bfloat16):
        for H, H_kv, want in ((8, 8, "q"), (8, 4, "kv"), (8, 1, "kv")):
            q = torch.empty(1, 64, H, 128, dtype=dtype)
            k = torch.empty(1, 64, H_kv, 128, dtype=dtype)
            c = burst_mod.backward_bytes(q, k, None, 4)
            assert ("q" if c["q_step"] <= c["kv_step"] else "kv") == want, (dtype, H, H_kv, c)
            assert (c["q"], c["kv"]) == (3 * c["q_step"], 3 * c["kv_step"])


class _FakeExchange:
    """In-process stand-in for PeerExchange: `group` is (mailboxes, my rank)."""

    def __init__(self, tensors, group, dst, src, counter=None, tag_base=0):
        boxes, me = group
        self._get = [(boxes, (src, me, tag_base + j)) for j in range(len(tensors))]
        for j, t in enumerate(tensors):
            boxes[(me, dst, tag_base + j)].put(t.clone())
        self.hops = counter
        if counter is not None:
            counter.append(1)

    def wait(self):
        return [boxes[key].get(timeout=10) for boxes, key in self._get]


@pytest.mark.parametrize("N,L", [(6, 2), (6, 3), (8, 2), (8, 4), (9, 3), (4, 1), (5, 5), (1, 1)])
def test_double_ring_schedule_simulated(monkeypatch, N, L):
    """The double-ring schedule for sizes a 2-core CPU cannot spawn: every rank sees every
    bundle once, travelling accumulators end at their owner with every rank's contribution,
    and a rank makes N-1 hops per ring (n*(L-1) intra-node, n-1 inter-node)."""
    import collections

    monkeypatch.setattr(burst_mod, "PeerExchange", _FakeExchange)
    boxes = collections.defaultdict(queue.Queue)
    results, errors = {}, []

    def rank_main(r):
        try:
            sched = burst_mod.DoubleRing(N, r, L)
            seen = []

            def step(bundle, owner):
                assert int(bundle[0]) == owner  # the bundle held is the owner's
                seen.append(owner)
                # contribution of holder r to owner's accumulator: 2**r
                return [(torch.full((1, 1), float(2**r), dtype=torch.float64), 0, 1)]

            inner, outer = [], []
            acc = burst_mod.run_double_ring(
                sched, (boxes, r), [torch.tensor(r)], step, inner, outer, [((1, 1), torch.float64, "cpu")]
            )
            results[r] = (seen, acc[0].item(), len(inner), len(outer), sched.order())
        except BaseException as exc:  # noqa: BLE001
            errors.append((r, repr(exc)))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    n = N // L
    for r in range(N):
        seen, acc, inner_posts, outer_posts, order = results[r]
        assert sorted(seen) == list(range(N)) and seen == order and seen[0] == r
        assert acc == 2**N - 1  # every rank contributed exactly once
        # bundle + accumulator posts: n*(L-1) + n*(L-1) intra, (n-1) + (n-1) inter
        assert inner_posts == 2 * n * (L - 1) and outer_posts == 2 * (n - 1)
