"""Back-of-the-envelope numbers: parameters, FLOPs, memory, peak throughput.

Used by `longctx train --dry-run` (the plan) and by the metrics (MFU). Everything
here is arithmetic on the config; nothing allocates real memory (the parameter
count builds the model on the `meta` device).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from longctx.config import Config, ModelConfig, ffn_hidden, head_dim
from longctx.models.rope import original_context

# --------------------------------------------------------------------------- params


def _meta_model(model_cfg: ModelConfig, vocab_size: int):
    """The real model (any block kinds) on the meta device: no memory, no init cost, so
    counts can never drift from `Transformer` itself."""
    from longctx.models.llama import Transformer

    with torch.device("meta"):
        return Transformer(model_cfg, vocab_size)


def count_params(model_cfg: ModelConfig, vocab_size: int, exclude_embedding: bool = False) -> int:
    """Parameter count of the real model, memory layers included."""
    return _meta_model(model_cfg, vocab_size).num_params(exclude_embedding=exclude_embedding)


def matmul_params(model_cfg: ModelConfig, vocab_size: int) -> int:
    """Weights that take part in a matmul for every token: every linear layer of every block
    (attention, MLP, memory projections and gates) plus the lm head. The embedding lookup is a
    gather (no FLOPs) and norms are elementwise, so neither counts; a tied lm head counts here
    as the head it is."""
    model = _meta_model(model_cfg, vocab_size)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def largest_block_params(model_cfg: ModelConfig) -> int:
    """Parameters of the model's largest block (attention or memory layer with its MLP)."""
    return max(sum(p.numel() for p in layer.parameters()) for layer in _meta_model(model_cfg, 1).layers)


# --------------------------------------------------------------------------- FLOPs


def causal_pairs_per_token(seq_len: int) -> float:
    """Visible query-key pairs per query in a full causal row: (1 + 2 + ... + S) / S."""
    return (seq_len + 1) / 2


