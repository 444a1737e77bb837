"""Tiny random Hugging Face checkpoints of each supported family, made with `transformers`
itself (shared by the checkpoint tests)."""

from __future__ import annotations

import torch

ORIGINAL_CONTEXT = 64  # max_position_embeddings of the tiny models; tests go to 4x this

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=ORIGINAL_CONTEXT, rms_norm_eps=1e-6)

# name -> (config class name, extra config)
CASES = {
    "llama3-tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "llama-yarn": ("LlamaConfig", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": ORIGINAL_CONTEXT})),
    "llama-linear": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": ("MistralConfig", dict(sliding_window=48)),
    "qwen2": ("Qwen2Config", dict()),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
}


# A shape-only config.json of Llama-3-8B (for dry runs of presets that start from it).
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
             "max_position_embeddings": 8192, "tie_word_embeddings": False, "hidden_act": "silu",
             "attention_bias": False, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}


def make_checkpoint(case: str, folder: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """Save a random model of `case` with `save_pretrained` into `folder`; returns the HF model.
    Biases and norm weights are randomised too (transformers initialises them to 0 / 1)."""
    import transformers

    cls_name, extra = CASES[case]
    config = getattr(transformers, cls_name)(**{**SHAPE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def trained_model(run_dir: str):
    """longctx's model of a run with the weights of its latest checkpoint, straight from the
    engine's files (not through an export)."""
    from longctx.models.hf import build_model
    from longctx.trainer.evaluate import EvalTarget, eval_config, load_checkpoint_weights, locate
    from longctx.trainer.loop import resolve_vocab_size
    from longctx.trainer.tokenizer import build_tokenizer

    target = EvalTarget(*locate(run_dir))
    cfg = eval_config(target, [])
    model = build_model(cfg.model, resolve_vocab_size(cfg, build_tokenizer(cfg.data.tokenizer)))
    load_checkpoint_weights(model, target.checkpoint)
    return model.eval()
