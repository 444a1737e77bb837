"""The Llama-style model (longctx.models.llama) and the plan estimates (longctx.models.estimate)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from longctx.config import Config, ModelConfig, ffn_hidden, head_dim
from longctx.models import estimate
from longctx.models.llama import Transformer, apply_rope, rope_cos_sin
from longctx.models.rope import rope_frequencies

VOCAB = 37


def tiny(**kw) -> ModelConfig:
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, attention_backend="torch")
    base.update(kw)
    return ModelConfig(**base)


def make_model(seed: int = 0, vocab: int = VOCAB, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**kw), vocab).eval()


def batch(B: int, S: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    pos = torch.arange(S).expand(B, S)
    return ids, pos


def sdpa_reference(q, k, v, doc_ids):
    """Independent attention: dense mask + repeated K/V heads (query head h uses KV head h // G)."""
    B, S, H, D = q.shape
    G = H // k.shape[2]
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    mask = torch.ones(S, S, dtype=torch.bool).tril()[None, None]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


# --------------------------------------------------------------------------- model


def test_forward_shapes_and_dtype():
    model = make_model()
    ids, pos = batch(2, 16)
    logits = model(ids, pos, torch.zeros_like(ids))
    assert logits.shape == (2, 16, VOCAB) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert model(ids, pos).shape == (2, 16, VOCAB)  # doc_ids=None: plain causal


def test_bf16_returns_lm_head_dtype():
    model = make_model().to(torch.bfloat16)
    ids, pos = batch(1, 8)
    assert model(ids, pos).dtype == torch.bfloat16


def test_backward_reaches_every_parameter():
    model = make_model().train()
    ids, pos = batch(2, 12)
    model(ids, pos, torch.zeros_like(ids)).float().logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gqa_matches_dense_reference(n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads)
    attn = model.layers[0].attention
    assert attn.wk.weight.shape == (n_kv_heads * head_dim(model.cfg), model.cfg.dim)
    ids, pos = batch(2, 16)
    doc = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    expected = model(ids, pos, doc)
    model.set_attention(sdpa_reference)
    torch.testing.assert_close(model(ids, pos, doc), expected, atol=1e-5, rtol=1e-5)


def test_set_attention_is_honoured():
    model = make_model(n_kv_heads=1)
    ids, pos = batch(2, 10)
    doc = torch.zeros_like(ids)
    calls = []

    def recording(q, k, v, doc_ids):
        calls.append((q.shape, k.shape, v.shape, doc_ids))
        return torch.zeros_like(q)

    model.set_attention(recording)
    logits = model(ids, pos, doc)
    D = head_dim(model.cfg)
    assert len(calls) == model.cfg.n_layers
    for q_shape, k_shape, v_shape, d in calls:
        assert q_shape == (2, 10, 4, D) and k_shape == v_shape == (2, 10, 1, D)
        assert d is doc
    # With attention zeroed, a token's logits depend only on that token.
    same = model(ids[:, :1].expand(2, 10), pos, doc)
    torch.testing.assert_close(same[:, 0], same[:, 5])
    assert torch.isfinite(logits).all()


def test_packed_documents_match_documents_alone():
    """Positions reset + document mask: each document in a packed row sees exactly what it sees alone."""
    model = make_model(n_kv_heads=2)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, VOCAB, (1, 7), generator=g), torch.randint(0, VOCAB, (1, 9), generator=g)
    ids = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    doc = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        packed = model(ids, pos, doc)
        alone_a = model(a, torch.arange(7)[None], torch.zeros_like(a))
        alone_b = model(b, torch.arange(9)[None], torch.zeros_like(b))
        leaky = model(ids, pos, None)  # no document mask: b attends to a
    torch.testing.assert_close(packed[:, :7], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[:, 7:], alone_b, atol=1e-5, rtol=0)
    assert not torch.allclose(leaky[:, 7:], alone_b, atol=1e-3)


def test_rope_uses_position_ids():
    # q.k after RoPE depends on the position difference only ...
    D = 16
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)
    inv_freq, _ = rope_frequencies(tiny(dim=4 * D))

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), inv_freq)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), inv_freq)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(1005, 1002), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 4))
    torch.testing.assert_close(score(0, 0), (q * k).sum())  # position 0 is the identity
    # ... and the model reads the position ids it is given, not arange(S).
    model = make_model()
    ids, pos = batch(1, 8)
    assert not torch.allclose(model(ids, pos), model(ids, pos * 3), atol=1e-4)


