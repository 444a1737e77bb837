"""Ring attention, contiguous layout, mesh and strategy factory.

Distributed checks run in gloo processes on CPU, grouped into one spawn per
world size to keep the file fast. Exactness is checked against a naive dense
fp64 softmax written here (independent of longctx.kernels):

- fp64 inputs: atol = rtol = 1e-10
- fp32 inputs: atol = rtol = 1e-5 (reference still computed in fp64)
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

from longctx.parallel import STRATEGIES, build_mesh, build_strategy

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


# ---------------------------------------------------------------------------
# reference and case definitions
# ---------------------------------------------------------------------------


# Document lengths that do not line up with shard boundaries (shards are
# 12 tokens for S=24 / cp=2 and 8 tokens for S=32 / cp=4 or S=16 / cp=2).
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


def _noncontiguous(t):
    """Same values and shape, non-contiguous strides ([B, S, H, D] stored as [B, H, S, D])."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def check_ring_case(strat, case, seq_len, seed=0, B=2, D=8):
    """Run one case on `strat`'s group; compare out and local dq/dk/dv to the dense reference."""
    name, H, H_kv, causal, use_docs, dtype, extra = case
    scale = extra.get("softmax_scale")
    N, r = strat.cp_size, strat.cp_rank
    g = torch.Generator().manual_seed(seed)  # same full tensors on every rank of the group
    q = torch.randn(B, seq_len, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, seq_len, H_kv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, seq_len, H_kv, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, seq_len, H, D, generator=g, dtype=torch.float64)
    doc = doc_ids_from_lengths(DOCS[seq_len]) if use_docs else None

    # fp64 reference on the full row.
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out_ref, mask = reference_attention(qr, kr, vr, doc, causal, scale)
    out_ref.backward(dout)

    # Local shards in the tested dtype, as leaves.
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
    where = f"case {name}, cp={N}, rank {r}"

    def close(got, ref, what):  # keep torch's mismatch details after our prefix
        torch.testing.assert_close(got.double(), ref, **tol, msg=lambda details: f"{where}: {what}\n{details}")

    assert out.dtype == dtype and ql.grad.dtype == dtype and kl.grad.dtype == dtype
    close(out, strat.shard(out_ref.detach()), "out")
    close(strat.unshard(out.detach()), out_ref.detach(), "unshard(out)")
    for what, got, ref in (("dq", ql.grad, qr.grad), ("dk", kl.grad, kr.grad), ("dv", vl.grad, vr.grad)):
        close(got, strat.shard(ref), what)

    # Communication: forward sends N-1 blocks of local K + V (+ doc ids);
    # backward sends the same plus N hops of dK + dV accumulators (fp32, fp64
    # for fp64 inputs) so that they end at their owner.
    kv_bytes = 2 * kl.numel() * kl.element_size()
    doc_bytes = docl.numel() * docl.element_size() if docl is not None else 0
    acc_size = 8 if dtype == torch.float64 else 4
    fwd = (N - 1) * (kv_bytes + doc_bytes)
    bwd = (N - 1) * (kv_bytes + doc_bytes) + (N * 2 * kl.numel() * acc_size if N > 1 else 0)
    assert fwd_stats["fwd_bytes_sent"] == fwd_stats["bytes_sent"] == fwd, f"{where}: fwd bytes {fwd_stats}"
    assert stats["fwd_bytes_sent"] == stats["fwd_bytes_recv"] == fwd, f"{where}: fwd bytes {stats}"
    assert stats["bwd_bytes_sent"] == stats["bwd_bytes_recv"] == bwd, f"{where}: bwd bytes {stats}"
    assert stats["bytes_sent"] == stats["bytes_recv"] == fwd + bwd, f"{where}: bytes {stats}"

    # FLOPs: the visible pairs of this rank's query rows, counted from the dense mask.
    rows = strat.token_index(seq_len)
    pairs = int(mask[:, rows].sum())
    assert stats["attn_flops_fwd"] == 4 * B * H * D * pairs, f"{where}: flops {stats}"
    assert stats["attn_flops_bwd"] == 2.5 * stats["attn_flops_fwd"], f"{where}: flops {stats}"
    assert stats["attn_flops"] == 3.5 * stats["attn_flops_fwd"], f"{where}: flops {stats}"
    # Contiguous + causal: blocks of later ranks are skipped.
    assert stats["steps"] == N
    assert stats["blocks_computed"] == (r + 1 if causal else N), f"{where}: blocks {stats}"
    return stats


def check_layout(strat, seq_len):
    N, r = strat.cp_size, strat.cp_rank
    n = seq_len // N
    assert torch.equal(strat.token_index(seq_len), torch.arange(r * n, (r + 1) * n))
    assert strat.token_index(seq_len).dtype == torch.int64
    for o in range(N):
        assert torch.equal(strat.token_index(seq_len, o), torch.arange(o * n, (o + 1) * n))
    full = torch.arange(3 * seq_len * 5, dtype=torch.float32).reshape(3, seq_len, 5)
    local = strat.shard(full, dim=1)
    assert local.is_contiguous() and torch.equal(local, full[:, r * n : (r + 1) * n])
    assert torch.equal(strat.unshard(local, dim=1), full)
    # Other dims and dtypes: sequence first, int64 doc ids, negative dim.
    ids = torch.arange(seq_len * 2).reshape(seq_len, 2)
    assert torch.equal(strat.unshard(strat.shard(ids, dim=0), dim=0), ids)
    assert torch.equal(strat.unshard(strat.shard(full, dim=-2), dim=-2), full)
    if N > 1:
        with pytest.raises(ValueError, match="not divisible"):
            strat.shard(torch.zeros(1, N * 3 + 1), dim=1)


