"""Titans neural memory, chunk-parallel (see ``titans/__init__.py`` for the derivation).

* linear memory: each chunk is an affine map of ``X = [W | S]`` (``X_c = X_{c-1} T_c + B_c``,
  dense ``2D x 2D`` T); all chunks' (T, B) and their intra-chunk outputs are batched matmuls
  and the chunk recurrence is ``affine_scan`` (Triton on CUDA). `TitansLinearChunks` builds
  the maps once and gives both the outputs from any initial state and the slice's own
  affine map (what the context-parallel affine fold composes).
* MLP memory: a loop over chunks, each chunk fully parallel inside.

Same arguments and state layouts as ``naive.naive_titans``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..common import chunk_end, chunk_geometry, check_retrieve, decay_matrix, doc_tensor, pad_seq, silu_grad
from ..scan import affine_scan
from .naive import reset_state


def _padded(q, k, v, theta, log_a, log_e, doc_ids, C):
    """Pad to whole chunks. Neutral padding for the outputs: no update (theta=0), no decay
    (log gates 0), same document; the final state is read at the last real token."""
    B, H, S, D = q.shape
    doc = doc_tensor(doc_ids, B, S, q.device)
    n = -(-S // C)
    pad = n * C - S
    q, k, v, theta, log_a, log_e = (pad_seq(t, pad, 0.0, dim=2) for t in (q, k, v, theta, log_a, log_e))
    return q, k, v, theta, log_a, log_e, pad_seq(doc, pad, None, dim=1), n, C - 1 - pad


def chunk_scan_terms(theta, log_a, log_e, doc_p, C: int, n: int, last: int):
    """Per-chunk decay structures shared by both memories (all chunks at once); the `*_end`
    entries are at each chunk's end (the last real token in the last chunk)."""
    B, H, Sp = theta.shape
    cont, mask, first = chunk_geometry(doc_p, C)  # [B,n,C], [B,n,C,C], [B,n,C]
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
    th = theta.view(B, H, n, C)
    return dict(contf=contf, Kmat=Kmat, Ebar=Ebar, Avec=Avec, cvec=cvec, theta=th,
                wK_end=chunk_end(Kmat, last, -2) * th, wE_end=chunk_end(Ebar, last, -2) * th,
                A_end=chunk_end(Avec, last), c_end=chunk_end(cvec, last), E_end=chunk_end(Evec, last),
                cont_end=chunk_end(contf, last))


