"""Models: one decoder-only Transformer (`llama.py`) whose layers are attention, sliding-window
or gated-memory blocks (`memory/`), plus size/FLOP/memory estimates; no parallelism here.
"""

from longctx.models.hf import from_pretrained, save_pretrained  # noqa: E402

__all__ = ["from_pretrained", "save_pretrained"]
