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

Chunk-parallel training as in the paper: inside a chunk of C tokens
(a global grid of positions), every gradient is taken at the chunk-start weights, so the
per-token updates ``u_i = -theta_i grad l_i`` are known in parallel and the momentum and
decay recurrences become a parallel scan: with ``A``, ``E`` the cumulative products of
``1 - alpha`` and ``eta``,

    W_t = A_t W_0 + c_t S_0 + sum_{i<=t} K(t, i) u_i,    K = Abar @ Ebar,
    Abar[t, j] = prod_{l in (j, t]} (1 - alpha_l),   Ebar[j, i] = prod_{l in (i, j]} eta_l,

and ``y_t = W_t q_t`` needs no per-token weights: ``u_i q_t`` is ``(k_i . q_t)`` times a
vector (an attention-like C x C product). The MLP memory uses the same scan per layer
(``W1_t q_t`` first, then ``W2_t silu(.)``).

Documents: at a document start the memory resets to its learned initial weights
(``M_0``, a parameter) and the momentum to 0; a document that starts inside a chunk uses
``M_0`` as its "chunk-start" weights.

Fast paths:
* linear memory: the chunk-start gradient ``2 (W_0 k - v) k^T`` is affine in ``W_0``, so each
  chunk is an affine map of ``X = [W | S]``: ``X_c = X_{c-1} T_c + B_c`` with a dense
  ``2dk x 2dk`` T. All chunks' (T, B) and their intra-chunk outputs are batched matmuls;
  the chunk recurrence is ``longctx.kernels.recurrence.affine_scan`` (Triton on CUDA).
  Context parallelism: affine fold (one all-gather).
* MLP memory: a loop over chunks (each chunk fully parallel inside). Context
  parallelism: weights and momentum pass rank to rank.

