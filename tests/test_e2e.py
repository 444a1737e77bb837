"""End to end on a real local Ray cluster, real DeepSpeed, a real MLflow store.

- The default preset submitted with `ray job submit` succeeds; its MLflow run has
  params, one loss per step, eval metrics and the artifacts; the loss falls.
- A run stopped after a checkpoint and resumed with `checkpoint.resume=auto` logs
  the same per-step losses as the uninterrupted run, into the same MLflow run.
- A worker killed mid-run is restarted by Ray from the last checkpoint and the job finishes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import REPO, longctx_cmd

pytestmark = pytest.mark.slow


def _mlflow(uri_db: str):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{uri_db}")


def _only_run(client, name: str):
    runs = client.search_runs(client.get_experiment_by_name("longctx").experiment_id,
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, f"expected one MLflow run named {name}, found {len(runs)}"
    return runs[0]


def _losses(client, run_id: str) -> dict[int, float]:
    history = client.get_metric_history(run_id, "train/loss")
    by_step: dict[int, float] = {}
    for m in history:
        assert m.step not in by_step, f"step {m.step} logged twice"
        by_step[m.step] = m.value
    return by_step


def _run(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def default_job(ray_cluster, tmp_path_factory):
    """The default preset, submitted to the cluster as a user would."""
    out = str(tmp_path_factory.mktemp("jobruns"))
    env = dict(ray_cluster["env"])
    t0 = time.time()
    proc = _run(["ray", "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", REPO, "--",
                 "longctx", "train", f"run.output_dir={out}", "run.name=default"], env, timeout=400)
    return {"out": out, "proc": proc, "seconds": time.time() - t0}


def test_ray_job_submit_default_preset(default_job):
    assert "succeeded" in default_job["proc"].stdout + default_job["proc"].stderr
    client = _mlflow(os.path.join(default_job["out"], "mlflow.db"))
    run = _only_run(client, "default")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["parallel.cp"] == "2" and params["parallel.strategy"] == "ring"
    assert params["deepspeed.zero_stage"] == "2" and params["ray.num_workers"] == "2"
    losses = _losses(client, run.info.run_id)
    steps = int(params["train.steps"])
    assert sorted(losses) == list(range(1, steps + 1))
    first, last = sum(losses[s] for s in range(1, 4)) / 3, sum(losses[s] for s in range(steps - 2, steps + 1)) / 3
    assert last < 0.75 * first, f"loss did not fall: first steps {first:.3f}, last steps {last:.3f}"
    for key in ("train/lr", "train/grad_norm", "perf/tokens_per_s", "eval/loss", "eval/answer_accuracy",
                "cp/bytes_sent", "cp/attn_flops_imbalance"):
        assert client.get_metric_history(run.info.run_id, key), f"no {key} in MLflow"
    assert any(k.startswith("system/") for k in run.data.metrics), "no system metrics"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "eval_results.json", "loss_curve.png"} <= artifacts
    print(f"default preset via ray job submit: {default_job['seconds']:.1f} s; loss {first:.3f} -> {last:.3f}")


def test_resume_is_exact_and_continues_the_mlflow_run(default_job, ray_cluster):
    """Stop the default preset at its first checkpoint, resume it, compare with the uninterrupted job."""
    out = default_job["out"]
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
    common = ["train", f"run.output_dir={out}", "run.name=resumed"]
    _run(longctx_cmd(*common, "train.stop_at_step=20"), env)
    client = _mlflow(os.path.join(out, "mlflow.db"))
    first = _only_run(client, "resumed")
    assert sorted(_losses(client, first.info.run_id)) == list(range(1, 21))

    second = _run(longctx_cmd(*common, "checkpoint.resume=auto"), env)
    assert "resumed from" in second.stdout + second.stderr
    run = _only_run(client, "resumed")
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"

    resumed = _losses(client, run.info.run_id)
    reference = _losses(client, _only_run(client, "default").info.run_id)
    assert resumed.keys() == reference.keys()
    worst = max(abs(resumed[s] - reference[s]) / abs(reference[s]) for s in reference)
    assert worst <= 1e-6, f"resumed losses differ from the uninterrupted run by up to {worst:.2e} (relative)"
    print(f"resume: {len(resumed)} steps, worst relative loss difference {worst:.1e}")


def test_killed_worker_restarts_from_checkpoint(ray_cluster, tmp_path):
    out = str(tmp_path / "runs")
    run_dir = os.path.join(out, "killed")
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
    args = longctx_cmd("train", f"run.output_dir={out}", "run.name=killed", "train.steps=60",
                       "checkpoint.every=5", "train.eval_every=0", "ray.max_failures=1")
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        victim = _wait_for_checkpoint_then_pid(run_dir, proc, step=10, rank=1)
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-6000:]
    assert "resumed from" in output, output[-6000:]
    final = os.path.join(run_dir, "checkpoints", "step_000060", "meta.json")
    assert os.path.isfile(final), "the job did not reach its last step"
    client = _mlflow(os.path.join(out, "mlflow.db"))
    run = _only_run(client, "killed")
    assert run.info.status == "FINISHED"
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == 60


def _wait_for_checkpoint_then_pid(run_dir: str, proc, step: int, rank: int, timeout: float = 240) -> int:
    """The pid of worker `rank` once checkpoint `step` exists (the kill then lands mid-run)."""
    target = os.path.join(run_dir, "checkpoints", f"step_{step:06d}", "meta.json")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before the kill:\n{proc.stdout.read()[-6000:]}")
        if os.path.isfile(target):
            with open(os.path.join(run_dir, "workers", f"rank{rank}.pid")) as f:
                return int(f.read())
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint {target} after {timeout} s")