def window_pairs_per_token(seq_len: int, window: int) -> float:
    """Visible pairs per query of a causal row of `seq_len` under a sliding `window`:
    (sum_i min(i + 1, W)) / S."""
    w = min(window, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def layer_pairs_per_token(model_cfg: ModelConfig, seq_len: int,
                          attn_pairs_per_token: Optional[float] = None) -> list[float]:
    """Visible query-key pairs per token of each layer's attention: full causal attention
    (`attn_pairs_per_token`, default a full causal row), a sliding window (at most the full
    count), or MAC's segment attention (persistent tokens + the causal memory tokens and
    segment tokens of a segment of C: P + C + 1)."""
    from longctx.models.llama import layer_specs

    full = causal_pairs_per_token(seq_len) if attn_pairs_per_token is None else attn_pairs_per_token
    mem = model_cfg.memory
    out = []
    for kind in layer_specs(model_cfg):
        window = mem.window if kind in ("swa", "mag", "mal") else 0
        if kind == "mac":
            from longctx.models.memory.blocks import memory_chunk

            out.append(float(mem.persistent_tokens + memory_chunk(model_cfg) + 1))
        elif window:
            out.append(min(full, window_pairs_per_token(seq_len, window)))
        else:
            out.append(full)
    return out


def attention_flops_per_token(model_cfg: ModelConfig, attn_pairs_per_token) -> float:
    """Training attention FLOPs per token, repository convention (ARCHITECTURE.md):
    forward = 4 * H * D per visible pair (2*D for q.k and 2*D for p.v), backward = 2.5x
    forward (flash-style backward recomputes q.k), so training = 3.5x forward.
    `attn_pairs_per_token`: one number for every layer, or a list with one per layer."""
    per_layer = (attn_pairs_per_token if isinstance(attn_pairs_per_token, (list, tuple))
                 else [attn_pairs_per_token] * model_cfg.n_layers)
    return 3.5 * 4 * model_cfg.n_heads * head_dim(model_cfg) * sum(per_layer)


def flops_per_token(model_cfg: ModelConfig, vocab_size: int, seq_len: int,
                    attn_pairs_per_token: Optional[float] = None) -> float:
    """Training (forward + backward) FLOPs per token.

    Dense part: 6 * matmul params (2 forward, 4 backward: grads w.r.t. inputs and weights).
    Attention part: see `attention_flops_per_token`, per layer (`layer_pairs_per_token`:
    sliding-window and MAC layers see fewer keys). `attn_pairs_per_token` (full-attention
    layers) defaults to a full causal row of `seq_len`; with packed documents the visible
    pairs are fewer and the caller may pass the measured number. The memory recurrences'
    own state updates are not counted (a floor, like the activation estimate).
    """
    pairs = layer_pairs_per_token(model_cfg, seq_len, attn_pairs_per_token)
    return 6.0 * matmul_params(model_cfg, vocab_size) + attention_flops_per_token(model_cfg, pairs)


# --------------------------------------------------------------------------- memory


def _dtype_bytes(dtype: str) -> int:
    return {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]


def activation_bytes_per_token(model_cfg: ModelConfig, vocab_size: int, dtype: str,
                               loss: str = "chunked") -> dict[str, float]:
    """Bytes saved for backward per local token (no activation checkpointing).

    A deliberately simple count of the main tensors autograd keeps, per layer, in the
    compute dtype (b bytes):
      - 2 RMSNorms: input and output, 2 * 2 * dim
      - attention: q, k, v after RoPE ((H + 2 H_kv) * D) and the output (H * D), plus the
        kernel's fp32 log-sum-exp (H). The kernel is chunked, so nothing is S x S: memory is
        linear in tokens.
      - SwiGLU: w1 out, w3 out, silu(w1 out), their product: 4 * ffn_hidden
    Outside the layers: the embedding output and final norm (2 * dim), RoPE cos/sin (fp32,
    D per token, shared by all layers), and the loss: with `loss="full"` the logits in the
    compute dtype plus the fp32 copy the loss makes (vocab * (b + 4)); with the chunked loss
    only its fp32 log-sum-exp, loss and int64 prediction (16 bytes; one chunk's logits are
    `loss_chunk_bytes`, not per token).
    Not counted: fp32 temporaries of norms/RoPE, CP strategies' in-flight K/V buffers
    (a few local K/V blocks), allocator fragmentation. Treat the total as a floor.
    """
    m, d, f = model_cfg, head_dim(model_cfg), ffn_hidden(model_cfg)
    b = _dtype_bytes(dtype)
    per_layer = b * (4 * m.dim + (2 * m.n_heads + 2 * m.n_kv_heads) * d + 4 * f) + 4 * m.n_heads
    head = vocab_size * (b + 4) if loss == "full" else 16
    outside = b * 2 * m.dim + head + 4 * d
    return {"layers": m.n_layers * per_layer, "outside": outside}


def loss_chunk_bytes(cfg: Config, vocab_size: int, local_tokens: float) -> float:
    """Peak bytes of the chunked loss beyond the per-token vectors: one chunk's fp32 logits
    and its cast to the compute dtype for the backward matmuls (0 for `train.loss=full`,
    whose logits are counted per token)."""
    from longctx.kernels.linear_cross_entropy import default_chunk_size

    if cfg.train.loss == "full":
        return 0.0
    chunk = min(cfg.train.loss_chunk_size or default_chunk_size(vocab_size), local_tokens)
    return chunk * vocab_size * (4 + _dtype_bytes(cfg.train.dtype))


def memory_per_gpu(cfg: Config, vocab_size: int, world_size: Optional[int] = None) -> dict[str, float]:
    """Estimated bytes per GPU: params, grads, optimizer, activations, total.

    Per parameter: weights and grads in the training dtype; AdamW keeps two fp32 moments,
    plus an fp32 master copy of the weights when training in bf16 (so 16 bytes a parameter
    in both fp32 and bf16; with DDP + autocast the split differs but the total does not).
    Sharding over all dp x cp ranks (the engine reduces gradients over both): ZeRO-1 shards
    the optimizer states, ZeRO-2 also the grads, ZeRO-3 also the weights. The DDP engine
    and ZeRO-0 shard nothing.
    Activations: `activation_bytes_per_token` for the `micro_batch_size * seq_len / cp`
    tokens this rank holds, plus one chunk of the chunked loss; with
    `train.activation_checkpointing` each layer keeps only its input and one layer's full
    activations exist at a time (offloaded inputs are counted too: they leave the GPU, but
    a floor should not assume it).
    """
    world = world_size if world_size is not None else cfg.ray.num_workers
    n = count_params(cfg.model, vocab_size)
    b = _dtype_bytes(cfg.train.dtype)
    opt_per_param = 8 + (4 if cfg.train.dtype != "fp32" else 0)

    stage = cfg.deepspeed.zero_stage if cfg.train.engine == "deepspeed" else 0
    shard = lambda nbytes, from_stage: nbytes / world if stage >= from_stage else float(nbytes)  # noqa: E731

    local_tokens = cfg.train.micro_batch_size * cfg.data.seq_len / cfg.parallel.cp
    act = activation_bytes_per_token(cfg.model, vocab_size, cfg.train.dtype, cfg.train.loss)
    if cfg.train.activation_checkpointing:
        # Each block keeps only its input; one block at a time is rebuilt in full.
        per_layer = act["layers"] / cfg.model.n_layers
        act["layers"] = cfg.model.n_layers * _dtype_bytes(cfg.train.dtype) * cfg.model.dim + per_layer
    mem = {
        "params": shard(n * b, 3),
        "grads": shard(n * b, 2),
        "optimizer": shard(n * opt_per_param, 1),
        "activations": local_tokens * (act["layers"] + act["outside"]) + loss_chunk_bytes(cfg, vocab_size,
                                                                                           local_tokens),
    }
    mem["total"] = sum(mem.values())
    return mem


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _format_count(n: float) -> str:
    for scale, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f} "


# --------------------------------------------------------------------------- plan


