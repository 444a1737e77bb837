"""Titans neural memory, token by token: the definition (see ``titans/__init__.py``).

The inner gradient is taken by ``torch.autograd.grad``, so this also checks the chunk
path's closed-form gradients.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..common import check_retrieve, doc_tensor


def is_linear(init_weights: Sequence[torch.Tensor]) -> bool:
    """(W0,) is the linear memory, (W1_0, W2_0) the MLP one."""
    if len(init_weights) not in (1, 2):
        raise ValueError(f"init_weights: (W0,) for the linear memory or (W1_0, W2_0) for the MLP, "
                         f"got {len(init_weights)} tensors")
    return len(init_weights) == 1


def reset_state(init_weights: Sequence[torch.Tensor], B: int, dtype) -> tuple[torch.Tensor, ...]:
    """The state at a document start as a tuple ``(weights..., momenta...)``: the learned
    initial weights (expanded over the batch) and zero momenta."""
    W = [w.to(dtype).unsqueeze(0).expand(B, *w.shape) for w in init_weights]
    return (*W, *[torch.zeros_like(w) for w in W])


def split_linear(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear memory state ``X = [W | S]`` ``[B, H, D, 2D]`` -> (W, S)."""
    D = X.shape[-2]
    return X[..., :D], X[..., D:]


def _mem_apply(params, x):
    """M(x) for per-(b, h) weights; x ``[B, H, D]``."""
    if len(params) == 1:
        (W,) = params
        return torch.einsum("bhvd,bhd->bhv", W, x)
    W1, W2 = params
    return torch.einsum("bhve,bhe->bhv", W2, F.silu(torch.einsum("bhed,bhd->bhe", W1, x)))


def naive_titans(q, k, v, theta, log_a, log_e, init_weights: Sequence[torch.Tensor],
                 doc_ids: Optional[torch.Tensor] = None, *, chunk_size: int, initial_state=None,
                 output_final_state: bool = False, retrieve: str = "current"):
    """The Titans recurrence token by token.

    q, k, v ``[B, H, S, D]``; theta, log_a (log(1 - alpha)), log_e (log eta) ``[B, H, S]``;
    init_weights: ``(W0 [H, D, D],)`` (linear) or ``(W1_0 [H, hid, D], W2_0 [H, D, hid])``
    (MLP), the memory at a document start; doc_ids ``[B, S]``. Inner gradients are taken at
    the weights of the chunk start (a global grid of `chunk_size` tokens from token 0).

    initial_state: the state before token 0, belonging to token 0's document (None: the
    document-start state): linear ``X = [W | S]`` ``[B, H, D, 2D]``; MLP ``(W1, W2, S1, S2)``.
    Returns ``(y [B, H, S, D], final state or None)``, the final state in the same form.
    """
    check_retrieve(retrieve)
    B, H, S, D = q.shape
    doc = doc_tensor(doc_ids, B, S, q.device)
    linear = is_linear(init_weights)
    C = chunk_size
    outer = torch.is_grad_enabled()  # under no_grad only the inner gradients need a graph
    a, e = torch.exp(log_a), torch.exp(log_e)
    init = reset_state(init_weights, B, q.dtype)
    P = len(init) // 2
    if initial_state is None:
        state = init
    else:
        state = split_linear(initial_state) if linear else tuple(initial_state)
    W, Sm = list(state[:P]), list(state[P:])
    R = list(W)
    ys = []
    for t in range(S):
        if t > 0:  # a document start resets the memory (token 0 continues initial_state)
            rs = (doc[:, t] != doc[:, t - 1]).view(B, 1, 1, 1)
            W = [torch.where(rs, i, w) for i, w in zip(init[:P], W)]
            Sm = [torch.where(rs, torch.zeros_like(s), s) for s in Sm]
        if t % C == 0:
            R = list(W)
        else:
            R = [torch.where(rs, w, r) for w, r in zip(W, R)]
        if retrieve == "chunk_start":
            ys.append(_mem_apply(R, q[:, :, t]))
        with torch.enable_grad():
            Rg = [r if (outer and r.requires_grad) else r.detach().requires_grad_() for r in R]
            loss = (_mem_apply(Rg, k[:, :, t]) - v[:, :, t]).pow(2).sum()
            grads = torch.autograd.grad(loss, Rg, create_graph=outer)
        th = theta[:, :, t].view(B, -1, 1, 1)
        et = e[:, :, t].view(B, -1, 1, 1)
        at = a[:, :, t].view(B, -1, 1, 1)
        Sm = [et * s - th * gr for s, gr in zip(Sm, grads)]
        W = [at * w + s for w, s in zip(W, Sm)]
        if retrieve == "current":
            ys.append(_mem_apply(W, q[:, :, t]))
    y = torch.stack(ys, dim=2) if ys else q.new_zeros(B, H, 0, D)
    if not output_final_state:
        return y, None
    final = torch.cat([W[0], Sm[0]], dim=-1) if linear else (*W, *Sm)
    return y, final


__all__ = ["naive_titans", "reset_state", "is_linear", "split_linear"]
