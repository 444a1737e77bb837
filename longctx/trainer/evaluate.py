"""`longctx eval`: a run, a checkpoint or a Hugging Face folder, on one of three tasks.

- `loss`: held-out loss and accuracy of a checkpoint, in one process (`evaluate_checkpoint`).
- `niah` / `ppl`: needle in a haystack and perplexity by position (`longctx.trainer.long_eval`),
  launched like training (`run_long_eval`): the config is resolved on the driver, then
  `eval_worker` runs on every Ray worker (`launcher=ray`, context parallel over
  `parallel.cp`) or in this process (`launcher=local`). Rank 0 writes the results JSON;
  the driver draws the plot and, when the target run has an MLflow run, logs the metrics
  and both files into it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import OmegaConf

from longctx.config import Config, ConfigError, from_container, load_config, parse_overrides
from longctx.trainer import checkpoint as ckpt

logger = logging.getLogger("longctx")


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
    raise ConfigError(f"'{target}' is neither a run folder (with config.yaml) nor a checkpoint (with meta.json)"
                      f" nor a Hugging Face folder (with config.json and *.safetensors)")


def is_hf_folder(target: str) -> bool:
    return os.path.isfile(os.path.join(target, "config.json")) and bool(glob.glob(os.path.join(target, "*.safetensors")))


@dataclass
class EvalTarget:
    """What `longctx eval` was pointed at: a run's checkpoint, or a Hugging Face folder."""

    run_dir: Optional[str] = None
    checkpoint: Optional[str] = None
    hf_dir: Optional[str] = None

    @property
    def step(self) -> Optional[int]:
        return int(ckpt.read_meta(self.checkpoint)["step"]) if self.checkpoint else None

    @property
    def mlflow_run_id(self) -> Optional[str]:
        return ckpt.read_meta(self.checkpoint).get("mlflow_run_id") if self.checkpoint else None


def find_target(target: str) -> EvalTarget:
    if is_hf_folder(target) and not os.path.isfile(os.path.join(target, "meta.json")):
        return EvalTarget(hf_dir=os.path.abspath(target))
    run_dir, checkpoint = locate(target)
    return EvalTarget(run_dir=run_dir, checkpoint=checkpoint)


def eval_config(t: EvalTarget, overrides: list[str]) -> Config:
    """The run's saved config (or, for a Hugging Face folder, the defaults with
    `model.init_from` set to it) with `key=value` overrides. A run's MLflow store and output
    folder are the ones beside the run folder (wherever it was moved)."""
    if t.hf_dir:
        return load_config(None, [f"model.init_from={t.hf_dir}", *overrides])
    saved = OmegaConf.to_container(OmegaConf.load(os.path.join(t.run_dir, "config.yaml")))
    merged = OmegaConf.to_container(OmegaConf.merge(saved, parse_overrides(overrides))) if overrides else saved
    cfg = from_container(merged)
    cfg.run.output_dir = os.path.dirname(t.run_dir)
    return cfg


def load_model_state(checkpoint: str) -> dict:
    """Full fp32 model weights from either engine's checkpoint."""
    engine_dir = os.path.join(checkpoint, "engine")
    ddp_file = os.path.join(engine_dir, "ddp_state.pt")
    if os.path.isfile(ddp_file):
        return torch.load(ddp_file, map_location="cpu", weights_only=True)["model"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # Consolidates ZeRO shards of any stage into one fp32 state dict.
    return get_fp32_state_dict_from_zero_checkpoint(engine_dir, tag="engine")


def load_checkpoint_weights(model: torch.nn.Module, checkpoint: str) -> None:
    """The checkpoint's consolidated weights into `model` (its lm head re-tied when tied);
    an error naming what does not match."""
    missing, unexpected = model.load_state_dict(load_model_state(checkpoint), strict=False)
    if [m for m in missing if not (model.cfg.tie_embeddings and m == "output.weight")] or unexpected:
        raise ConfigError(f"checkpoint '{checkpoint}' does not match the model: missing {missing}, "
                          f"unexpected {unexpected}")
    model.tie_weights()


def load_trainer(cfg: Config, ctx, checkpoint: Optional[str]):
    """An evaluation `Trainer` (model and `parallelize` only) with the checkpoint's weights
    (without a checkpoint: what the Trainer built, e.g. `model.init_from`'s weights)."""
    from longctx.trainer.loop import Trainer

    trainer = Trainer(cfg, ctx, for_training=False)
    if checkpoint is None:
        return trainer
    load_checkpoint_weights(trainer.model, checkpoint)
    return trainer


def evaluate_checkpoint(target: str, overrides: list[str]) -> dict:
    """Held-out loss / accuracy (`Trainer.evaluate`) of a checkpoint or a Hugging Face folder,
    in one process (cp=1)."""
    from longctx.trainer.loop import RunContext

    t = find_target(target)
    cfg = eval_config(t, overrides)
    # One process, no context parallelism: the plain evaluation path (a resolved copy).
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, cp=1),
                              ray=dataclasses.replace(cfg.ray, num_workers=1))
    folder = t.run_dir or t.hf_dir
    trainer = load_trainer(cfg, RunContext(run_dir=folder, checkpoint_dir=os.path.dirname(t.checkpoint or folder),
                                           launch_id="eval"), t.checkpoint)
    metrics = trainer.evaluate()
    return {"step": float(t.step), **metrics} if t.checkpoint else metrics


