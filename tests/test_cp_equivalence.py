"""Context parallelism changes nothing numerically: cp=2 gives the cp=1 loss and every
parameter gradient (fp32), under DeepSpeed ZeRO-2 and under DDP, and the same losses
over a few optimizer steps. Rows hold several packed documents, so the document mask,
RoPE position resets and label masking across boundaries all take part.

Tolerance: rtol 1e-5 per element, with an absolute floor of 1e-6 x the largest
magnitude in that gradient tensor (elements that are ~0 carry only rounding noise).
"""

from __future__ import annotations

import os

import pytest
import torch

from distributed_utils import run_distributed
from longctx.parallel import STRATEGIES

pytestmark = pytest.mark.distributed

RTOL = 1e-5


def _overrides(engine: str, cp: int, world: int) -> list[str]:
    return [f"train.engine={engine}", f"parallel.cp={cp}", f"ray.num_workers={world}",
            "data.seq_len=256", "data.task=mix", "data.min_doc_len=40", "data.max_doc_len=200",
            "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
            "train.dtype=fp32", "train.steps=4", "optim.warmup_steps=1", "deepspeed.zero_stage=2",
            "logging.mlflow=false", "model.attention_backend=torch"]


def _train_body(rank: int, world: int, engine: str, cp: int, run_dir: str, extra: tuple = (),
                resume: bool = False):
    """Losses of 4 steps and the first step's gradients; with `resume`, also the losses of 2
    steps after a checkpoint at step 4 and of the same 2 steps again after loading it."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["DS_ACCELERATOR"] = "cpu"
    from longctx.config import load_config
    from longctx.trainer.loop import RunContext, Trainer

    cfg = load_config(None, _overrides(engine, cp, world) + list(extra))
    trainer = Trainer(cfg, RunContext(run_dir=run_dir, checkpoint_dir=os.path.join(run_dir, "ckpt"),
                                      launch_id="test"))
    first = trainer.forward_backward(trainer.data.next_batch(cfg.train.micro_batch_size))
    grads = {k: v.cpu() for k, v in trainer.engine.full_grads().items()}
    trainer.engine.step()
    losses = [first] + [trainer.train_step()["train/loss"] for _ in range(3)]
    out = {"losses": losses, "grads": grads if rank == 0 else None}
    if cfg.deepspeed.zero_stage == 3:  # fp32: the optimizer's master partition is the model's own
        zero3 = trainer.engine.module.optimizer
        out["master_shared"] = [m.data_ptr() == p.data_ptr() for p, m in
                                zip(zero3.fp16_partitioned_groups_flat, zero3.fp32_partitioned_groups_flat)]
    if resume:
        path = trainer.save()
        out["after_save"] = [trainer.train_step()["train/loss"] for _ in range(2)]
        trainer.load(path)
        out["after_load"] = [trainer.train_step()["train/loss"] for _ in range(2)]
    return out


def _assert_grads_equal(got: dict, want: dict) -> float:
    assert got.keys() == want.keys() and len(want) > 0
    worst = 0.0
    for name, w in want.items():
        g = got[name]
        floor = 1e-6 * float(w.abs().max())
        torch.testing.assert_close(g, w, rtol=RTOL, atol=floor, msg=lambda m: f"gradient of {name}: {m}")
        worst = max(worst, float((g - w).norm() / w.norm().clamp(min=1e-30)))
    return worst


@pytest.mark.parametrize("engine", ["ddp"])  # DeepSpeed: test_every_strategy_trains_like_cp1[ring]
def test_cp2_matches_cp1(engine, tmp_path):
    base = run_distributed(_train_body, 1, engine, 1, str(tmp_path / "cp1"), timeout=240)[0]
    cp2 = run_distributed(_train_body, 2, engine, 2, str(tmp_path / "cp2"), timeout=240)
    for r in range(2):  # both ranks report the cp-group loss
        torch.testing.assert_close(cp2[r]["losses"], base["losses"], rtol=RTOL, atol=0)
    rel = _assert_grads_equal(cp2[0]["grads"], base["grads"])
    print(f"{engine}: losses {base['losses']} ; worst relative gradient error {rel:.2e}")


def test_dp2_cp2_matches_dp2_cp1_deepspeed(tmp_path):
    """World 4 = dp 2 x cp 2 against world 2 = dp 2 x cp 1: the mesh groups and data assignment agree."""
    base = run_distributed(_train_body, 2, "deepspeed", 1, str(tmp_path / "a"), timeout=300)
    mixed = run_distributed(_train_body, 4, "deepspeed", 2, str(tmp_path / "b"), timeout=300)
    torch.testing.assert_close(mixed[0]["losses"], base[0]["losses"], rtol=RTOL, atol=0)
    _assert_grads_equal(mixed[0]["grads"], base[0]["grads"])


def test_cp2_with_activation_checkpointing_matches_cp1_ddp(tmp_path):
    """Ring attention recomputed in backward (communication included) still gives the cp=1 numbers."""
    base = run_distributed(_train_body, 1, "ddp", 1, str(tmp_path / "cp1"), timeout=240)[0]
    ac = run_distributed(_train_body, 2, "ddp", 2, str(tmp_path / "ac"), ("train.activation_checkpointing=true",),
                         timeout=240)
    torch.testing.assert_close(ac[0]["losses"], base["losses"], rtol=RTOL, atol=0)
    _assert_grads_equal(ac[0]["grads"], base["grads"])


def test_zero3_cp2_trains_like_zero2_cp1(tmp_path):
    """ZeRO-3 builds the model partitioned (`deepspeed.zero.Init`) and initialises it one
    block at a time: the same initial weights as the whole-model build, so cp=2 under ZeRO-3
    gives the losses and gradients of cp=1 under ZeRO-2 (the default of every other test).
    In fp32 its optimizer updates the model's partition in place (no master copy,
    `share_master_partition`): the steps after a checkpoint repeat exactly once it is loaded."""
    base = run_distributed(_train_body, 1, "deepspeed", 1, str(tmp_path / "cp1"), timeout=240)[0]
    cp2 = run_distributed(_train_body, 2, "deepspeed", 2, str(tmp_path / "cp2"), ("deepspeed.zero_stage=3",), True,
                          timeout=240)
    torch.testing.assert_close(cp2[0]["losses"], base["losses"], rtol=RTOL, atol=0)
    _assert_grads_equal(cp2[0]["grads"], base["grads"])
    for r in range(2):
        assert cp2[r]["master_shared"] and all(cp2[r]["master_shared"])
        assert cp2[r]["after_load"] == cp2[r]["after_save"], cp2[r]


# Layer 0 is a sliding-window layer (the window is a mask of every strategy), layer 1 full attention.
WINDOW = ("model.memory.swa_layers=[0]", "model.memory.window=48")


@pytest.fixture(scope="module")
def cp1_deepspeed_reference(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cp1ref"))
    return run_distributed(_train_body, 1, "deepspeed", 1, path, WINDOW, timeout=240)[0]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_like_cp1(strategy, cp1_deepspeed_reference, tmp_path):
    """The default preset's model and engine (DeepSpeed ZeRO-2, fp32), with a sliding-window
    layer and a full-attention layer: cp=2 with each strategy gives the cp=1 losses over 4
    steps and the cp=1 gradients (rtol 1e-5)."""
    out = run_distributed(_train_body, 2, "deepspeed", 2, str(tmp_path), (f"parallel.strategy={strategy}",) + WINDOW,
                          timeout=300)
    torch.testing.assert_close(out[0]["losses"], cp1_deepspeed_reference["losses"], rtol=RTOL, atol=0)
    _assert_grads_equal(out[0]["grads"], cp1_deepspeed_reference["grads"])


def test_cad_dp_scope_trains_like_plain_data_parallel(tmp_path):
    """CAD across data-parallel ranks (each holds different rows) changes where attention
    runs, not the numbers: same losses and gradients as plain dp=2."""
    plain = run_distributed(_train_body, 2, "deepspeed", 1, str(tmp_path / "plain"), timeout=300)
    cad = run_distributed(_train_body, 2, "deepspeed", 1, str(tmp_path / "cad"),
                          ("parallel.strategy=cad", "parallel.cad_scope=dp"), timeout=300)
    torch.testing.assert_close(cad[0]["losses"], plain[0]["losses"], rtol=RTOL, atol=0)
    _assert_grads_equal(cad[0]["grads"], plain[0]["grads"])


@pytest.mark.parametrize("memory", [("titans", "mal"), ("gsa", "mag"), ("fifo", "mac")])
def test_memory_hybrid_trains_like_cp1(memory, tmp_path):
    """Attention layers under ring CP and memory layers passing state across ranks, in one run."""
    kind, variant = memory
    extra = (f"model.memory.type={kind}", f"model.memory.variant={variant}", "model.memory.chunk_size=32",
             "model.memory.layers=[1]", "model.memory.window=64")
    base = run_distributed(_train_body, 1, "ddp", 1, str(tmp_path / "cp1"), extra, timeout=300)[0]
    cp2 = run_distributed(_train_body, 2, "ddp", 2, str(tmp_path / "cp2"), extra, timeout=300)
    torch.testing.assert_close(cp2[0]["losses"], base["losses"], rtol=RTOL, atol=0)
    _assert_grads_equal(cp2[0]["grads"], base["grads"])


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_loss_trains_like_full_logits(tied, tmp_path):
    """cp=2 (ring, DDP): the chunked lm-head loss (37-token chunks, so chunks straddle the
    documents and the rank's slice) against the full logits: the same per-step losses
    (relative 1e-6) and parameter gradients (rtol 1e-5). Every other test here runs the
    chunked loss, the default."""
    extra = (f"model.tie_embeddings={str(tied).lower()}",)
    full = run_distributed(_train_body, 2, "ddp", 2, str(tmp_path / "full"), extra + ("train.loss=full",),
                           timeout=240)
    chunked = run_distributed(_train_body, 2, "ddp", 2, str(tmp_path / "chunked"),
                              extra + ("train.loss_chunk_size=37",), timeout=240)
    torch.testing.assert_close(chunked[0]["losses"], full[0]["losses"], rtol=1e-6, atol=0)
    rel = _assert_grads_equal(chunked[0]["grads"], full[0]["grads"])
    print(f"tied={tied}: losses {full[0]['losses']} ; worst relative gradient error {rel:.2e}")
