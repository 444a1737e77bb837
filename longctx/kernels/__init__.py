"""Attention kernels: forward/backward with global token indices and doc masks.

Contract (ARCHITECTURE.md, "Kernels"):

    out, lse = attention_forward(q, k, v, *, q_index, k_index, ...)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, *, q_index, k_index, ...)
    out = attention(q, k, v, ...)          # autograd

plus ``merge_partials`` (combine results over disjoint key sets) and
``visible_pairs`` (FLOP accounting). Backends: ``"torch"`` (reference, any
device), ``"triton"`` (``triton_attention``: compiled on CUDA, or on any device
under ``TRITON_INTERPRET=1``), ``"auto"`` (Triton for CUDA tensors when triton
imports, the torch reference otherwise).

``window=W`` (all three) adds a sliding-window mask: key j is visible to
query i only when ``q_index[i] - k_index[j] < W``.

``attention_forward(..., acc=(out_acc, lse_acc))`` folds the call's result
into an incoming fp32 ``(out, lse)`` (ring steps) and returns the merged
result with out in fp32; see its docstring.
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


_TRITON_BACKEND = None
_TRITON_IMPORT_ERROR = None


def _load_triton_backend():
    """The Triton backend module (``triton_attention``), or None when triton does not import.

    It provides ``forward`` / ``backward`` with the same keywords as
    ``reference`` (plus ``acc``) and ``supports(q)``.
    """
    global _TRITON_BACKEND, _TRITON_IMPORT_ERROR
    if _TRITON_BACKEND is None and _TRITON_IMPORT_ERROR is None:
        try:
            from . import triton_attention
        except ImportError as err:  # triton missing or broken
            _TRITON_IMPORT_ERROR = err
        else:
            _TRITON_BACKEND = triton_attention
    return _TRITON_BACKEND


def _select_backend(backend: str, q: torch.Tensor):
    """Map a backend name to a module with ``forward`` / ``backward``."""
    if backend == "torch":
        return reference
    if backend == "triton":
        triton_backend = _load_triton_backend()
        if triton_backend is None:
            raise RuntimeError(
                f"backend='triton': triton could not be imported ({_TRITON_IMPORT_ERROR}); "
                "use backend='torch' or backend='auto'"
            )
        ok, why = triton_backend.supports(q)
        if not ok:
            raise RuntimeError(f"backend='triton' (the Triton attention kernels) cannot run these inputs: {why}")
        return triton_backend
    if backend == "auto":
        # Triton on CUDA when it imports and supports the inputs (head dim <= 256,
        # fp32/fp16/bf16); the torch reference everywhere else.
        if q.is_cuda:
            triton_backend = _load_triton_backend()
            if triton_backend is not None and triton_backend.supports(q)[0]:
                return triton_backend
        return reference
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def _options(q_index, k_index, q_doc, k_doc, causal, window, softmax_scale, q_chunk_size, k_chunk_size):
    """The keywords every backend's ``forward`` / ``backward`` takes."""
    opts = dict(q_index=q_index, k_index=k_index, q_doc=q_doc, k_doc=k_doc,
                causal=causal, window=window, softmax_scale=softmax_scale)
    # Only forward explicit chunk sizes, so each backend keeps its own defaults.
    if q_chunk_size is not None:
        opts["q_chunk_size"] = int(q_chunk_size)
    if k_chunk_size is not None:
        opts["k_chunk_size"] = int(k_chunk_size)
    return opts


