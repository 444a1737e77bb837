"""Where checkpoints live: a local folder or an object store, through one `pyarrow.fs` file system.

    store = Store("s3://bucket/run/checkpoints")   # or "/shared/run/checkpoints", "gs://...", "file:///..."
    store.list_dirs()                    -> ["step_000010", "step_000020"]
    store.upload("/tmp/x.pt", "step_000020/engine/x.pt")
    store.download("step_000020/engine/x.pt", "/tmp/y.pt")   -> (size, sha256)

Every path a method takes is relative to the root, with "/" between parts. `child(rel)` is the
name a user sees (a local path, or the root URI with `/rel` appended), so checkpoint paths of
an object store stay URIs (`s3://bucket/run/step_000020`).

Why so small: the checkpoint code needs a listing, small text files, whole-file copies in and
out, deletion of a folder, and a rename where one exists (local folders; object stores have
none, so the checkpoint code commits with a manifest written last instead). Everything else a
file system offers is left out.

S3 is built here rather than by `FileSystem.from_uri`, so that it honours the standard AWS
environment variables the same way on every worker, including an endpoint override for
S3-compatible stores (MinIO, Ceph, moto), and fails in seconds, naming the URI, when the store
cannot be reached instead of retrying for minutes inside the first checkpoint save.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from typing import Optional
from urllib.parse import urlsplit

import pyarrow.fs as pafs

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_CHUNK = 8 << 20  # bytes per read while copying and hashing

# An unreachable endpoint fails after about attempts x connect timeout (plus a short backoff);
# a refused connection fails at once. Transient errors of a reachable store are still retried.
S3_CONNECT_TIMEOUT_S = 3.0
S3_REQUEST_TIMEOUT_S = 30.0
S3_MAX_ATTEMPTS = 3


class StorageError(OSError):
    """A checkpoint store cannot be used; the message names the URI and the problem."""


def is_uri(path: str) -> bool:
    """`scheme://...` (an object store or `file://`), as opposed to a plain local path."""
    return bool(_URI.match(path))


def s3_filesystem(env=os.environ) -> pafs.S3FileSystem:
    """S3 from the standard AWS environment variables.

    Endpoint: `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL` (e.g. `http://127.0.0.1:9000`): its
    scheme becomes `scheme=` and its host:port `endpoint_override=` (path-style addressing, as
    S3-compatible stores expect). Region: `AWS_REGION`, else `AWS_DEFAULT_REGION`, else us-east-1.
    Credentials: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN` when set,
    else the AWS SDK's own chain (profile files, instance metadata).

    Small files are written with one PUT (`allow_delayed_open`) rather than a multipart upload:
    one round trip instead of three for meta.json, manifest.json and the RNG files.
    """
    kwargs = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise StorageError(f"AWS endpoint '{endpoint}' is not http(s)://host[:port]")
        kwargs.update(scheme=parts.scheme, endpoint_override=parts.netloc)
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        kwargs.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                      session_token=env.get("AWS_SESSION_TOKEN") or None)
    return pafs.S3FileSystem(
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        connect_timeout=S3_CONNECT_TIMEOUT_S, request_timeout=S3_REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        allow_delayed_open=True, **kwargs)


def _open(root: str) -> tuple[pafs.FileSystem, str]:
    """(file system, its path of `root`) for a local path or a URI."""
    if not is_uri(root):
        return pafs.LocalFileSystem(), os.path.abspath(root)
    scheme = root.split("://", 1)[0].lower()
    if "?" in root:
        raise StorageError(f"checkpoint store '{root}': options in the URI are not supported; "
                           "configure the store through its environment variables (AWS_* for s3)")
    if scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(urlsplit(root).path)
    if scheme == "s3":
        base = root.split("://", 1)[1].strip("/")
        if not base:
            raise StorageError(f"checkpoint store '{root}' names no bucket (expected s3://bucket/prefix)")
        return s3_filesystem(), base
    try:
        fs, path = pafs.FileSystem.from_uri(root)
    except (ValueError, OSError) as e:
        raise StorageError(f"checkpoint store '{root}': {e}") from e
    return fs, path.rstrip("/")


def copy_hashing(src, dst=None) -> tuple[int, str]:
    """Read the stream `src` to its end, writing each chunk to `dst` if given;
    returns (bytes read, sha256 hex digest)."""
    h, n = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        n += len(chunk)
        if dst is not None:
            dst.write(chunk)
    return n, h.hexdigest()


def digest_local_file(path: str) -> tuple[int, str]:
    """(size, sha256) of a local file."""
    with open(path, "rb") as f:
        return copy_hashing(f)


class Store:
    """A checkpoint root: a local folder or an object-store URI. Paths are relative to it."""

    def __init__(self, root: str):
        self.root = root
        self.fs, self._base = _open(root)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    @property
    def local_path(self) -> Optional[str]:
        """The root as a local path, when it is one."""
        return self._base if self.is_local else None

    def sub(self, rel: str) -> "Store":
        """The store rooted at `rel`: the same file system (no new connection)."""
        out = copy.copy(self)
        out.root, out._base = self.child(rel), self._path(rel)
        return out

    def _path(self, rel: str = "") -> str:
        return f"{self._base}/{rel}" if rel else self._base

    def child(self, rel: str) -> str:
        """What a user calls `rel`: a local path, or a URI below the root URI."""
        return os.path.join(self.root, rel) if not is_uri(self.root) else f"{self.root.rstrip('/')}/{rel}"

    def _error(self, what: str, e: Exception) -> StorageError:
        return StorageError(f"checkpoint store '{self.root}': {what}: {e}")

    # -- reading -------------------------------------------------------------------------------------
    def list_dirs(self, rel: str = "") -> list[str]:
        """Names of the folders directly under `rel` (none when it does not exist)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), allow_not_found=True))
        except OSError as e:
            raise self._error(f"cannot list '{rel or '.'}'", e) from e
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def list_files(self, rel: str = "") -> dict[str, int]:
        """Every file below `rel`, recursively: path relative to `rel` -> size in bytes."""
        top = self._path(rel)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(top, recursive=True, allow_not_found=True))
        except OSError as e:
            raise self._error(f"cannot list '{rel or '.'}'", e) from e
        return {i.path[len(top) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}

    def is_file(self, rel: str) -> bool:
        try:
            return self.fs.get_file_info(self._path(rel)).type == pafs.FileType.File
        except OSError as e:
            raise self._error(f"cannot look up '{rel}'", e) from e

    def read_text(self, rel: str) -> str:
        """The file's text; FileNotFoundError when it does not exist."""
        try:
            with self.fs.open_input_stream(self._path(rel)) as f:
                return f.read().decode()
        except FileNotFoundError:
            raise
        except OSError as e:
            if not self.is_file(rel):
                raise FileNotFoundError(f"{self.child(rel)} does not exist") from e
            raise self._error(f"cannot read '{rel}'", e) from e

    def digest(self, rel: str) -> tuple[int, str]:
        """(size, sha256) of a stored file, streamed (nothing written locally)."""
        with self.fs.open_input_stream(self._path(rel)) as f:
            return copy_hashing(f)

    def download(self, rel: str, local: str) -> tuple[int, str]:
        """Copy a stored file to the local path `local`; returns (size, sha256) of what was read."""
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        try:
            with self.fs.open_input_stream(self._path(rel)) as src, open(local, "wb") as dst:
                return copy_hashing(src, dst)
        except OSError as e:
            raise self._error(f"cannot download '{rel}'", e) from e

    # -- writing -------------------------------------------------------------------------------------
    def _parent(self, rel: str) -> None:
        if self.is_local:  # object stores have no folders to create
            self.fs.create_dir(os.path.dirname(self._path(rel)), recursive=True)

    def write_text(self, rel: str, text: str) -> None:
        try:
            self._parent(rel)
            with self.fs.open_output_stream(self._path(rel)) as f:
                f.write(text.encode())
        except OSError as e:
            raise self._error(f"cannot write '{rel}'", e) from e

    def upload(self, local: str, rel: str) -> None:
        """Copy the local file `local` to `rel`."""
        try:
            self._parent(rel)
            with open(local, "rb") as src, self.fs.open_output_stream(self._path(rel)) as dst:
                copy_hashing(src, dst)
        except OSError as e:
            raise self._error(f"cannot upload '{local}' to '{rel}'", e) from e

    def delete_dir(self, rel: str) -> None:
        """Remove the folder `rel` and everything below it; nothing happens when it does not exist."""
        try:
            if self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound:
                self.fs.delete_dir(self._path(rel))
        except OSError as e:
            raise self._error(f"cannot delete '{rel}'", e) from e

    def rename(self, src: str, dst: str) -> None:
        """Atomic rename of a folder: local folders only (object stores have no rename)."""
        if not self.is_local:
            raise StorageError(f"checkpoint store '{self.root}' is an object store: it has no rename")
        os.replace(self._path(src), self._path(dst))

    # -- before anything starts ----------------------------------------------------------------------
    def check_reachable(self) -> None:
        """Raise StorageError, naming the URI and the problem, unless the root can be listed.

        Cheap (one or two requests), for the launcher to run before workers start: an endpoint
        that does not answer, a missing bucket, rejected credentials or a local root that is a
        file all fail here in seconds rather than in the first checkpoint save.
        """
        if self.is_local:
            if os.path.exists(self._base) and not os.path.isdir(self._base):
                raise StorageError(f"checkpoint folder '{self.root}' exists and is not a folder")
            return
        bucket = self._base.split("/", 1)[0]
        try:
            info = self.fs.get_file_info(bucket)
            if info.type == pafs.FileType.NotFound:
                raise StorageError(f"checkpoint store '{self.root}': bucket '{bucket}' does not exist "
                                   f"(or these credentials cannot see it)")
            self.fs.get_file_info(pafs.FileSelector(self._base, allow_not_found=True))
        except StorageError:
            raise
        except OSError as e:
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            where = f" at {endpoint}" if endpoint and self.root.startswith("s3://") else ""
            raise StorageError(f"checkpoint store '{self.root}' is not reachable{where}: {e}") from e


def optional_text(store: Store, rel: str) -> Optional[str]:
    """The file's text, or None when it does not exist."""
    try:
        return store.read_text(rel)
    except FileNotFoundError:
        return None
