"""longctx: distributed training of long-context language models.

Packages, from the bottom up: `kernels` (attention and gated-memory ops), `models` (one
Transformer, no parallelism), `parallel` (mesh, CP strategies, state passing, `parallelize`),
`trainer` (loop, data, loss, engines, checkpoints, metrics), `launch` (CLI, Ray driver),
`bench` (`longctx bench`). `config.py` is the strict YAML schema.
"""