def attention_forward(q, k, v, *, q_index, k_index, q_doc=None, k_doc=None, causal=True, window=None,
                      softmax_scale=None, backend="auto", q_chunk_size=None, k_chunk_size=None, acc=None):
    """q ``[B, S_q, H, D]``, k/v ``[B, S_k, H_kv, D]`` -> (out ``[B, S_q, H, D]``, lse ``[B, H, S_q]``).

    out has q's dtype; lse is fp32 (fp64 for fp64 inputs), natural log;
    rows with no visible key give out = 0, lse = -inf. ``window`` (a positive
    int or None) keeps only keys with ``q_index - k_index < window``.

    Accumulating mode (ring steps): ``acc=(out_acc, lse_acc)`` with
    ``out_acc`` fp32 ``[B, S_q, H, D]`` and ``lse_acc`` fp32 ``[B, H, S_q]``
    (rows may be -inf = nothing seen yet) holds the merged result over the key
    blocks processed so far. This call's keys are folded into it and the
    merged ``(out, lse)`` over all of them is returned, **out in fp32** (fp64
    for fp64 inputs) -- cast once at the end of the ring. The result equals
    ``merge_partials(out_acc, lse_acc, *attention_forward(q, k, v, ...))``.
    The Triton backend folds inside the kernel (no separate merge pass); both
    backends return new tensors and leave ``out_acc``/``lse_acc`` unchanged.
    """
    impl = _select_backend(backend, q)
    opts = _options(q_index, k_index, q_doc, k_doc, causal, window, softmax_scale, q_chunk_size, k_chunk_size)
    if acc is None:
        return impl.forward(q, k, v, **opts)
    out_acc, lse_acc = _check_acc(acc, q)
    if impl is not reference:  # the Triton kernels fold inside the kernel
        return impl.forward(q, k, v, acc=(out_acc, lse_acc), **opts)
    return merge_partials(out_acc, lse_acc, *impl.forward(q, k, v, **opts))


def _check_acc(acc, q):
    """Validate ``acc=(out_acc, lse_acc)`` against q; returns the pair."""
    try:
        out_acc, lse_acc = acc
    except (TypeError, ValueError):
        raise ValueError("acc must be a pair (out_acc [B, S_q, H, D], lse_acc [B, H, S_q])") from None
    B, S_q, H, D = q.shape
    if tuple(out_acc.shape) != (B, S_q, H, D):
        raise ValueError(f"acc out must have shape {(B, S_q, H, D)}, got {tuple(out_acc.shape)}")
    if tuple(lse_acc.shape) != (B, H, S_q):
        raise ValueError(f"acc lse must have shape {(B, H, S_q)}, got {tuple(lse_acc.shape)}")
    if not out_acc.is_floating_point() or not lse_acc.is_floating_point():
        raise ValueError("acc tensors must be floating point (fp32)")
    return out_acc, lse_acc


def attention_backward(dout, q, k, v, out, lse, *, q_index, k_index, q_doc=None, k_doc=None, causal=True,
                       window=None, softmax_scale=None, backend="auto", delta=None, q_chunk_size=None,
                       k_chunk_size=None):
    """Gradients (dq, dk, dv) in the input dtypes.

    ``out``/``lse`` may be the global results over a larger key set; the
    gradients are then this key set's contribution. ``delta`` (optional,
    ``[B, H, S_q]``) is rowsum(dout * out), computed when not given.
    """
    impl = _select_backend(backend, q)
    opts = _options(q_index, k_index, q_doc, k_doc, causal, window, softmax_scale, q_chunk_size, k_chunk_size)
    return impl.backward(dout, q, k, v, out, lse, delta=delta, **opts)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_index, k_index, q_doc, k_doc, opts):
        out, lse = attention_forward(q, k, v, q_index=q_index, k_index=k_index, q_doc=q_doc, k_doc=k_doc, **opts)
        ctx.save_for_backward(q, k, v, out, lse, q_index, k_index, q_doc, k_doc)
        ctx.opts = opts
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, q_index, k_index, q_doc, k_doc = ctx.saved_tensors
        dq, dk, dv = attention_backward(
            dout, q, k, v, out, lse, q_index=q_index, k_index=k_index, q_doc=q_doc, k_doc=k_doc, **ctx.opts,
        )
        return dq, dk, dv, None, None, None, None, None


def attention(q, k, v, *, q_index=None, k_index=None, q_doc=None, k_doc=None, causal=True, window=None,
              softmax_scale=None, backend="auto", q_chunk_size=None, k_chunk_size=None):
    """Differentiable attention; indices default to ``arange``. Returns out only."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, S, H, D], got shape {tuple(t.shape)}")
    if q_index is None:
        q_index = torch.arange(q.shape[1], device=q.device)
    if k_index is None:
        k_index = torch.arange(k.shape[1], device=k.device)
    opts = dict(causal=causal, window=window, softmax_scale=softmax_scale, backend=backend,
                q_chunk_size=q_chunk_size, k_chunk_size=k_chunk_size)
    return _Attention.apply(q, k, v, q_index, k_index, q_doc, k_doc, opts)
