"""Round trip through training: a transformers checkpoint -> `longctx train model.init_from=DIR`
at cp=2 on the shared Ray cluster (DeepSpeed ZeRO-3; ZeRO-2 in test_context_extension.py) -> `longctx export` ->
transformers loads the folder with no missing or unexpected keys, and its logits equal
longctx's for the trained weights (fp32, relative 1e-4)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from conftest import REPO, longctx_cmd
from hf_cases import make_checkpoint, trained_model

import transformers  # noqa: E402  (a test dependency: the reference)
pytestmark = pytest.mark.slow


def _run(args, env, timeout=400):
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pretrained"))
    make_checkpoint("llama3-tied", folder, vocab_size=300)
    return folder


# ZeRO-3 here; ZeRO-2 (the default engine) in test_context_extension.py, on the extended model.
@pytest.mark.parametrize("zero_stage", [3])
def test_train_export_load_in_transformers(pretrained, ray_cluster, tmp_path, zero_stage):
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
    out = str(tmp_path / "runs")
    _run(longctx_cmd("train", f"model.init_from={pretrained}", f"run.output_dir={out}", "run.name=ft",
                     "parallel.cp=2", "ray.num_workers=2", f"deepspeed.zero_stage={zero_stage}",
                     "data.seq_len=256", "data.max_doc_len=600", "train.steps=3", "train.eval_every=0",
                     "train.eval_batches=1", "optim.lr=1e-3", "optim.warmup_steps=1"), env)
    run_dir = os.path.join(out, "ft")
    exported = str(tmp_path / "hf")
    _run(longctx_cmd("export", run_dir, exported, "--dtype", "fp32"), env)

    config = json.load(open(os.path.join(exported, "config.json")))
    assert config["max_position_embeddings"] == 256  # raised to the trained length
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["tie_word_embeddings"] is True
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info
    theirs = theirs.float().eval()

    # longctx's model with the trained weights, straight from the engine's checkpoint.
    ours = trained_model(run_dir)
    source = transformers.AutoModelForCausalLM.from_pretrained(pretrained).float()
    moved = (ours.tok_embeddings.weight - source.model.embed_tokens.weight).abs().max().item()
    assert moved > 1e-5, "training did not change the weights"

    ids = torch.randint(0, 300, (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(ids, torch.arange(256).expand_as(ids))
        b = theirs(input_ids=ids).logits
    err = ((a - b).abs().max() / b.abs().max()).item()
    print(f"ZeRO-{zero_stage}: exported logits vs longctx's trained model: relative error {err:.2e}")
    assert err <= 1e-4
