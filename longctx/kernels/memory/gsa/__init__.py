"""Gated Slot Attention (Zhang et al., "Gated Slot Attention for Efficient Linear-Time
Sequence Modeling") as functional ops: ``naive_gsa`` (the token loop) and ``chunk_gsa``
(chunk-parallel), with an initial state in and a final state out.

Per head, two slot memories of M slots with a slot-wise forget gate ``alpha_t`` (in (0, 1)^M):

    K~_t = diag(alpha_t) K~_{t-1} + (1 - alpha_t) k_t^T          [M, d_k]
    V~_t = diag(alpha_t) V~_{t-1} + (1 - alpha_t) v_t^T          [M, d_v]
    o_t  = V~_t^T softmax(K~_t q_t / sqrt(d_k))

i.e. two gated linear-attention passes (the first reads the keys with q, the second reads
the values with the slot probabilities) joined by a softmax over the slots.

Chunked form: both memories share the recurrence ``X_t = X_{t-1} diag(alpha_t) + [k_t; v_t]
(1 - alpha_t)^T`` on ``X = [K~^T ; V~^T]`` (the state, ``[B, H, 2D, M]``). Per chunk, the
intra-chunk parts are GEMMs with the decays factorised as ``exp(G_t) exp(-G_i)`` (G the
cumulative log-gate from the chunk start) while ``-G`` stays below 60 (no overflow); a
block of chunks whose gates decay harder falls back to the exact pairwise decays
``exp(G_t - G_i)`` (a [C, C, M] tensor, recomputed in backward; safe for any gate value,
even 0 or 1 in floating point). The chunk states come from ``affine_scan`` with a diagonal
transition (Triton on CUDA). States reset to 0 at document starts. The state is
independent of the queries, so a slice maps it affinely (``GSAChunks.affine_map``) and any
split of the sequence is exact (``retrieve="chunk_start"`` reads chunk-start states: there
the chunk grid must be global).
"""

from .chunk import FACTORISE_MIN_LOG_DECAY, GSAChunks, chunk_gsa
from .naive import naive_gsa

__all__ = ["naive_gsa", "chunk_gsa", "GSAChunks", "FACTORISE_MIN_LOG_DECAY"]
