"""Checks of what a run connects to, on the driver, before anything is written.

A tracking server that is down, a Ray address that does not answer, or more workers than
an embedded local Ray can ever place would otherwise surface minutes later (MLflow's HTTP
retries, Ray waiting for resources forever) or as tracebacks from workers. `preflight`
turns each into a `ConfigError` naming the setting, where it came from and the fix, in
seconds. It creates no files and starts no processes.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import sys
import urllib.error
import urllib.request
from typing import Optional
from urllib.parse import urlsplit

from longctx.config import Config, ConfigError
from longctx.launch.tracking import tracking_source

CONNECT_TIMEOUT_S = 4.0  # one attempt per endpoint; a live server answers in milliseconds
# MLflow's HTTP client otherwise retries 7 times with exponential backoff and a 120 s timeout
# per request: a tracking server that dies mid-run would hang the driver for minutes.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
MLFLOW_API_PROBE = "api/2.0/mlflow/experiments/search?max_results=1"  # any MLflow server answers it
NOTHING_CHANGED = "(nothing was changed)"


def preflight(cfg: Config) -> list[str]:
    """Raise ConfigError if the MLflow server or the Ray cluster cannot be used; else lines to log.
    `cfg` is resolved (`resolve_config`)."""
    notes = []
    if cfg.logging.mlflow:
        notes += check_mlflow(cfg)
    if cfg.launcher == "ray":
        notes += check_ray(cfg)
    return notes


# ------------------------------------------------------------------ MLflow


def _http_get(url: str) -> Optional[int]:
    """The HTTP status `url` answers with (any status: the server is up); None = no answer."""
    try:
        with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def check_mlflow(cfg: Config) -> list[str]:
    uri, source = tracking_source(cfg)
    if not uri or urlsplit(uri).scheme not in ("http", "https"):
        return []  # a local store (SQLite, files) or a managed one (databricks): nothing to reach
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    base = uri.rstrip("/")
    fix = (f"Start the server (e.g. `mlflow server --host 0.0.0.0 --port {urlsplit(uri).port or 5000}`), fix "
           f"{source}, or pass logging.mlflow=false to train without MLflow {NOTHING_CHANGED}")
    try:
        status = _http_get(f"{base}/health")
        if status == 404:  # behind a proxy that only forwards the API
            status = _http_get(f"{base}/{MLFLOW_API_PROBE}")
    except ssl.SSLError as err:  # it answers TLS; MLflow's own client may trust what urllib does not
        return [f"MLflow tracking server {uri} (from {source}) answers, but its TLS certificate was not "
                f"verified here ({getattr(err, 'reason', None) or err})"]
    except (OSError, ValueError, http.client.HTTPException) as err:  # refused, timed out, unknown host, not HTTP
        reason = getattr(err, "reason", None) or err
        raise ConfigError(f"the MLflow tracking server {uri} (from {source}) does not answer: {reason}. "
                          f"{fix}") from None
    if status == 404:  # something answers HTTP there, but not MLflow's REST API
        raise ConfigError(f"{uri} (from {source}) answers HTTP 404 at /health and at /{MLFLOW_API_PROBE}: it is "
                          f"not an MLflow tracking server (a wrong host, port or path?). {fix}")
    return [f"MLflow tracking server {uri} (from {source}) answers (HTTP {status})"]


# ------------------------------------------------------------------ Ray


def ray_address(cfg: Config) -> tuple[Optional[str], str]:
    """(the Ray address, the setting it came from): ray.address, else $RAY_ADDRESS; (None, "") = an
    embedded local Ray."""
    if cfg.ray.address:
        return cfg.ray.address, "ray.address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
    return None, ""


def resources_needed(cfg: Config) -> dict[str, float]:
    """What the Ray Train workers of `cfg` ask for in all, e.g. {"CPU": 8.0, "GPU": 0}."""
    n = cfg.ray.num_workers
    return {"CPU": n * float(cfg.ray.cpus_per_worker), "GPU": n if cfg.ray.use_gpu else 0}


def local_resources() -> dict[str, float]:
    """What an embedded local Ray would detect on this machine."""
    import torch

    try:  # what ray.init counts (cgroup limits included)
        from ray._private.utils import get_num_cpus

        cpus = get_num_cpus()
    except ImportError:  # a Ray without that private helper
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"CPU": float(cpus), "GPU": torch.cuda.device_count()}


def check_local_resources(cfg: Config) -> list[str]:
    need, have = resources_needed(cfg), local_resources()
    n, c = cfg.ray.num_workers, cfg.ray.cpus_per_worker
    where = "this machine (embedded local Ray: no ray.address, no $RAY_ADDRESS)"
    cluster = "or run on a cluster (ray.address=HOST:PORT or $RAY_ADDRESS)"
    if need["CPU"] > have["CPU"] + 1e-6:
        fit = int(have["CPU"] // c)
        fewer = f"fewer workers (ray.num_workers <= {fit}, a multiple of parallel.cp), " if fit else ""
        raise ConfigError(
            f"ray.num_workers={n} x ray.cpus_per_worker={c:g} needs {need['CPU']:g} CPUs, but {where} has "
            f"{have['CPU']:g}; Ray would wait for them forever. Use {fewer}a lower ray.cpus_per_worker "
            f"(<= {have['CPU'] / n:g}), {cluster} {NOTHING_CHANGED}")
    if need["GPU"] > have["GPU"]:
        fewer = f"ray.num_workers <= {have['GPU']}, " if have["GPU"] else ""
        raise ConfigError(
            f"ray.use_gpu=true with ray.num_workers={n} needs {need['GPU']} GPUs (one per worker), but {where} "
            f"has {have['GPU']}. Use {fewer}ray.use_gpu=false, {cluster} {NOTHING_CHANGED}")
    gpus = f", {need['GPU']} of {have['GPU']} GPUs" if need["GPU"] else ""
    return [f"embedded local Ray: {n} workers x {c:g} CPU = {need['CPU']:g} of {have['CPU']:g} CPUs{gpus}"]


def _host_port(address: str, source: str) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else "//" + address)
    default = {"ray": 10001, "http": 80, "https": 443}.get(parts.scheme, 6379)
    try:
        port = parts.port or default
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ConfigError(f"{source}='{address}' is not a Ray address: expected HOST:PORT, ray://HOST:PORT, "
                          f"http://HOST:PORT (a job server), auto or local")
    return parts.hostname, port


def check_ray(cfg: Config) -> list[str]:
    address, source = ray_address(cfg)
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        return []  # this process already joined a Ray (a caller's ray.init): it is used as is
    if address in (None, "local"):
        return check_local_resources(cfg)
    if address == "auto":
        return []  # a Ray started on this machine; ray.init says at once if there is none
    host, port = _host_port(address, source)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise ConfigError(
            f"the Ray cluster at {address} (from {source}) does not answer: {err or type(err).__name__}. Start it "
            f"(`ray start --head`), fix {source}, or unset it to train on an embedded local Ray "
            f"{NOTHING_CHANGED}") from None
    return [f"Ray cluster at {address} (from {source}) answers"]


__all__ = ["check_mlflow", "check_ray", "local_resources", "preflight", "ray_address", "resources_needed"]