``reference`` runs the definition token by token, with the inner gradient taken by
``torch.autograd.grad`` (so it also checks the fast path's closed-form gradients).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longctx.kernels.recurrence import affine_scan

from .common import (HeadRMSNorm, MemoryModule, chunk_geometry, compute_dtype, decay_matrix, doc_tensor,
                     pad_seq, silu_grad)
from .state_passing import affine_fold, group_info, recv_prev, send_next

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

    def _output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y ``[B, H, S, D]`` -> ``[B, S, dim]``."""
        B, H, S, D = y.shape
        y = self.norm(y).transpose(1, 2).reshape(B, S, H * D).to(self._param_dtype())
        return self.wo(y).to(x.dtype)

    def _init_state(self, B: int, dtype, device):
        if self.memory == "linear":
            W = self.w_init.to(dtype).unsqueeze(0).expand(B, -1, -1, -1)
            return (W, torch.zeros_like(W))
        W1 = self.w1_init.to(dtype).unsqueeze(0).expand(B, -1, -1, -1)
        W2 = self.w2_init.to(dtype).unsqueeze(0).expand(B, -1, -1, -1)
        return (W1, W2, torch.zeros_like(W1), torch.zeros_like(W2))

    # ------------------------------------------------------------------ fast path

    def forward(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, group=None, *,
                retrieve: str = "current") -> torch.Tensor:
        self._check_x(x)
        self._check_retrieve(retrieve)
        B, S, _ = x.shape
        world, rank = group_info(group)
        self._check_cp_alignment(S, world, rank)
        doc = doc_tensor(doc_ids, B, S, x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v, theta, log_a, log_e = self._project(x)
            C = self.chunk_size
            n = -(-S // C)
            pad = n * C - S
            # Neutral padding: no update (theta=0), no decay (log gates 0), same document.
            q, k, v = (pad_seq(t, pad, 0.0, dim=2) for t in (q, k, v))
            theta, log_a, log_e = (pad_seq(t, pad, 0.0, dim=2) for t in (theta, log_a, log_e))
            doc_p = pad_seq(doc, pad, None, dim=1)
            final = None
            if self.memory == "linear":
                y = self._linear_fast(q, k, v, theta, log_a, log_e, doc_p, n, group, retrieve)
            else:
                y, final = self._mlp_fast(q, k, v, theta, log_a, log_e, doc_p, n, group, retrieve)
            y = y[:, :, :S]
            out = self._output(y, x)
        if final is not None and world > 1:
            out = send_next(out, final, group)
        return out

    def _chunk_scan_terms(self, theta, log_a, log_e, doc_p, n, doc_in=None):
        """Per-chunk decay structures shared by both memories (all chunks at once)."""
        B, H, Sp = theta.shape
        C = self.chunk_size
        cont, mask, first = chunk_geometry(doc_p, C, doc_in)  # [B,n,C], [B,n,C,C], [B,n,C]
        mask_h = mask[:, None]
        LA = torch.cumsum(log_a.view(B, H, n, C), -1)
        LE = torch.cumsum(log_e.view(B, H, n, C), -1)
        Abar = decay_matrix(LA, mask_h)  # [B,H,n,C,C]
        Ebar = decay_matrix(LE, mask_h)
        Kmat = Abar @ Ebar
        a = torch.exp(log_a.view(B, H, n, C))
        Avec = (Abar * (first[:, None].to(a.dtype) * a)[..., None, :]).sum(-1)  # decay since segment start
        contf = cont[:, None].to(theta.dtype)  # [B,1,n,C]
        Evec = torch.exp(LE) * contf
        cvec = (Abar @ Evec[..., None]).squeeze(-1)  # coefficient of S_0 in W_t
        return dict(cont=cont, contf=contf, Kmat=Kmat, Ebar=Ebar, Avec=Avec, Evec=Evec, cvec=cvec,
                    theta=theta.view(B, H, n, C))

    # -- linear memory: affine chunk maps + scan

    def _linear_fast(self, q, k, v, theta, log_a, log_e, doc_p, n, group, retrieve):
        B, H, Sp, D = q.shape
        C = self.chunk_size
        dt = q.dtype
        g = self._chunk_scan_terms(theta, log_a, log_e, doc_p, n)
        qc, kc, vc = (t.view(B, H, n, C, D) for t in (q, k, v))
        th, Kmat, Ebar, Avec, cvec, contf = g["theta"], g["Kmat"], g["Ebar"], g["Avec"], g["cvec"], g["contf"]
        cf = contf[..., None]  # [B,1,n,C,1]
        W0 = self.w_init.to(dt)  # [H, dv, dk]
        if retrieve == "current":
            Amat = 2.0 * Kmat * th[..., None, :] * (qc @ kc.transpose(-1, -2))  # [B,H,n,C,C]
            p = Avec[..., None] * qc - Amat @ kc  # [B,H,n,C,dk]
            loc = Amat @ vc
            Qt = torch.cat([cf * p, cf * cvec[..., None] * qc], dim=-1)  # [B,H,n,C,2dk]
            Pt = (1 - cf) * p
        else:
            loc = None
            Qt = torch.cat([cf * qc, torch.zeros_like(qc)], dim=-1)
            Pt = (1 - cf) * qc
        # chunk maps X_c = X_{c-1} T_c + B_c, X = [W | S]  ([dv, 2dk])
        wK = 2.0 * Kmat[..., -1, :] * th  # [B,H,n,C]
        wE = 2.0 * Ebar[..., -1, :] * th
        PK = torch.einsum("bhni,bhnid,bhnie->bhnde", wK, kc, kc)
        PE = torch.einsum("bhni,bhnid,bhnie->bhnde", wE, kc, kc)
        VK = torch.einsum("bhni,bhniv,bhnid->bhnvd", wK, vc, kc)
        VE = torch.einsum("bhni,bhniv,bhnid->bhnvd", wE, vc, kc)
        A_C, c_C, E_C = Avec[..., -1], cvec[..., -1], g["Evec"][..., -1]  # [B,H,n]
        cont_C = contf[..., -1]  # [B,1,n]
        eye = torch.eye(D, dtype=dt, device=q.device)
        TWW = A_C[..., None, None] * eye - PK
        TWS = -PE
        TSW = c_C[..., None, None] * eye
        TSS = E_C[..., None, None] * eye
        T = torch.cat([torch.cat([TWW, TWS], -1), torch.cat([TSW, TSS], -1)], -2) * cont_C[..., None, None]
        Bm = torch.einsum("hvd,bhnde->bhnve", W0, torch.cat([TWW, TWS], -1)) * (1 - cont_C)[..., None, None] \
            + torch.cat([VK, VE], -1)
        G = B * H
        T = T.reshape(G, n, 2 * D, 2 * D)
        Bm = Bm.reshape(G, n, D, 2 * D)
        x_init = torch.cat([W0, torch.zeros_like(W0)], -1).unsqueeze(0).expand(B, -1, -1, -1).reshape(G, D, 2 * D)
        world, rank = group_info(group)
        x0 = x_init
        if world > 1:
            # This slice's map from a zero state: scan [I; 0] rows through the chunk maps.
            aug0 = torch.cat([torch.eye(2 * D, dtype=dt, device=q.device).expand(G, -1, -1),
                              torch.zeros(G, D, 2 * D, dtype=dt, device=q.device)], 1)
            augB = torch.cat([torch.zeros(G, n, 2 * D, 2 * D, dtype=dt, device=q.device), Bm], 2)
            _, fin = affine_scan(aug0, augB, t=T, backend=self.backend)
            T_r, B_r = fin[:, :2 * D], fin[:, 2 * D:]
            x0 = affine_fold(T_r, B_r, x_init, doc_p[:, 0], doc_p[:, -1], group, dense=True, heads=H)
        starts, _ = affine_scan(x0, Bm, t=T, backend=self.backend)
        starts = starts.view(B, H, n, D, 2 * D)
        y = torch.einsum("bhnvm,bhntm->bhntv", starts, Qt) + torch.einsum("bhntd,hvd->bhntv", Pt, W0)
        if loc is not None:
            y = y + loc
        return y.reshape(B, H, n * C, D)

    # -- MLP memory: loop over chunks

    def _mlp_fast(self, q, k, v, theta, log_a, log_e, doc_p, n, group, retrieve):
        B, H, Sp, D = q.shape
        C = self.chunk_size
        dt = q.dtype
        world, rank = group_info(group)
        state = self._init_state(B, dt, q.device)
        doc_in = None
        if world > 1:
            template = [s.contiguous() for s in state] + [torch.zeros(B, dtype=torch.float64, device=q.device)]
            got = recv_prev(template, group)
            if got is not None:
                state, doc_in = tuple(got[:-1]), got[-1]
                # A document starting exactly at the slice boundary resets the memory.
                keep = (doc_p[:, 0].to(torch.float64) == doc_in).view(B, 1, 1, 1)
                init = self._init_state(B, dt, q.device)
                state = tuple(torch.where(keep, s, i) for s, i in zip(state, init))
        g = self._chunk_scan_terms(theta, log_a, log_e, doc_p, n)
        qc, kc, vc = (t.view(B, H, n, C, D) for t in (q, k, v))
        W1i, W2i = self.w1_init.to(dt), self.w2_init.to(dt)
        W1, W2, S1, S2 = state
        ys = []
        for c in range(n):
            cont = g["contf"][:, :, c]  # [B,1,C]
            cm = cont[..., None]  # [B,1,C,1]
            qq, kk, vv = qc[:, :, c], kc[:, :, c], vc[:, :, c]
            if retrieve == "chunk_start":
                hq = torch.where(cm.bool(), F.silu(qq @ W1.transpose(-1, -2)),
                                 F.silu(torch.einsum("bhcd,hed->bhce", qq, W1i)))
                y_cs = torch.where(cm.bool(), hq @ W2.transpose(-1, -2), torch.einsum("bhce,hve->bhcv", hq, W2i))
            th, Kmat = g["theta"][:, :, c], g["Kmat"][:, :, c]
            Ebar, Avec, cvec = g["Ebar"][:, :, c], g["Avec"][:, :, c], g["cvec"][:, :, c]
            # inner gradients at the chunk-start weights (M_0 for documents starting in the chunk)
            z = torch.where(cm.bool(), kk @ W1.transpose(-1, -2), torch.einsum("bhcd,hed->bhce", kk, W1i))
            hk = F.silu(z)
            pred = torch.where(cm.bool(), hk @ W2.transpose(-1, -2), torch.einsum("bhce,hve->bhcv", hk, W2i))
            r = pred - vv
            back = torch.where(cm.bool(), r @ W2, torch.einsum("bhcv,hve->bhce", r, W2i))
            delta = 2.0 * back * silu_grad(z)  # dl/dz
            if retrieve == "current":
                A1 = Kmat * th[..., None, :] * (qq @ kk.transpose(-1, -2))
                base_q = torch.where(cm.bool(), qq @ W1.transpose(-1, -2), torch.einsum("bhcd,hed->bhce", qq, W1i))
                zq = Avec[..., None] * base_q + cm * cvec[..., None] * (qq @ S1.transpose(-1, -2)) - A1 @ delta
                hq = F.silu(zq)
                A2 = 2.0 * Kmat * th[..., None, :] * (hq @ hk.transpose(-1, -2))
                base_h = torch.where(cm.bool(), hq @ W2.transpose(-1, -2), torch.einsum("bhce,hve->bhcv", hq, W2i))
                y = Avec[..., None] * base_h + cm * cvec[..., None] * (hq @ S2.transpose(-1, -2)) - A2 @ r
            else:
                y = y_cs
            ys.append(y)
            # state at the chunk end
            wK = Kmat[..., -1, :] * th  # [B,H,C]
            wE = Ebar[..., -1, :] * th
            cC = cont[..., -1][..., None, None]  # [B,1,1,1]
            A_C = Avec[..., -1][..., None, None]
            c_C = cvec[..., -1][..., None, None]
            E_C = g["Evec"][:, :, c, -1][..., None, None]
            base1 = torch.where(cC.bool(), W1, W1i.unsqueeze(0))
            base2 = torch.where(cC.bool(), W2, W2i.unsqueeze(0))
            U1K = torch.einsum("bhc,bhce,bhcd->bhed", wK, delta, kk)
            U1E = torch.einsum("bhc,bhce,bhcd->bhed", wE, delta, kk)
            U2K = 2.0 * torch.einsum("bhc,bhcv,bhce->bhve", wK, r, hk)
            U2E = 2.0 * torch.einsum("bhc,bhcv,bhce->bhve", wE, r, hk)
            W1, S1 = A_C * base1 + cC * c_C * S1 - U1K, cC * E_C * S1 - U1E
            W2, S2 = A_C * base2 + cC * c_C * S2 - U2K, cC * E_C * S2 - U2E
        final = [W1.contiguous(), W2.contiguous(), S1.contiguous(), S2.contiguous(),
                 doc_p[:, -1].to(torch.float64)]
        return torch.cat(ys, dim=2), final

    # ------------------------------------------------------------------ reference

    def _mem_apply(self, params, x):
        """M(x) for per-(b, h) weights; x ``[B, H, D]``."""
        if self.memory == "linear":
            (W,) = params
            return torch.einsum("bhvd,bhd->bhv", W, x)
        W1, W2 = params
        return torch.einsum("bhve,bhe->bhv", W2, F.silu(torch.einsum("bhed,bhd->bhe", W1, x)))

    def reference(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, *,
                  retrieve: str = "current") -> torch.Tensor:
        """The definition, token by token (inner gradients by autograd)."""
        self._check_x(x)
        self._check_retrieve(retrieve)
        B, S, _ = x.shape
        doc = doc_tensor(doc_ids, B, S, x.device)
        C = self.chunk_size
        outer = torch.is_grad_enabled()  # under no_grad only the inner gradients need a graph
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v, theta, log_a, log_e = self._project(x)
            a, e = torch.exp(log_a), torch.exp(log_e)
            dt = q.dtype
            init = self._init_state(B, dt, x.device)
            P = len(init) // 2
            W, Sm = list(init[:P]), list(init[P:])
            R = list(W)
            ys = []
            for t in range(S):
                reset = torch.ones(B, dtype=torch.bool, device=x.device) if t == 0 else doc[:, t] != doc[:, t - 1]
                rs = reset.view(B, 1, 1, 1)
                W = [torch.where(rs, i, w) for i, w in zip(init[:P], W)]
                Sm = [torch.where(rs, torch.zeros_like(s), s) for s in Sm]
                if t % C == 0:
                    R = list(W)
                else:
                    R = [torch.where(rs, w, r) for w, r in zip(W, R)]
                if retrieve == "chunk_start":
                    ys.append(self._mem_apply(R, q[:, :, t]))
                with torch.enable_grad():
                    Rg = [r if (outer and r.requires_grad) else r.detach().requires_grad_() for r in R]
                    loss = (self._mem_apply(Rg, k[:, :, t]) - v[:, :, t]).pow(2).sum()
                    grads = torch.autograd.grad(loss, Rg, create_graph=outer)
                th = theta[:, :, t].view(B, -1, 1, 1)
                et = e[:, :, t].view(B, -1, 1, 1)
                at = a[:, :, t].view(B, -1, 1, 1)
                Sm = [et * s - th * gr for s, gr in zip(Sm, grads)]
                W = [at * w + s for w, s in zip(W, Sm)]
                if retrieve == "current":
                    ys.append(self._mem_apply(W, q[:, :, t]))
            y = torch.stack(ys, dim=2)
            return self._output(y, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", memory={self.memory}, max_lr={self.max_lr:.3g}, eta_max={self.eta_max}"
