"""Runs that go wrong end cleanly and lose nothing (one process, real DeepSpeed, real MLflow).

- Training that diverges (optim.lr=1e4) stops after `train.max_bad_steps` skipped steps
  in a row, with exit code 1 and a message naming the step and what was non-finite; the
  last good checkpoint stays; the skipped steps are a metric.
- A corrupt newest checkpoint is reported by name and the previous valid one is used;
  the run then logs the per-step losses of an uninterrupted run.
- SIGINT between checkpoints writes a checkpoint at that step, marks the MLflow run
  KILLED and prints the command that resumes it; that command continues with the
  uninterrupted run's losses, each step logged once.

The same runs under Ray, with checkpoints in S3, are in test_e2e.py.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time

import pytest

from conftest import REPO, longctx_cmd
from longctx.launch.cli import main

pytestmark = pytest.mark.slow

STEPS = 12
COMMON = ["launcher=local", f"train.steps={STEPS}", "checkpoint.every=4", "train.eval_every=0", "data.task=lm",
          "logging.log_every=1", "logging.system_metrics=false", "logging.progress_bar=false"]


def _client(out):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{os.path.join(out, 'mlflow.db')}")


def _run(out, name: str):
    client = _client(out)
    runs = client.search_runs(client.get_experiment_by_name("longctx").experiment_id,
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1
    return client, runs[0]


def _losses(out, name: str) -> dict[int, float]:
    client, run = _run(out, name)
    by_step: dict[int, float] = {}
    for m in client.get_metric_history(run.info.run_id, "train/loss"):
        assert m.step not in by_step, f"step {m.step} logged twice"
        by_step[m.step] = m.value
    return by_step


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in b)


@pytest.fixture(scope="module", autouse=True)
def _no_process_group_left():
    """In-process `launcher=local` runs share one world-of-one process group (DeepSpeed keeps
    a handle on it); tests in later modules of this process expect none."""
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    import deepspeed.comm.comm as ds_comm

    ds_comm.cdb = None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: per-step losses from its MLflow run."""
    out = str(tmp_path_factory.mktemp("reference"))
    assert main(["train", *COMMON, f"run.output_dir={out}", "run.name=ref"]) == 0
    losses = _losses(out, "ref")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def test_diverging_run_stops_after_max_bad_steps(tmp_path, capsys):
    out = str(tmp_path)
    t0 = time.monotonic()
    rc = main(["train", *COMMON, f"run.output_dir={out}", "run.name=div", "optim.lr=1e4", "optim.warmup_steps=0",
               "checkpoint.every=1", "train.max_bad_steps=2", "train.steps=30"])
    seconds = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback" not in err
    m = re.search(r"step (\d+): non-finite .*train\.max_bad_steps=2.*last good checkpoint is (\S+step_(\d+))", err)
    assert m, err
    stopped, good = int(m.group(1)), int(m.group(3))
    client, run = _run(out, "div")
    assert run.info.status == "FAILED"
    skipped = {x.step: x.value for x in client.get_metric_history(run.info.run_id, "train/skipped_steps")}
    assert max(skipped) == stopped and skipped[stopped] == 2.0, skipped
    first_bad = min(s for s, v in skipped.items() if v > 0)
    assert stopped == first_bad + 1, "the run did not stop after 2 skipped steps in a row"
    assert good == first_bad - 1, "the newest checkpoint is not the last good step"
    steps_on_disk = sorted(int(n[5:]) for n in os.listdir(os.path.join(out, "div", "checkpoints")))
    assert max(steps_on_disk) == good
    print(f"diverging run: first skipped step {first_bad}, stopped at {stopped} after {seconds:.1f} s")


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, reference):
    out = str(tmp_path)
    common = [*COMMON, f"run.output_dir={out}", "run.name=corrupt"]
    assert main(["train", *common, "train.stop_at_step=8"]) == 0
    ckpts = os.path.join(out, "corrupt", "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["step_000004", "step_000008"]
    shard = max((os.path.join(d, f) for d, _, files in os.walk(os.path.join(ckpts, "step_000008", "engine"))
                 for f in files), key=os.path.getsize)
    with open(shard, "r+b") as f:  # a shard cut short, as by a full disk or a killed upload
        f.truncate(os.path.getsize(shard) // 2)
    capsys.readouterr()

    assert main(["train", *common, "checkpoint.resume=auto"]) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "step_000008" in text and os.path.basename(shard) in text, text[-3000:]
    assert re.search(r"resumed from \S+step_000004 at step 4", text), text[-3000:]
    worst = _worst(_losses(out, "corrupt"), reference)
    assert worst <= 1e-6, f"losses after the fallback differ from the uninterrupted run by {worst:.1e}"
    print(f"corrupt newest checkpoint: resumed from step 4, worst relative loss difference {worst:.1e}")


def test_sigint_checkpoints_then_resumes_exactly(tmp_path, reference, capsys, monkeypatch):
    out = str(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run folder's SQLite store, here and below
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(longctx_cmd("train", *COMMON, f"run.output_dir={out}", "run.name=sig"), cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(rf"step\s+5/{STEPS} ", line):
                proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines)
    assert proc.returncode == 130, text[-3000:]
    m = re.search(r"stopped at step (\d+) on request; checkpoint (\S+)", text)
    assert m, text[-3000:]
    step = int(m.group(1))
    assert 5 <= step < STEPS and os.path.basename(m.group(2)) == f"step_{step:06d}"
    assert os.path.isfile(os.path.join(m.group(2), "meta.json"))
    assert _run(out, "sig")[1].info.status == "KILLED"
    resume = re.search(r"Resume it with:\s*\n\s*(longctx train .*)", text)
    assert resume and "checkpoint.resume=auto" in resume.group(1), text[-3000:]

    capsys.readouterr()
    assert main(shlex.split(resume.group(1))[1:]) == 0  # the printed command, in this process
    assert f"resumed from {m.group(2)} at step {step}" in capsys.readouterr().out
    assert _run(out, "sig")[1].info.status == "FINISHED"
    worst = _worst(_losses(out, "sig"), reference)
    assert worst <= 1e-6, f"resumed losses differ from the uninterrupted run by {worst:.1e}"
    print(f"SIGINT: stopped at step {step} with a checkpoint; resumed, worst relative difference {worst:.1e}")


def test_console_sends_framework_messages_to_the_run_log(tmp_path, capfd):
    """What a framework says (its loggers, native writes to fd 2, lines Ray forwards from its
    workers) lands in <run>/logs/framework.log; longctx's lines stay on the console."""
    import logging

    from longctx.launch.console import Console
    from longctx.trainer.metrics import setup_logging

    setup_logging()
    with Console(verbose=False, launcher="ray") as console:
        logging.getLogger("ray.train").warning("said before the run folder exists")
        path = console.open(str(tmp_path))
        logging.getLogger("DeepSpeed").warning("a DeepSpeed banner")
        logging.getLogger("longctx").info("step 1/2 | loss 1.0")
        console._dispatch({"lines": ["12:00:00 longctx step 2/2 | loss 0.5", "Setting up process group for: env://"],
                           "pid": 7, "actor_name": "RayTrainWorker", "is_err": False})
        os.write(2, b"native chatter\n")
    shown = capfd.readouterr()
    log = open(path).read()
    for said in ("said before the run folder exists", "a DeepSpeed banner",
                 "(RayTrainWorker pid=7) Setting up process group", "native chatter"):
        assert said in log and said not in shown.out + shown.err, said
    assert "longctx step 1/2 | loss 1.0" in shown.out and "12:00:00 longctx step 2/2 | loss 0.5" in shown.out
    assert "step 1/2" not in log

    before = {name: list(logging.getLogger(name).handlers) for name in ("ray", "DeepSpeed", "mlflow")}
    with Console(verbose=True, launcher="ray") as console:  # -v: nothing is rerouted
        console.open(str(tmp_path / "v"))
        assert {name: list(logging.getLogger(name).handlers) for name in before} == before
    assert not os.path.exists(tmp_path / "v" / "logs")
