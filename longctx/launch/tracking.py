"""The driver's side of MLflow: where the store is, the run, params, artifacts, the plot.

Workers only log metrics into the run the driver created (trainer/metrics.py).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

from longctx.config import Config, to_flat_dict

logger = logging.getLogger("longctx")

MLFLOW_PARAM_BATCH = 100  # MLflow accepts at most 100 params per log_batch
# Keys that change where a run goes and how it is watched, not what it computes: a resume that
# changes only these repeats the earlier attempt's values, which MLflow then keeps once.
BOOKKEEPING = ("checkpoint.", "logging.", "run.", "ray.", "launcher", "train.stop_at_step")


def tracking_source(cfg: Config) -> tuple[Optional[str], str]:
    """(the tracking URI the user gave, the setting it came from); (None, "") = the local SQLite
    default of `tracking_uri`."""
    if cfg.logging.tracking_uri:
        return cfg.logging.tracking_uri, "logging.tracking_uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI"
    return None, ""


def tracking_uri(cfg: Config) -> str:
    """logging.tracking_uri, else $MLFLOW_TRACKING_URI, else SQLite in the output folder."""
    uri, _ = tracking_source(cfg)
    if uri:
        return uri
    out = os.path.abspath(cfg.run.output_dir)
    os.makedirs(out, exist_ok=True)
    return f"sqlite:///{os.path.join(out, 'mlflow.db')}"


def _client(uri: str):
    # MLflow prints alembic migration chatter the first time it creates a store.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow import MlflowClient
    return MlflowClient(uri)


def _experiment_id(client, cfg: Config, uri: str) -> str:
    exp = client.get_experiment_by_name(cfg.logging.experiment)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the store, not in the current folder
        artifacts = "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
    return client.create_experiment(cfg.logging.experiment, artifact_location=artifacts)


def start_run(cfg: Config, uri: str, run_name: str, existing_run_id: Optional[str],
              resume_step: int = 0) -> str:
    """Create the run (or reopen `existing_run_id` on resume, from checkpoint `resume_step`)
    and log params. Returns the run id. A resume whose config differs from what the run
    logged records the changes as tags and has every step after `resume_step` logged again."""
    from mlflow.entities import Param

    client = _client(uri)
    if existing_run_id:
        client.update_run(existing_run_id, status="RUNNING")
        run_id = existing_run_id
        logged = client.get_run(run_id).data.params
    else:
        run = client.create_run(_experiment_id(client, cfg, uri), run_name=run_name,
                                tags={"longctx.preset": getattr(cfg, "_preset", "custom")})
        run_id, logged = run.info.run_id, {}
    params = []
    for key, value in to_flat_dict(cfg).items():
        text = str(value)[:6000]
        if key in logged:
            if logged[key] != text:  # MLflow params are immutable; record what changed on resume
                client.set_tag(run_id, f"resume.changed.{key}", text[:5000])
            continue
        params.append(Param(key, text))
    if existing_run_id and any(key in logged and logged[key] != str(value)[:6000] and not key.startswith(BOOKKEEPING)
                               for key, value in to_flat_dict(cfg).items()):
        from longctx.trainer.metrics import reset_logged_marks

        reset_logged_marks(client, run_id, resume_step)
    for i in range(0, len(params), MLFLOW_PARAM_BATCH):
        client.log_batch(run_id, params=params[i:i + MLFLOW_PARAM_BATCH])
    return run_id


def log_artifact(uri: str, run_id: str, path: str, subdir: Optional[str] = None) -> None:
    _client(uri).log_artifact(run_id, path, subdir)


def log_metrics(uri: str, run_id: str, metrics: list[tuple[str, float, Optional[int]]]) -> None:
    """(name, value, step) triples into the run, in one batch (step None = 0)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _client(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, int(step or 0)) for k, v, step in metrics])


def end_run(uri: str, run_id: str, status: str) -> None:
    """status: FINISHED, KILLED (stopped on request, resumable) or FAILED."""
    _client(uri).set_terminated(run_id, status=status, end_time=int(time.time() * 1000))


def plot_loss_curve(uri: str, run_id: str, out_png: str) -> Optional[str]:
    """Train and eval loss against step, read back from MLflow (so a resumed run plots whole)."""
    client = _client(uri)
    train = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    if not train:
        return None
    evals = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/loss"))
    from longctx.plots import pyplot, save_line_plot

    fig, ax = pyplot().subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*train), label="train loss", lw=1.4)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"loss — {client.get_run(run_id).info.run_name}")
    return save_line_plot(fig, ax, out_png)
