"""`launcher=local` (one process, no Ray) trains, checkpoints, and `longctx eval`
reads the DeepSpeed checkpoint back to the same held-out metrics."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, longctx_cmd

pytestmark = pytest.mark.slow


def test_local_train_then_eval(tmp_path):
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    train = subprocess.run(longctx_cmd("train", "launcher=local", f"run.output_dir={out}", "run.name=local",
                                       "train.steps=6", "checkpoint.every=3", "train.eval_every=0",
                                       "logging.system_metrics=false"),
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stdout[-4000:] + train.stderr[-4000:]
    assert "launcher=local runs one process" in train.stdout + train.stderr
    run_dir = out / "local"
    saved = json.loads((run_dir / "eval_results.json").read_text())
    assert saved["step"] == 6

    ev = subprocess.run(longctx_cmd("eval", str(run_dir)), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
    assert ev.returncode == 0, ev.stdout[-4000:] + ev.stderr[-4000:]
    printed = dict(line.split() for line in ev.stdout.strip().splitlines() if line.startswith(("eval/", "step")))
    assert float(printed["step"]) == 6
    assert float(printed["eval/loss"]) == pytest.approx(saved["eval/loss"], rel=1e-5)

    bad = subprocess.run(longctx_cmd("eval", str(tmp_path / "nowhere")), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "neither a run folder" in bad.stderr
