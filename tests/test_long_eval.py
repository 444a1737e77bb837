"""Long-context evaluation (`longctx eval --task niah|ppl`, longctx/trainer/long_eval.py).

- NIAH scoring (every key token is the argmax given the correct prefix) equals greedy decoding.
- For a fixed checkpoint, cp=2 x dp=2 (gloo processes, zigzag layout) gives the one-process
  NIAH grid and perplexity buckets.
- Through the CLI: niah on 2 Ray workers with cp=2 and ppl in one process write their JSON
  and PNG and log metrics and both files into the run's MLflow run; the training run itself
  ended with a NIAH grid (eval_results.json, `niah/accuracy`, the heatmap artifact).
- Bad options exit 2 with a message naming the option.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from conftest import REPO, longctx_cmd
from distributed_utils import run_distributed

pytestmark = pytest.mark.slow

GRID = ["--lengths", "96,192", "--depths", "0,0.5,1", "--samples", "2"]


def _mlflow(run_dir: str):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{os.path.join(os.path.dirname(run_dir), 'mlflow.db')}")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> str:
    """A few steps of the default preset in one process, at 192 tokens: a fixed checkpoint."""
    out = tmp_path_factory.mktemp("longeval") / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(longctx_cmd("train", "launcher=local", f"run.output_dir={out}", "run.name=tiny",
                                      "train.steps=3", "optim.warmup_steps=2", "checkpoint.every=0",
                                      "train.eval_every=0", "train.eval_batches=1", "data.seq_len=192",
                                      "data.max_doc_len=180", "logging.system_metrics=false"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return str(out / "tiny")


def _eval_config(run_dir: str, *overrides: str):
    from longctx.launch.resolve import resolve_config
    from longctx.trainer.evaluate import EvalTarget, eval_config, locate

    target = EvalTarget(*locate(run_dir))
    cfg, _ = resolve_config(eval_config(target, list(overrides)))
    return cfg, target.checkpoint


def _long_eval_body(rank, world_size, run_dir, cp):
    """niah + ppl on `world_size` ranks (context parallel over `cp`, zigzag) for the run's checkpoint."""
    from longctx.trainer import long_eval
    from longctx.trainer.evaluate import load_trainer
    from longctx.trainer.loop import RunContext

    cfg, checkpoint = _eval_config(run_dir, "launcher=ray", f"parallel.cp={cp}",
                                   f"ray.num_workers={world_size}", "parallel.strategy=zigzag")
    trainer = load_trainer(cfg, RunContext(run_dir=run_dir, checkpoint_dir=os.path.dirname(checkpoint),
                                           launch_id="test"), checkpoint)
    niah = long_eval.run_niah(trainer, long_eval.NiahOptions(lengths=[96, 190], depths=[0.0, 0.5, 1.0],
                                                             samples=2, batch_size=3))
    ppl = long_eval.run_ppl(trainer, long_eval.PplOptions(length=250, buckets=5, docs=3, batch_size=2))
    return niah, ppl


def test_niah_score_is_greedy_decoding(tiny_run):
    """A key counts as correct exactly when greedy decoding from the prompt writes it."""
    from longctx.trainer import long_eval
    from longctx.trainer.evaluate import load_trainer
    from longctx.trainer.loop import RunContext

    cfg, checkpoint = _eval_config(tiny_run, "launcher=local")
    trainer = load_trainer(cfg, RunContext(run_dir=tiny_run, checkpoint_dir=os.path.dirname(checkpoint),
                                           launch_id="test"), checkpoint)
    tok, model = trainer.tokenizer, trainer.module.eval()
    haystack = long_eval.Haystack(cfg, tok, "filler", 128)

    def greedy(ids: list[int], n: int) -> list[int]:
        ids = list(ids)
        with torch.no_grad():
            for _ in range(n):
                x = torch.tensor([ids])
                ids.append(int(model(x, torch.arange(len(ids))[None], torch.zeros_like(x))[0, -1].argmax()))
        return ids[-n:]

    cases = []
    for depth in (0.0, 0.5, 1.0):
        p = long_eval.niah_prompt(tok, haystack, 128, depth, 0, seed=1)
        prompt = p.ids[:-p.answer_len]
        written = greedy(prompt, 5)
        for answer in (written, written[:2] + [(written[2] + 1) % 256] + written[3:], p.ids[-p.answer_len:],
                       [(written[0] + 7) % 256] + written[1:]):
            cases.append((prompt + answer, answer == written))
    rows = long_eval.single_document_rows(
        [long_eval.NiahPrompt(128, 0.0, 0, "", ids, 5).row() for ids, _ in cases], 128, tok.pad_id)
    wrong = long_eval.answer_errors(trainer, rows)
    assert [w == 0 for w in wrong] == [expected for _, expected in cases]


