"""End to end on a real local Ray cluster, real DeepSpeed, a real MLflow store.

- The default preset submitted with `ray job submit` succeeds; its MLflow run has
  params, one loss per step, eval metrics and the artifacts; the loss falls.
- With checkpoints in S3 (a loopback server), a worker killed mid-run is restarted by Ray
  from the bucket, SIGTERM stops the run with a checkpoint there, and a resume finishes it
  with the local-disk run's losses, each step logged once, into the same MLflow run
  (resuming from a local folder, and after a corrupt checkpoint, is in test_operations.py).
- The console shows longctx's lines only (every step line), none of Ray's or DeepSpeed's.
"""

from __future__ import annotations

import os
import re
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


_OURS = re.compile(r"^\d\d:\d\d:\d\d longctx ")


def _not_ours(console: str) -> list[str]:
    """Console lines of `longctx train` that are not longctx's own (the resume hint's
    indented command is ours)."""
    return [line for line in console.splitlines()
            if line.strip() and not _OURS.match(line) and not line.startswith("  longctx train ")]


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


def test_s3_checkpoints_survive_a_killed_worker_and_a_stop(default_job, ray_cluster, s3_server):
    """checkpoint.dir=s3://... (moto's server on loopback): a worker killed after the step-20
    checkpoint is restarted from the bucket, SIGTERM at step 30 writes a checkpoint there,
    and `checkpoint.resume=auto` finishes the run; the losses are the local-disk run's,
    each step logged once, and the console carries only longctx's lines."""
    out = default_job["out"]
    uri = s3_server["bucket"]("longctx-e2e") + "/run"
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"], **s3_server["env"]}
    common = ["train", f"run.output_dir={out}", "run.name=s3run", f"checkpoint.dir={uri}"]
    proc = subprocess.Popen(longctx_cmd(*common, "ray.max_failures=1"), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, killed, stopped = [], False, False
    try:
        for line in proc.stdout:
            lines.append(line)
            if not killed and f"checkpoint {uri}/step_000020" in line:
                with open(os.path.join(out, "s3run", "workers", "rank1.pid")) as f:
                    os.kill(int(f.read()), signal.SIGKILL)
                killed = True
            elif killed and not stopped and "step 30/40" in line and "resumed from" in "".join(lines):
                proc.send_signal(signal.SIGTERM)  # as a preemption notice would
                stopped = True
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = "".join(lines)
    assert killed and stopped, first[-6000:]
    assert proc.returncode == 128 + signal.SIGTERM, first[-6000:]
    assert f"resumed from {uri}/step_000020 at step 20" in first
    m = re.search(r"stopped at step (\d+) on request; checkpoint (s3://\S+)", first)
    assert m and m.group(2) == f"{uri}/step_{int(m.group(1)):06d}", first[-6000:]
    manifest = s3_server["fs"].get_file_info(m.group(2)[len("s3://"):] + "/manifest.json")
    assert manifest.size > 0, "the stop's checkpoint has no manifest in the bucket"
    assert not os.path.exists(os.path.join(out, "s3run", "checkpoints")), "checkpoints went to local disk"
    client = _mlflow(os.path.join(out, "mlflow.db"))
    assert _only_run(client, "s3run").info.status == "KILLED"

    second = _run(longctx_cmd(*common, "checkpoint.resume=auto"), env)
    assert f"resumed from {m.group(2)} at step {m.group(1)}" in second.stdout
    run = _only_run(client, "s3run")
    assert run.info.status == "FINISHED"  # the one run named s3run: the stop and the resume continued it
    # The console: every logging interval's step line (those after step 20 twice in the first
    # launch: the restart repeats them), and nothing of Ray's or DeepSpeed's.
    shown = [int(x) for x in re.findall(r"longctx step\s+(\d+)/40 ", first + second.stdout)]
    assert sorted(set(shown)) == list(range(5, 41, 5)), shown
    resumed = _losses(client, run.info.run_id)  # asserts each step once
    reference = _losses(client, _only_run(client, "default").info.run_id)
    assert resumed.keys() == reference.keys()
    worst = max(abs(resumed[s] - reference[s]) / abs(reference[s]) for s in reference)
    assert worst <= 1e-6, f"S3 run's losses differ from the local-disk run by up to {worst:.2e} (relative)"
    for text in (first, second.stdout + second.stderr):
        assert _not_ours(text) == [], "framework lines on the console:\n" + "\n".join(_not_ours(text)[:20])
    print(f"s3: killed rank 1 after step 20, stopped at step {m.group(1)}, resumed; worst relative loss "
          f"difference {worst:.1e}")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs train.device=cuda to fail in the workers")
def test_worker_exception_is_reported_once_with_its_rank(ray_cluster, tmp_path):
    """A failure inside the workers (here: train.device=cuda on a CPU machine) ends the run
    with exit code 1 and one error: the original exception, the rank, one traceback."""
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
    proc = subprocess.run(longctx_cmd("train", f"run.output_dir={tmp_path}", "run.name=fails", "train.device=cuda",
                                      "ray.max_failures=0", "parallel.cp=1", "ray.num_workers=1"), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-4000:]
    assert re.search(r"longctx: error: worker rank 0 failed: RuntimeError: train\.device=cuda",
                     proc.stderr), text[-4000:]
    assert text.count("Traceback") == 1, text[-4000:]
    assert _not_ours(proc.stdout) == []
    assert _only_run(_mlflow(str(tmp_path / "mlflow.db")), "fails").info.status == "FAILED"


def test_cluster_short_of_resources_says_what_it_awaits(ray_cluster, tmp_path):
    """With a cluster address the run waits for the autoscaler, says for what and how long,
    and gives up after ray.resource_timeout_s naming what is missing."""
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
    t0 = time.monotonic()
    proc = subprocess.run(longctx_cmd("train", f"run.output_dir={tmp_path}", "run.name=short", "ray.num_workers=8",
                                      "ray.resource_timeout_s=2"), env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-4000:]
    assert "waiting up to 2 s (ray.resource_timeout_s) for the cluster to offer 8 CPU (it has 4 CPU now)" in text
    assert "did not offer 8 CPU within ray.resource_timeout_s=2 s" in proc.stderr, text[-4000:]
    assert time.monotonic() - t0 < 60