# ---------------------------------------------------------------------------
# bodies run in each gloo process
# ---------------------------------------------------------------------------


def _body_world(rank, world, seq_len):
    strat = build_strategy("ring", backend="torch")
    assert (strat.cp_size, strat.cp_rank) == (world, rank)
    check_layout(strat, seq_len)
    for case in CASES:
        check_ring_case(strat, case, seq_len)
    return True


def _body_world4(rank, world, seq_len):
    _body_world(rank, world, seq_len)
    _check_mesh4(rank, world)
    return True


def _check_mesh4(rank, world):
    assert world == 4
    with pytest.raises(ValueError, match=r"parallel.cp=3 does not divide the 4 workers"):
        build_mesh(3)

    mesh = build_mesh(2)
    assert (mesh.world_size, mesh.rank, mesh.dp_size, mesh.cp_size) == (4, rank, 2, 2)
    assert (mesh.dp_rank, mesh.cp_rank) == (rank // 2, rank % 2)
    assert (mesh.data_rank, mesh.data_world) == (rank // 2, 2)
    assert mesh.is_logging_rank == (rank == 0)
    assert mesh.loss_scale_for_grad_reduction == 2
    # cp groups are consecutive ranks; dp groups share a cp_rank.
    assert dist.get_process_group_ranks(mesh.cp_group) == [2 * (rank // 2), 2 * (rank // 2) + 1]
    assert dist.get_process_group_ranks(mesh.dp_group) == [rank % 2, rank % 2 + 2]
    assert dist.get_world_size(mesh.grad_group) == 4
    # The groups really connect those ranks.
    t = torch.tensor([rank])
    dist.all_reduce(t, group=mesh.cp_group)
    assert int(t) == sum(mesh.cp_ranks())
    t = torch.tensor([rank])
    dist.all_reduce(t, group=mesh.dp_group)
    assert int(t) == sum(mesh.dp_ranks())

    # Ring over a sub-group: peers are addressed by global rank. Each dp
    # group attends over its own data (seed = dp_rank).
    strat = build_strategy("ring", group=mesh.cp_group, backend="torch")
    assert (strat.cp_size, strat.cp_rank) == (2, rank % 2)
    check_layout(strat, 16)
    for case in (CASES[2], CASES[4]):
        check_ring_case(strat, case, 16, seed=mesh.dp_rank)

    whole = build_mesh(4)
    assert (whole.dp_size, whole.cp_size, whole.cp_rank, whole.dp_rank) == (1, 4, rank, 0)


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


@pytest.mark.distributed
def test_ring_world2():
    """Layout + all ring cases (outputs, grads, bytes, FLOPs) with cp=2, S=24."""
    run_distributed(_body_world, 2, 24, timeout=120)


@pytest.mark.distributed
def test_ring_world4_and_mesh():
    """All ring cases with cp=4 (S=32), then the dp x cp mesh and ring on its cp sub-groups."""
    run_distributed(_body_world4, 4, 32, timeout=180)


def test_single_device_ring_is_local_kernel():
    """Without torch.distributed: cp_size 1, exact, no communication."""
    strat = build_strategy("ring")
    assert (strat.group, strat.cp_size, strat.cp_rank) == (None, 1, 0)
    check_layout(strat, 12)
    for case in CASES:
        stats = check_ring_case(strat, case, 16)
        assert stats["bytes_sent"] == stats["bytes_recv"] == 0


def test_trivial_mesh_without_dist():
    mesh = build_mesh(1)
    assert (mesh.world_size, mesh.rank, mesh.dp_size, mesh.cp_size) == (1, 0, 1, 1)
    assert (mesh.dp_rank, mesh.cp_rank, mesh.data_rank, mesh.data_world) == (0, 0, 0, 1)
    assert mesh.is_logging_rank and mesh.loss_scale_for_grad_reduction == 1
    assert mesh.cp_group is None and mesh.dp_group is None and mesh.grad_group is None
    with pytest.raises(ValueError, match="parallel.cp=2"):
        build_mesh(2)


def test_strategy_names(monkeypatch):
    assert STRATEGIES == ("ring", "zigzag", "striped", "burst", "ulysses", "hybrid", "cad")
    with pytest.raises(ValueError, match="did you mean 'ring'"):
        build_strategy("rnig")
    with pytest.raises(ValueError, match="did you mean 'ulysses'"):
        build_strategy("ulyses")
    with pytest.raises(ValueError, match="unknown CP strategy 'nonsense'"):
        build_strategy("nonsense")
    # In the contract but not built (simulated by hiding a registered one): say what is available.
    from longctx.parallel import strategy as strategy_mod

    monkeypatch.delitem(strategy_mod._implemented(), "zigzag")
    with pytest.raises(ValueError, match="'zigzag' is not available in this version; available: ring"):
        build_strategy("zigzag")
    with pytest.raises(ValueError, match="unknown option"):
        build_strategy("ring", chunk=4)