def test_tied_and_untied_embeddings():
    tied, untied = make_model(tie_embeddings=True), make_model(tie_embeddings=False)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight is not untied.tok_embeddings.weight
    emb = VOCAB * tied.cfg.dim
    assert untied.num_params() == tied.num_params() + emb
    assert tied.num_params(exclude_embedding=True) == tied.num_params() - emb
    assert untied.num_params(exclude_embedding=True) == untied.num_params() - emb
    assert len(list(tied.parameters())) == len(list(untied.parameters())) - 1


def test_init_statistics():
    cfg = ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, init_std=0.02, tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg, 1000)
    std, resid = 0.02, 0.02 / math.sqrt(2 * cfg.n_layers)
    layer = model.layers[1]
    for w, want in [(model.tok_embeddings.weight, std), (model.output.weight, std),
                    (layer.attention.wq.weight, std), (layer.feed_forward.w1.weight, std),
                    (layer.attention.wo.weight, resid), (layer.feed_forward.w2.weight, resid)]:
        assert abs(w.std().item() - want) < 0.05 * want
        assert abs(w.mean().item()) < 0.05 * want
    for norm in (layer.attention_norm, layer.ffn_norm, model.norm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))


def test_meta_build_then_materialise():
    with torch.device("meta"):
        model = Transformer(tiny(), VOCAB)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.output.weight is model.tok_embeddings.weight
    ids, pos = batch(1, 8)
    assert torch.isfinite(model(ids, pos)).all()
    copy.deepcopy(model)  # the default attention fn is a partial, so copies/pickles work


# --------------------------------------------------------------------------- estimates


@pytest.mark.parametrize("tie", [True, False])
def test_count_params_on_meta_matches_real_model(tie):
    cfg = tiny(tie_embeddings=tie, n_layers=3, ffn_hidden=72)
    real = Transformer(cfg, VOCAB)
    assert estimate.count_params(cfg, VOCAB) == real.num_params()
    assert estimate.count_params(cfg, VOCAB, exclude_embedding=True) == real.num_params(exclude_embedding=True)
    linears = sum(m.weight.numel() for m in real.modules() if isinstance(m, torch.nn.Linear))
    assert estimate.matmul_params(cfg, VOCAB) == linears  # the tied head counted as a matmul


def test_flops_per_token_by_hand():
    cfg = ModelConfig(dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=16, tie_embeddings=True)
    vocab, seq = 10, 7
    # per layer: wq 8*8 + wk 8*4 + wv 8*4 + wo 8*8 = 192; MLP 3*8*16 = 384; lm head 8*10 = 80
    dense = 6 * (2 * (192 + 384) + 80)  # 7392
    pairs = (7 + 1) / 2  # 28 visible causal pairs over 7 tokens
    attn = 3.5 * 4 * 2 * 4 * pairs * 2  # 3.5x forward, 4*H*D per pair, 2 layers = 896
    assert estimate.flops_per_token(cfg, vocab, seq) == pytest.approx(dense + attn)
    assert estimate.flops_per_token(cfg, vocab, seq, attn_pairs_per_token=1.0) == pytest.approx(dense + 3.5 * 4 * 2 * 4 * 2)


@pytest.mark.parametrize("S", [1, 7, 64])
def test_causal_pairs_per_token(S):
    assert estimate.causal_pairs_per_token(S) == torch.ones(S, S).tril().sum().item() / S


def _cfg(engine="deepspeed", stage=2, workers=4, cp=2, dtype="bf16") -> Config:
    cfg = Config()
    cfg.model = tiny()
    cfg.train.engine, cfg.deepspeed.zero_stage, cfg.train.dtype = engine, stage, dtype
    cfg.ray.num_workers, cfg.parallel.cp = workers, cp
    cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.grad_accum = 512, 2, 3
    return cfg


