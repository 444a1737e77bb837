"""Gated Slot Attention (Zhang et al., "Gated Slot Attention for Efficient Linear-Time
Sequence Modeling").

Per head, two slot memories of M slots with a slot-wise forget gate
``alpha_t = sigmoid(w x_t + b) ** (1 / tau)`` (in (0, 1)^M; tau damps it, as in the paper):

    K~_t = diag(alpha_t) K~_{t-1} + (1 - alpha_t) k_t^T          [M, d_k]
    V~_t = diag(alpha_t) V~_{t-1} + (1 - alpha_t) v_t^T          [M, d_v]
    o_t  = V~_t^T softmax(K~_t q_t / sqrt(d_k))

i.e. two gated linear-attention passes (the first reads the keys with q, the second reads
the values with the slot probabilities) joined by a softmax over the slots.

Chunked form: both memories share the recurrence ``X_t = X_{t-1} diag(alpha_t) + [k_t; v_t]
(1 - alpha_t)^T`` on ``X = [K~^T ; V~^T]``. Per chunk, the intra-chunk parts are GEMMs with
the decays factorised as ``exp(G_t) exp(-G_i)`` (G the cumulative log-gate from the chunk
start) while ``-G`` stays below 60 (no overflow); a block of chunks whose gates decay
harder falls back to the exact pairwise decays ``exp(G_t - G_i)`` (a [C, C, M] tensor,
recomputed in backward; safe for any gate value, even 0 or 1 in floating point). The
chunk states come from
``longctx.kernels.recurrence.affine_scan`` with a diagonal transition (Triton on CUDA).
States reset to 0 at document starts.

Context parallelism: affine fold (one all-gather of every rank's (gate product, state
from zero); the state is independent of the queries, so both passes fold at once).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from longctx.kernels.recurrence import affine_scan

from .common import HeadRMSNorm, MemoryModule, chunk_geometry, compute_dtype, doc_tensor, pad_seq
from .state_passing import affine_fold, group_info


def _intra(qc, kc, vc, Gam, bb, mask, contf, XK, XV, scale, retrieve):
    """Outputs of a block of chunks. qc/kc/vc [B,H,n,C,D], Gam/bb [B,H,n,C,M], mask [B,1,n,C,C],
    contf [B,1,n,C], XK/XV [B,H,n,D,M] chunk-start states."""
    cf = contf[..., None]
    eG = torch.exp(Gam)
    if retrieve == "chunk_start":
        s = cf * (qc @ XK) * scale
        p = torch.softmax(s, dim=-1)
        return cf * (p @ XV.transpose(-1, -2))
    C = Gam.shape[-2]
    eye = torch.eye(C, dtype=torch.bool, device=Gam.device)[..., None]
    diff = Gam[..., :, None, :] - Gam[..., None, :, :]
    diff = torch.where(eye, torch.zeros((), dtype=diff.dtype, device=diff.device), diff)  # see decay_matrix
    diff = diff.masked_fill(~mask[..., None], float("-inf"))
    Dm = torch.exp(diff)  # [B,H,n,C,C,M]
    DB = Dm * bb[..., None, :, :]
    QK = qc @ kc.transpose(-1, -2)
    s_loc = torch.einsum("bhnti,bhntim->bhntm", QK, DB)
    s_car = cf * eG * (qc @ XK)
    p = torch.softmax((s_loc + s_car) * scale, dim=-1)
    A2 = torch.einsum("bhntm,bhntim->bhnti", p, DB)
    return A2 @ vc + cf * ((p * eG) @ XV.transpose(-1, -2))


#: The factorised intra-chunk form multiplies exp(G_t) by exp(-G_i); it is used for a block of
#: chunks whose cumulative log-decay stays above this (exp(60) is far from fp32 overflow).
FACTORISE_MIN_LOG_DECAY = -60.0


def _intra_factorised(qc, kc, vc, Gam, bb, mask, contf, XK, XV, scale):
    """`_intra` as GEMMs: exp(G_t - G_i) = exp(G_t) exp(-G_i), valid while -G stays small."""
    cf = contf[..., None]
    eG = torch.exp(Gam)
    bt = bb * torch.exp(-Gam)  # [B,H,n,C,M]
    maskf = mask.to(qc.dtype)  # [B,1,n,C,C]
    QK = (qc @ kc.transpose(-1, -2)) * maskf
    s = eG * (QK @ bt + cf * (qc @ XK))
    p = torch.softmax(s * scale, dim=-1)
    pe = p * eG
    A2 = (pe @ bt.transpose(-1, -2)) * maskf
    return A2 @ vc + cf * (pe @ XV.transpose(-1, -2))


class GatedSlotAttention(MemoryModule):
    name = "gsa"
    needs_chunk_aligned_cp = False  # exact for any chunking: the chunk size is only a compute tile

    def __init__(self, dim: int, num_heads: int, chunk_size: int = 32, *, num_slots: int = 32,
                 gate_temperature: float = 8.0, head_dim: Optional[int] = None, backend: str = "auto",
                 block_chunks: int = 64):
        super().__init__(dim, num_heads, chunk_size, head_dim, backend)
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots, self.tau, self.block_chunks = num_slots, float(gate_temperature), block_chunks
        H, D, M = num_heads, self.head_dim, num_slots
        self.wq = nn.Linear(dim, H * D, bias=False)
        self.wk = nn.Linear(dim, H * D, bias=False)
        self.wv = nn.Linear(dim, H * D, bias=False)
        self.wf = nn.Linear(dim, H * M, bias=True)  # slot forget-gate logits
        self.wo = nn.Linear(H * D, dim, bias=False)
        self.norm = HeadRMSNorm(D)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: Optional[float] = None) -> None:
        std = std or 1.0 / math.sqrt(self.dim)
        for lin in (self.wq, self.wk, self.wv, self.wo, self.wf):
            nn.init.normal_(lin.weight, std=std)
        # alpha = sigmoid(b)^(1/tau) spread over slots: some fast, some slow slots
        self.wf.bias.copy_(torch.linspace(0.0, 6.0, self.num_slots).repeat(self.num_heads))
        self.norm.weight.fill_(1.0)

    def _project(self, x):
        B, S, _ = x.shape
        H, D, M = self.num_heads, self.head_dim, self.num_slots
        cdt = compute_dtype(x)
        x = self._in(x)
        heads = lambda t, d: t.view(B, S, H, d).transpose(1, 2).to(cdt)  # noqa: E731
        q, k, v = heads(self.wq(x), D), heads(self.wk(x), D), heads(self.wv(x), D)
        log_alpha = F.logsigmoid(heads(self.wf(x), M)) / self.tau  # [B,H,S,M]
        b = -torch.expm1(log_alpha)  # 1 - alpha, accurate near alpha = 1
        return q, k, v, log_alpha, b

    def _output(self, y, x):
        B, H, S, D = y.shape
        return self.wo(self.norm(y).transpose(1, 2).reshape(B, S, H * D).to(self._param_dtype())).to(x.dtype)

    def forward(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, group=None, *,
                retrieve: str = "current") -> torch.Tensor:
        self._check_x(x)
        self._check_retrieve(retrieve)
        B, S, _ = x.shape
        if retrieve == "chunk_start":  # reads chunk-start states: the chunk grid must be global
            self.needs_chunk_aligned_cp = True
            try:
                self._check_cp_alignment(S, *group_info(group))
            finally:
                self.needs_chunk_aligned_cp = False
        doc = doc_tensor(doc_ids, B, S, x.device)
        H, D, M, C = self.num_heads, self.head_dim, self.num_slots, self.chunk_size
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v, lg, bb = self._project(x)
            n = -(-S // C)
            pad = n * C - S
            q, k, v = (pad_seq(t, pad, 0.0, dim=2) for t in (q, k, v))
            lg, bb = pad_seq(lg, pad, 0.0, dim=2), pad_seq(bb, pad, 0.0, dim=2)  # neutral: alpha=1, no write
            doc_p = pad_seq(doc, pad, None, dim=1)
            cont, mask, _ = chunk_geometry(doc_p, C)
            contf = cont[:, None].to(q.dtype)  # [B,1,n,C]
            qc, kc, vc = (t.reshape(B, H, n, C, D) for t in (q, k, v))
            lgc, bbc = lg.reshape(B, H, n, C, M), bb.reshape(B, H, n, C, M)
            Gam = torch.cumsum(lgc, dim=3)
            # chunk-end state contributions and the chunk transition (diagonal over slots)
            endm = mask[:, :, -1, :][:, None, :, :, None]  # [B,1,n,C,1]: same doc as the chunk's last token
            dlast = Gam[..., -1:, :] - Gam
            dlast = torch.cat([dlast[..., :-1, :], torch.zeros_like(dlast[..., -1:, :])], dim=-2)  # exact 0, no grad
            dC = torch.exp(dlast.masked_fill(~endm, float("-inf")))  # [B,H,n,C,M]
            wb = bbc * dC
            Bm = torch.einsum("bhnir,bhnim->bhnrm", torch.cat([kc, vc], -1), wb)  # [B,H,n,2D,M]
            gamma = torch.exp(Gam[..., -1, :]) * contf[..., -1:]  # [B,H,n,M]
            G = B * H
            Bm = Bm.reshape(G, n, 2 * D, M)
            gamma = gamma.reshape(G, n, M)
            world, _ = group_info(group)
            x0 = q.new_zeros(G, 2 * D, M)
            if world > 1:
                _, B_r = affine_scan(x0, Bm, gamma=gamma, backend=self.backend)
                T_r = torch.prod(gamma, dim=1)
                x0 = affine_fold(T_r, B_r, x0, doc_p[:, 0], doc_p[:, -1], group, dense=False, heads=H)
            starts, _ = affine_scan(x0, Bm, gamma=gamma, backend=self.backend)
            starts = starts.view(B, H, n, 2 * D, M)
            XK, XV = starts[..., :D, :], starts[..., D:, :]
            scale = 1.0 / math.sqrt(D)
            outs = []
            step = max(1, self.block_chunks)
            for c0 in range(0, n, step):
                sl = slice(c0, min(n, c0 + step))
                args = (qc[:, :, sl], kc[:, :, sl], vc[:, :, sl], Gam[:, :, sl], bbc[:, :, sl], mask[:, None, sl],
                        contf[:, :, sl], XK[:, :, sl], XV[:, :, sl])
                if retrieve == "current" and bool(Gam[:, :, sl, -1].min() > FACTORISE_MIN_LOG_DECAY):
                    outs.append(_intra_factorised(*args, scale))
                elif torch.is_grad_enabled() and retrieve == "current":
                    outs.append(checkpoint(_intra, *args, scale, retrieve, use_reentrant=False))
                else:
                    outs.append(_intra(*args, scale, retrieve))
            y = torch.cat(outs, dim=2).reshape(B, H, n * C, D)[:, :, :S]
            return self._output(y, x)

    def reference(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, *,
                  retrieve: str = "current") -> torch.Tensor:
        self._check_x(x)
        self._check_retrieve(retrieve)
        B, S, _ = x.shape
        doc = doc_tensor(doc_ids, B, S, x.device)
        H, D, M, C = self.num_heads, self.head_dim, self.num_slots, self.chunk_size
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v, lg, bb = self._project(x)
            alpha = torch.exp(lg)
            Kt = q.new_zeros(B, H, M, D)
            Vt = q.new_zeros(B, H, M, D)
            K0, V0 = Kt, Vt
            scale = 1.0 / math.sqrt(D)
            ys = []
            for t in range(S):
                reset = (doc[:, t] != doc[:, t - 1]) if t > 0 else torch.zeros(B, dtype=torch.bool, device=x.device)
                rs = reset.view(B, 1, 1, 1)
                Kt = torch.where(rs, torch.zeros_like(Kt), Kt)
                Vt = torch.where(rs, torch.zeros_like(Vt), Vt)
                if t % C == 0:
                    K0, V0 = Kt, Vt
                else:
                    K0 = torch.where(rs, Kt, K0)
                    V0 = torch.where(rs, Vt, V0)
                if retrieve == "chunk_start":
                    p = torch.softmax(torch.einsum("bhmd,bhd->bhm", K0, q[:, :, t]) * scale, -1)
                    ys.append(torch.einsum("bhmd,bhm->bhd", V0, p))
                a = alpha[:, :, t, :, None]
                b = bb[:, :, t, :, None]
                Kt = a * Kt + b * k[:, :, t, None, :]
                Vt = a * Vt + b * v[:, :, t, None, :]
                if retrieve == "current":
                    p = torch.softmax(torch.einsum("bhmd,bhd->bhm", Kt, q[:, :, t]) * scale, -1)
                    ys.append(torch.einsum("bhmd,bhm->bhd", Vt, p))
            y = torch.stack(ys, dim=2)
            return self._output(y, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_slots={self.num_slots}, tau={self.tau}"
