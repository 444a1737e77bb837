"""Gated FIFO memory as functional ops: ``naive_fifo`` (the token loop) and ``chunk_fifo``
(chunk-parallel), with an initial state in and a final state out.

A bank of m slots written once per chunk, read by cross-attention (the memory of recurrent
memory-augmented transformers with chunked attention). For each chunk c of C tokens (a
global grid of positions):

    s_c    = sum_t softmax_t(score_t) u_t                         (attention-pooled summary
                                                                  of the chunk's last document)
    g_c    = sigmoid(W_g s_c + b_g)                               (per-channel write gate)
    cand_c = g_c * s_c + (1 - g_c) * cand_{c-1}                   (sigmoid-gated blend with the
                                                                  newest slot, same document only)
    bank_c = [bank_{c-1}[1:], cand_c]                             (FIFO: the oldest slot drops)

A token of chunk c reads ``bank_{c-1}`` (the state before its own chunk, so nothing leaks
from the future): softmax attention of ``q_t`` over the slots of its own document, keys
``W_k slot + age embedding``, values ``W_v slot``; no visible slot gives 0. Documents: a
slot belongs to the document of its chunk's last token (its tag); a token sees only slots
of its own document, and the blend restarts at a new document. The state is
``(bank [B, m, dim], tags [B, m])``; the final state is the bank after the last complete
chunk (so a sequence splits exactly on chunk boundaries).
"""

from .chunk import chunk_fifo
from .naive import FIFOWeights, empty_bank, naive_fifo

__all__ = ["naive_fifo", "chunk_fifo", "FIFOWeights", "empty_bank"]
