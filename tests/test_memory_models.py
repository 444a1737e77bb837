"""The one Transformer with sliding-window and gated-memory blocks (MAC / MAG / MAL).

Context parallelism: loss and every parameter gradient at cp=2 equal cp=1 (relative 1e-5:
loss relative difference, gradients relative RMSE ||a - b|| / ||b||) for every memory type x
variant under ring, and for a sliding-window-only model under every strategy. The model is
wired exactly as the trainer wires it (`longctx.parallel.parallelize` step functions).
"""

from __future__ import annotations


import pytest
import torch

from distributed_utils import run_distributed
from longctx.config import MemorySectionConfig, ModelConfig
from longctx.kernels import attention
from longctx.models import estimate
from longctx.models.llama import Transformer
from longctx.models.memory import MEMORY_MODULES, VARIANTS
from longctx.parallel import STRATEGIES
from longctx.parallel.parallelize import row_multiple

REL = 1e-5
VOCAB = 40


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def packed_docs(B: int, S: int, lengths) -> torch.Tensor:
    doc = torch.zeros(B, S, dtype=torch.long)
    for b, lens in enumerate(lengths):
        doc[b] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[:S]
    return doc


def model_cfg(n_layers: int = 3, **memory) -> ModelConfig:
    return ModelConfig(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, memory=MemorySectionConfig(**memory))


def build(n_layers: int = 3, seed: int = 0, **memory) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(model_cfg(n_layers, **memory), VOCAB)