def plan_text(cfg: Config, vocab_size: int) -> str:
    """Readable summary of what `longctx train` would run, for `--dry-run`."""
    from longctx.kernels.linear_cross_entropy import default_chunk_size
    from longctx.models.llama import layer_specs

    m, t = cfg.model, cfg.train
    world = cfg.ray.num_workers
    cp = cfg.parallel.cp
    dp = world // cp
    seq = cfg.data.seq_len
    total = count_params(m, vocab_size)
    non_emb = count_params(m, vocab_size, exclude_embedding=True)
    fpt = flops_per_token(m, vocab_size, seq)
    tokens_per_step = t.micro_batch_size * t.grad_accum * dp * seq
    engine = f"deepspeed ZeRO-{cfg.deepspeed.zero_stage}" if t.engine == "deepspeed" else "ddp (nothing sharded)"
    mem = memory_per_gpu(cfg, vocab_size, world)
    tied = "tied" if m.tie_embeddings else "untied"
    lines = [
        f"model        dim={m.dim} layers={m.n_layers} heads={m.n_heads} kv_heads={m.n_kv_heads} "
        f"head_dim={head_dim(m)} ffn_hidden={ffn_hidden(m)} vocab={vocab_size} ({tied} embeddings)",
        f"family       {m.family}" + (f", weights from {m.init_from}" if m.init_from else ", random init"),
        f"rope         theta={m.rope_theta:g}" + (
            f", {m.rope_scaling.rope_type} x{m.rope_scaling.factor:g}"
            + (f" over {original_context(m)} positions" if m.rope_scaling.rope_type in ("yarn", "llama3") else "")
            if m.rope_scaling.rope_type != "default" else ""),
        f"parameters   {total:,} total ({_format_count(total).strip()}), {non_emb:,} non-embedding",
        f"blocks       {' '.join(layer_specs(m))}" + (f" (memory {m.memory.type}, window {m.memory.window})"
                                                   if m.memory.type != "none" or m.memory.swa_layers else ""),
        f"FLOPs/token  {fpt:,.0f} ({_format_count(fpt)}FLOP, training, causal attention over seq_len {seq})",
        f"FLOPs/step   {_format_count(fpt * tokens_per_step)}FLOP",
        f"tokens/step  {tokens_per_step:,} = micro_batch {t.micro_batch_size} x grad_accum {t.grad_accum} "
        f"x dp {dp} x seq_len {seq}",
        f"world        {world} workers = dp {dp} x cp {cp}, strategy {cfg.parallel.strategy}",
        f"tokens/rank  {seq // cp:,} of each row (seq_len {seq} / cp {cp})",
        f"engine       {engine}, dtype {t.dtype}" + (
            f", activation checkpointing{' (inputs offloaded to CPU)' if t.activation_checkpointing == 'offload' else ''}"
            if t.activation_checkpointing else ""),
        "loss         " + ("full logits (tokens x vocab fp32)" if t.loss == "full" else
                            f"chunked, {t.loss_chunk_size or default_chunk_size(vocab_size):,} tokens a chunk "
                            f"(no tokens x vocab logits)"),
        f"memory/GPU   {format_bytes(mem['total'])} (estimate): params {format_bytes(mem['params'])}, "
        f"grads {format_bytes(mem['grads'])}, optimizer {format_bytes(mem['optimizer'])}, "
        f"activations {format_bytes(mem['activations'])}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- peak FLOP/s

# Dense (no 2:4 sparsity) peak FLOP/s from NVIDIA's datasheets: bf16/fp16 tensor cores,
# tf32 tensor cores, and plain fp32 (what PyTorch uses for fp32 matmuls unless TF32 is
# allowed). Matched as substrings of `torch.cuda.get_device_name` in order, most specific
# first: "h100 pcie" before "h100", "l40s" before "l4"; "a10g" is spelled out because a
# bare "a10" would also match "a100".
_PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("h100 pcie", {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("h100 nvl", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("h100", {"bf16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200", {"bf16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("a100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("a10g", {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("l40s", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("l4", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
]


def peak_flops(device: Union[torch.device, str], dtype: str) -> Optional[float]:
    """Dense peak FLOP/s of `device` for training in `dtype` ("bf16", "fp16" or "fp32");
    None on CPU or an unknown GPU (MFU is then not reported)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).lower()
    for pattern, peaks in _PEAK_FLOPS:
        if pattern in name:
            if dtype in ("bf16", "fp16"):
                return peaks["bf16"]
            # fp32 matmuls run on TF32 tensor cores only when the user allowed it.
            return peaks["tf32"] if torch.get_float32_matmul_precision() != "highest" else peaks["fp32"]
    return None


__all__ = ["count_params", "matmul_params", "flops_per_token", "causal_pairs_per_token", "window_pairs_per_token",
           "layer_pairs_per_token",
           "attention_flops_per_token", "activation_bytes_per_token", "memory_per_gpu", "format_bytes",
           "plan_text", "peak_flops"]
