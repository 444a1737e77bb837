"""`longctx train`: resolve the run, fail fast on bad input, then launch workers.

Everything that can be checked on the driver is checked before a single worker
starts (config, data files, tokenizer, resume target), so a bad command costs
seconds and leaves earlier runs untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shlex
import sys
import threading
import time
import traceback
import uuid
import warnings
from typing import Callable, Optional

from longctx.config import Config, ConfigError, from_container, to_container, to_yaml
from longctx.errors import RunError, WorkerError
from longctx.launch import tracking
from longctx.trainer import checkpoint as ckpt
from longctx.trainer.interrupt import create_channel, find_channel
from longctx.trainer.loop import NIAH_PNG, RunContext
from longctx.trainer.metrics import setup_logging

logger = logging.getLogger("longctx")


def _resume_target(cfg: Config, checkpoint_dir: str) -> Optional[str]:
    """The checkpoint this run starts from. `auto`: the newest one that matches its manifest;
    newer ones that do not are reported by name and left in place. Local checkpoints are
    checked file by file (size and sha256); in an object store the sizes are checked here
    and the checksums while the workers download."""
    from longctx.trainer.storage import is_uri

    mode = cfg.checkpoint.resume
    if mode == "auto":
        try:
            return ckpt.newest_valid_checkpoint(checkpoint_dir, checksums=not is_uri(checkpoint_dir),
                                                report=logger.warning, strict=True)
        except ckpt.InvalidCheckpoint as err:
            raise ConfigError(f"{err}\nNothing was changed; pass checkpoint.resume=none with another run.name "
                              f"to start afresh, or checkpoint.resume=PATH for a checkpoint of your choice") from None
    if mode == "none":
        if ckpt.list_checkpoints(checkpoint_dir):
            raise ConfigError(
                f"the run folder already holds checkpoints ({checkpoint_dir}); pass checkpoint.resume=auto to "
                f"continue that run, or another run.name for a new one (nothing was changed)")
        return None
    path = mode if is_uri(mode) else os.path.abspath(mode)
    problems = ckpt.verify_checkpoint(path, checksums=not is_uri(path))
    if problems:
        raise ConfigError(f"checkpoint.resume='{mode}' is not a valid checkpoint: " + "; ".join(problems))
    return path


def prepare_run(cfg: Config, auto_text: str = "") -> RunContext:
    """Checks inputs, creates the run folder and the MLflow run. Nothing is written before the checks pass.
    `cfg` is resolved (`resolve_config`); `auto_text` explains an `auto` strategy choice."""
    from longctx.launch.preflight import preflight
    from longctx.trainer.storage import StorageError, Store, is_uri
    from longctx.trainer.loop import resolve_vocab_size
    from longctx.trainer.sources import check_data
    from longctx.trainer.tokenizer import build_tokenizer

    for note in preflight(cfg):  # MLflow server, Ray address or local resources: fail in seconds
        logger.info(note)
    check_data(cfg.data)
    vocab_size = resolve_vocab_size(cfg, build_tokenizer(cfg.data.tokenizer))
    if cfg.model.init_from:
        from longctx.models.hf import check_weights

        check_weights(cfg.model, vocab_size)
    run_dir = os.path.abspath(os.path.join(cfg.run.output_dir, cfg.run.name))
    checkpoint_dir = cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints")
    if is_uri(checkpoint_dir):  # an object store: it must answer before anything starts
        try:
            Store(checkpoint_dir).check_reachable()
        except StorageError as err:
            raise ConfigError(f"checkpoint.dir={checkpoint_dir}: {err}") from None
    else:
        checkpoint_dir = os.path.abspath(checkpoint_dir)
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
        meta = ckpt.read_meta(resume) if resume else {}
        ctx.mlflow_run_id = tracking.start_run(cfg, ctx.tracking_uri, cfg.run.name, meta.get("mlflow_run_id"),
                                               int(meta.get("step", 0)))
        tracking.log_artifact(ctx.tracking_uri, ctx.mlflow_run_id, config_path)
        if auto_text:
            auto_path = os.path.join(run_dir, "auto_strategy.txt")
            with open(auto_path, "w") as f:
                f.write(auto_text + "\n")
            tracking.log_artifact(ctx.tracking_uri, ctx.mlflow_run_id, auto_path)
    ctx.resume_from = resume  # checked here; a worker restarted by Ray prefers this launch's own
    return ctx


def train_entry(cfg: Config, ctx: RunContext) -> dict:
    """`train_worker`, with its summary reduced to the scalars a worker reports."""
    from longctx.trainer.loop import train_worker

    summary = train_worker(cfg, ctx)
    return {"step": summary["step"], "finished": summary["finished"], "interrupted": summary["interrupted"],
            **summary["eval"]}


def forwarded_env() -> dict:
    """The driver's object-store settings (the standard `AWS_*` variables: credentials, region,
    an S3-compatible endpoint) for the workers, so `checkpoint.dir=s3://...` means the same
    bucket on every node as on the machine that launched the run; and MLflow's HTTP retry
    and timeout settings (`preflight` sets short ones), so rank 0 gives up on a dead server
    as soon as the driver would."""
    return {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MLFLOW_HTTP_"))}


def _ray_worker_entry(config: dict) -> None:
    """Runs inside each Ray Train worker: `worker(cfg, ctx, **kwargs)`, its scalars reported.
    A `RunError` (e.g. training diverged) is reported, not raised: Ray would restart the
    workers, and a restart cannot fix it."""
    import ray.train

    os.environ["LONGCTX_UNDER_RAY"] = "1"
    os.environ.update(config["env"])
    # DeepSpeed's ZeRO still calls this torch collective by its old name.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    cfg = from_container(config["cfg"])
    ctx = RunContext(**config["ctx"])
    rank = ray.train.get_context().get_world_rank()
    try:
        result = config["worker"](cfg, ctx, **config["kwargs"])
    except RunError as err:
        result = {"fatal": str(err)}
    except Exception as err:  # the traceback as text, for the driver to print once
        raise WorkerError(rank, type(err).__name__, str(err), traceback.format_exc()) from None
    channel = find_channel(ctx.launch_id)  # Ray Train keeps reported metrics only with checkpoints
    if channel is not None and rank == 0:
        ray.get(channel.report.remote(result))


def _worker_failure(err: Exception) -> RunError:
    """One error for Ray Train's: the lowest failing rank's exception and its traceback."""
    failures = getattr(err, "worker_failures", None) or {}
    if not failures:
        cause = getattr(err, "controller_failure", None) or err
        return RunError(f"Ray Train failed: {type(cause).__name__}: {cause}")
    # The first rank to fail makes the others fail in their collectives: report the rank
    # whose error is not such a consequence (connection reset, peer closed, ...), if any.
    collateral = ("connection", "closed by peer", "gloo", "nccl", "timed out", "broken pipe", "peer")
    rank = min(failures, key=lambda r: (any(w in str(failures[r]).lower() for w in collateral), r))
    exc = failures[rank]
    others = sorted(set(failures) - {rank})
    also = f" (rank{'s' * (len(others) > 1)} {', '.join(map(str, others))} failed too)" if others else ""
    if isinstance(exc, WorkerError):
        return RunError(f"worker rank {rank} failed{also}: {exc.kind}: {exc.message}\n{exc.trace.rstrip()}")
    return RunError(f"worker rank {rank} failed{also}: {type(exc).__name__}: {exc}")


def _wait_for_cluster(cfg: Config, announce, stop=None) -> None:
    """On a cluster, the autoscaler may still add nodes: say what is awaited and for how
    long, and fail (with what is missing) after `ray.resource_timeout_s`."""
    import ray

    from longctx.launch.preflight import resources_needed

    need = {k: v for k, v in resources_needed(cfg).items() if v}
    have = ray.cluster_resources()
    short = {k: v for k, v in need.items() if have.get(k, 0.0) < v}
    if not short:
        return
    timeout = cfg.ray.resource_timeout_s
    shown = ", ".join(f"{v:g} {k}" for k, v in need.items())
    announce(f"waiting up to {timeout:.0f} s (ray.resource_timeout_s) for the cluster to offer {shown} "
             f"(it has {', '.join(f'{have.get(k, 0.0):g} {k}' for k in need)} now): {cfg.ray.num_workers} "
             f"workers x {cfg.ray.cpus_per_worker:g} CPU{' + 1 GPU' if cfg.ray.use_gpu else ''}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(2.0)
        if stop is not None and stop.requested:  # nothing started yet: nothing to save
            raise KeyboardInterrupt
        have = ray.cluster_resources()
        if all(have.get(k, 0.0) >= v for k, v in need.items()):
            return
    raise RunError(f"the Ray cluster did not offer {shown} within ray.resource_timeout_s={timeout:g} s "
                   f"(it has {', '.join(f'{have.get(k, 0.0):g} {k}' for k in need)}); lower ray.num_workers "
                   f"or ray.cpus_per_worker, or add nodes")


def _fit_off_main_thread(trainer):
    """`trainer.fit()` in a thread. On the main thread Ray Train replaces our SIGINT handler
    with one that aborts the run at once; off it, Ray leaves signals to us, and the main
    thread, waiting here, still receives them."""
    box: dict = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as err:  # handed to the main thread
            box["error"] = err

    thread = threading.Thread(target=fit, name="longctx-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]


def run_with_ray(cfg: Config, ctx: RunContext, worker: Callable[..., dict] = train_entry,
                 name: Optional[str] = None, console=None, stop=None, **kwargs) -> dict:
    """`worker(cfg, ctx, **kwargs)` on `ray.num_workers` Ray Train workers (a module-level
    function returning scalars; default: training); returns rank 0's scalars. `name`: the
    Ray run (default run.name); `console`: filters what Ray forwards; `stop`: the driver's
    `SignalStop`, whose flag the workers read."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        # address None: $RAY_ADDRESS (as under `ray job submit`) or a new local Ray.
        with console.framework_call() if console is not None else contextlib.nullcontext():
            ray.init(address=cfg.ray.address, include_dashboard=False, logging_level=logging.WARNING,
                     configure_logging=True)
    if console is not None:
        console.filter_ray_output()
    channel = create_channel(ctx.launch_id)
    if stop is not None:
        stop.use_ray(channel)
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        _wait_for_cluster(cfg, logger.info, stop)
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _ray_worker_entry,
        train_loop_config={"cfg": to_container(cfg), "ctx": dataclasses.asdict(ctx), "worker": worker,
                           "kwargs": kwargs, "env": forwarded_env()},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name or cfg.run.name, storage_path=os.path.join(ctx.run_dir, "ray"),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    from ray.train import TrainingFailedError

    try:
        _fit_off_main_thread(trainer)
    except TrainingFailedError as err:
        raise _worker_failure(err) from None
    metrics = dict(ray.get(channel.get_result.remote()) or {})
    ray.kill(channel)
    if "fatal" in metrics:
        raise RunError(metrics["fatal"])
    return metrics


