"""Gated-memory ops (flash-linear-attention style) and the chunk scan they share.

Per memory a ``naive`` reference (the sequential token loop, the definition) and a
``chunk`` fast path, as functions of tensors: they take ``initial_state=None`` and, with
``output_final_state=True``, return the final state, so a sequence cut in two gives the
same result when the first half's final state starts the second half. They know nothing of
ranks; context parallelism (``longctx.parallel.memory_state``) composes them:

    y, final = naive_titans(q, k, v, theta, log_a, log_e, init_weights, doc_ids, chunk_size=C,
                            initial_state=None, output_final_state=True, retrieve="current")
    y, final = chunk_titans_linear(q, k, v, theta, log_a, log_e, W0, doc_ids, ..., backend="auto")
    y, final = chunk_titans_mlp(q, k, v, theta, log_a, log_e, (W1_0, W2_0), doc_ids, ...)
    y, final = naive_gsa(q, k, v, log_alpha, doc_ids, chunk_size=C, ...)   # also chunk_gsa
    y, final = naive_fifo(q, u, score, weights, doc_ids, chunk_size=C, ...)  # also chunk_fifo

    c = TitansLinearChunks(...) / GSAChunks(...)   # the chunk maps of a slice, built once
    T, B = c.affine_map()                          # the slice's map X @ T + B from a zero state
    y, final = c.output(initial_state, output_final_state)

``affine_scan`` (``scan.py``; Triton kernel in ``triton_scan.py`` / ``_triton_scan.py``) is
the chunk-level recurrence ``X_c = X_{c-1} @ T_c + B_c`` of linear Titans, GSA and FIFO.
"""

from .fifo import FIFOWeights, chunk_fifo, naive_fifo
from .gsa import GSAChunks, chunk_gsa, naive_gsa
from .scan import BACKENDS, affine_scan, naive_recurrence, scan_torch, select_backend
from .titans import TitansLinearChunks, chunk_titans_linear, chunk_titans_mlp, naive_titans

__all__ = ["naive_titans", "chunk_titans_linear", "chunk_titans_mlp", "TitansLinearChunks", "naive_gsa", "chunk_gsa",
           "GSAChunks", "naive_fifo", "chunk_fifo", "FIFOWeights", "affine_scan", "scan_torch", "naive_recurrence",
           "select_backend", "BACKENDS"]
