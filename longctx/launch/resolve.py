"""Resolve a config once, on the driver, into the one every worker runs.

Workers (and `--dry-run`) never change a config: what `auto` or `launcher=local` means
is decided here, logged, and saved in the run's `config.yaml`.
"""

from __future__ import annotations

import copy
import time

from longctx.config import Config


def resolve_config(cfg: Config) -> tuple[Config, list[str]]:
    """(a resolved copy of `cfg`, lines that explain what was resolved); `cfg` is unchanged.

    - `launcher=local` is one process without Ray: a world of one (cp=1, one worker).
    - `parallel.strategy=auto` becomes the cost model's choice (with its options).
    - `run.name` empty becomes `<preset>-<timestamp>`.
    """
    from longctx.parallel.auto import apply_auto

    out = copy.deepcopy(cfg)
    notes = []
    if out.launcher == "local":
        if out.parallel.cp != 1 or out.ray.num_workers != 1:
            notes.append(f"launcher=local runs one process: using parallel.cp=1 and ray.num_workers=1 "
                         f"(the config asked for cp={out.parallel.cp}, {out.ray.num_workers} workers)")
        out.parallel.cp = 1
        out.ray.num_workers = 1
    auto_text = apply_auto(out)
    if auto_text:
        notes.append(auto_text)
    if not out.run.name:
        out.run.name = f"{getattr(cfg, '_preset', 'run')}-{time.strftime('%Y%m%d-%H%M%S')}"
    return out, notes


__all__ = ["resolve_config"]
