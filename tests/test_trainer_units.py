"""Unit checks of the trainer's pieces: LR schedules, checkpoint atomicity and rotation,
and both engines in bf16 with gradient accumulation."""

from __future__ import annotations

import math
import os

import pytest
import torch

from distributed_utils import run_distributed
from longctx.config import load_config
from longctx.trainer import checkpoint as ckpt
from longctx.trainer.engine import lr_lambda


def test_cosine_schedule_warms_up_then_decays_to_min():
    cfg = load_config(None, ["train.steps=100", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_wsd_schedule_is_flat_then_decays_linearly():
    cfg = load_config(None, ["train.steps=100", "optim.schedule=wsd", "optim.warmup_steps=5",
                             "optim.decay_fraction=0.2", "optim.min_lr_ratio=0.0"])
    f = lr_lambda(cfg)
    assert [f(s) for s in (5, 40, 79)] == [1.0, 1.0, 1.0]
    assert f(89) == pytest.approx(0.5) and f(99) == pytest.approx(0.0)


class _FakeEngine:
    def __init__(self):
        self.saved = []

    def save(self, folder):
        with open(os.path.join(folder, "state.bin"), "wb") as f:
            f.write(b"x")
        self.saved.append(folder)

    def load(self, folder):
        assert os.path.isfile(os.path.join(folder, "state.bin"))


def test_checkpoints_are_atomic_and_rotated(tmp_path):
    root = str(tmp_path)
    eng = _FakeEngine()
    for step in (5, 10, 15, 20):
        ckpt.save_checkpoint(root, step, eng, {"launch_id": "a"}, rank=0, keep=2)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == ["step_000015", "step_000020"]
    # A save that crashed midway leaves a .tmp folder: never picked, cleaned by the next save of that step.
    os.makedirs(tmp_path / "step_000025.tmp" / "engine")
    assert os.path.basename(ckpt.latest_checkpoint(root)) == "step_000020"
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(root), eng, rank=0)  # restores the RNG saved at step 20
    assert meta["step"] == 20 and meta["launch_id"] == "a"
    ckpt.save_checkpoint(root, 25, eng, {}, rank=0, keep=2)
    assert not os.path.exists(tmp_path / "step_000025.tmp")
    assert expected.shape == (3,)
    with pytest.raises(FileNotFoundError, match="not a longctx checkpoint"):
        ckpt.read_meta(str(tmp_path))


def _bf16_accum_body(rank, world, engine, run_dir):
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    from longctx.trainer.loop import RunContext, Trainer

    cfg = load_config(None, [f"train.engine={engine}", "train.dtype=bf16", "train.grad_accum=2",
                             f"parallel.cp={world}", f"ray.num_workers={world}", "data.seq_len=128",
                             "model.dim=64", "train.steps=3", "optim.warmup_steps=2", "logging.mlflow=false"])
    trainer = Trainer(cfg, RunContext(run_dir=run_dir, checkpoint_dir=os.path.join(run_dir, "c"), launch_id="t"))
    metrics = [trainer.train_step() for _ in range(3)]
    return [(m["train/loss"], m.get("train/grad_norm"), m["train/lr"]) for m in metrics]


@pytest.mark.parametrize("engine", ["deepspeed", "ddp"])
def test_bf16_with_grad_accumulation_trains(engine, tmp_path):
    out = run_distributed(_bf16_accum_body, 2, engine, str(tmp_path), timeout=240)
    losses = [m[0] for m in out[0]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(m[1] is not None and math.isfinite(m[1]) for m in out[0]), "one optimizer step per train_step"
    assert out[0] == out[1], "ranks of a cp group report the same numbers"


def _accum_fp32_body(rank, world, engine, run_dir):
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    from longctx.trainer.loop import RunContext, Trainer

    cfg = load_config(None, [f"train.engine={engine}", "train.grad_accum=3", "parallel.cp=1",
                             "ray.num_workers=1", "data.seq_len=128", "model.dim=64", "train.steps=4",
                             "optim.warmup_steps=1", "logging.mlflow=false"])
    trainer = Trainer(cfg, RunContext(run_dir=run_dir, checkpoint_dir=os.path.join(run_dir, "c"), launch_id="t"))
    return [trainer.train_step()["train/loss"] for _ in range(4)]


def test_engines_agree_with_gradient_accumulation(tmp_path):
    """Same micro-batches, same math: one optimizer step per train step under both engines."""
    ds = run_distributed(_accum_fp32_body, 1, "deepspeed", str(tmp_path / "ds"), timeout=240)[0]
    ddp = run_distributed(_accum_fp32_body, 1, "ddp", str(tmp_path / "ddp"), timeout=240)[0]
    torch.testing.assert_close(ds, ddp, rtol=1e-5, atol=0)
    assert ds[-1] < ds[0]


def _mfu_body(rank, world, run_dir):
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    from longctx.kernels import visible_pairs
    from longctx.trainer import loop
    from longctx.trainer.loop import RunContext, Trainer

    loop.peak_flops = lambda device, dtype: 1e12  # a CPU has no known peak; MFU needs one
    cfg = load_config(None, ["train.engine=ddp", "parallel.cp=2", "ray.num_workers=2", "data.seq_len=128",
                             "data.task=mix", "data.min_doc_len=10", "data.max_doc_len=60", "model.dim=64",
                             "train.grad_accum=2", "train.activation_checkpointing=true", "logging.mlflow=false"])
    trainer = Trainer(cfg, RunContext(run_dir=run_dir, checkpoint_dir=os.path.join(run_dir, "c"), launch_id="t"))
    rows = []
    next_batch = trainer.data.next_batch
    trainer.data.next_batch = lambda n: rows.append(next_batch(n)) or rows[-1]
    m = trainer.train_step()
    idx = torch.arange(128)
    pairs = sum(visible_pairs(idx, idx, b["doc_ids"], b["doc_ids"], causal=True) for b in rows)
    return {"attn": m["perf/attn_tflops"] * 1e12 * m["perf/step_time_s"] * world, "mfu": m["perf/mfu"],
            "dt": m["perf/step_time_s"], "pairs": pairs, "causal_pairs": len(rows) * 128 * 129 // 2,
            "dense": trainer._flops_per_token * 2 * 128, "per_pair": 3.5 * 4 * cfg.model.n_heads * 16 * 2}


def test_mfu_counts_the_visible_pairs_computed(tmp_path):
    """MFU and attention TFLOP/s come from the pairs the strategy computed (packed documents:
    far fewer than a causal row), once per layer although checkpointing recomputes forwards."""
    out = run_distributed(_mfu_body, 2, str(tmp_path), timeout=240)[0]
    assert out["pairs"] < 0.7 * out["causal_pairs"]  # several documents per row
    want = out["per_pair"] * out["pairs"]  # 3.5 x 4 H D per visible pair, 2 layers, dim 64 / 4 heads
    assert out["attn"] == pytest.approx(want, rel=1e-9)
    assert out["mfu"] == pytest.approx((out["dense"] + want) / out["dt"] / (1e12 * 2), rel=1e-9)
