"""Core attention disaggregation (`cad`): planner properties, exactness, traffic, model step.

Distributed checks run in gloo processes on CPU, one spawn per world size (2 and 4)
with many cases each. Exactness (against the dense fp64 reference, tolerances of
cp_cases.TOL), traffic and FLOPs are checked by cp_cases.py.

Scope "cp": every rank holds a contiguous shard of the same rows. Scope "dp":
every rank holds different whole rows; each rank's outputs and gradients are
compared with the reference on its own rows.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from attention_reference import doc_ids_from_lengths
from cp_cases import check_cad, random_qkv, run_and_compare
from distributed_utils import run_distributed

from longctx.parallel import build_strategy
from longctx.parallel.cad import CostModel, docs_from_lengths, docs_from_runs, local_runs, pairs_in, plan

COST = CostModel.for_shapes(32, 8, 128, 2)


# ---------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------


# Rows per (scope, seq_len). cp: one set of rows shared by the group (lengths
# cross shard boundaries); dp: different rows per rank -- rank 0 gets one long
# document (the straggler), the others short ones.
CP_DOCS = {
    24: [[5, 7, 9, 3], [13, 11]],
    32: [[5, 7, 9, 3, 8], [20, 11, 1]],
}


def dp_docs(rank: int, seq_len: int) -> list[list[int]]:
    if rank == 0:
        return [[seq_len], [seq_len - 3, 3]]
    if rank == 1:
        return [[4] * (seq_len // 4), [3, 5, seq_len - 8]]
    return [[2] * (seq_len // 2), [seq_len // 2, seq_len // 2]]


# name, H, H_kv, causal, docs ("docs" | None | "interleaved"), dtype, strategy options, extra
CASES = [
    ("causal_docs", 4, 4, True, "docs", torch.float64, dict(min_shard_tokens=1, tolerance=0.01), {}),
    ("causal_nodocs", 4, 4, True, None, torch.float64, dict(min_shard_tokens=1, max_shard_tokens=3), {}),
    ("noncausal_docs_scale", 4, 4, False, "docs", torch.float64, dict(min_shard_tokens=1),
     {"softmax_scale": 0.3}),
    ("noncausal_nodocs", 4, 4, False, None, torch.float64, dict(min_shard_tokens=1, ping_pong=False), {}),
    ("gqa2_causal_docs_split", 4, 2, True, "docs", torch.float64,
     dict(min_shard_tokens=1, max_shard_tokens=2, tolerance=0.0), {}),
    ("gqa2_causal_docs_no_pingpong", 4, 2, True, "docs", torch.float64,
     dict(min_shard_tokens=1, ping_pong=False), {}),
    ("mqa_interleaved_doc_ids", 4, 1, True, "interleaved", torch.float64, dict(min_shard_tokens=1), {}),
    ("fp32_gqa2_causal_docs", 4, 2, True, "docs", torch.float32, dict(min_shard_tokens=2), {}),
    ("default_options", 4, 2, True, "docs", torch.float64, dict(), {}),
]


def _rows_for(scope, rank, seq_len, use_docs):
    if use_docs is None:
        return None
    if scope == "cp":
        doc = doc_ids_from_lengths(CP_DOCS[seq_len])
    else:
        doc = doc_ids_from_lengths(dp_docs(rank, seq_len))
    if use_docs == "interleaved":  # the same id in non-adjacent runs is one document
        doc = doc % 2
    return doc


def check_cad_case(strat, case, seq_len, seed=0, B=2, D=8, window=None):
    """One case on `strat`'s group: out, dq, dk, dv against the dense reference; traffic; FLOPs."""
    name, H, H_kv, causal, use_docs, dtype, _, extra = case
    r, scope = strat.cp_rank, strat.scope
    # scope cp: same full rows on every rank; scope dp: different rows per row group
    row = 0 if scope == "cp" else r // strat.row_size
    q, k, v, dout = random_qkv(H, H_kv, seq_len, seed if scope == "cp" else seed + 1000 * (row + 1), B, D)
    doc = _rows_for(scope, row, seq_len, use_docs)
    run = run_and_compare(strat, f"{name}, scope {scope}, row_size {strat.row_size}", q, k, v, dout, doc, dtype,
                          causal=causal, scale=extra.get("softmax_scale"), window=window)
    check_cad(run, seq_len)
    p = strat._cache.plan
    my_pairs = int(run.mask[:, strat.token_index(seq_len)].sum())
    return {"pairs_owned": my_pairs, "pairs_computed": p.loads_after[r], "moves": p.moves,
            "total_pairs": sum(p.loads_after), "imb": (p.imbalance_before, p.imbalance_after),
            "tol": strat.tolerance}


