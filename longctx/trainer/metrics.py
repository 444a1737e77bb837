"""What a run reports: a progress bar and one log line on rank 0, metrics to MLflow.

Only the logging rank (global rank 0) talks to MLflow. Metrics are buffered and
sent with `log_batch` once per logging interval, so a step costs no round trip.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

logger = logging.getLogger("longctx")


class _TqdmHandler(logging.StreamHandler):
    """Writes through tqdm so log lines never break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm
        tqdm.write(self.format(record), file=sys.stdout)


def setup_logging() -> None:
    if not logger.handlers:
        handler = _TqdmHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s longctx %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def format_step_line(step: int, total: int, m: dict) -> str:
    parts = [f"step {step:>{len(str(total))}}/{total}", f"loss {m['train/loss']:.4f}"]
    if "train/grad_norm" in m:
        parts.append(f"gnorm {m['train/grad_norm']:.3f}")
    parts.append(f"lr {m['train/lr']:.2e}")
    parts.append(f"{m['perf/tokens_per_s']:,.0f} tok/s")
    parts.append(f"{m['perf/step_time_s'] * 1000:.0f} ms/step")
    if "perf/mfu" in m:
        parts.append(f"mfu {m['perf/mfu'] * 100:.1f}%")
    if "perf/peak_mem_gib" in m:
        parts.append(f"mem {m['perf/peak_mem_gib']:.2f} GiB")
    if "cp/bytes_sent" in m:
        parts.append(f"cp sent {m['cp/bytes_sent'] / 2**20:.1f} MiB")
    if "cp/attn_flops_imbalance" in m:
        parts.append(f"imbalance {m['cp/attn_flops_imbalance']:.2f}")
    return " | ".join(parts)


class _Progress:
    """tqdm on rank 0; under Ray the Ray-aware tqdm that renders on the driver."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if not enabled:
            return
        if os.environ.get("LONGCTX_UNDER_RAY") == "1":
            from ray.experimental.tqdm_ray import tqdm
            self.bar = tqdm(total=total, desc="train")
            self.bar.update(initial)
        else:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, leave=False)

    def update(self, loss: float) -> None:
        if self.bar is not None:
            if hasattr(self.bar, "set_postfix"):  # Ray's tqdm has no postfix
                self.bar.set_postfix(loss=f"{loss:.4f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


LOGGED_THROUGH_TAG = "longctx.logged_through_step"  # the last step whose step metrics are in MLflow
EVAL_LOGGED_THROUGH_TAG = "longctx.eval_logged_through_step"  # ... and whose evaluations are


def reset_logged_marks(client, run_id: str, step: int) -> None:
    """A resume that may compute other values than an earlier attempt (the config changed):
    log again everything after `step`, the checkpoint it starts from."""
    for tag in (LOGGED_THROUGH_TAG, EVAL_LOGGED_THROUGH_TAG):
        client.set_tag(run_id, tag, str(step))


class RunLogger:
    def __init__(self, *, enabled: bool, run_id: Optional[str], tracking_uri: Optional[str],
                 total_steps: int, start_step: int, log_every: int, progress_bar: bool,
                 system_metrics: bool, resumed: bool):
        self.enabled = enabled
        self.total, self.log_every = total_steps, log_every
        self.run_id, self.client = run_id, None
        self.pending: list = []
        self.pending_through = {"train": 0, "eval": 0}
        self.monitor = None
        if not enabled:
            return
        setup_logging()
        self.progress = _Progress(total_steps, start_step, progress_bar)
        self.restart_mark = self.eval_mark = 0  # steps up to here were logged by an earlier attempt
        if run_id is not None:
            from mlflow import MlflowClient
            self.client = MlflowClient(tracking_uri)
            # A restart (worker failure, or a resume after the run went on past its last
            # checkpoint) repeats steps MLflow already has, with the same values: log each once.
            tags = self.client.get_run(run_id).data.tags
            self.restart_mark = int(tags.get(LOGGED_THROUGH_TAG) or 0)
            self.eval_mark = int(tags.get(EVAL_LOGGED_THROUGH_TAG) or 0)
            if self.restart_mark > start_step:
                logger.info(f"MLflow has this run's metrics up to step {self.restart_mark} from an earlier "
                            f"launch: steps {start_step + 1}-{self.restart_mark} are not logged again")
            if system_metrics:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
                self.monitor = SystemMetricsMonitor(run_id, sampling_interval=5, resume_logging=resumed,
                                                    tracking_uri=tracking_uri)
                self.monitor.start()

    def log(self, step: int, metrics: dict, *, family: str = "eval") -> None:
        """Buffer metrics of `step`. `family`: "train" (the step's own metrics) or "eval"
        (evaluations, NIAH); each has its own logged-through mark, so an evaluation an
        earlier attempt did not get to log is logged even at an already logged step."""
        if not self.enabled:
            return
        from mlflow.entities import Metric
        if step <= (self.restart_mark if family == "train" else self.eval_mark):
            return
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.pending_through[family] = max(self.pending_through[family], step)

    def step(self, step: int, metrics: dict) -> None:
        """Record one training step: buffer, update the bar, log a line each interval."""
        if not self.enabled:
            return
        self.log(step, metrics, family="train")
        self.progress.update(metrics["train/loss"])
        if step % self.log_every == 0 or step == self.total:
            logger.info(format_step_line(step, self.total, metrics))
            self.flush()

    def info(self, msg: str) -> None:
        if self.enabled:
            logger.info(msg)

    def warning(self, msg: str) -> None:
        if self.enabled:
            logger.warning(msg)

    def flush(self) -> None:
        if self.client is not None and self.pending:
            from mlflow.entities import RunTag

            # MLflow caps a batch at 1000 metrics; the last batch also moves the logged-through mark.
            marks = {LOGGED_THROUGH_TAG: max(self.restart_mark, self.pending_through["train"]),
                     EVAL_LOGGED_THROUGH_TAG: max(self.eval_mark, self.pending_through["eval"])}
            for i in range(0, len(self.pending), 1000):
                last = i + 1000 >= len(self.pending)
                tags = [RunTag(k, str(v)) for k, v in marks.items()] if last else []
                self.client.log_batch(self.run_id, metrics=self.pending[i:i + 1000], tags=tags, synchronous=True)
        self.pending = []

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        self.progress.close()
        if self.monitor is not None:
            self.monitor.finish()