# ---------------------------------------------------------------------------- niah / ppl


def eval_worker(cfg: Config, ctx, *, task: str, options: dict, checkpoint: Optional[str], out_json: str,
                info: dict) -> dict:
    """Entry point of every evaluation worker: load the model, run `task`, write the results
    (with `info`, e.g. the target and step) to `out_json` on rank 0. Returns the summary metrics."""
    from longctx.trainer import long_eval

    trainer = load_trainer(cfg, ctx, checkpoint)
    results = {**info, **long_eval.run_task(trainer, task, long_eval.options_from_dict(task, options))}
    if trainer.mesh.is_logging_rank:
        os.makedirs(os.path.dirname(out_json) or ".", exist_ok=True)
        with open(out_json + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(out_json + ".tmp", out_json)
    return long_eval.summary_metrics(results)


def task_options(cfg: Config, task: str, given: dict):
    """The task's default options for this config (`long_eval.default_niah` / `default_ppl`)
    with the ones given on the command line; checked."""
    from longctx.trainer import long_eval
    from longctx.trainer.tokenizer import build_tokenizer

    if task == "ppl":
        options = dataclasses.replace(long_eval.default_ppl(cfg), **given)
        long_eval.check_ppl(options)
        return options
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    options = dataclasses.replace(long_eval.default_niah(cfg, tokenizer), **given)
    long_eval.check_niah(options, tokenizer)
    return options


def log_to_mlflow(cfg: Config, t: EvalTarget, results: dict, files: list[str]) -> Optional[str]:
    """Metrics (at the checkpoint's step; the curve as a metric whose step is its x axis) and
    `files` (under `eval/`) into the target run's MLflow run. Returns the run id, if any."""
    from longctx.launch import tracking
    from longctx.trainer import long_eval

    run_id = t.mlflow_run_id
    if not (run_id and cfg.logging.mlflow):
        return None
    uri = tracking.tracking_uri(cfg)
    name, curve = long_eval.curve_metrics(results)
    tracking.log_metrics(uri, run_id, [(k, v, t.step) for k, v in long_eval.summary_metrics(results).items()]
                         + [(name, v, x) for x, v in curve])
    for path in files:
        tracking.log_artifact(uri, run_id, path, "eval")
    return run_id


def run_long_eval(target: str, task: str, overrides: list[str], given: dict, json_path: Optional[str] = None,
                  plot_path: Optional[str] = None) -> tuple[dict, list[str]]:
    """`longctx eval TARGET --task niah|ppl`: (results, files written). JSON and plot go to
    `json_path` / `plot_path`, by default `<run>/eval_<task>.json|png` (a Hugging Face folder
    has no run folder: then only where asked)."""
    from longctx.launch.driver import run_with_ray
    from longctx.launch.resolve import resolve_config
    from longctx.trainer import long_eval
    from longctx.trainer.loop import RunContext

    t = find_target(target)
    cfg, notes = resolve_config(eval_config(t, overrides))
    for note in notes:
        logger.info(note)
    options = task_options(cfg, task, given)
    in_run = (lambda ext: os.path.join(t.run_dir, f"eval_{task}.{ext}")) if t.run_dir else (lambda ext: None)
    scratch = tempfile.mkdtemp(prefix="longctx-eval-")  # the JSON of a Hugging Face folder without --json
    try:
        out_json = os.path.abspath(json_path or in_run("json") or os.path.join(scratch, f"eval_{task}.json"))
        ctx = RunContext(run_dir=t.run_dir or scratch,
                         checkpoint_dir=os.path.dirname(t.checkpoint) if t.checkpoint else scratch,
                         launch_id=f"eval-{uuid.uuid4().hex}")
        kwargs = dict(task=task, options=dataclasses.asdict(options), checkpoint=t.checkpoint, out_json=out_json,
                      info={"target": t.checkpoint or t.hf_dir, "step": t.step})
        if cfg.launcher == "local":
            eval_worker(cfg, ctx, **kwargs)
        else:
            run_with_ray(cfg, ctx, eval_worker, name=f"{cfg.run.name}-eval-{task}", **kwargs)
        with open(out_json) as f:
            results = json.load(f)
        files = [out_json] if json_path or t.run_dir else []
        png = plot_path or in_run("png")
        if png:
            files.append(long_eval.plot(results, os.path.abspath(png)))
        log_to_mlflow(cfg, t, results, files)
        return results, files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


__all__ = ["evaluate_checkpoint", "run_long_eval", "eval_worker", "load_trainer", "find_target", "locate",
           "EvalTarget", "eval_config", "load_model_state"]
