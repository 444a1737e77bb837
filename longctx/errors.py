"""Errors that end a run with one message and exit code 1 (bad input is `config.ConfigError`, exit 2)."""


class RunError(RuntimeError):
    """The run stopped for a reason the user must act on; the message says which and what to do."""


class WorkerError(RuntimeError):
    """A worker's exception as it reaches the driver: its rank, type, message and traceback
    (as text: Ray does not carry tracebacks back). Ray Train still restarts the workers on
    it, up to `ray.max_failures`."""

    def __init__(self, rank: int, kind: str, message: str, trace: str):
        super().__init__(rank, kind, message, trace)  # args: what pickling rebuilds it from
        self.rank, self.kind, self.message, self.trace = rank, kind, message, trace

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.kind}: {self.message}"
