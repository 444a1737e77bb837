"""Context extension on CPU, end to end, as a user runs it.

1. Pretrain a tiny Llama at 256 tokens (`longctx train launcher=local`) and export it.
2. Extend it to 2048 tokens with YaRN (factor 8) at cp=2 on the shared Ray cluster
   (`longctx train model.init_from=DIR`, DeepSpeed ZeRO-2).
3. `longctx eval --task ppl` before and after, in one process: perplexity at positions
   1024-2048 is lower after the extension (evaluation at cp=2 on Ray equals one process:
   test_long_eval.py).
4. The extended run (ZeRO-2) exports to a folder transformers loads, with logits equal to
   longctx's for the trained weights (the ZeRO-3 round trip is in test_hf_roundtrip.py).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from conftest import REPO, longctx_cmd
from hf_cases import trained_model

import transformers  # noqa: E402  (a test dependency: the reference)
pytestmark = pytest.mark.slow

LONG_DOCS = ["data.task=lm", "data.min_doc_len=2100", "data.max_doc_len=4000"]


def _run(args, env, timeout=400):
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _ppl_range(path: str, lo: int, hi: int) -> float:
    """Token-weighted perplexity over the buckets inside [lo, hi) from an `eval --task ppl` JSON."""
    import math

    results = json.load(open(path))
    loss = tokens = 0.0
    for b in results["buckets"]:
        if b["start"] >= lo and b["end"] <= hi:
            loss += math.log(b["ppl"]) * b["tokens"]
            tokens += b["tokens"]
    assert tokens > 0, results
    return math.exp(loss / tokens)


def test_yarn_extension_lowers_long_range_perplexity(ray_cluster, tmp_path):
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
    out = str(tmp_path / "runs")
    common = [f"run.output_dir={out}", "logging.system_metrics=false", "train.eval_every=0", "checkpoint.every=0",
              "train.eval_batches=1"]
    # 1. pretrain at 256 tokens (documents split into 256-token rows: positions < 256)
    _run(longctx_cmd("train", "launcher=local", "run.name=base", "data.task=lm", "data.seq_len=256",
                     "model.dim=64", "train.steps=100", *common), env)
    base = str(tmp_path / "base_hf")
    _run(longctx_cmd("export", os.path.join(out, "base"), base, "--dtype", "fp32"), env)

    # 2. extend to 2048 with YaRN at cp=2 (ZeRO-2, the default engine)
    _run(longctx_cmd("train", f"model.init_from={base}", "model.rope_scaling.rope_type=yarn",
                     "model.rope_scaling.factor=8", "run.name=extended", "data.seq_len=2048", *LONG_DOCS,
                     "parallel.cp=2", "ray.num_workers=2", "train.steps=20", "optim.lr=1e-3",
                     "optim.warmup_steps=3", *common), env)

    # 3. perplexity by position, before and after (one process each)
    ppl = ["--task", "ppl", "--length", "2048", "--buckets", "8", "--docs", "2"]
    before, after = str(tmp_path / "before.json"), str(tmp_path / "after.json")
    _run(longctx_cmd("eval", base, *ppl, "--json", before, "launcher=local", "data.seq_len=256", *LONG_DOCS), env)
    _run(longctx_cmd("eval", os.path.join(out, "extended"), *ppl, "--json", after, "--plot",
                     str(tmp_path / "after.png"), "launcher=local"), env)
    ppl_before, ppl_after = _ppl_range(before, 1024, 2048), _ppl_range(after, 1024, 2048)
    short_before, short_after = _ppl_range(before, 0, 256), _ppl_range(after, 0, 256)
    print(f"perplexity at positions 1024-2048: {ppl_before:.2f} before -> {ppl_after:.2f} after YaRN x8 "
          f"(positions 0-256: {short_before:.2f} -> {short_after:.2f})")
    assert ppl_after < ppl_before
    assert os.path.getsize(str(tmp_path / "after.png")) > 0

    # 4. the extended model exports to transformers with equal logits
    exported = str(tmp_path / "extended_hf")
    _run(longctx_cmd("export", os.path.join(out, "extended"), exported, "--dtype", "fp32"), env)
    config = json.load(open(os.path.join(exported, "config.json")))
    assert config["max_position_embeddings"] == 2048 and config["rope_scaling"]["rope_type"] == "yarn"
    assert config["rope_scaling"]["original_max_position_embeddings"] == 256
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info
    ours = trained_model(os.path.join(out, "extended"))
    ids = torch.randint(0, 259, (1, 2048), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids, torch.arange(2048)[None]), theirs.float().eval()(input_ids=ids).logits
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-4
