"""Titans neural long-term memory (Behrouz et al., "Titans: Learning to Memorize at Test Time"),
as functional ops: ``naive_titans`` (the token loop) and ``chunk_titans_linear`` /
``chunk_titans_mlp`` (chunk-parallel), with an initial state in and a final state out.

Per head, a memory M (a matrix W, or a 2-layer MLP ``W2 silu(W1 k)``) is trained online on
the associative loss ``l_t = ||M(k_t) - v_t||^2``:

    S_t = eta_t S_{t-1} - theta_t grad l_t        (momentum, "surprise")
    M_t = (1 - alpha_t) M_{t-1} + S_t              (forgetting)
    y_t = M_t(q_t)                                 (retrieval)

Chunk-parallel training as in the paper: inside a chunk of C tokens (a global grid of
positions), every gradient is taken at the chunk-start weights, so the per-token updates
``u_i = -theta_i grad l_i`` are known in parallel and the momentum and decay recurrences
become a parallel scan: with ``A``, ``E`` the cumulative products of ``1 - alpha`` and ``eta``,

    W_t = A_t W_0 + c_t S_0 + sum_{i<=t} K(t, i) u_i,    K = Abar @ Ebar,
    Abar[t, j] = prod_{l in (j, t]} (1 - alpha_l),   Ebar[j, i] = prod_{l in (i, j]} eta_l,

and ``y_t = W_t q_t`` needs no per-token weights: ``u_i q_t`` is ``(k_i . q_t)`` times a
vector (an attention-like C x C product). The MLP memory uses the same scan per layer
(``W1_t q_t`` first, then ``W2_t silu(.)``).

Documents: at a document start the memory resets to the learned initial weights
(``init_weights``) and the momentum to 0; a document that starts inside a chunk uses them
as its "chunk-start" weights. ``retrieve="chunk_start"`` reads the memory as it was at the
start of the token's chunk (or the fresh one if its document started inside the chunk).

States: linear ``X = [W | S]`` ``[B, H, D, 2D]`` (the affine state: a slice maps it as
``X @ T + B``, see ``TitansLinearChunks.affine_map``); MLP ``(W1, W2, S1, S2)``.
"""

from .chunk import TitansLinearChunks, chunk_titans_linear, chunk_titans_mlp
from .naive import naive_titans, reset_state

__all__ = ["naive_titans", "chunk_titans_linear", "chunk_titans_mlp", "TitansLinearChunks", "reset_state"]
