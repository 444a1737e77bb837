"""Gated memory modules (Titans linear/MLP, GSA, gated FIFO) and their ops (`longctx.kernels.memory`).

Bound: every comparison below is a relative RMSE, ||a - b||_2 / ||b||_2, at fp32, and must be
below REL = 1e-4 (measured values are around 1e-7..2e-5). Compared: outputs and the gradients
of the input and of *every* parameter (projections, gate weights and biases, initial memory,
norms), for the fast chunk-parallel path against the naive token loop (`reference`), and
for context-parallel runs (2 and 4 gloo ranks) against one rank. The ops themselves
(chunk vs naive with initial and final states, a sequence split in two, the affine maps) are
compared in fp64 at 1e-9.
"""

from __future__ import annotations

import pytest
import torch

try:
    from distributed_utils import run_distributed
except ImportError:  # pragma: no cover
    from tests.distributed_utils import run_distributed

import math

import torch.nn.functional as F

from longctx.kernels.memory import (FIFOWeights, GSAChunks, TitansLinearChunks, chunk_fifo, chunk_gsa,
                                    chunk_titans_linear, chunk_titans_mlp, naive_fifo, naive_gsa, naive_titans)
from longctx.models.memory import MEMORY_MODULES, LocalStatePassing, MemoryConfig, build_memory
from longctx.parallel import context_parallel_memory

REL = 1e-4
DIM, HEADS = 16, 2

