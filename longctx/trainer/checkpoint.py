"""Checkpoints: engine state, data position, RNG, MLflow run id; committed by a manifest; keep the last K.

Layout of one checkpoint `step_000020/` under the root (a local folder, or a prefix in an object
store such as `s3://bucket/run/checkpoints`, see `storage.py`):
    engine/            the engine's own files (DeepSpeed shards, or ddp_state.pt)
    rng/rank_<r>.pt    each rank's RNG state
    meta.json          step, data positions per dp rank, MLflow run id, launch id
    manifest.json      every other file: relative path, size in bytes, sha256. Written last.

The manifest is the commit: a checkpoint is valid when it has one and every file matches it
(present, same size, same sha256; `verify_checkpoint`). This catches what a rename alone cannot:
a disk that lost data after the rename, a half-uploaded object, a copy gone wrong.

Listed (`list_checkpoints`) are the step folders with a manifest.json or a meta.json; a folder
with neither is a save in progress or one that stopped early, and is ignored. A listed folder
without a manifest is, in a local root, one written before manifests existed: committed by its
rename as before, it is accepted unverified (with a warning on load). In an object store it is
a save that stopped between meta.json and manifest.json: not valid, but visible, so that a
resume reports it instead of silently starting a new run over it.

Saving (collective, `save_checkpoint`):
  1. rank 0 removes leftovers of an earlier save of this step; barrier.
  2. each rank has the engine write into its own local staging folder, so it knows exactly which
     files are its own, and hashes them;
  3. the (path, size, sha256) lists of all ranks are gathered (two ranks writing one path is an
     error, raised on every rank before anything is moved);
  4. each rank moves (local root) or uploads (object store) its files to their final paths; barrier;
  5. rank 0 writes meta.json, then manifest.json listing everything, last.
  Local roots stage inside `step_X.tmp/` and rank 0 then renames it to `step_X/` (the same step
  saved again replaces it), so the final name only ever holds a committed checkpoint. Object
  stores have no rename: files go straight to `step_X/`, and the manifest written last commits.
  6. rotation (rank 0): of the valid checkpoints up to this step, the newest `keep` stay (the
     one just written always among them); older valid ones are deleted. Nothing else is ever
     deleted: newer steps (another lineage) stay, and a checkpoint that fails verification
     stays for an operator to look at and never counts toward `keep`.

Loading (collective, `load_checkpoint`): a local root loads in place after a sizes check. An
object store is downloaded once per node (by the lowest rank on each host) into a local cache
folder, each file checked against the manifest's size and sha256 as it streams in; then every
rank loads from there (DeepSpeed ZeRO-1/2 reads every rank's optimizer shard on every rank, so
a node needs the whole folder), and the cache is removed.

Verification cost: sizes need one listing; checksums read every byte. `newest_valid_checkpoint`
checks both by default; for an object store the launcher may pass `checksums=False` (sizes only,
no download on the driver), since loading verifies every checksum anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import tempfile
import uuid
from typing import Callable, Optional

import logging

import torch
import torch.distributed as dist

from longctx.trainer.distributed import all_gather_object
from longctx.trainer.storage import Store, digest_local_file, optional_text

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
META = "meta.json"
MANIFEST = "manifest.json"
_STAGING = ".staging"
logger = logging.getLogger("longctx")


class InvalidCheckpoint(ValueError):
    """A checkpoint whose files do not match its manifest, or a root where none is valid."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# -- finding checkpoints ---------------------------------------------------------------------------
def _listed(store: Store) -> list[str]:
    """Names of the step folders under the store that hold a manifest or a meta.json, oldest first."""
    found = []
    for name in store.list_dirs():
        m = _STEP_DIR.match(name)
        if m and (store.is_file(f"{name}/{MANIFEST}") or store.is_file(f"{name}/{META}")):
            found.append((int(m.group(1)), name))
    return [name for _, name in sorted(found)]


def list_checkpoints(root: str) -> list[str]:
    """Checkpoints under `root` (a local path or a URI), oldest first: step folders with a
    manifest or a meta.json, not verified. Paths are `root`/step_N: URIs stay URIs."""
    store = Store(root)
    return [store.child(name) for name in _listed(store)]


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest listed checkpoint (not verified: see `newest_valid_checkpoint`)."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_meta(path: str) -> dict:
    text = optional_text(Store(path), META)
    if text is None:
        raise FileNotFoundError(f"'{path}' is not a longctx checkpoint (no meta.json)")
    return json.loads(text)


# -- verification ----------------------------------------------------------------------------------
def _manifest_files(store: Store) -> list[dict]:
    """The manifest's entries [{path, size, sha256}]; InvalidCheckpoint when missing or unreadable."""
    text = optional_text(store, MANIFEST)
    if text is None:
        raise InvalidCheckpoint(f"{MANIFEST}: missing (written before manifests, or the save did not finish)")
    try:
        files = json.loads(text)["files"]
        return [{"path": str(e["path"]), "size": int(e["size"]), "sha256": str(e["sha256"])} for e in files]
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidCheckpoint(f"{MANIFEST}: unreadable ({type(e).__name__}: {e})") from None


