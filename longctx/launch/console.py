"""What `longctx train` shows on its console, and where everything else goes.

The console carries longctx's own lines (run start, step lines or the progress bar,
evals, checkpoints, the summary), warnings that matter, and errors. What Ray,
DeepSpeed and MLflow say for themselves goes to `<run>/logs/framework.log`:

- their Python loggers on the driver get a handler into that file (buffered in
  memory until the run folder exists, so a command that fails its checks writes
  nothing);
- native code writing to the driver's stderr (Ray's core worker) writes into the
  file too: file descriptor 2 is pointed at it, and `sys.stderr` keeps the terminal;
- lines Ray forwards from its actors and workers pass through a filter: a longctx
  log line (`HH:MM:SS longctx ...`) or a Ray progress-bar update goes to the
  terminal, anything else (DeepSpeed's banners, Ray Train's controller, worker
  tracebacks, which the driver reports once itself) to the file;
- the raylet's error reports (a worker died, memory pressure) become one longctx
  warning each, their first sentence, with the whole text in the file.

`verbose=True` (`longctx train -v`) changes nothing: everything is shown as it comes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import Optional

# Loggers of the frameworks we run; each gets the file handler and stops propagating.
FRAMEWORK_LOGGERS = ("ray", "mlflow", "alembic", "deepspeed", "DeepSpeed", "torch", "urllib3", "filelock",
                     "py.warnings", "datasets", "huggingface_hub")
_OURS = re.compile(r"^\d\d:\d\d:\d\d longctx ")
_RAY_TQDM = "__ray_tqdm_magic_token__"
LOG_NAME = os.path.join("logs", "framework.log")


class _Buffer(logging.Handler):
    """Holds records until the run folder exists."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Console:
    """Context manager around one run on the driver. `open(run_dir)` once the folder exists."""

    def __init__(self, verbose: bool = False, launcher: str = "ray", engine: str = "deepspeed"):
        self.verbose = verbose
        # Frameworks configure their loggers on import: import them first, then take the loggers over.
        # In one process (launcher=local) DeepSpeed runs here; with Ray it runs in the workers.
        self.preload_ray = launcher == "ray"
        self.preload_deepspeed = launcher == "local" and engine == "deepspeed"
        self.path: Optional[str] = None
        self._file = None
        self._handler: logging.Handler = _Buffer()
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        self._saved_loggers: dict[str, tuple] = {}
        self._saved_fd: Optional[int] = None
        self._saved_stderr = None
        self._saved_dispatch = None
        self._saved_print = None

    # -- set-up and tear-down --------------------------------------------------------------
    def __enter__(self) -> "Console":
        if self.verbose:
            return self
        import mlflow  # noqa: F401

        if self.preload_ray:
            import ray  # noqa: F401

        if self.preload_deepspeed:
            import torch

            if not torch.cuda.is_available():
                os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as the engine sets it: no detection message
            import deepspeed.utils.logging  # noqa: F401

        for name in FRAMEWORK_LOGGERS:
            lg = logging.getLogger(name)
            self._saved_loggers[name] = (list(lg.handlers), lg.propagate, lg.level)
            if name in ("ray", "DeepSpeed", "deepspeed"):
                lg.setLevel(logging.INFO)
        self._take_loggers()
        logging.captureWarnings(True)  # framework warnings into the file; ours are log lines
        return self

    def open(self, run_dir: str) -> str:
        """Start writing `<run>/logs/framework.log` (what was buffered first)."""
        self.path = os.path.join(run_dir, LOG_NAME)
        if self.verbose:
            return self.path
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        handler = logging.StreamHandler(self._file)
        handler.setFormatter(self._handler.formatter)
        for record in self._handler.records:
            handler.handle(record)
        self._handler = handler
        self._take_loggers()
        # Native writes to fd 2 into the file; Python's sys.stderr keeps the terminal.
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        self._saved_stderr = sys.stderr
        sys.stderr = open(self._saved_fd, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")
        os.dup2(self._file.fileno(), 2)
        return self.path

    @contextlib.contextmanager
    def framework_call(self):
        """Around a call that sets up a framework's logging and talks while doing it (`ray.init`
        clears the "ray" logger's handlers, then warns through Python's last-resort handler,
        which writes to `sys.stderr`): its Python-level stderr goes to the file; afterwards the
        loggers are taken over again."""
        if self.verbose or self._file is None:
            yield
            return
        terminal, sys.stderr = sys.stderr, self._file
        try:
            yield
        finally:
            sys.stderr = terminal
            self._take_loggers()

    def _take_loggers(self) -> None:
        """Every framework logger writes to our handler only (the buffer, then the file)."""
        for name in FRAMEWORK_LOGGERS:
            lg = logging.getLogger(name)
            lg.handlers, lg.propagate = [self._handler], False

    def filter_ray_output(self) -> None:
        """After `ray.init`: lines forwarded from Ray's workers go through `_dispatch`."""
        if self.verbose or self._file is None:
            return
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        found = [h for name, h in getattr(dispatcher, "handlers", []) if name == "ray_print_logs"]
        if not found:
            return  # log_to_driver=False, or a Ray whose internals moved: nothing forwarded to filter
        self._saved_dispatch = found[0]
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", self._dispatch)
        # The raylet's error reports (a worker died, memory pressure) reach the console through
        # this function directly: they matter, so they become one longctx warning each.
        self._saved_print = ray_worker.print_to_stdstream
        ray_worker.print_to_stdstream = self._print_raylet

    def _print_raylet(self, data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            return self._saved_print(data, ignore_prefix)
        for line in data.get("lines", []):
            if self._file is not None:
                self._file.write(f"(raylet) {line}\n")
            first = re.split(r"(?<=[.!?])\s", line.strip(), maxsplit=1)[0]
            logging.getLogger("longctx").warning(f"Ray: {first} (details in {self.path})")

    def _dispatch(self, data: dict) -> None:
        keep, other = [], []
        for line in data.get("lines", []):
            (keep if _OURS.match(line) or _RAY_TQDM in line else other).append(line)
        if other and self._file is not None:
            who = f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')})"
            self._file.write("".join(f"{who} {line}\n" for line in other))
        if keep:
            from ray._private.worker import print_to_stdstream

            print_to_stdstream({**data, "lines": keep}, ignore_prefix=True)

    def __exit__(self, *exc) -> None:
        if self.verbose:
            return
        if self._file is None:  # the run never started (a failed check): its warnings matter here
            for record in self._handler.records:
                if record.levelno >= logging.WARNING:
                    print(self._handler.format(record), file=sys.stderr)
        if self._saved_dispatch is not None:
            from ray._private import worker as ray_worker

            dispatcher = ray_worker.global_worker_stdstream_dispatcher
            dispatcher.remove_handler("ray_print_logs")
            dispatcher.add_handler("ray_print_logs", self._saved_dispatch)
            ray_worker.print_to_stdstream = self._saved_print
        if self._saved_fd is not None:
            sys.stderr.flush()
            os.dup2(self._saved_fd, 2)
            sys.stderr = self._saved_stderr
            os.close(self._saved_fd)
        for name, (handlers, propagate, level) in self._saved_loggers.items():
            lg = logging.getLogger(name)
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)
        logging.captureWarnings(False)
        if self._file is not None:
            self._file.close()
