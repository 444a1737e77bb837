"""Titans neural long-term memory (Behrouz et al., "Titans: Learning to Memorize at Test Time").

Per head, a memory M (a matrix W, or a 2-layer MLP ``W2 silu(W1 k)``) is trained online on
the associative loss ``l_t = ||M(k_t) - v_t||^2``:

    S_t = eta_t S_{t-1} - theta_t grad l_t        (momentum, "surprise")
    M_t = (1 - alpha_t) M_{t-1} + S_t              (forgetting)
    y_t = M_t(q_t)                                 (retrieval)

with data-dependent gates per head, ``theta_t = max_lr sigmoid(.)``, ``alpha_t = sigmoid(.)``,
``eta_t = eta_max sigmoid(.)`` (defaults eta_max = 0.5, max_lr = (1 - eta_max) / chunk_size:
with chunk-start gradients, the chunk map for a repeated key is a contraction for every
gate value exactly up to that bound), and l2-normalised q, k and v (unit-norm targets keep
the MLP memory's inner loop from diverging on long documents; the output is RMS-normalised
per head anyway).

The recurrence itself is the op ``longctx.kernels.memory.titans`` (the derivation of the
chunk-parallel form is there): ``naive_titans`` (token by token, inner gradients by autograd:
`reference`) and ``chunk_titans_linear`` / ``chunk_titans_mlp`` (the fast path). Under
context parallelism the module passes its state through `state_passing`: the affine fold
(linear memory: each slice maps ``[W | S]`` affinely) or rank-to-rank passing of weights and
momentum (MLP memory).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longctx.kernels.memory.titans import TitansLinearChunks, chunk_titans_mlp, naive_titans, reset_state

from .common import HeadRMSNorm, MemoryModule, compute_dtype

MEMORY_KINDS = ("linear", "mlp")


class TitansMemory(MemoryModule):
    name = "titans"

    def __init__(self, dim: int, num_heads: int, chunk_size: int = 64, *, memory: str = "linear",
                 head_dim: Optional[int] = None, expansion: int = 2, backend: str = "auto",
                 max_lr: Optional[float] = None, eta_max: float = 0.5, theta_bias: float = 0.0,
                 alpha_bias: float = -5.0, eta_bias: float = 0.0):
        super().__init__(dim, num_heads, chunk_size, head_dim, backend)
        if memory not in MEMORY_KINDS:
            raise ValueError(f"titans memory must be one of {MEMORY_KINDS}, got {memory!r}")
        self.memory = memory
        # Gate ranges: theta_t = max_lr * sigmoid(.), eta_t = eta_max * sigmoid(.). Gradients at the
        # chunk-start weights make C tokens with the same key move M(k) by ~2 theta C / (1 - eta)
        # times the residual at once: for a repeated key the chunk map is a contraction for every
        # gate value iff max_lr <= (1 - eta_max) / C (1.5x that diverges), hence the default.
        if not 0.0 <= eta_max < 1.0:
            raise ValueError(f"eta_max must be in [0, 1), got {eta_max}")
        self.eta_max = float(eta_max)
        self.max_lr = float(max_lr) if max_lr is not None else (1.0 - self.eta_max) / chunk_size
        if self.max_lr <= 0:
            raise ValueError(f"max_lr must be positive, got {max_lr}")
        H, D = num_heads, self.head_dim
        self.hidden = expansion * D
        self.wq = nn.Linear(dim, H * D, bias=False)
        self.wk = nn.Linear(dim, H * D, bias=False)
        self.wv = nn.Linear(dim, H * D, bias=False)
        self.wg = nn.Linear(dim, 3 * H, bias=True)  # theta, alpha, eta logits per head
        self.wo = nn.Linear(H * D, dim, bias=False)
        self.norm = HeadRMSNorm(D)
        self._biases = (theta_bias, alpha_bias, eta_bias)
        if memory == "linear":
            self.w_init = nn.Parameter(torch.zeros(H, D, D))  # [H, dv, dk]
        else:
            self.w1_init = nn.Parameter(torch.empty(H, self.hidden, D))  # [H, hid, dk]
            self.w2_init = nn.Parameter(torch.empty(H, D, self.hidden))  # [H, dv, hid]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: Optional[float] = None) -> None:
        std = std or 1.0 / math.sqrt(self.dim)
        for lin in (self.wq, self.wk, self.wv, self.wo):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.wg.weight, std=std)
        th, al, et = self._biases
        H = self.num_heads
        self.wg.bias[:H].fill_(th)
        self.wg.bias[H:2 * H].fill_(al)
        self.wg.bias[2 * H:].fill_(et)
        self.norm.weight.fill_(1.0)
        if self.memory == "linear":
            self.w_init.zero_()
        else:
            nn.init.normal_(self.w1_init, std=1.0 / math.sqrt(self.head_dim))
            nn.init.normal_(self.w2_init, std=1.0 / math.sqrt(self.hidden))

    # ------------------------------------------------------------------ shared pieces

    def _project(self, x: torch.Tensor):
        """q, k, v (l2-normalised) ``[B, H, S, D]``; theta, log(1-alpha), log(eta) ``[B, H, S]``."""
        B, S, _ = x.shape
        H, D = self.num_heads, self.head_dim
        cdt = compute_dtype(x)
        x = self._in(x)
        heads = lambda t: t.view(B, S, H, D).transpose(1, 2).to(cdt)  # noqa: E731
        q = F.normalize(heads(self.wq(x)), dim=-1)
        k = F.normalize(heads(self.wk(x)), dim=-1)
        v = F.normalize(heads(self.wv(x)), dim=-1)  # bounded targets keep the inner loop stable
        z = self.wg(x).to(cdt).view(B, S, 3, H).permute(2, 0, 3, 1)  # [3, B, H, S]
        theta = self.max_lr * torch.sigmoid(z[0])
        log_a = F.logsigmoid(-z[1])  # log(1 - alpha)
        log_e = F.logsigmoid(z[2]) + math.log(self.eta_max) if self.eta_max > 0 else \
            torch.full_like(z[2], float("-inf"))  # log(eta)
        return q, k, v, theta, log_a, log_e

    def _init_weights(self) -> tuple[torch.Tensor, ...]:
        return (self.w_init,) if self.memory == "linear" else (self.w1_init, self.w2_init)

    def forward(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, *,
                retrieve: str = "current") -> torch.Tensor:
        doc = self._begin(x, doc_ids, retrieve, aligned=self.needs_chunk_aligned_cp)
        sp = self.state_passing
        final = None
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v, theta, log_a, log_e = self._project(x)
            kw = dict(chunk_size=self.chunk_size, retrieve=retrieve)
            if self.memory == "linear":
                chunks = TitansLinearChunks(q, k, v, theta, log_a, log_e, self.w_init, doc, backend=self.backend, **kw)
                x0 = sp.fold(chunks.affine_map, chunks.reset, doc[:, 0], doc[:, -1])
                y, _ = chunks.output(x0)
            else:
                reset = reset_state(self._init_weights(), x.shape[0], q.dtype)
                state = sp.recv_prev(reset, first_doc=doc[:, 0])
                y, final = chunk_titans_mlp(q, k, v, theta, log_a, log_e, self._init_weights(), doc,
                                            initial_state=state, output_final_state=True, **kw)
            out = self._heads_out(y.transpose(1, 2), x)
        if final is not None:
            out = sp.send_next(out, final, last_doc=doc[:, -1])
        return out

    def reference(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, *,
                  retrieve: str = "current") -> torch.Tensor:
        """The definition, token by token (inner gradients by autograd); single rank."""
        doc = self._begin(x, doc_ids, retrieve)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v, theta, log_a, log_e = self._project(x)
            y, _ = naive_titans(q, k, v, theta, log_a, log_e, self._init_weights(), doc, chunk_size=self.chunk_size,
                                retrieve=retrieve)
            return self._heads_out(y.transpose(1, 2), x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", memory={self.memory}, max_lr={self.max_lr:.3g}, eta_max={self.eta_max}"
