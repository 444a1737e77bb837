"""Models: one decoder-only Transformer (`llama.py`) whose layers are attention, sliding-window
or gated-memory blocks (`memory/`), plus size/FLOP/memory estimates; no parallelism here.
"""