def test_cp2_dp2_equals_one_process(tiny_run):
    """4 ranks, cp=2 x dp=2 (rows split over dp, empty rows padding the shorter share): the
    one-process grid and buckets."""
    one = _long_eval_body(0, 1, tiny_run, 1)
    for niah, ppl in run_distributed(_long_eval_body, 4, tiny_run, 2, timeout=240):
        assert niah == one[0]
        assert [b["tokens"] for b in ppl["buckets"]] == [b["tokens"] for b in one[1]["buckets"]] == [150] * 5
        for got, want in zip(ppl["buckets"], one[1]["buckets"]):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert ppl["ppl_beyond_seq_len"] == pytest.approx(one[1]["ppl_beyond_seq_len"], rel=1e-5)


def test_train_ends_with_niah(tiny_run):
    saved = json.load(open(os.path.join(tiny_run, "eval_results.json")))
    assert 0.0 <= saved["niah/accuracy"] <= 1.0 and saved["niah"]["lengths"] == [79, 96, 192]
    assert os.path.isfile(os.path.join(tiny_run, "niah_heatmap.png"))
    client = _mlflow(tiny_run)
    run = client.search_runs(client.get_experiment_by_name("longctx").experiment_id)[0]
    assert "niah/accuracy" in run.data.metrics
    assert "niah_heatmap.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def _logged(run_dir: str, metric: str) -> tuple[dict, set]:
    """The metric's history {step: value} and the artifacts under eval/ of the run's MLflow run."""
    client = _mlflow(run_dir)
    run = client.search_runs(client.get_experiment_by_name("longctx").experiment_id)[0]
    history = client.get_metric_history(run.info.run_id, metric)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    return {m.step: m.value for m in history}, artifacts


def test_cli_niah_on_ray_with_cp2(tiny_run, ray_cluster, tmp_path):
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"], "PYTHONUNBUFFERED": "1"}
    out_json, out_png = str(tmp_path / "niah.json"), str(tmp_path / "niah.png")
    proc = subprocess.run(longctx_cmd("eval", tiny_run, "--task", "niah", *GRID, "--json", out_json,
                                      "--plot", out_png, "launcher=ray", "parallel.cp=2", "ray.num_workers=2"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "niah/accuracy" in proc.stdout
    results = json.load(open(out_json))
    assert results["lengths"] == [96, 192] and len(results["grid"]) == 3 and results["step"] == 3
    assert os.path.getsize(out_png) > 0
    by_step, artifacts = _logged(tiny_run, "niah/accuracy")
    assert by_step[3] == pytest.approx(results["accuracy"])
    assert {"eval/niah.json", "eval/niah.png"} <= artifacts


def test_cli_ppl_local(tiny_run, capsys):
    from longctx.launch.cli import main

    assert main(["eval", tiny_run, "--task", "ppl", "--length", "384", "--buckets", "4", "--docs", "2",
                 "launcher=local"]) == 0
    assert "ppl/beyond_seq_len" in capsys.readouterr().out
    results = json.load(open(os.path.join(tiny_run, "eval_ppl.json")))
    assert [b["end"] for b in results["buckets"]] == [96, 192, 288, 384]
    assert all(b["tokens"] == 2 * 96 for b in results["buckets"])
    assert os.path.getsize(os.path.join(tiny_run, "eval_ppl.png")) > 0
    curve, artifacts = _logged(tiny_run, "ppl/by_position")
    assert sorted(curve) == [96, 192, 288, 384]
    assert {"eval/eval_ppl.json", "eval/eval_ppl.png"} <= artifacts


@pytest.mark.parametrize("args, message", [
    (["--task", "niah", "--lengths", "1"], "--lengths"),
    (["--task", "niah", "--depths", "0,150"], "--depths"),
    (["--task", "niah", "--length", "512"], "--length applies to --task ppl"),
    (["--task", "niah", "--lengths", "20"], "at least 79 tokens"),
    (["--task", "loss", "--plot", "x.png"], "--plot applies"),
])
def test_bad_options_exit_2(tiny_run, args, message, capsys):
    from longctx.launch.cli import main

    try:
        code = main(["eval", tiny_run, *args, "launcher=local"])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err