# name, options, chunk size
CASES = {
    "titans-linear": ("titans", {"memory": "linear"}, 8),
    "titans-mlp": ("titans", {"memory": "mlp"}, 8),
    "gsa": ("gsa", {"num_slots": 6}, 8),
    "fifo": ("fifo", {"num_slots": 3}, 4),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def make(case: str, seed: int = 0, **extra):
    name, opts, chunk = CASES[case]
    torch.manual_seed(seed)
    m = build_memory(name, DIM, HEADS, chunk_size=chunk, **{**opts, **extra})
    if name == "titans" and opts["memory"] == "linear":
        with torch.no_grad():  # a non-zero initial memory, so resets are visible
            m.w_init.normal_(std=0.5)
    return m


def packed_docs(B: int, S: int, lengths) -> torch.Tensor:
    out = []
    for row in lengths:
        ids = []
        for d, n in enumerate(row):
            ids += [d] * n
        ids = (ids + [len(row) - 1] * S)[:S]
        out.append(ids)
    return torch.tensor(out[:B])


def grads(m, x, y, w):
    params = [x] + [p for p in m.parameters()]
    return torch.autograd.grad((y * w).sum(), params, allow_unused=True)


def assert_close_all(m, x, doc, **kw):
    y_fast = m(x, doc, **kw)
    y_ref = m.reference(x, doc, **kw)
    w = torch.randn_like(y_ref)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    errs = {"out": rel(y_fast, y_ref)}
    for n, a, b in zip(names, grads(m, x, y_fast, w), grads(m, x, y_ref, w)):
        assert (a is None) == (b is None), n
        if b is not None:
            errs[n] = rel(a, b)
    bad = {k: v for k, v in errs.items() if not v < REL}
    assert not bad, f"relative RMSE above {REL}: {bad}"
    return errs


# ----------------------------------------------------------------------------- fast vs reference


@pytest.mark.parametrize("case", list(CASES))
def test_fast_matches_reference_packed_odd_length(case):
    # odd length, not a multiple of the chunk, packed documents (one starting mid-chunk,
    # one on a chunk boundary, a one-token document), batch rows with different packing
    m = make(case)
    S = 29
    torch.manual_seed(1)
    x = torch.randn(2, S, DIM, requires_grad=True)
    doc = packed_docs(2, S, [[3, 5, 1, 12, 8], [S]])
    assert_close_all(m, x, doc)


@pytest.mark.parametrize("case", ["titans-linear", "gsa"])
def test_fast_matches_reference_without_docs_and_short(case):
    m = make(case)
    for S in (1, 7, 16):
        x = torch.randn(1, S, DIM, requires_grad=True)
        assert_close_all(m, x, None)


@pytest.mark.parametrize("case", ["titans-linear", "titans-mlp", "gsa"])
def test_chunk_start_retrieval_matches_reference(case):
    m = make(case)
    x = torch.randn(2, 21, DIM, requires_grad=True)
    doc = packed_docs(2, 21, [[5, 16], [2, 2, 17]])
    assert_close_all(m, x, doc, retrieve="chunk_start")


@pytest.mark.parametrize("setting", [
    ("titans-linear", dict(theta_bias=12.0, alpha_bias=-12.0, eta_bias=-12.0)),  # theta->1, no forget, no momentum
    ("titans-linear", dict(theta_bias=-12.0, alpha_bias=12.0, eta_bias=12.0)),   # forget all, full momentum
    ("titans-mlp", dict(theta_bias=-12.0, alpha_bias=-12.0, eta_bias=12.0)),     # eta->1, tiny steps
    ("titans-mlp", dict(theta_bias=3.0, alpha_bias=12.0, eta_bias=-12.0)),
])
def test_titans_extreme_gates(setting):
    case, biases = setting
    m = make(case, **biases)
    x = torch.randn(2, 19, DIM, requires_grad=True)
    doc = packed_docs(2, 19, [[6, 13], [19]])
    assert_close_all(m, x, doc)


def assert_as_accurate_as_reference(m, x, doc):
    """For ill-conditioned settings where the fp32 reference loop itself is off: fp64 truth.
    The fast path must equal the reference in fp64 (1e-9) and, in fp32, be within REL of the
    truth or no worse than twice the fp32 reference's own error."""
    import copy

    m64 = copy.deepcopy(m).double()
    w = torch.randn(*x.shape[:2], m.dim, dtype=torch.float64)
    x64 = x.detach().double().requires_grad_()
    fast64, ref64 = m64(x64, doc), m64.reference(x64, doc)
    truth = [ref64] + list(grads(m64, x64, ref64, w))
    assert all(rel(a, b) < 1e-9 for a, b in zip([fast64] + list(grads(m64, x64, fast64, w)), truth))
    fast32, ref32 = m(x, doc), m.reference(x, doc)
    f = [fast32] + list(grads(m, x, fast32, w.float()))
    r = [ref32] + list(grads(m, x, ref32, w.float()))
    names = ["out", "x"] + [n for n, _ in m.named_parameters()]
    for n, a, b, t in zip(names, f, r, truth):
        err, ref_err = rel(a.double(), t), rel(b.double(), t)
        assert err < max(REL, 2 * ref_err), (n, err, ref_err)


@pytest.mark.parametrize("bias", [(40.0,), (-40.0,), (-400.0, 40.0)])
def test_gsa_extreme_gates(bias):
    # alpha = sigmoid(bias)^(1/tau): +40: 1 - alpha ~ 1e-18 (keep everything); -40: alpha ~ e^-5
    # per token (factorised intra-chunk GEMMs still safe); (-400, 40) alternating over slots:
    # alpha ~ e^-50 per token on half the slots, the chunk decays past e^-60 and the exact
    # pairwise-decay fallback runs (all slots at -400 would make every slot score equal)
    m = make("gsa")
    with torch.no_grad():
        m.wf.bias.copy_(torch.tensor(bias).repeat(m.wf.bias.numel() // len(bias)))
    x = torch.randn(2, 19, DIM, requires_grad=True)
    doc = packed_docs(2, 19, [[6, 13], [19]])
    y = m(x, doc)
    assert torch.isfinite(y).all()
    if len(bias) == 1:
        assert_close_all(m, x, doc)
    else:  # here the q/k gradients are ill-conditioned in fp32 for both paths (~5e-4 vs fp64)
        assert_as_accurate_as_reference(m, x, doc)


@pytest.mark.parametrize("bias", [30.0, -30.0])
def test_fifo_extreme_gates(bias):
    m = make("fifo", gate_bias=bias)
    x = torch.randn(2, 19, DIM, requires_grad=True)
    doc = packed_docs(2, 19, [[6, 13], [19]])
    assert_close_all(m, x, doc)


def test_doc_reset_isolates_documents():
    # a document's output must not depend on the document before it
    for case in CASES:
        m = make(case)
        x = torch.randn(1, 24, DIM)
        doc = packed_docs(1, 24, [[9, 15]])
        y = m(x, doc)
        y_alone = m(x[:, 9:], None) if CASES[case][0] == "gsa" else None
        x2 = x.clone()
        x2[:, :9] = torch.randn(1, 9, DIM)
        y2 = m(x2, doc)
        assert rel(y2[:, 9:], y[:, 9:]) < 1e-6, case
        if y_alone is not None:
            assert rel(y_alone, y[:, 9:]) < 1e-5


def test_build_memory_contract_and_errors():
    assert MEMORY_MODULES == ("titans", "gsa", "fifo")
    for name in MEMORY_MODULES:
        m = build_memory(name, 8, 2)
        assert m(torch.randn(1, 5, 8)).shape == (1, 5, 8)
    with pytest.raises(ValueError, match="did you mean 'titans'"):
        build_memory("titan", 8, 2)
    with pytest.raises(ValueError, match="unknown option"):
        build_memory("gsa", 8, 2, slots=4)
    with pytest.raises(ValueError, match="memory must be one of"):
        build_memory("titans", 8, 2, memory="deep")
    with pytest.raises(ValueError, match="unknown model.memory key"):
        MemoryConfig.from_any({"type": "gsa", "slots": 3})
    with pytest.raises(ValueError, match="variant"):
        MemoryConfig.from_any({"type": "gsa", "variant": "mxx"})


# ----------------------------------------------------------------------------- the ops


OP_C = 8  # chunk of the op tests (fifo: 4)


def _op(case, seed=0, S=24):
    """(naive, chunk, sequence tensors, seq dim, doc ids, a random initial state) of one op, fp64.
    naive / chunk: fn(seq, doc, **kw) -> (y, final)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    B, H, D, dim, m = 2, 2, 4, 8, 3
    doc = packed_docs(B, S, [[5, S], [S]])
    if case.startswith("titans"):
        seq = [F.normalize(r(B, H, S, D), dim=-1) for _ in range(3)]
        seq += [0.05 * torch.sigmoid(r(B, H, S)), F.logsigmoid(r(B, H, S) - 3),  # theta, log(1 - alpha)
                F.logsigmoid(r(B, H, S)) + math.log(0.5)]  # log eta
        if case == "titans-linear":
            W0 = 0.5 * r(H, D, D)
            state = 0.3 * r(B, H, D, 2 * D)
            naive = lambda seq, doc, **kw: naive_titans(*seq, (W0,), doc, chunk_size=OP_C, **kw)  # noqa: E731
            chunk = lambda seq, doc, **kw: chunk_titans_linear(*seq, W0, doc, chunk_size=OP_C, **kw)  # noqa: E731
        else:
            init = (r(H, 2 * D, D) / D ** 0.5, r(H, D, 2 * D) / (2 * D) ** 0.5)
            state = (0.3 * r(B, H, 2 * D, D), 0.3 * r(B, H, D, 2 * D), 0.1 * r(B, H, 2 * D, D), 0.1 * r(B, H, D, 2 * D))
            naive = lambda seq, doc, **kw: naive_titans(*seq, init, doc, chunk_size=OP_C, **kw)  # noqa: E731
            chunk = lambda seq, doc, **kw: chunk_titans_mlp(*seq, init, doc, chunk_size=OP_C, **kw)  # noqa: E731
        return naive, chunk, seq, 2, doc, state
    if case == "gsa":
        seq = [r(B, H, S, D) for _ in range(3)] + [F.logsigmoid(r(B, H, S, m) + 2.0) / 4]
        naive = lambda seq, doc, **kw: naive_gsa(*seq, doc, chunk_size=OP_C, **kw)  # noqa: E731
        chunk = lambda seq, doc, **kw: chunk_gsa(*seq, doc, chunk_size=OP_C, **kw)  # noqa: E731
        return naive, chunk, seq, 2, doc, r(B, H, 2 * D, m)
    seq = [r(B, S, H, D), r(B, S, dim), r(B, S)]
    s = dim ** -0.5
    w = FIFOWeights(s * r(dim, dim), r(dim), s * r(H * D, dim), s * r(H * D, dim), r(m, H * D))
    tags = torch.tensor([[float("nan"), 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    naive = lambda seq, doc, **kw: naive_fifo(*seq, w, doc, chunk_size=OP_C // 2, **kw)  # noqa: E731
    chunk = lambda seq, doc, **kw: chunk_fifo(*seq, w, doc, chunk_size=OP_C // 2, **kw)  # noqa: E731
    return naive, chunk, seq, 1, doc, (r(B, m, dim), tags)


def _flat(y, state):
    return [y] + ([state] if torch.is_tensor(state) else list(state))


def _assert_same(a, b, tol=1e-9):
    for i, (u, v) in enumerate(zip(a, b)):
        if u.dtype == torch.float64 and torch.isnan(v).any():  # fifo's slot tags
            assert torch.equal(torch.isnan(u), torch.isnan(v)) and torch.equal(u.nan_to_num(-1), v.nan_to_num(-1)), i
        else:
            assert rel(u, v) < tol, (i, rel(u, v))


OP_CASES = ["titans-linear", "titans-mlp", "gsa", "fifo"]
OP_RETRIEVE = [(c, "current") for c in OP_CASES] + [(c, "chunk_start") for c in OP_CASES[:3]]


def _kw(case, retrieve):
    return {} if case == "fifo" else {"retrieve": retrieve}


@pytest.mark.parametrize("S", [24, 21])  # 21: the last chunk is partial (the final state is at token 20)
@pytest.mark.parametrize("case,retrieve", OP_RETRIEVE)
def test_op_chunk_matches_naive_with_initial_and_final_state(case, retrieve, S):
    naive, chunk, seq, _, doc, state = _op(case, S=S)
    kw = _kw(case, retrieve)
    diff = [t for t in (seq + _flat(None, state)[1:]) if t.is_floating_point() and not torch.isnan(t).any()]
    for t in diff:
        t.requires_grad_()
    outs = []
    for fn in (chunk, naive):
        y, final = fn(seq, doc, initial_state=state, output_final_state=True, **kw)
        flat = _flat(y, final)
        assert final is not None and fn(seq, doc, initial_state=state, **kw)[1] is None
        loss = sum((f * torch.cos(torch.arange(f.numel(), dtype=f.dtype)).view(f.shape)).sum()
                   for f in flat if f.requires_grad)
        outs.append([f.detach() for f in flat] + list(torch.autograd.grad(loss, diff, allow_unused=True)))
    assert all((a is None) == (b is None) for a, b in zip(*outs))
    _assert_same(*[[t for t in o if t is not None] for o in outs])


@pytest.mark.parametrize("case,retrieve", OP_RETRIEVE + [("gsa-any", "current")])
def test_op_split_in_two_equals_whole(case, retrieve):
    """The final state of the first part, as the initial state of the second, gives the whole
    sequence's outputs and final state (a split on the chunk grid; GSA: any split)."""
    split = 11 if case == "gsa-any" else 16
    case = case.replace("-any", "")
    naive, chunk, seq, dim, doc, state = _op(case)
    kw = _kw(case, retrieve)
    for fn in (chunk, naive):
        y, final = fn(seq, doc, initial_state=state, output_final_state=True, **kw)
        part = lambda sl: [t.narrow(dim, sl.start, sl.stop - sl.start) for t in seq]  # noqa: E731
        y1, mid = fn(part(slice(0, split)), doc[:, :split], initial_state=state, output_final_state=True, **kw)
        y2, fin2 = fn(part(slice(split, 24)), doc[:, split:], initial_state=mid, output_final_state=True, **kw)
        _assert_same(_flat(torch.cat([y1, y2], dim=dim), fin2), _flat(y, final))


@pytest.mark.parametrize("case", ["titans-linear", "gsa"])
def test_op_affine_map_gives_the_final_state(case):
    """`affine_map()` (from a zero state) maps any initial state to the slice's final state."""
    _, _, seq, _, doc, state = _op(case, S=21)
    if case == "gsa":
        chunks = GSAChunks(*seq, doc, chunk_size=OP_C)
    else:
        chunks = TitansLinearChunks(*seq, 0.5 * torch.randn(2, 4, 4, dtype=torch.float64), doc, chunk_size=OP_C)
    T, Bm = chunks.affine_map()
    final = chunks.output(state, output_final_state=True)[1]
    mapped = (state @ T if T.dim() == state.dim() else state * T[..., None, :]) + Bm
    assert rel(mapped, final) < 1e-9


def test_state_passing_is_handed_to_modules():
    """The default is one rank; `context_parallel_memory` sets it on every memory module of a
    container (with one rank: a no-op state passing); the chunk-alignment check asks it."""
    mods = torch.nn.ModuleList([make("titans-mlp"), torch.nn.Linear(2, 2), make("gsa")])
    assert mods[0].state_passing.world == 1 and isinstance(mods[0].state_passing, LocalStatePassing)
    x = torch.randn(1, 12, DIM)
    y = mods[0](x)
    assert context_parallel_memory(mods) is mods
    assert mods[0].state_passing is mods[2].state_passing and mods[0].state_passing.world == 1
    assert torch.equal(mods[0](x), y)

    class TwoRanks(LocalStatePassing):
        world, rank = 2, 0

    m = make("fifo")
    m.state_passing = TwoRanks()
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        m(torch.randn(1, 6, DIM))
    g = make("gsa")
    g.state_passing = TwoRanks()
    g(torch.randn(1, 6, DIM))  # GSA: any split ...
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        g(torch.randn(1, 6, DIM), retrieve="chunk_start")  # ... but chunk-start reads need the grid


# ----------------------------------------------------------------------------- context parallelism


def _cp_inputs(S, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, S, DIM, generator=g)
    w = torch.randn(2, S, DIM, generator=g)
    # documents crossing rank boundaries, and one starting exactly at S/2 (a boundary for 2 and 4 ranks)
    half = S // 2
    doc = packed_docs(2, S, [[5, half - 5, 3, S], [S]])
    return x, w, doc


def _cp_single(case, S):
    x, w, doc = _cp_inputs(S)
    m = make(case)
    x = x.clone().requires_grad_()
    y = m(x, doc)
    (y * w).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


def _body_cp(rank, world, S, cases):
    import torch.distributed as dist

    results = {}
    L = S // world
    sl = slice(rank * L, (rank + 1) * L)
    for case in cases:
        x, w, doc = _cp_inputs(S)
        m = context_parallel_memory(make(case), dist.group.WORLD)
        xl = x[:, sl].clone().requires_grad_()
        y = m(xl, doc[:, sl])
        (y * w[:, sl]).sum().backward()
        results[case] = (y.detach(), xl.grad, {n: p.grad.clone() for n, p in m.named_parameters()})
    return results


def _check_cp(world, S):
    cases = list(CASES)
    outs = run_distributed(_body_cp, world, S, cases, timeout=240)
    for case in cases:
        y1, gx1, gp1 = _cp_single(case, S)
        y = torch.cat([o[case][0] for o in outs], dim=1)
        gx = torch.cat([o[case][1] for o in outs], dim=1)
        assert rel(y, y1) < REL, (case, "out", rel(y, y1))
        assert rel(gx, gx1) < REL, (case, "x grad", rel(gx, gx1))
        for n, g1 in gp1.items():
            g = sum(o[case][2][n] for o in outs)
            assert rel(g, g1) < REL, (case, n, rel(g, g1))


@pytest.mark.distributed
def test_cp_two_ranks_equal_one_rank():
    _check_cp(2, 48)


@pytest.mark.distributed
def test_cp_four_ranks_equal_one_rank():
    _check_cp(4, 64)