def test_memory_per_gpu_follows_zero_stage_and_world_size():
    n = estimate.count_params(tiny(), VOCAB)
    mem = {s: estimate.memory_per_gpu(_cfg(stage=s), VOCAB) for s in range(4)}
    world = 4
    # bf16: 2-byte weights and grads, AdamW 2 fp32 moments + fp32 master = 12 bytes
    assert mem[0]["params"] == 2 * n and mem[0]["grads"] == 2 * n and mem[0]["optimizer"] == 12 * n
    assert mem[1]["optimizer"] == 12 * n / world and mem[1]["grads"] == 2 * n
    assert mem[2]["grads"] == 2 * n / world and mem[2]["params"] == 2 * n
    assert mem[3]["params"] == 2 * n / world
    totals = [mem[s]["total"] for s in range(4)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    for m in mem.values():
        assert m["total"] == pytest.approx(sum(v for k, v in m.items() if k != "total"))
        assert m["activations"] == mem[0]["activations"] > 0

    # More ranks: sharded parts shrink in proportion, unsharded ones do not.
    wide = estimate.memory_per_gpu(_cfg(stage=3), VOCAB, world_size=8)
    assert wide["params"] == mem[3]["params"] / 2 and wide["optimizer"] == mem[3]["optimizer"] / 2
    assert estimate.memory_per_gpu(_cfg(stage=1), VOCAB, world_size=8)["grads"] == mem[1]["grads"]

    # DDP shards nothing, whatever zero_stage says; fp32 has no master copy.
    ddp = estimate.memory_per_gpu(_cfg(engine="ddp", stage=3), VOCAB)
    assert ddp["params"] == mem[0]["params"] and ddp["optimizer"] == mem[0]["optimizer"]
    fp32 = estimate.memory_per_gpu(_cfg(stage=0, dtype="fp32"), VOCAB)
    assert fp32["params"] == 4 * n and fp32["optimizer"] == 8 * n

    # Activations are per local token: doubling cp halves them.
    act_cp1 = estimate.memory_per_gpu(_cfg(cp=1), VOCAB)["activations"]
    assert mem[2]["activations"] == pytest.approx(act_cp1 / 2)

    # The full-logits loss keeps vocab x (2 + 4) bytes a token (bf16 logits and their fp32
    # copy); the chunked one 16 bytes a token plus one chunk's logits. Here the 512 local
    # tokens of a micro-batch fit in one chunk, so only the 16 bytes differ; at 128k tokens
    # and Llama-3's vocabulary the chunk is 261 tokens and the logits' gigabytes are gone.
    full = _cfg()
    full.train.loss = "full"
    gap = estimate.memory_per_gpu(full, VOCAB)["activations"] - mem[2]["activations"]
    assert gap == pytest.approx(-16 * 2 * 512 / 2)
    big = _cfg()
    big.data.seq_len = 131072
    chunk = estimate.memory_per_gpu(big, 128256)["activations"]
    big.train.loss = "full"
    assert estimate.memory_per_gpu(big, 128256)["activations"] - chunk > 2 * 65536 * 128256 * 5


def test_plan_text_has_the_key_numbers():
    cfg = _cfg(stage=2, workers=4, cp=2)
    text = estimate.plan_text(cfg, VOCAB)
    total = estimate.count_params(cfg.model, VOCAB)
    non_emb = estimate.count_params(cfg.model, VOCAB, exclude_embedding=True)
    tokens_per_step = 2 * 3 * 2 * 512
    fpt = estimate.flops_per_token(cfg.model, VOCAB, 512)
    mem = estimate.memory_per_gpu(cfg, VOCAB)
    for needle in [f"{total:,}", f"{non_emb:,}", f"{tokens_per_step:,}", f"{fpt:,.0f}", "dp 2", "cp 2",
                   "4 workers", "ring", "ZeRO-2", "bf16", "256 of each row", estimate.format_bytes(mem["total"]),
                   f"ffn_hidden={ffn_hidden(cfg.model)}"]:
        assert needle in text, (needle, text)
    assert "ddp" in estimate.plan_text(_cfg(engine="ddp"), VOCAB)


def test_format_bytes():
    assert estimate.format_bytes(512) == "512 B"
    assert estimate.format_bytes(1536) == "1.50 KiB"
    assert estimate.format_bytes(3 * 1024**3) == "3.00 GiB"


def test_peak_flops(monkeypatch):
    assert estimate.peak_flops(torch.device("cpu"), "bf16") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cases = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA L40S": 362e12, "NVIDIA L4": 121e12,
             "NVIDIA A10G": 125e12, "NVIDIA GeForce GTX 1080": None}
    for name, want in cases.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert estimate.peak_flops(torch.device("cuda"), "bf16") == want, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-PCIE-40GB")
    assert estimate.peak_flops("cuda", "fp32") == 19.5e12  # fp32 matmul precision "highest": no TF32
