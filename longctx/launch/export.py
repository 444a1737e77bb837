"""`longctx export RUN_OR_CHECKPOINT OUT_DIR`: a training checkpoint as a Hugging Face folder.

The engine's shards (DeepSpeed ZeRO 0-3 or DDP) are consolidated into full fp32 weights on
the CPU, loaded into the run's model, and written by `save_pretrained` with the RoPE
settings the run trained with and `max_position_embeddings` raised to the trained length.
"""

from __future__ import annotations

import os

import torch
from longctx.config import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def token_ids(cfg, tokenizer) -> dict:
    """bos/eos/pad ids for config.json: the pretrained folder's, else the tokenizer's."""
    if cfg.model.init_from:
        from longctx.models.hf import read_config_json

        source = read_config_json(cfg.model.init_from)
        ids = {k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if source.get(k) is not None}
        if ids:
            return ids
    ids = {"bos_token_id": getattr(tokenizer, "bos_id", None), "eos_token_id": tokenizer.eos_id,
           "pad_token_id": tokenizer.pad_id}
    return {k: v for k, v in ids.items() if v is not None}


def tokenizer_folder(spec: str):
    """The folder whose tokenizer files are copied, or None for the byte tokenizer."""
    if spec == "byte":
        return None
    path = os.path.expanduser(spec)
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def export(target: str, out_dir: str, dtype: str = "bf16") -> str:
    from longctx.models.hf import build_model, save_pretrained
    from longctx.trainer.evaluate import EvalTarget, eval_config, load_checkpoint_weights, locate
    from longctx.trainer.loop import resolve_vocab_size
    from longctx.trainer.tokenizer import build_tokenizer

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"output folder '{out_dir}' exists and is not empty; choose another (nothing was written)")
    run_dir, checkpoint = locate(target)
    cfg = eval_config(EvalTarget(run_dir, checkpoint), [])
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg.model, resolve_vocab_size(cfg, tokenizer), "cpu")
    load_checkpoint_weights(model, checkpoint)
    trained = max(cfg.model.max_position_embeddings, cfg.data.seq_len)
    return save_pretrained(model, out_dir, tokenizer_folder(cfg.data.tokenizer), dtype=DTYPES[dtype],
                           max_position_embeddings=trained, extra_config=token_ids(cfg, tokenizer))


__all__ = ["export", "DTYPES"]