class TitansLinearChunks:
    """The chunk maps of one slice of the linear memory, built once.

    ``.output(initial_state)`` -> (y, final state); ``.affine_map()`` -> the slice's map
    ``X_out = X_in @ T + B`` from a zero state (T ``[B, H, 2D, 2D]``, B ``[B, H, D, 2D]``);
    ``.reset`` is the document-start state ``[W0 | 0]`` ``[B, H, D, 2D]``.
    """

    def __init__(self, q, k, v, theta, log_a, log_e, w_init: torch.Tensor, doc_ids=None, *, chunk_size: int,
                 retrieve: str = "current", backend: str = "auto"):
        check_retrieve(retrieve)
        B, H, S, D = q.shape
        C = chunk_size
        q, k, v, theta, log_a, log_e, doc_p, n, last = _padded(q, k, v, theta, log_a, log_e, doc_ids, C)
        dt = q.dtype
        g = chunk_scan_terms(theta, log_a, log_e, doc_p, C, n, last)
        qc, kc, vc = (t.view(B, H, n, C, D) for t in (q, k, v))
        th, Kmat, Avec, cvec, contf = g["theta"], g["Kmat"], g["Avec"], g["cvec"], g["contf"]
        cf = contf[..., None]  # [B,1,n,C,1]
        W0 = w_init.to(dt)  # [H, dv, dk]
        if retrieve == "current":
            Amat = 2.0 * Kmat * th[..., None, :] * (qc @ kc.transpose(-1, -2))  # [B,H,n,C,C]
            p = Avec[..., None] * qc - Amat @ kc  # [B,H,n,C,dk]
            self.loc = Amat @ vc
            self.Qt = torch.cat([cf * p, cf * cvec[..., None] * qc], dim=-1)  # [B,H,n,C,2dk]
            self.Pt = (1 - cf) * p
        else:
            self.loc = None
            self.Qt = torch.cat([cf * qc, torch.zeros_like(qc)], dim=-1)
            self.Pt = (1 - cf) * qc
        # chunk maps X_c = X_{c-1} T_c + B_c, X = [W | S]  ([dv, 2dk])
        wK, wE = 2.0 * g["wK_end"], 2.0 * g["wE_end"]  # [B,H,n,C]
        PK = torch.einsum("bhni,bhnid,bhnie->bhnde", wK, kc, kc)
        PE = torch.einsum("bhni,bhnid,bhnie->bhnde", wE, kc, kc)
        VK = torch.einsum("bhni,bhniv,bhnid->bhnvd", wK, vc, kc)
        VE = torch.einsum("bhni,bhniv,bhnid->bhnvd", wE, vc, kc)
        A_C, c_C, E_C, cont_C = g["A_end"], g["c_end"], g["E_end"], g["cont_end"]  # [B,H,n] ([B,1,n])
        eye = torch.eye(D, dtype=dt, device=q.device)
        TWW = A_C[..., None, None] * eye - PK
        TWS = -PE
        TSW = c_C[..., None, None] * eye
        TSS = E_C[..., None, None] * eye
        T = torch.cat([torch.cat([TWW, TWS], -1), torch.cat([TSW, TSS], -1)], -2) * cont_C[..., None, None]
        Bm = torch.einsum("hvd,bhnde->bhnve", W0, torch.cat([TWW, TWS], -1)) * (1 - cont_C)[..., None, None] \
            + torch.cat([VK, VE], -1)
        G = B * H
        self.T = T.reshape(G, n, 2 * D, 2 * D)
        self.Bm = Bm.reshape(G, n, D, 2 * D)
        self.W0 = W0
        self.reset = torch.cat([W0, torch.zeros_like(W0)], -1).unsqueeze(0).expand(B, -1, -1, -1)
        self.shape, self.n, self.C, self.backend = (B, H, S, D), n, C, backend

    def affine_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, B) of the whole slice from a zero state: scan [I; 0] rows through the chunk maps."""
        B, H, S, D = self.shape
        G, n, dt, dev = B * H, self.n, self.T.dtype, self.T.device
        aug0 = torch.cat([torch.eye(2 * D, dtype=dt, device=dev).expand(G, -1, -1),
                          torch.zeros(G, D, 2 * D, dtype=dt, device=dev)], 1)
        augB = torch.cat([torch.zeros(G, n, 2 * D, 2 * D, dtype=dt, device=dev), self.Bm], 2)
        _, fin = affine_scan(aug0, augB, t=self.T, backend=self.backend)
        return fin[:, :2 * D].view(B, H, 2 * D, 2 * D), fin[:, 2 * D:].view(B, H, D, 2 * D)

    def output(self, initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False):
        """(y ``[B, H, S, D]``, final ``X [B, H, D, 2D]`` or None) from `initial_state` (None: `reset`)."""
        B, H, S, D = self.shape
        n, C = self.n, self.C
        x0 = (self.reset if initial_state is None else initial_state).reshape(B * H, D, 2 * D)
        starts, final = affine_scan(x0, self.Bm, t=self.T, backend=self.backend)
        starts = starts.view(B, H, n, D, 2 * D)
        y = torch.einsum("bhnvm,bhntm->bhntv", starts, self.Qt) + torch.einsum("bhntd,hvd->bhntv", self.Pt, self.W0)
        if self.loc is not None:
            y = y + self.loc
        y = y.reshape(B, H, n * C, D)[:, :, :S]
        return y, (final.view(B, H, D, 2 * D) if output_final_state else None)


def chunk_titans_linear(q, k, v, theta, log_a, log_e, w_init: torch.Tensor, doc_ids=None, *, chunk_size: int,
                        initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                        retrieve: str = "current", backend: str = "auto"):
    """Linear Titans memory, chunk-parallel: (y ``[B, H, S, D]``, final ``[W | S]`` or None)."""
    chunks = TitansLinearChunks(q, k, v, theta, log_a, log_e, w_init, doc_ids, chunk_size=chunk_size,
                                retrieve=retrieve, backend=backend)
    return chunks.output(initial_state, output_final_state)


def chunk_titans_mlp(q, k, v, theta, log_a, log_e, init_weights: Sequence[torch.Tensor], doc_ids=None, *,
                     chunk_size: int, initial_state=None, output_final_state: bool = False,
                     retrieve: str = "current"):
    """MLP Titans memory, a loop over chunks: (y ``[B, H, S, D]``, final ``(W1, W2, S1, S2)`` or None)."""
    check_retrieve(retrieve)
    B, H, S, D = q.shape
    C = chunk_size
    q, k, v, theta, log_a, log_e, doc_p, n, last = _padded(q, k, v, theta, log_a, log_e, doc_ids, C)
    dt = q.dtype
    W1i, W2i = (w.to(dt) for w in init_weights)
    W1, W2, S1, S2 = reset_state((W1i, W2i), B, dt) if initial_state is None else initial_state
    g = chunk_scan_terms(theta, log_a, log_e, doc_p, C, n, last)
    qc, kc, vc = (t.view(B, H, n, C, D) for t in (q, k, v))

    def base(cm, x, W, Wi, eq):  # x @ W^T, or with the initial weights for tokens of a new document
        return torch.where(cm.bool(), x @ W.transpose(-1, -2), torch.einsum(eq, x, Wi))

    ys = []
    for c in range(n):
        cm = g["contf"][:, :, c][..., None]  # [B,1,C,1]
        qq, kk, vv = qc[:, :, c], kc[:, :, c], vc[:, :, c]
        if retrieve == "chunk_start":
            hq = F.silu(base(cm, qq, W1, W1i, "bhcd,hed->bhce"))
            y_cs = base(cm, hq, W2, W2i, "bhce,hve->bhcv")
        th, Kmat = g["theta"][:, :, c], g["Kmat"][:, :, c]
        Avec, cvec = g["Avec"][:, :, c], g["cvec"][:, :, c]
        # inner gradients at the chunk-start weights (M_0 for documents starting in the chunk)
        z = base(cm, kk, W1, W1i, "bhcd,hed->bhce")
        hk = F.silu(z)
        r = base(cm, hk, W2, W2i, "bhce,hve->bhcv") - vv
        back = torch.where(cm.bool(), r @ W2, torch.einsum("bhcv,hve->bhce", r, W2i))
        delta = 2.0 * back * silu_grad(z)  # dl/dz
        if retrieve == "current":
            A1 = Kmat * th[..., None, :] * (qq @ kk.transpose(-1, -2))
            base_q = base(cm, qq, W1, W1i, "bhcd,hed->bhce")
            zq = Avec[..., None] * base_q + cm * cvec[..., None] * (qq @ S1.transpose(-1, -2)) - A1 @ delta
            hq = F.silu(zq)
            A2 = 2.0 * Kmat * th[..., None, :] * (hq @ hk.transpose(-1, -2))
            base_h = base(cm, hq, W2, W2i, "bhce,hve->bhcv")
            y = Avec[..., None] * base_h + cm * cvec[..., None] * (hq @ S2.transpose(-1, -2)) - A2 @ r
        else:
            y = y_cs
        ys.append(y)
        # state at the chunk end
        wK, wE = g["wK_end"][:, :, c], g["wE_end"][:, :, c]  # [B,H,C]
        cC = g["cont_end"][:, :, c][..., None, None]  # [B,1,1,1]
        A_C, c_C, E_C = (g[key][:, :, c][..., None, None] for key in ("A_end", "c_end", "E_end"))
        base1 = torch.where(cC.bool(), W1, W1i.unsqueeze(0))
        base2 = torch.where(cC.bool(), W2, W2i.unsqueeze(0))
        U1K = torch.einsum("bhc,bhce,bhcd->bhed", wK, delta, kk)
        U1E = torch.einsum("bhc,bhce,bhcd->bhed", wE, delta, kk)
        U2K = 2.0 * torch.einsum("bhc,bhcv,bhce->bhve", wK, r, hk)
        U2E = 2.0 * torch.einsum("bhc,bhcv,bhce->bhve", wE, r, hk)
        W1, S1 = A_C * base1 + cC * c_C * S1 - U1K, cC * E_C * S1 - U1E
        W2, S2 = A_C * base2 + cC * c_C * S2 - U2K, cC * E_C * S2 - U2E
    y = torch.cat(ys, dim=2)[:, :, :S] if ys else q.new_zeros(B, H, 0, D)
    return y, ((W1, W2, S1, S2) if output_final_state else None)


__all__ = ["TitansLinearChunks", "chunk_titans_linear", "chunk_titans_mlp", "chunk_scan_terms"]