# ---------------------------------------------------------------------------
# bodies run in each gloo process
# ---------------------------------------------------------------------------


def _body(rank, world, seq_len):
    import torch.distributed as dist

    report = {}
    for scope in ("cp", "dp"):
        for case in CASES:
            strat = build_strategy("cad", backend="torch", scope=scope, **case[6])
            assert (strat.cp_size, strat.cp_rank) == (world, rank)
            res = check_cad_case(strat, case, seq_len)
            # the group's totals, gathered on every rank
            t = torch.tensor([res["pairs_owned"], res["pairs_computed"]], dtype=torch.int64)
            dist.all_reduce(t)
            assert int(t[0]) == int(t[1]) == res["total_pairs"], f"{scope} {case[0]}: pairs not conserved {t}"
            report[(scope, case[0])] = res
        if world == 2:  # a sliding window: balanced by windowed pair counts, exact
            strat = build_strategy("cad", backend="torch", scope=scope, min_shard_tokens=1, tolerance=0.0)
            res = check_cad_case(strat, CASES[4], seq_len, window=5)
            assert res["imb"][1] <= res["imb"][0] and (res["moves"] > 0 or res["imb"][0] < 1.1), res
    if world == 4:
        # scope dp on a dp 2 x cp 2 mesh: ranks {0, 1} share one row, {2, 3} another
        for case in (CASES[0], CASES[1], CASES[4], CASES[7]):
            strat = build_strategy("cad", backend="torch", scope="dp", row_size=2, **case[6])
            assert (strat.cp_size, strat.layout.cp_size, strat.layout.cp_rank) == (4, 2, rank % 2)
            res = check_cad_case(strat, case, seq_len)
            t = torch.tensor([res["pairs_owned"], res["pairs_computed"]], dtype=torch.int64)
            dist.all_reduce(t)
            assert int(t[0]) == int(t[1]) == res["total_pairs"]
            report[("dp_rows2", case[0])] = res
    # The plan is reused when nothing changed (all layers of a step), and redone otherwise.
    strat = build_strategy("cad", backend="torch", scope="cp", min_shard_tokens=1)
    case = CASES[0]
    check_cad_case(strat, case, seq_len)
    first = strat._cache
    check_cad_case(strat, case, seq_len)
    assert strat._cache is first and strat.last_stats["plan_cached"] == 1
    check_cad_case(strat, CASES[1], seq_len)
    assert strat._cache is not first and strat.last_stats["plan_cached"] == 0
    # dp scope where only one rank's doc ids change: every rank must re-plan.
    strat = build_strategy("cad", backend="torch", scope="dp", min_shard_tokens=1)
    B, H, D = 1, 2, 4
    qkv = [torch.randn(B, seq_len, H, D, dtype=torch.float64) for _ in range(3)]
    d1 = torch.zeros(B, seq_len, dtype=torch.int64)
    strat.attention(*qkv, doc_ids=d1)
    d2 = d1.clone()
    if rank == 1:
        d2[:, seq_len // 2:] = 1
    strat.attention(*qkv, doc_ids=d2)
    assert strat.last_stats["plan_cached"] == 0
    return report


def _check_report(reports, world):
    """Planner outcome of each case: fine-grained cases end within tolerance (tiny rows:
    one token is a few % of a server's work, hence the 0.05 floor), and work moved
    wherever the in-place imbalance was clearly above it."""
    options = {c[0]: c[6] for c in CASES}
    for (scope, name), res in reports[0].items():
        before, after = res["imb"]
        assert after <= before + 1e-12
        if options[name].get("min_shard_tokens", 128) <= 2:
            assert after <= 1 + max(res["tol"], 0.05) + 1e-9, (scope, name, res)
            if before > 1.1:
                assert res["moves"] > 0, (scope, name, res)


@pytest.mark.distributed
def test_cad_world2():
    """All cases, both scopes, cp/dp groups of 2 (S=24): exact out/dq/dk/dv, bytes, FLOPs, caching."""
    reports = run_distributed(_body, 2, 24, timeout=150)
    _check_report(reports, 2)


@pytest.mark.distributed
def test_cad_world4_and_model_step():
    """All cases, both scopes, groups of 4 (S=32); then a model step with cad equals the unsplit one."""
    reports = run_distributed(_body_world4, 4, 32, timeout=200)
    _check_report([r["cases"] for r in reports], 4)


def _body_world4(rank, world, seq_len):
    cases = _body(rank, world, seq_len)
    _model_step(rank, world)
    return {"cases": cases}


def _model_step(rank, world):
    """A tiny Transformer: cad (scope cp over all ranks, then scope dp) gives the single-device
    loss and parameter gradients."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from longctx.config import ModelConfig
    from longctx.models.llama import Transformer

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, attention_backend="torch")
    S = 32
    g = torch.Generator().manual_seed(7)
    ids_all = torch.randint(0, 50, (world, 1, S), generator=g)
    docs_all = torch.stack([doc_ids_from_lengths([[3, 20, 9], [S], [4] * 8, [12, 20]][i % 4:i % 4 + 1])
                            for i in range(world)])
    pos_all = torch.stack([torch.cat([torch.arange(n) for n in torch.unique_consecutive(d[0], return_counts=True)[1]])
                           [None] for d in docs_all])
    labels_all = torch.roll(ids_all, -1, dims=2)

    def build():
        torch.manual_seed(0)
        return Transformer(cfg, 50).double()

    def ref_grads(row):
        m = build()
        logits = m(ids_all[row], pos_all[row], docs_all[row])
        loss = F.cross_entropy(logits.flatten(0, 1), labels_all[row].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    # scope cp: row 0 sharded over all ranks; local loss = local token losses / all tokens
    m = build()
    strat = build_strategy("cad", backend="torch", scope="cp", min_shard_tokens=1)
    m.set_attention(lambda q, k, v, d, w=None: strat.attention(q, k, v, doc_ids=d, causal=True, window=w))
    sh = lambda t: strat.shard(t, dim=1)  # noqa: E731
    logits = m(sh(ids_all[0]), sh(pos_all[0]), sh(docs_all[0]))
    loss = F.cross_entropy(logits.flatten(0, 1), sh(labels_all[0]).flatten(), reduction="sum") / S
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    want_loss, want = ref_grads(0)
    torch.testing.assert_close(total, want_loss, rtol=1e-10, atol=1e-12)
    for n, p in m.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, want[n], rtol=1e-8, atol=1e-12, msg=lambda s: f"cp grad {n}: {s}")
    assert strat.last_stats["moved_pairs_frac"] > 0

    # scope dp: rank r trains on its own row r; attention tasks move between ranks
    m = build()
    strat = build_strategy("cad", backend="torch", scope="dp", min_shard_tokens=1, tolerance=0.0)
    m.set_attention(lambda q, k, v, d, w=None: strat.attention(q, k, v, doc_ids=d, causal=True, window=w))
    logits = m(ids_all[rank], pos_all[rank], docs_all[rank])
    loss = F.cross_entropy(logits.flatten(0, 1), labels_all[rank].flatten())
    loss.backward()
    want_loss, want = ref_grads(rank)
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-10, atol=1e-12)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-8, atol=1e-12, msg=lambda s: f"dp grad {n}: {s}")
    assert strat.last_stats["imbalance_after"] < strat.last_stats["imbalance_before"]
    assert strat.last_stats["moved_pairs_frac"] > 0


# ---------------------------------------------------------------------------
# planner properties (no processes)
# ---------------------------------------------------------------------------


def long_tailed_rows(n_ranks, seq_len, dist, seed):
    """Packed rows: document lengths from a lognormal or Pareto law, last one cut to fit."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_ranks):
        lengths, total = [], 0
        while total < seq_len:
            if dist == "lognormal":
                x = rng.lognormvariate(math.log(seq_len / 32), 1.8)
            else:
                x = (seq_len / 128) * rng.paretovariate(1.1)
            n = max(1, min(int(x), seq_len - total))
            lengths.append(n)
            total += n
        rows.append(lengths)
    return rows


def _signature(p):
    return [(t.doc.key, t.a, t.b, t.server, t.nano) for t in p.tasks]


def _check_plan(p, docs, N, tol, causal=True):
    # every query token in exactly one task; tasks inside their run
    by_doc = {}
    for t in p.tasks:
        assert t.run.doc_start <= t.a < t.b <= t.run.doc_end, t
        assert 0 <= t.server < N and t.nano in range(p.nanos)
        by_doc.setdefault(t.doc.key, []).append((t.a, t.b))
    assert set(by_doc) == {d.key for d in docs}
    for d in docs:
        spans = sorted(by_doc[d.key])
        assert spans[0][0] == 0 and spans[-1][1] == d.length, (d, spans[:3])
        assert all(x[1] == y[0] for x, y in zip(spans, spans[1:])), f"doc {d.key}: gap or overlap"
    # FLOPs conserved, loads consistent
    total = sum(pairs_in(0, d.length, d.length, causal) for d in docs)
    assert sum(p.loads_before) == sum(p.loads_after) == sum(t.pairs for t in p.tasks) == total
    loads = [0] * N
    for t in p.tasks:
        assert t.pairs == pairs_in(t.a, t.b, t.doc.length, causal)
        loads[t.server] += t.pairs
    assert loads == p.loads_after
    assert p.imbalance_after <= 1 + tol + 1e-9, (p.imbalance_before, p.imbalance_after)
    sent, recv = p.traffic()
    assert sum(sent) == sum(recv)


@pytest.mark.parametrize("dist", ["lognormal", "pareto"])
@pytest.mark.parametrize("N,seq_len", [(8, 32768), (64, 16384)])
def test_planner_properties_dp(dist, N, seq_len):
    tol = 0.05
    for seed in range(3):
        rows = long_tailed_rows(N, seq_len, dist, seed)
        docs = docs_from_lengths(rows)
        p = plan(docs, N, cost=COST, tolerance=tol, max_shard_tokens=2048, min_shard_tokens=16)
        _check_plan(p, docs, N, tol)
        # deterministic: same input, same plan (fresh documents too)
        p2 = plan(docs_from_lengths(rows), N, cost=COST, tolerance=tol, max_shard_tokens=2048, min_shard_tokens=16)
        assert _signature(p2) == _signature(p)
        # nano-batches hold about half of each server's work each
        for s in range(N):
            halves = [sum(t.pairs for t in p.tasks if t.server == s and t.nano == n) for n in (0, 1)]
            biggest = max((t.pairs for t in p.tasks if t.server == s), default=0)
            assert abs(halves[0] - halves[1]) <= biggest + 16 * seq_len


@pytest.mark.parametrize("causal", [True, False])
def test_planner_properties_cp_scope(causal):
    """Documents spanning ranks (scope cp), from doc ids through run-length encoding."""
    N, S_local = 8, 1024
    rng = random.Random(5)
    lengths, total = [], 0
    while total < N * S_local:
        n = min(N * S_local - total, max(1, int(rng.paretovariate(1.2) * 200)))
        lengths.append(n)
        total += n
    full = doc_ids_from_lengths([lengths])
    runs = [local_runs(full[:, r * S_local:(r + 1) * S_local], 1, S_local).tolist() for r in range(N)]
    docs = docs_from_runs(runs, [S_local] * N, row_size=N)
    assert sorted(d.length for d in docs) == sorted(lengths)
    p = plan(docs, N, causal=causal, cost=COST, tolerance=0.05, max_shard_tokens=256, min_shard_tokens=8)
    _check_plan(p, docs, N, 0.05, causal)
    if causal:
        assert p.imbalance_before > 1.3 and p.moves > 0
    assert _signature(plan(docs, N, causal=causal, cost=COST, tolerance=0.05, max_shard_tokens=256,
                           min_shard_tokens=8)) == _signature(p)


def test_local_runs_and_interleaved_documents():
    doc = torch.tensor([[0, 0, 1, 1, 0, 0], [2, 2, 2, 2, 2, 2]])
    runs = local_runs(doc, 2, 6)
    assert runs.tolist() == [[0, 0, 2, 0], [0, 2, 2, 1], [0, 4, 2, 0], [1, 0, 6, 2]]
    docs = docs_from_runs([runs.tolist()], [6], row_size=1)
    assert [(d.length, len(d.runs)) for d in docs] == [(4, 2), (2, 1), (6, 1)]
    assert local_runs(None, 2, 5).tolist() == [[0, 0, 5, 0], [1, 0, 5, 0]]


def test_single_process_cad_is_exact_and_options_are_checked():
    """Without torch.distributed: one server, exact, no traffic; bad options are refused."""
    strat = build_strategy("cad", backend="torch", min_shard_tokens=1)
    assert (strat.group, strat.cp_size, strat.cp_rank) == (None, 1, 0)
    for case in CASES[:4]:
        check_cad_case(strat, case, 24)
        assert strat.last_stats["bytes_sent"] == strat.last_stats["bytes_recv"] == 0
    dp = build_strategy("cad", scope="dp")
    x = torch.randn(2, 10, 3)
    assert dp.shard(x) is x and dp.unshard(x) is x and torch.equal(dp.token_index(10), torch.arange(10))
    with pytest.raises(ValueError, match="scope"):
        build_strategy("cad", scope="tp")
    with pytest.raises(ValueError, match="tolerance"):
        build_strategy("cad", tolerance=-1)
    with pytest.raises(ValueError, match="max_shard_tokens"):
        build_strategy("cad", max_shard_tokens=0)
    with pytest.raises(ValueError, match="unknown option"):
        build_strategy("cad", chunk=3)
    with pytest.raises(ValueError, match="row_size"):
        build_strategy("cad", scope="cp", row_size=2)
    with pytest.raises(ValueError, match="row_size"):
        build_strategy("cad", scope="dp", row_size=2)  # does not divide a group of 1
