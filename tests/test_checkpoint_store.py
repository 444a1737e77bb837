"""Checkpoints with a manifest, in a local folder and in S3 (moto's server on loopback, real
pyarrow S3 client): every file listed with size and sha256, the manifest written last; a
corrupt checkpoint is named and passed over, never deleted; a round trip restores weights,
optimizer state and data position, at world 1 (DDP) and world 2 (DeepSpeed ZeRO-2, gloo)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time

import pytest
import torch

from distributed_utils import free_port
from longctx.bench.spawn import launch
from longctx.config import load_config
from longctx.trainer import checkpoint as ckpt
from longctx.trainer.storage import StorageError, Store

TINY = ["model.dim=32", "model.n_layers=1", "data.seq_len=64", "train.steps=20", "optim.warmup_steps=1",
        "parallel.cp=1", "logging.mlflow=false", "checkpoint.keep=2"]
BUCKET = "ckpt"


@pytest.fixture(scope="module")
def s3(s3_server):
    """The session's moto S3 server with one bucket; this process's AWS_* environment points
    at it. The tiny checkpoints here are single PUTs: moto 5.2.1 answers a multipart upload's
    completion with an XML root that pyarrow rejects (getmoto/moto#10055)."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            mp.delenv(key, raising=False)
        for key, value in s3_server["env"].items():
            mp.setenv(key, value)
        s3_server["bucket"](BUCKET)
        yield s3_server["endpoint"]


def _trainer(root: str, engine: str = "ddp", world: int = 1, launch: str = "a"):
    from longctx.trainer.loop import RunContext, Trainer

    cfg = load_config(None, TINY + [f"train.engine={engine}", f"ray.num_workers={world}"])
    return Trainer(cfg, RunContext(run_dir="", checkpoint_dir=root, launch_id=launch))  # a Trainer writes no run files


def _ddp_state(trainer) -> dict:
    """Weights and every optimizer state tensor, copied."""
    state = {f"w.{k}": v.clone() for k, v in trainer.engine.raw.state_dict().items()}
    for pid, s in trainer.engine.optimizer.state_dict()["state"].items():
        state.update({f"opt.{pid}.{k}": torch.as_tensor(v).clone() for k, v in s.items()})
    return state


def _steps(trainer, n: int = 2) -> list[float]:
    return [trainer.train_step()["train/loss"] for _ in range(n)]


def _round_trip(trainer, path: str) -> tuple[list, list]:
    """Losses of the two steps after `path` was saved, then again after loading it: equal when
    weights, optimizer and scheduler state and the data position all came back."""
    after = _steps(trainer)
    trainer.load(path)
    return after, _steps(trainer)


def _rewrite(store: Store, rel: str, mutate) -> None:
    """Replace a stored file by `mutate(its bytes)`."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "f")
        store.download(rel, local)
        with open(local, "rb") as f:
            data = mutate(f.read())
        with open(local, "wb") as f:
            f.write(data)
        store.upload(local, rel)


def _flip_first_byte(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


def test_local_manifest_corruption_fallback_and_rotation(tmp_path):
    root = str(tmp_path / "checkpoints")
    trainer = _trainer(root)
    for _ in range(3):
        trainer.train_step()
        trainer.save()
    names = [os.path.basename(p) for p in ckpt.list_checkpoints(root)]
    assert names == ["step_000002", "step_000003"], "keep=2"
    newest = os.path.join(root, "step_000003")

    manifest = json.load(open(os.path.join(newest, "manifest.json")))
    on_disk = {os.path.relpath(os.path.join(d, n), newest) for d, _, ns in os.walk(newest) for n in ns}
    assert {e["path"] for e in manifest["files"]} == on_disk - {"manifest.json"}
    assert {"engine/ddp_state.pt", "rng/rank_0.pt", "meta.json"} <= on_disk
    for e in manifest["files"]:
        data = open(os.path.join(newest, e["path"]), "rb").read()
        assert (e["size"], e["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    mtimes = {p: os.stat(os.path.join(newest, p)).st_mtime_ns for p in on_disk}
    assert max(mtimes, key=mtimes.get) == "manifest.json", "written last"
    assert ckpt.verify_checkpoint(newest) == []

    # A same-size change is caught by the checksum only; a truncation by the sizes too.
    state = os.path.join(newest, "engine", "ddp_state.pt")
    size = os.path.getsize(state)
    _rewrite(Store(newest), "engine/ddp_state.pt", _flip_first_byte)
    assert ckpt.verify_checkpoint(newest, checksums=False) == []
    assert "engine/ddp_state.pt: sha256" in ckpt.verify_checkpoint(newest)[0]
    os.truncate(state, 100)
    assert ckpt.verify_checkpoint(newest, checksums=False) == [
        f"engine/ddp_state.pt: 100 bytes, manifest says {size}"]
    reports = []
    assert ckpt.newest_valid_checkpoint(root, report=reports.append) == os.path.join(root, "step_000002")
    assert len(reports) == 1 and "step_000003" in reports[0] and "100 bytes" in reports[0]
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == names, "nothing deleted"
    with pytest.raises(ckpt.InvalidCheckpoint, match="ddp_state.pt: 100 bytes"):
        ckpt.load_checkpoint(newest, trainer.engine, rank=0)

    # Rotation counts valid checkpoints only and never deletes an invalid one.
    trainer.train_step()
    trainer.save()  # step 4
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == ["step_000002", "step_000003",
                                                                         "step_000004"]
    assert ckpt.find_newest_valid(root) == (os.path.join(root, "step_000004"), [])
    # A manifest that cannot be read makes a checkpoint invalid, as does a missing file.
    with open(os.path.join(root, "step_000004", "manifest.json"), "w") as f:
        f.write("{not json")
    os.remove(os.path.join(root, "step_000002", "rng", "rank_0.pt"))
    path, rejected = ckpt.find_newest_valid(root)
    assert path is None and [os.path.basename(p) for p, _ in rejected] == ["step_000004", "step_000003",
                                                                          "step_000002"]
    assert rejected[0][1][0].startswith("manifest.json: unreadable")
    assert rejected[2][1] == ["rng/rank_0.pt: missing"]
    with pytest.raises(ckpt.InvalidCheckpoint, match="none is valid"):
        ckpt.newest_valid_checkpoint(root, strict=True)
    # A local folder with meta.json and no manifest at all was written before manifests (a local
    # save renames its folder into place only after the manifest): accepted, unverified.
    os.remove(os.path.join(root, "step_000004", "manifest.json"))
    assert ckpt.find_newest_valid(root)[0] == os.path.join(root, "step_000004")

    trainer.save()  # the same step saved again replaces the uncommitted folder, then round trip
    before = _ddp_state(trainer)
    after, again = _round_trip(trainer, os.path.join(root, "step_000004"))
    assert after == again
    trainer.load(os.path.join(root, "step_000004"))
    torch.testing.assert_close(_ddp_state(trainer), before, rtol=0, atol=0)


def test_s3_round_trip_world1_and_corrupt_object(s3):
    root = f"s3://{BUCKET}/world1/checkpoints"
    trainer = _trainer(root)
    for _ in range(2):
        trainer.train_step()
        path = trainer.save()
    assert path == f"{root}/step_000002"
    assert ckpt.list_checkpoints(root) == [f"{root}/step_000001", path]
    assert ckpt.read_meta(path)["step"] == 2 and ckpt.verify_checkpoint(path) == []
    before = _ddp_state(trainer)
    after, again = _round_trip(trainer, path)
    assert after == again
    trainer.load(path)
    torch.testing.assert_close(_ddp_state(trainer), before, rtol=0, atol=0)
    store = Store(root)
    assert not [n for n in store.list_dirs() if not n.startswith("step_")], "no leftovers"

    # A same-size corruption passes the sizes check and fails on download, naming the file.
    _rewrite(store, "step_000002/engine/ddp_state.pt", _flip_first_byte)
    assert ckpt.verify_checkpoint(path, checksums=False) == []
    with pytest.raises(ckpt.InvalidCheckpoint, match=r"step_000002.*engine/ddp_state.pt: sha256"):
        ckpt.load_checkpoint(path, trainer.engine, rank=0)
    # A worker that meets it while loading (it passed the driver's sizes check) uses the next
    # older valid checkpoint instead.
    from longctx.trainer.loop import _load_start

    assert _load_start(trainer, trainer.cfg, trainer.ctx) == f"{root}/step_000001" and trainer.step == 1
    reports = []
    assert ckpt.newest_valid_checkpoint(root, report=reports.append) == f"{root}/step_000001"
    _rewrite(store, "step_000002/engine/ddp_state.pt", lambda d: d[:10])  # a truncated object
    assert ckpt.newest_valid_checkpoint(root, checksums=False, report=reports.append) == f"{root}/step_000001"
    assert "step_000002" in reports[1] and "engine/ddp_state.pt: 10 bytes" in reports[1]
    assert ckpt.list_checkpoints(root) == [f"{root}/step_000001", path], "nothing deleted"
    store.write_text("step_000009/engine/ddp_state.pt", "x")  # an upload that stopped early: ignored
    assert ckpt.latest_checkpoint(root) == path
    store.write_text("step_000008/meta.json", "{}")  # stopped between meta.json and manifest.json
    assert ckpt.latest_checkpoint(root) == f"{root}/step_000008"
    assert ckpt.verify_checkpoint(f"{root}/step_000008")[0].startswith("manifest.json: missing")
    assert ckpt.newest_valid_checkpoint(root, checksums=False) == f"{root}/step_000001"


def test_check_reachable_fails_fast_and_names_the_uri(s3, monkeypatch):
    Store(f"s3://{BUCKET}/any/prefix").check_reachable()
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/run.*bucket 'no-such-bucket' does not exist"):
        Store("s3://no-such-bucket/run").check_reachable()
    port = free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=rf"s3://{BUCKET}/run' is not reachable at http://127.0.0.1:{port}"):
        Store(f"s3://{BUCKET}/run").check_reachable()
    assert time.monotonic() - t0 < 10
    with pytest.raises(StorageError, match="not a folder"):
        Store(__file__).check_reachable()


def _zero2_body(rank, world, local_root, s3_root):
    trainer = _trainer(s3_root, engine="deepspeed", world=world)
    trainer.train_step()
    trainer.ctx.checkpoint_dir = local_root
    local = trainer.save()
    trainer.ctx.checkpoint_dir = s3_root
    remote = trainer.save()
    out = {"local": local, "remote": remote, "after": _steps(trainer)}
    for kind, path in (("remote_trip", remote), ("local_trip", local)):
        trainer.load(path)
        out[kind] = _steps(trainer)
    return out


@pytest.mark.distributed
def test_s3_and_local_world2_deepspeed_zero2(s3, tmp_path):
    s3_root = f"s3://{BUCKET}/world2/checkpoints"
    # Forked from a server that imported DeepSpeed once: 6 s less than two spawned imports.
    result = launch(_zero2_body, 2, str(tmp_path / "c"), s3_root, engine="deepspeed", timeout=240)
    assert result["status"] == "ok", result.get("traceback", result["message"])
    out = result["ranks"]
    for kind in ("remote_trip", "local_trip"):
        assert out[0][kind] == out[0]["after"] and out[1][kind] == out[1]["after"], kind
    for path in (out[0]["local"], out[0]["remote"]):
        files = {e["path"] for e in json.loads(Store(path).read_text("manifest.json"))["files"]}
        shards = {f"engine/engine/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)}
        assert shards | {"rng/rank_0.pt", "rng/rank_1.pt", "meta.json"} <= files, sorted(files)
        assert ckpt.verify_checkpoint(path) == []
    assert not os.path.exists(str(tmp_path / "c" / "step_000001.tmp"))