def _mismatch(entry: dict, size: int, sha256: Optional[str]) -> Optional[str]:
    """What is wrong with a file of `size` bytes (and `sha256`, if known) against its manifest entry."""
    if size != entry["size"]:
        return f"{entry['path']}: {size} bytes, manifest says {entry['size']}"
    if sha256 is not None and sha256 != entry["sha256"]:
        return f"{entry['path']}: sha256 {sha256[:16]}..., manifest says {entry['sha256'][:16]}..."
    return None


def _legacy(store: Store) -> bool:
    """A local checkpoint written before manifests: committed by its folder's rename (a local
    save renames only after the manifest), so trusted as it was, unverified."""
    return store.is_local and not store.is_file(MANIFEST) and store.is_file(META)


def _problems(store: Store, checksums: bool) -> list[str]:
    if _legacy(store):
        return []
    try:
        files = _manifest_files(store)
    except InvalidCheckpoint as e:
        return [str(e)]
    sizes = store.list_files()
    problems = []
    for entry in files:
        if entry["path"] not in sizes:
            problems.append(f"{entry['path']}: missing")
            continue
        problem = _mismatch(entry, sizes[entry["path"]], None)
        if problem is None and checksums:
            problem = _mismatch(entry, *store.digest(entry["path"]))
        if problem:
            problems.append(problem)
    return problems


def verify_checkpoint(path: str, *, checksums: bool = True) -> list[str]:
    """Problems of the checkpoint at `path` (empty: valid). Each names the file and what is wrong,
    e.g. "engine/ddp_state.pt: 1234 bytes, manifest says 5678". Files are listed once for sizes;
    `checksums=True` also reads every file to compare its sha256."""
    return _problems(Store(path), checksums)


def find_newest_valid(root: str, *, checksums: bool = True,
                      below: Optional[int] = None) -> tuple[Optional[str], list[tuple[str, list[str]]]]:
    """(newest valid checkpoint or None, [(path, problems)] of the newer ones rejected, newest first).

    Listed checkpoints are verified newest first and the search stops at the first valid one;
    nothing is deleted. `(None, [...])` means checkpoints exist and none is valid; `(None, [])`
    means there is none."""
    store = Store(root)
    rejected = []
    for name in reversed(_listed(store)):
        if below is not None and _step_of(name) >= below:
            continue
        problems = _problems(store.sub(name), checksums)
        if not problems:
            return store.child(name), rejected
        rejected.append((store.child(name), problems))
    return None, rejected


def describe_rejected(rejected: list[tuple[str, list[str]]]) -> str:
    return "\n".join(f"  {path}: " + "; ".join(problems) for path, problems in rejected)


def newest_valid_checkpoint(root: str, *, checksums: bool = True, report: Optional[Callable[[str], None]] = None,
                            strict: bool = False, below: Optional[int] = None) -> Optional[str]:
    """The newest checkpoint under `root` that matches its manifest (see `find_newest_valid`).

    Each newer checkpoint passed over is reported through `report` (e.g. `log.warning`) with its
    problems. `strict=True` raises InvalidCheckpoint when checkpoints exist but none is valid
    (a resume that would otherwise silently start from scratch)."""
    path, rejected = find_newest_valid(root, checksums=checksums, below=below)
    if report is not None:
        for bad, problems in rejected:
            report(f"checkpoint {bad} is not valid, skipped: " + "; ".join(problems))
    if strict and path is None and rejected:
        raise InvalidCheckpoint(f"checkpoints exist under '{root}' but none is valid:\n{describe_rejected(rejected)}")
    return path


# -- RNG and collectives -----------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


# -- saving ------------------------------------------------------------------------------------------
def _describe(folder: str) -> list[dict]:
    """[{path, size, sha256}] of every file below the local `folder`, paths relative with '/'."""
    out = []
    for top, _, names in os.walk(folder):
        for n in names:
            full = os.path.join(top, n)
            size, sha = digest_local_file(full)
            out.append({"path": os.path.relpath(full, folder).replace(os.sep, "/"), "size": size, "sha256": sha})
    return sorted(out, key=lambda e: e["path"])


def _check_disjoint(per_rank: list[list[dict]]) -> None:
    owner = {}
    for r, entries in enumerate(per_rank):
        for e in entries:
            if e["path"] in owner:
                raise RuntimeError(f"checkpoint file '{e['path']}' was written by ranks {owner[e['path']]} and {r}")
            owner[e["path"]] = r


def _rotate(store: Store, keep: int, step: int) -> None:
    """Delete the valid checkpoints older than the newest `keep` valid ones up to `step`, the
    one just saved (sizes checked: one listing each, no reads). That one always stays, and
    newer steps (another lineage: a run resumed from an older checkpoint) are not touched,
    nor is anything invalid. A store that refuses deletion costs disk, not the run: warn."""
    valid = [name for name in _listed(store)
             if _step_of(name) <= step and not _problems(store.sub(name), checksums=False)]
    for name in valid[:-max(keep, 1)]:
        try:
            store.delete_dir(name)
        except OSError as e:
            logger.warning(f"could not delete the old checkpoint {store.child(name)} ({e}); it stays")