def run_local(cfg: Config, ctx: RunContext, console=None, stop=None) -> dict:
    return train_entry(cfg, ctx)


def finish_run(cfg: Config, ctx: RunContext, status: str) -> None:
    """Artifacts and the final MLflow status (FINISHED, KILLED or FAILED)."""
    if not ctx.mlflow_run_id:
        return
    uri, run_id = ctx.tracking_uri, ctx.mlflow_run_id
    ok = status == "FINISHED"
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
        tracking.end_run(uri, run_id, status)


def resume_command(argv: Optional[list[str]], cfg: Config) -> str:
    """The `longctx train` command that continues this run from its last checkpoint."""
    args = [a for a in (argv or []) if not a.startswith(("checkpoint.resume=", "run.name="))]
    return shlex.join(["longctx", "train", *args, f"run.name={cfg.run.name}", "checkpoint.resume=auto"])


def train(cfg: Config, argv: Optional[list[str]] = None, verbose: bool = False) -> int:
    """`longctx train`: returns the exit code (0; 130/143 when a signal stopped it cleanly).
    `argv`: the command's config file and overrides (for the resume hint)."""
    from longctx.launch.console import Console
    from longctx.launch.resolve import resolve_config
    from longctx.trainer.interrupt import SignalStop

    setup_logging()
    cfg, notes = resolve_config(cfg)
    with Console(verbose, cfg.launcher, cfg.train.engine) as console:
        for note in notes:
            logger.info(note)
        auto_text = next((n for n in notes if n.startswith("parallel.strategy=auto")), "")
        ctx = prepare_run(cfg, auto_text)
        log_path = console.open(ctx.run_dir)
        logger.info(f"run '{cfg.run.name}' in {ctx.run_dir}")
        if ctx.mlflow_run_id:
            logger.info(f"MLflow run {ctx.mlflow_run_id} at {ctx.tracking_uri}")
        if not verbose:
            logger.info(f"Ray, DeepSpeed and MLflow messages go to {log_path} (longctx train -v shows them here)")
        status, summary = "FAILED", {}
        with SignalStop(ctx.launch_id, logger.warning) as stop:
            try:
                summary = (run_local if cfg.launcher == "local" else run_with_ray)(cfg, ctx, console=console,
                                                                                  stop=stop)
                status = "KILLED" if summary.get("interrupted") else "FINISHED"
            except KeyboardInterrupt:
                status = "KILLED"
                raise
            except Exception:
                if not verbose:
                    logger.error(f"the run failed; Ray's, DeepSpeed's and MLflow's messages are in {log_path}")
                raise
            finally:
                finish_run(cfg, ctx, status)
        if status == "KILLED":
            logger.info(f"run '{cfg.run.name}' stopped at step {summary.get('step')} with a checkpoint; "
                        f"MLflow status KILLED. Resume it with:\n  {resume_command(argv, cfg)}")
            return stop.exit_code()
        summary_path = os.path.join(ctx.run_dir, "eval_results.json")
        logger.info(f"run '{cfg.run.name}' done; results in {summary_path}")
        if ctx.mlflow_run_id and ctx.tracking_uri.startswith("sqlite:///"):
            logger.info(f"view it: mlflow ui --backend-store-uri {ctx.tracking_uri}")
    sys.stdout.flush()
    return 0
