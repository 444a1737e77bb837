"""Gated memory modules (Titans linear/MLP, GSA, gated FIFO) and hybrid models.

Bound: every comparison below is a relative RMSE, ||a - b||_2 / ||b||_2, at fp32, and must be
below REL = 1e-4 (measured values are around 1e-7..2e-5). Compared: outputs and the gradients
of the input and of *every* parameter (projections, gate weights and biases, initial memory,
norms), for the fast chunk-parallel path against the naive token loop (`reference`), and
for context-parallel runs (2 and 4 gloo ranks) against one rank.
"""

from __future__ import annotations

import pytest
import torch

try:
    from distributed_utils import run_distributed
except ImportError:  # pragma: no cover
    from tests.distributed_utils import run_distributed

from longctx.config import ModelConfig
from longctx.models.memory import MEMORY_MODULES, MemoryConfig, build_memory
from longctx.models.memory.hybrid import build_hybrid_model, sliding_window_attention

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
        m = make(case)
        xl = x[:, sl].clone().requires_grad_()
        y = m(xl, doc[:, sl], group=dist.group.WORLD)
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


# ----------------------------------------------------------------------------- hybrid models


def test_sliding_window_attention_matches_dense_mask():
    torch.manual_seed(0)
    B, S, H, Hkv, D = 2, 45, 4, 2, 8
    q, k, v = torch.randn(B, S, H, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    doc = packed_docs(B, S, [[10, 35], [S]])
    pos = torch.stack([torch.cat([torch.arange(10), torch.arange(35)]), torch.arange(S)])
    i = torch.arange(S)
    for window in (1, 5, 16, 100):
        out = sliding_window_attention(q, k, v, pos, doc, window, block=7)
        mask = (doc[:, :, None] == doc[:, None, :]) & (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
            attn_mask=mask[:, None]).transpose(1, 2)
        assert (out - ref).abs().max() < 1e-5


def _tiny_cfg(n_layers=3):
    return ModelConfig(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2)


@pytest.mark.parametrize("mtype", MEMORY_MODULES)
def test_hybrid_model_forward_backward_all_variants(mtype):
    for variant in ("mac", "mag", "mal"):
        torch.manual_seed(0)
        model = build_hybrid_model(_tiny_cfg(), 40, {"type": mtype, "variant": variant, "layers": [1],
                                                     "chunk_size": 8, "window": 6, "swa_layers": [0]})
        assert model.layer_kinds() == ["swa", variant, "attn"]
        ids = torch.randint(0, 40, (2, 27))
        doc = packed_docs(2, 27, [[11, 16], [27]])
        pos = torch.stack([torch.cat([torch.arange(11), torch.arange(16)]), torch.arange(27)])
        logits = model(ids, pos, doc)
        assert logits.shape == (2, 27, 40)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        # memory layer gets gradient
        mem = model.layers[1].memory
        assert any(p.grad.abs().sum() > 0 for p in mem.parameters())


def test_hybrid_plain_config_is_a_transformer():
    model = build_hybrid_model(_tiny_cfg(2), 40, None)
    assert model.layer_kinds() == ["attn", "attn"]
    assert model.seq_multiple(2) == 4
    hm = build_hybrid_model(_tiny_cfg(2), 40, {"type": "titans", "layers": [-1], "chunk_size": 16})
    assert hm.seq_multiple(2) == 32 and hm.layer_kinds() == ["attn", "mal"]


HYBRID_CP = [("titans", "mac", {"memory": "linear"}), ("gsa", "mag", {}), ("fifo", "mal", {"num_slots": 2}),
             ("titans", "mal", {"memory": "mlp"})]


def _hybrid_model(spec):
    mtype, variant, opts = spec
    torch.manual_seed(0)
    return build_hybrid_model(_tiny_cfg(), 40, {"type": mtype, "variant": variant, "layers": [1], "chunk_size": 8,
                                                "window": 12, "swa_layers": [0], "options": opts})


def _hybrid_batch(S):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 40, (2, S), generator=g)
    doc = packed_docs(2, S, [[7, S // 2 - 7, S], [S]])
    pos = torch.zeros_like(doc)
    for b in range(2):
        for t in range(1, S):
            pos[b, t] = pos[b, t - 1] + 1 if doc[b, t] == doc[b, t - 1] else 0
    labels = torch.where(torch.cat([doc[:, 1:] == doc[:, :-1], torch.zeros(2, 1, dtype=torch.bool)], 1),
                         ids.roll(-1, 1), torch.full_like(ids, -100))
    return ids, pos, doc, labels


def _hybrid_loss(model, ids, pos, doc, labels, n_valid):
    logits = model(ids, pos, doc)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                             reduction="sum") / n_valid


def _body_hybrid_cp(rank, world, S):
    import torch.distributed as dist

    from longctx.parallel import build_strategy

    strategy = build_strategy("ring", group=dist.group.WORLD, backend="torch")
    out = []
    for spec in HYBRID_CP:
        model = _hybrid_model(spec)
        model.set_attention(lambda q, k, v, d: strategy.attention(q, k, v, doc_ids=d, causal=True))
        model.set_cp_group(dist.group.WORLD, strategy.layout)
        if spec is HYBRID_CP[0]:
            with pytest.raises(ValueError, match="contiguous CP layout"):
                model.set_cp_group(dist.group.WORLD, build_strategy("zigzag", group=dist.group.WORLD).layout)
        ids, pos, doc, labels = (strategy.shard(t, dim=1).contiguous() for t in _hybrid_batch(S))
        n_valid = (_hybrid_batch(S)[3] != -100).sum()
        loss = _hybrid_loss(model, ids, pos, doc, labels, n_valid)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        out.append((total, {n: p.grad.clone() for n, p in model.named_parameters()}))
    return out


@pytest.mark.distributed
def test_hybrid_model_cp2_equals_cp1():
    """Full attention through the ring strategy, sliding-window halos, and memory state
    passing together: loss and every gradient with cp=2 equal cp=1."""
    S = 32
    outs = run_distributed(_body_hybrid_cp, 2, S, timeout=240)
    for i, spec in enumerate(HYBRID_CP):
        model = _hybrid_model(spec)
        ids, pos, doc, labels = _hybrid_batch(S)
        loss = _hybrid_loss(model, ids, pos, doc, labels, (labels != -100).sum())
        loss.backward()
        assert abs(outs[0][i][0].item() - loss.item()) < 1e-5 * max(1.0, abs(loss.item())), spec
        for n, p in model.named_parameters():
            g = sum(o[i][1][n] for o in outs)
            assert rel(g, p.grad) < REL, (spec, n, rel(g, p.grad))


@pytest.mark.parametrize("mtype", MEMORY_MODULES)
def test_hybrid_model_bf16_autocast_and_bf16_weights(mtype):
    # under autocast the memory receives bf16 activations with fp32 weights; a bf16 model has
    # bf16 weights: the recurrences run in fp32 either way
    cfg = _tiny_cfg()
    spec = {"type": mtype, "variant": "mal", "layers": [1], "chunk_size": 8, "window": 6}
    ids = torch.randint(0, 40, (1, 24))
    pos = torch.arange(24)[None]
    model = build_hybrid_model(cfg, 40, spec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, pos, None)
    out.float().sum().backward()
    model16 = build_hybrid_model(cfg, 40, spec).to(torch.bfloat16)
    out16 = model16(ids, pos, None)
    out16.float().sum().backward()
    assert out.dtype == out16.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all() and torch.isfinite(out16.float()).all()
