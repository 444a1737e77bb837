"""`longctx eval`: held-out loss and accuracy of a checkpoint, in one process."""

from __future__ import annotations

import dataclasses
import os

import torch
from omegaconf import OmegaConf

from longctx.config import ConfigError, from_container, parse_overrides
from longctx.trainer import checkpoint as ckpt


def locate(target: str) -> tuple[str, str]:
    """(run folder, checkpoint folder) from either one."""
    target = os.path.abspath(target)
    if os.path.isfile(os.path.join(target, "meta.json")):  # a checkpoint: <run>/checkpoints/step_N
        run_dir = os.path.dirname(os.path.dirname(target))
        return run_dir, target
    if os.path.isfile(os.path.join(target, "config.yaml")):
        latest = ckpt.latest_checkpoint(os.path.join(target, "checkpoints"))
        if latest is None:
            raise ConfigError(f"run folder '{target}' has no checkpoint yet")
        return target, latest
    raise ConfigError(f"'{target}' is neither a run folder (with config.yaml) nor a checkpoint (with meta.json)")


def load_model_state(checkpoint: str) -> dict:
    """Full fp32 model weights from either engine's checkpoint."""
    engine_dir = os.path.join(checkpoint, "engine")
    ddp_file = os.path.join(engine_dir, "ddp_state.pt")
    if os.path.isfile(ddp_file):
        return torch.load(ddp_file, map_location="cpu", weights_only=True)["model"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # Consolidates ZeRO shards of any stage into one fp32 state dict.
    return get_fp32_state_dict_from_zero_checkpoint(engine_dir, tag="engine")


def evaluate_checkpoint(target: str, overrides: list[str]) -> dict:
    from longctx.trainer.loop import RunContext, Trainer

    run_dir, checkpoint = locate(target)
    saved = OmegaConf.to_container(OmegaConf.load(os.path.join(run_dir, "config.yaml")))
    merged = OmegaConf.merge(saved, parse_overrides(overrides)) if overrides else saved
    cfg = from_container(OmegaConf.to_container(merged) if overrides else merged)
    # One process, no context parallelism: the plain evaluation path (a resolved copy).
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, cp=1),
                              ray=dataclasses.replace(cfg.ray, num_workers=1))
    # The model and `parallelize` only: no engine, optimizer or training stream.
    trainer = Trainer(cfg, RunContext(run_dir=run_dir, checkpoint_dir=os.path.dirname(checkpoint),
                                      launch_id="eval"), for_training=False)
    state = load_model_state(checkpoint)
    missing, unexpected = trainer.model.load_state_dict(state, strict=False)
    if [m for m in missing if not m.endswith("output.weight")] or unexpected:
        raise RuntimeError(f"checkpoint '{checkpoint}' does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
    if cfg.model.tie_embeddings:
        trainer.model.tie_weights()
    metrics = trainer.evaluate()
    return {"step": float(ckpt.read_meta(checkpoint)["step"]), **metrics}