def test_sliding_window_attention_matches_dense_mask():
    """The window is a mask of the kernels: chunked (7-token tiles) against a dense SDPA mask."""
    torch.manual_seed(0)
    B, S, H, Hkv, D = 2, 45, 4, 2, 8
    q, k, v = torch.randn(B, S, H, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    doc = packed_docs(B, S, [[10, 35], [S]])
    i = torch.arange(S)
    for window in (1, 5, 16, 100):
        out = attention(q, k, v, q_doc=doc, k_doc=doc, window=window, backend="torch", q_chunk_size=7,
                        k_chunk_size=7)
        mask = (doc[:, :, None] == doc[:, None, :]) & (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
            attn_mask=mask[:, None]).transpose(1, 2)
        assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("mtype", MEMORY_MODULES)
def test_hybrid_model_forward_backward_all_variants(mtype):
    for variant in VARIANTS:
        model = build(type=mtype, variant=variant, layers=[1], chunk_size=8, window=6, swa_layers=[0])
        assert model.layer_kinds() == ["swa", variant, "attn"]
        ids = torch.randint(0, VOCAB, (2, 27))
        doc = packed_docs(2, 27, [[11, 16], [27]])
        pos = torch.stack([torch.cat([torch.arange(11), torch.arange(16)]), torch.arange(27)])
        logits = model(ids, pos, doc)
        assert logits.shape == (2, 27, VOCAB)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        # memory layer gets gradient
        mem = model.layers[1].memory
        assert any(p.grad.abs().sum() > 0 for p in mem.parameters())


def test_plain_config_is_a_plain_transformer():
    model = build(2)
    assert model.layer_kinds() == ["attn", "attn"]
    assert row_multiple(model, 2) == 4
    hm = build(2, type="titans", layers=[-1], chunk_size=16)
    assert row_multiple(hm, 2) == 32 and hm.layer_kinds() == ["attn", "mal"]
    assert row_multiple(build(2, type="gsa", layers=[-1], chunk_size=16), 2) == 4  # GSA: any split
    assert row_multiple(build(2, type="gsa", variant="mac", chunk_size=16), 2) == 32  # MAC: segments


@pytest.mark.parametrize("mtype", MEMORY_MODULES)
def test_estimate_covers_memory_models(mtype):
    """`--dry-run` and MFU count what is built: parameters equal the model's, for every
    variant; FLOPs grow with the memory's projections; window / MAC layers see fewer keys."""
    base = model_cfg(3)
    for variant in VARIANTS:
        cfg = model_cfg(3, type=mtype, variant=variant, layers=[1], chunk_size=8, window=6, swa_layers=[0])
        model = Transformer(cfg, VOCAB)
        assert estimate.count_params(cfg, VOCAB) == model.num_params()
        assert estimate.count_params(cfg, VOCAB, exclude_embedding=True) == model.num_params(True)
        linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert estimate.matmul_params(cfg, VOCAB) == linears > estimate.matmul_params(base, VOCAB)
        pairs = estimate.layer_pairs_per_token(cfg, 512)
        assert pairs[0] == pytest.approx(estimate.window_pairs_per_token(512, 6)) and pairs[2] == 256.5
        assert pairs[1] == (pytest.approx(4 + 8 + 1) if variant == "mac" else pairs[0])
        assert estimate.flops_per_token(cfg, VOCAB, 512) == pytest.approx(
            6 * linears + 3.5 * 4 * 4 * 8 * sum(pairs))


def test_window_pairs_formula_matches_the_mask():
    S = 37
    i = torch.arange(S)
    for w in (1, 7, 36, 37, 100):
        visible = ((i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < w)).sum().item()
        assert estimate.window_pairs_per_token(S, w) * S == pytest.approx(visible)


# ----------------------------------------------------------------------------- cp=2 == cp=1

MEMORY_CP = [(t, v, {"num_slots": 2} if t == "fifo" else {}) for t in MEMORY_MODULES for v in VARIANTS]
MEMORY_CP += [("titans", "mal", {"memory": "mlp"}), ("titans", "mac", {"memory": "mlp"})]


def _memory_spec(spec) -> dict:
    mtype, variant, opts = spec
    return dict(type=mtype, variant=variant, layers=[1], chunk_size=8, window=12, swa_layers=[0], options=opts)


SWA_SPEC = dict(swa_layers=[0, 2], window=12)  # sliding-window layers only (plus one full layer)


def _batch(S):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, S), generator=g)
    doc = packed_docs(2, S, [[7, S // 2 - 7, S], [S]])
    pos = torch.zeros_like(doc)
    for b in range(2):
        for t in range(1, S):
            pos[b, t] = pos[b, t - 1] + 1 if doc[b, t] == doc[b, t - 1] else 0
    labels = torch.where(torch.cat([doc[:, 1:] == doc[:, :-1], torch.zeros(2, 1, dtype=torch.bool)], 1),
                         ids.roll(-1, 1), torch.full_like(ids, -100))
    return ids, pos, doc, labels


def _loss(model, ids, pos, doc, labels, n_valid):
    logits = model(ids, pos, doc)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                             reduction="sum") / n_valid


def _cp_run(model, strategy, S):
    import torch.distributed as dist

    ids, pos, doc, labels = (strategy.shard(t, dim=1).contiguous() for t in _batch(S))
    n_valid = (_batch(S)[3] != -100).sum()
    loss = _loss(model, ids, pos, doc, labels, n_valid)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def _body_cp(rank, world, S):
    import torch.distributed as dist

    from longctx.parallel import build_strategy
    from longctx.parallel.parallelize import apply_memory_state_passing, apply_strategy

    group = dist.group.WORLD
    ring = build_strategy("ring", group=group, backend="torch")
    memory = []
    for spec in MEMORY_CP:
        model = build(**_memory_spec(spec))
        apply_strategy(model, ring)
        apply_memory_state_passing(model, ring, group)
        if spec is MEMORY_CP[0]:
            with pytest.raises(ValueError, match="contiguous CP layout"):
                apply_memory_state_passing(build(**_memory_spec(spec)), build_strategy("zigzag", group=group), group)
        memory.append(_cp_run(model, ring, S))
    window = {}
    for name in STRATEGIES:
        strategy = build_strategy(name, group=group, backend="torch")
        model = build(**SWA_SPEC)
        apply_strategy(model, strategy)
        apply_memory_state_passing(model, strategy, group)  # nothing to pass: no memory layers
        window[name] = _cp_run(model, strategy, S)
    return memory, window


def _reference(model, S):
    ids, pos, doc, labels = _batch(S)
    loss = _loss(model, ids, pos, doc, labels, (labels != -100).sum())
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _assert_cp_equal(outs, index, want, what):
    loss, grads = want
    assert abs(outs[0][index][0].item() - loss) <= REL * abs(loss), what
    for n, g1 in grads.items():
        g = sum(o[index][1][n] for o in outs)
        assert rel(g, g1) < REL, (what, n, rel(g, g1))


@pytest.mark.distributed
def test_memory_and_window_models_cp2_equal_cp1():
    """Every memory type x variant (ring, memory state passing, window layers through the
    strategy) and a sliding-window-only model under every strategy: cp=2 == cp=1."""
    S = 32
    outs = run_distributed(_body_cp, 2, S, timeout=300)
    for i, spec in enumerate(MEMORY_CP):
        _assert_cp_equal([o[0] for o in outs], i, _reference(build(**_memory_spec(spec)), S), spec)
    want = _reference(build(**SWA_SPEC), S)
    for name in STRATEGIES:
        _assert_cp_equal([o[1] for o in outs], name, want, name)


@pytest.mark.parametrize("mtype", MEMORY_MODULES)
def test_hybrid_model_bf16_autocast_and_bf16_weights(mtype):
    # under autocast the memory receives bf16 activations with fp32 weights; a bf16 model has
    # bf16 weights: the recurrences run in fp32 either way
    spec = dict(type=mtype, variant="mal", layers=[1], chunk_size=8, window=6)
    ids = torch.randint(0, VOCAB, (1, 24))
    pos = torch.arange(24)[None]
    model = build(**spec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, pos, None)
    out.float().sum().backward()
    model16 = build(**spec).to(torch.bfloat16)
    out16 = model16(ids, pos, None)
    out16.float().sum().backward()
    assert out.dtype == out16.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all() and torch.isfinite(out16.float()).all()
