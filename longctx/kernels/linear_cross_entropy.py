"""Cross-entropy of an lm head without the `[tokens, vocab]` logits.

For hidden states ``h [N, d]``, the head ``W [V, d]`` and targets ``y [N]``:

    loss_t = logsumexp_v(z_t) - z_t[y_t],   z_t = h_t W^T (fp32),   pred_t = argmax_v z_t

with ``loss_t = 0`` where ``y_t = ignore_index``. The plain computation
(``F.cross_entropy(h @ W.T)``) holds the fp32 logits of every token, and autograd keeps
them and their softmax for backward: with the Llama-3 vocabulary (128,256) that is
0.5 MB a token per copy.

Here tokens are taken ``chunk_size`` at a time:

- forward: ``z_c = h_c W^T`` (in the inputs' dtype, then fp32), its log-sum-exp, the
  target logit and the argmax; only ``loss [N]``, ``pred [N]`` and ``lse [N]`` leave the
  chunk. Saved for backward: h, W, y and lse, never the logits.
- backward (incoming per-token gradient ``g``): each chunk's logits are recomputed and
  turned into ``G_c = g * (softmax(z_c) - onehot(y_c))`` in place; ``dh_c = G_c W`` and
  ``dW += G_c^T h_c`` (fp32 accumulator, cast once).

The rows are the same fp32 operations as the plain path, so the loss and gradients agree
to rounding (tests: rtol 1e-5 in fp32). Memory beyond the inputs: one chunk's fp32 logits
(plus its cast for the matmuls when the inputs are bf16) and O(N) vectors; compute: the
forward matmul twice (forward and recompute), i.e. 4 head matmuls a step instead of 3.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_BYTES = 128 * 2**20  # default chunk: its fp32 logits take at most this many bytes

__all__ = ["linear_cross_entropy", "default_chunk_size", "CHUNK_BYTES", "IGNORE_INDEX"]


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take at most `CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // (4 * max(int(vocab_size), 1)))


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, chunk_size, ignore_index):
        n = h.shape[0]
        losses = torch.empty(n, device=h.device, dtype=torch.float32)
        preds = torch.empty(n, device=h.device, dtype=torch.long)
        lse = torch.empty(n, device=h.device, dtype=torch.float32)
        valid = labels != ignore_index
        target = torch.where(valid, labels, 0)
        for s, e in _chunks(n, chunk_size):
            z = (h[s:e] @ weight.T).float()
            lse[s:e] = torch.logsumexp(z, dim=-1)
            preds[s:e] = z.argmax(dim=-1)
            picked = z.gather(1, target[s:e, None]).squeeze(1)
            losses[s:e] = torch.where(valid[s:e], lse[s:e] - picked, 0.0)
            del z
        ctx.save_for_backward(h, weight, target, valid, lse)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(preds)
        return losses, preds

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses, _grad_preds):
        h, weight, target, valid, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        g_all = torch.where(valid, grad_losses.float(), 0.0)
        for s, e in _chunks(h.shape[0], ctx.chunk_size):
            g = g_all[s:e]
            z = (h[s:e] @ weight.T).float()
            z.sub_(lse[s:e, None]).exp_().mul_(g[:, None])  # g * softmax
            z.scatter_add_(1, target[s:e, None], -g[:, None])  # - g * onehot(target)
            grad_z = z.to(h.dtype)
            del z
            if need_h:
                dh[s:e] = grad_z @ weight
            if need_w:
                dw.add_(grad_z.T @ h[s:e])
            del grad_z
        return dh, (dw.to(weight.dtype) if need_w else None), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         chunk_size: int | None = None,
                         ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden `[..., d]`, weight `[V, d]`, labels `[...]` (int, `ignore_index` = no target)
    -> (losses fp32 `[...]` (0 where ignored), argmax predictions int64 `[...]`).

    Differentiable w.r.t. hidden and weight. The matmuls run in hidden's dtype, or in the
    autocast dtype when autocast is on (as `nn.Linear` would); the softmax is fp32.
    `chunk_size` tokens at a time (None = `default_chunk_size(V)`).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading dims "
                         f"{tuple(hidden.shape[:-1])}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    chunk = default_chunk_size(weight.shape[0]) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    with torch.autocast(device_type, enabled=False):  # the Function's matmuls run in `dtype`, both passes
        losses, preds = _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]).to(dtype),
                                                  weight.to(dtype), labels.reshape(-1), chunk, ignore_index)
    return losses.view(labels.shape), preds.view(labels.shape)
