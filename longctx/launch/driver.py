"""`longctx train`: resolve the run, fail fast on bad input, then launch workers.

Everything that can be checked on the driver is checked before a single worker
starts (config, data files, tokenizer, resume target), so a bad command costs
seconds and leaves earlier runs untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import uuid
import warnings
from typing import Callable, Optional

from longctx.config import Config, ConfigError, from_container, to_container, to_yaml
from longctx.launch import tracking
from longctx.trainer import checkpoint as ckpt
from longctx.trainer.loop import NIAH_PNG, RunContext
from longctx.trainer.metrics import setup_logging

logger = logging.getLogger("longctx")


def _resume_target(cfg: Config, checkpoint_dir: str) -> Optional[str]:
    mode = cfg.checkpoint.resume
    if mode == "auto":
        return ckpt.latest_checkpoint(checkpoint_dir)
    if mode == "none":
        if ckpt.list_checkpoints(checkpoint_dir):
            raise ConfigError(
                f"the run folder already holds checkpoints ({checkpoint_dir}); pass checkpoint.resume=auto to "
                f"continue that run, or another run.name for a new one (nothing was changed)")
        return None
    if not os.path.isfile(os.path.join(mode, "meta.json")):
        raise ConfigError(f"checkpoint.resume='{mode}' is not a checkpoint folder (expected {mode}/meta.json)")
    return os.path.abspath(mode)


def prepare_run(cfg: Config, auto_text: str = "") -> RunContext:
    """Checks inputs, creates the run folder and the MLflow run. Nothing is written before the checks pass.
    `cfg` is resolved (`resolve_config`); `auto_text` explains an `auto` strategy choice."""
    from longctx.trainer.loop import resolve_vocab_size
    from longctx.trainer.sources import check_data
    from longctx.trainer.tokenizer import build_tokenizer

    check_data(cfg.data)
    vocab_size = resolve_vocab_size(cfg, build_tokenizer(cfg.data.tokenizer))
    if cfg.model.init_from:
        from longctx.models.hf import check_weights

        check_weights(cfg.model, vocab_size)
    run_dir = os.path.abspath(os.path.join(cfg.run.output_dir, cfg.run.name))
    checkpoint_dir = os.path.abspath(cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints"))
    resume = _resume_target(cfg, checkpoint_dir)

    os.makedirs(run_dir, exist_ok=True)
    config_path = os.path.join(run_dir, "config.yaml")
    with open(config_path + ".tmp", "w") as f:
        f.write(to_yaml(cfg))
    os.replace(config_path + ".tmp", config_path)

    ctx = RunContext(run_dir=run_dir, checkpoint_dir=checkpoint_dir, launch_id=uuid.uuid4().hex,
                     interactive=sys.stderr.isatty())
    if cfg.logging.mlflow:
        ctx.tracking_uri = tracking.tracking_uri(cfg)
        previous = ckpt.read_meta(resume).get("mlflow_run_id") if resume else None
        ctx.mlflow_run_id = tracking.start_run(cfg, ctx.tracking_uri, cfg.run.name, previous)
        tracking.log_artifact(ctx.tracking_uri, ctx.mlflow_run_id, config_path)
        if auto_text:
            auto_path = os.path.join(run_dir, "auto_strategy.txt")
            with open(auto_path, "w") as f:
                f.write(auto_text + "\n")
            tracking.log_artifact(ctx.tracking_uri, ctx.mlflow_run_id, auto_path)
    if cfg.checkpoint.resume not in ("auto", "none"):
        ctx.resume_from = resume
    return ctx


def train_entry(cfg: Config, ctx: RunContext) -> dict:
    """`train_worker`, with its summary reduced to the scalars a worker reports."""
    from longctx.trainer.loop import train_worker

    summary = train_worker(cfg, ctx)
    return {"step": summary["step"], "finished": summary["finished"], **summary["eval"]}


def _ray_worker_entry(config: dict) -> None:
    """Runs inside each Ray Train worker: `worker(cfg, ctx, **kwargs)`, its scalars reported."""
    import ray.train

    os.environ["LONGCTX_UNDER_RAY"] = "1"
    # DeepSpeed's ZeRO still calls this torch collective by its old name.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    cfg = from_container(config["cfg"])
    ctx = RunContext(**config["ctx"])
    ray.train.report(config["worker"](cfg, ctx, **config["kwargs"]))


def run_with_ray(cfg: Config, ctx: RunContext, worker: Callable[..., dict] = train_entry,
                 name: Optional[str] = None, **kwargs) -> None:
    """`worker(cfg, ctx, **kwargs)` on `ray.num_workers` Ray Train workers (a module-level
    function returning scalars; default: training). `name`: the Ray run (default run.name)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        # address None: $RAY_ADDRESS (as under `ray job submit`) or a new local Ray.
        ray.init(address=cfg.ray.address, include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=True)
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _ray_worker_entry,
        train_loop_config={"cfg": to_container(cfg), "ctx": dataclasses.asdict(ctx), "worker": worker,
                           "kwargs": kwargs},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name or cfg.run.name, storage_path=os.path.join(ctx.run_dir, "ray"),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    trainer.fit()


def run_local(cfg: Config, ctx: RunContext) -> None:
    from longctx.trainer.loop import train_worker

    train_worker(cfg, ctx)


def finish_run(cfg: Config, ctx: RunContext, ok: bool) -> None:
    if not ctx.mlflow_run_id:
        return
    uri, run_id = ctx.tracking_uri, ctx.mlflow_run_id
    try:
        eval_json = os.path.join(ctx.run_dir, "eval_results.json")
        if ok and os.path.isfile(eval_json):
            tracking.log_artifact(uri, run_id, eval_json)
        heatmap = os.path.join(ctx.run_dir, NIAH_PNG)
        if ok and os.path.isfile(heatmap):
            tracking.log_artifact(uri, run_id, heatmap)
        png = tracking.plot_loss_curve(uri, run_id, os.path.join(ctx.run_dir, "loss_curve.png"))
        if png:
            tracking.log_artifact(uri, run_id, png)
    finally:
        tracking.end_run(uri, run_id, ok)


def train(cfg: Config) -> int:
    from longctx.launch.resolve import resolve_config

    setup_logging()
    cfg, notes = resolve_config(cfg)
    for note in notes:
        logger.info(note)
    auto_text = next((n for n in notes if n.startswith("parallel.strategy=auto")), "")
    ctx = prepare_run(cfg, auto_text)
    logger.info(f"run '{cfg.run.name}' in {ctx.run_dir}")
    if ctx.mlflow_run_id:
        logger.info(f"MLflow run {ctx.mlflow_run_id} at {ctx.tracking_uri}")
    ok = False
    try:
        (run_local if cfg.launcher == "local" else run_with_ray)(cfg, ctx)
        ok = True
    finally:
        finish_run(cfg, ctx, ok)
    summary = os.path.join(ctx.run_dir, "eval_results.json")
    logger.info(f"run '{cfg.run.name}' done; results in {summary}")
    if ctx.mlflow_run_id and ctx.tracking_uri.startswith("sqlite:///"):
        logger.info(f"view it: mlflow ui --backend-store-uri {ctx.tracking_uri}")
    sys.stdout.flush()
    return 0
