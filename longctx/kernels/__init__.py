"""Attention kernels: forward/backward with global token indices and doc masks.

Contract (ARCHITECTURE.md, "Kernels"):

    out, lse = attention_forward(q, k, v, *, q_index, k_index, ...)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, *, q_index, k_index, ...)
    out = attention(q, k, v, ...)          # autograd

plus ``merge_partials`` (combine results over disjoint key sets) and
``visible_pairs`` (FLOP accounting). Backends: ``"torch"`` (reference, any
device), ``"triton"`` (not built in this version), ``"auto"``.
"""

from __future__ import annotations

import torch

from . import reference
from .reference import merge_partials, visible_pairs

__all__ = [
    "attention_forward",
    "attention_backward",
    "attention",
    "merge_partials",
    "visible_pairs",
    "BACKENDS",
]

BACKENDS = ("auto", "torch", "triton")


def _load_triton_backend():
    """The Triton backend module, or None when unavailable.

    No Triton backend exists in this version. When one is added, return its
    module here (when triton imports); it must provide ``forward`` and
    ``backward`` with the same keyword signatures as ``reference``.
    """
    return None


def _select_backend(backend: str, q: torch.Tensor):
    """Map a backend name to a module with ``forward`` / ``backward``."""
    if backend == "torch":
        return reference
    if backend == "triton":
        triton_backend = _load_triton_backend()
        if triton_backend is None:
            raise RuntimeError(
                "backend='triton': the Triton attention backend is not built in this "
                "version of longctx; use backend='torch' or backend='auto'"
            )
        return triton_backend
    if backend == "auto":
        if q.is_cuda:
            triton_backend = _load_triton_backend()
            if triton_backend is not None:
                return triton_backend
        return reference
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def _chunk_options(q_chunk_size, k_chunk_size):
    # Only forward explicit chunk sizes, so each backend keeps its own defaults.
    opts = {}
    if q_chunk_size is not None:
        opts["q_chunk_size"] = int(q_chunk_size)
    if k_chunk_size is not None:
        opts["k_chunk_size"] = int(k_chunk_size)
    return opts


def attention_forward(
    q,
    k,
    v,
    *,
    q_index,
    k_index,
    q_doc=None,
    k_doc=None,
    causal=True,
    softmax_scale=None,
    backend="auto",
    q_chunk_size=None,
    k_chunk_size=None,
):
    """q ``[B, S_q, H, D]``, k/v ``[B, S_k, H_kv, D]`` -> (out ``[B, S_q, H, D]``, lse ``[B, H, S_q]``).

    out has q's dtype; lse is fp32 (fp64 for fp64 inputs), natural log;
    rows with no visible key give out = 0, lse = -inf.
    """
    impl = _select_backend(backend, q)
    return impl.forward(
        q, k, v,
        q_index=q_index, k_index=k_index, q_doc=q_doc, k_doc=k_doc,
        causal=causal, softmax_scale=softmax_scale,
        **_chunk_options(q_chunk_size, k_chunk_size),
    )


def attention_backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    *,
    q_index,
    k_index,
    q_doc=None,
    k_doc=None,
    causal=True,
    softmax_scale=None,
    backend="auto",
    delta=None,
    q_chunk_size=None,
    k_chunk_size=None,
):
    """Gradients (dq, dk, dv) in the input dtypes.

    ``out``/``lse`` may be the global results over a larger key set; the
    gradients are then this key set's contribution. ``delta`` (optional,
    ``[B, H, S_q]``) is rowsum(dout * out), computed when not given.
    """
    impl = _select_backend(backend, q)
    return impl.backward(
        dout, q, k, v, out, lse,
        q_index=q_index, k_index=k_index, q_doc=q_doc, k_doc=k_doc,
        causal=causal, softmax_scale=softmax_scale, delta=delta,
        **_chunk_options(q_chunk_size, k_chunk_size),
    )


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_index, k_index, q_doc, k_doc, causal, softmax_scale, backend, q_chunk, k_chunk):
        out, lse = attention_forward(
            q, k, v, q_index=q_index, k_index=k_index, q_doc=q_doc, k_doc=k_doc,
            causal=causal, softmax_scale=softmax_scale, backend=backend,
            q_chunk_size=q_chunk, k_chunk_size=k_chunk,
        )
        ctx.save_for_backward(q, k, v, out, lse, q_index, k_index, q_doc, k_doc)
        ctx.opts = dict(causal=causal, softmax_scale=softmax_scale, backend=backend,
                        q_chunk_size=q_chunk, k_chunk_size=k_chunk)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, q_index, k_index, q_doc, k_doc = ctx.saved_tensors
        dq, dk, dv = attention_backward(
            dout, q, k, v, out, lse, q_index=q_index, k_index=k_index,
            q_doc=q_doc, k_doc=k_doc, **ctx.opts,
        )
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


def attention(
    q,
    k,
    v,
    *,
    q_index=None,
    k_index=None,
    q_doc=None,
    k_doc=None,
    causal=True,
    softmax_scale=None,
    backend="auto",
    q_chunk_size=None,
    k_chunk_size=None,
):
    """Differentiable attention; indices default to ``arange``. Returns out only."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, S, H, D], got shape {tuple(t.shape)}")
    if q_index is None:
        q_index = torch.arange(q.shape[1], device=q.device)
    if k_index is None:
        k_index = torch.arange(k.shape[1], device=k.device)
    return _Attention.apply(
        q, k, v, q_index, k_index, q_doc, k_doc, causal, softmax_scale, backend, q_chunk_size, k_chunk_size
    )