def _step_of(name: str) -> int:
    return int(_STEP_DIR.match(name).group(1))


def save_checkpoint(root: str, step: int, engine, meta: dict, *, rank: int, keep: int) -> str:
    """Collective: every rank calls it. Returns the committed folder (a URI for object stores)."""
    store = Store(root)
    name = step_dir_name(step)
    target = name + ".tmp" if store.is_local else name  # where the files go until the commit
    if rank == 0:
        store.delete_dir(target)  # a crashed save's leftovers; on an object store, this step saved before
    _barrier()
    if store.is_local:
        staging = os.path.join(store.sub(target).local_path, _STAGING, f"rank_{rank}")
    else:
        staging = tempfile.mkdtemp(prefix=f"longctx-{name}-rank{rank}-")
    try:
        os.makedirs(os.path.join(staging, "engine"), exist_ok=True)
        os.makedirs(os.path.join(staging, "rng"), exist_ok=True)
        engine.save(os.path.join(staging, "engine"))
        torch.save(rng_state(), os.path.join(staging, "rng", f"rank_{rank}.pt"))
        mine = _describe(staging)
        per_rank = all_gather_object(mine)
        _check_disjoint(per_rank)
        for entry in mine:
            src = os.path.join(staging, entry["path"])
            if store.is_local:
                dst = os.path.join(store.sub(target).local_path, entry["path"])
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(src, dst)
            else:
                store.upload(src, f"{target}/{entry['path']}")
    finally:
        if not store.is_local:
            shutil.rmtree(staging, ignore_errors=True)
    _barrier()
    if rank == 0:
        if store.is_local:
            shutil.rmtree(os.path.join(store.sub(target).local_path, _STAGING))  # empty folders by now
        meta_text = json.dumps({**meta, "step": step}, indent=2)
        store.write_text(f"{target}/{META}", meta_text)
        files = sorted([e for entries in per_rank for e in entries], key=lambda e: e["path"])
        files.append({"path": META, "size": len(meta_text.encode()),
                      "sha256": hashlib.sha256(meta_text.encode()).hexdigest()})
        store.write_text(f"{target}/{MANIFEST}", json.dumps({"format": 1, "step": step, "files": files}, indent=1))
        if store.is_local:  # the same step saved again (a resumed run) replaces it: old aside first,
            aside = f"{name}.old-{uuid.uuid4().hex[:8]}"  # so a crash here leaves one committed copy
            had_old = store.sub(name).local_path is not None and os.path.isdir(store.sub(name).local_path)
            if had_old:
                store.rename(name, aside)
            store.rename(target, name)
            if had_old:
                store.delete_dir(aside)
        _rotate(store, keep, step)
    _barrier()
    return store.child(name)


# -- loading -----------------------------------------------------------------------------------------
def _load_local(folder: str, engine, rank: int) -> dict:
    meta = read_meta(folder)
    engine.load(os.path.join(folder, "engine"))
    rng_file = os.path.join(folder, "rng", f"rank_{rank}.pt")
    if os.path.isfile(rng_file):  # absent when resuming on a different world size
        # Python's RNG state is a tuple of ints: weights_only loading accepts it.
        set_rng_state(torch.load(rng_file, weights_only=True))
    return meta


def _download_verified(store: Store, folder: str) -> None:
    """Every file of the manifest into the local `folder`, each checked as it streams in."""
    files = _manifest_files(store)
    shutil.rmtree(folder, ignore_errors=True)
    for entry in files:
        problem = _mismatch(entry, *store.download(entry["path"], os.path.join(folder, entry["path"])))
        if problem:
            raise InvalidCheckpoint(problem)


def load_checkpoint(path: str, engine, *, rank: int) -> dict:
    """Collective: restores engine and this rank's RNG; returns meta. InvalidCheckpoint (on every
    rank) when the files do not match the manifest: sizes for a local folder, sizes and sha256
    for an object store (checked while downloading)."""
    store = Store(path)
    if _legacy(store):
        logger.warning(f"checkpoint {path} was written before manifests: its files are not verified")
    if store.is_local:
        problems = _problems(store, checksums=False)
        if problems:
            raise InvalidCheckpoint(f"checkpoint {path} is not valid: " + "; ".join(problems))
        return _load_local(store.local_path, engine, rank)
    hosts = all_gather_object((socket.gethostname(), uuid.uuid4().hex))
    leader = min(r for r, (host, _) in enumerate(hosts) if host == hosts[rank][0])
    cache = os.path.join(tempfile.gettempdir(), f"longctx-checkpoint-{hosts[0][1]}")  # one name, every node
    error = None
    if rank == leader:
        try:
            _download_verified(store, cache)
        except (InvalidCheckpoint, OSError) as e:
            error = f"{type(e).__name__}: {e}"
    errors = [e for e in all_gather_object(error) if e]  # also the barrier: every node's copy is complete
    try:
        if errors:
            raise InvalidCheckpoint(f"checkpoint {path} could not be downloaded: {errors[0]}")
        return _load_local(cache, engine, rank)
    finally:
        _barrier()
        if rank == leader:
            shutil.rmtree(cache, ignore_errors=True)
