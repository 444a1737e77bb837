"""Shared fixtures. One real Ray cluster (`ray start --head` on loopback) serves every
end-to-end test of the session: starting Ray costs 5-30 s, so we pay it once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/distributed_utils.py


@pytest.fixture
def interp(monkeypatch):
    """Run the Triton kernels under the interpreter for this test (TRITON_INTERPRET=1; the
    backend reads it at call time)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env(tmp_root: str) -> dict:
    env = dict(os.environ)
    # A throw-away cluster on loopback: no token to distribute to the test's clients.
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.pop("RAY_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A head node on 127.0.0.1 with the job server. Yields addresses and an env for clients."""
    root = str(tmp_path_factory.mktemp("ray"))
    gcs_port, dash_port = _free_port(), _free_port()
    env = _ray_env(root)
    cmd = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--num-cpus=4",
           "--disable-usage-stats", f"--temp-dir={root}"]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        raise RuntimeError(f"ray start failed:\n{started.stdout}\n{started.stderr}")
    info = {"gcs": f"127.0.0.1:{gcs_port}", "dashboard": f"http://127.0.0.1:{dash_port}", "env": env}
    try:
        _wait_for_job_server(info["dashboard"], env)
        yield info
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def _wait_for_job_server(url: str, env: dict, timeout: float = 90.0) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"the Ray job server at {url} did not come up in {timeout:.0f} s")


def longctx_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "longctx.launch.cli", *args]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the session. Yields its endpoint, the AWS_*
    variables that point a client (or a `longctx train` subprocess) at it, and
    `bucket(name)`, which creates a bucket and returns its s3:// URI."""
    import logging

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", scheme="http",
                           endpoint_override=f"{host}:{port}", region="us-east-1", allow_bucket_creation=True)

    def bucket(name: str) -> str:
        fs.create_dir(name)
        return f"s3://{name}"

    try:
        yield {"endpoint": f"http://{host}:{port}", "env": env, "bucket": bucket, "fs": fs}
    finally:
        server.stop()
