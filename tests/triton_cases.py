"""Shared pieces of the Triton kernel tests: tolerances, the case table, inputs, a brute-force
visibility mask. Tolerances (stated once, used everywhere) are documented in test_kernels_triton.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch

# triton is imported lazily (first by a test, after the ``interp`` fixture has
# set TRITON_INTERPRET where it applies), never at collection: other test
# files' interpreted kernels may rely on triton being first imported in
# interpreter mode. Our own kernels work with either import order.
if importlib.util.find_spec("triton") is None:  # a broken install, not a reason to skip
    raise ImportError("triton is a dependency of longctx (pyproject.toml); reinstall with `pip install -e .`")


def _ta():
    from longctx.kernels import triton_attention

    return triton_attention

FWD_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=2e-5, rtol=2e-5)
HALF_TOL = dict(atol=2e-2, rtol=2e-2)

_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def requires_cuda(fn):
    """A CUDA-only check: marked `gpu` (`python -m pytest -m gpu`) and skipped without CUDA."""
    return pytest.mark.gpu(_no_cuda(fn))



# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------


def docs_from_lengths(rows):
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


def _case(name, S_q, S_k, H=4, H_kv=2, D=16, B=2, q_index=None, k_index=None, q_doc=None, k_doc=None,
          causal=True, scale=None):
    return pytest.param(
        dict(S_q=S_q, S_k=S_k, H=H, H_kv=H_kv, D=D, B=B,
             q_index=torch.arange(S_q) if q_index is None else q_index,
             k_index=torch.arange(S_k) if k_index is None else k_index,
             q_doc=q_doc, k_doc=k_doc, causal=causal, scale=scale),
        id=name,
    )


_DOCS67 = docs_from_lengths([[3, 40, 1, 9, 14], [67]])  # long-tailed lengths, one 1-token doc
_G = torch.Generator().manual_seed(7)
_PERM_Q = torch.randperm(80, generator=_G)[:45]
_PERM_K = torch.randperm(80, generator=_G)[:61]

CASES = [
    # self-attention, S not a multiple of either tile size
    _case("causal", 67, 67),
    _case("full", 45, 70, causal=False),
    _case("causal_scale_mqa", 50, 50, H=4, H_kv=1, scale=0.3),
    _case("causal_mha", 50, 50, H=2, H_kv=2),
    _case("causal_docs", 67, 67, q_doc=_DOCS67, k_doc=_DOCS67),
    _case("full_docs", 67, 67, q_doc=_DOCS67, k_doc=_DOCS67, causal=False),
    # ring steps: q block after its k block (all visible), before it (nothing visible)
    _case("ring_q_after_k", 40, 48, q_index=torch.arange(48, 88), k_index=torch.arange(48)),
    _case("ring_q_before_k", 40, 48, q_index=torch.arange(40), k_index=torch.arange(40, 88)),
    _case("ring_q_before_k_docs", 40, 48, q_index=torch.arange(40), k_index=torch.arange(40, 88),
          q_doc=torch.zeros(2, 40, dtype=torch.long), k_doc=torch.zeros(2, 48, dtype=torch.long)),
    # zigzag: rank 0 (chunks 0, 3) queries against rank 1's keys (chunks 1, 2)
    _case("zigzag_offsets", 48, 48, q_index=torch.cat([torch.arange(0, 24), torch.arange(72, 96)]),
          k_index=torch.arange(24, 72)),
    # striped: rank 1 queries vs rank 0 keys and the reverse (diagonal invisible)
    _case("striped_q1_k0", 40, 40, q_index=torch.arange(1, 80, 2), k_index=torch.arange(0, 80, 2)),
    _case("striped_q0_k1_docs", 40, 40, q_index=torch.arange(0, 80, 2), k_index=torch.arange(1, 80, 2),
          q_doc=docs_from_lengths([[15, 25], [1, 39]]), k_doc=docs_from_lengths([[16, 24], [2, 38]])),
    # rows with no visible key: a query document absent from the key block
    _case("empty_rows_docs", 36, 36, q_index=torch.arange(36, 72), k_index=torch.arange(36),
          q_doc=torch.tensor([[0] * 10 + [5] * 26, [1] * 36]), k_doc=torch.tensor([[0] * 36, [0] * 20 + [1] * 16])),
    # general index sets (unsorted, arbitrary docs): no fully visible tiles, every tile masked
    _case("permuted_docs", 45, 61, q_index=_PERM_Q, k_index=_PERM_K,
          q_doc=torch.randint(0, 3, (2, 45), generator=_G), k_doc=torch.randint(0, 3, (2, 61), generator=_G)),
    # head dims: 64, 128, and one that is not a power of two (padded to 32)
    _case("d64", 40, 40, H=2, H_kv=1, D=64, B=1),
    _case("d128_docs", 33, 33, H=2, H_kv=2, D=128, B=1, q_doc=docs_from_lengths([[20, 13]]),
          k_doc=docs_from_lengths([[20, 13]])),
    _case("d24_full", 30, 37, H=2, H_kv=1, D=24, B=1, causal=False),
]


def case(name):
    return next(c.values[0] for c in CASES if c.id == name)


def make_inputs(c, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, H_kv, D = c["B"], c["H"], c["H_kv"], c["D"]
    q = torch.randn(B, c["S_q"], H, D, generator=g)
    k = torch.randn(B, c["S_k"], H_kv, D, generator=g)
    v = torch.randn(B, c["S_k"], H_kv, D, generator=g)
    dout = torch.randn(B, c["S_q"], H, D, generator=g)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    kw = dict(q_index=c["q_index"].to(device), k_index=c["k_index"].to(device),
              q_doc=None if c["q_doc"] is None else c["q_doc"].to(device),
              k_doc=None if c["k_doc"] is None else c["k_doc"].to(device),
              causal=c["causal"], softmax_scale=c["scale"])
    return to(q), to(k), to(v), to(dout), kw


def assert_lse_close(got, ref, **tol):
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), "lse -inf rows differ"
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], **tol)


def _brute_visible(a_idx, b_idx, a_doc, b_doc, causal):
    vis = torch.ones(1 if a_doc is None else a_doc.shape[0], len(a_idx), len(b_idx), dtype=torch.bool,
                     device=a_idx.device)
    if causal:
        vis &= b_idx[None, None, :] <= a_idx[None, :, None]
    if a_doc is not None:
        vis &= a_doc[:, :, None] == b_doc[:, None, :]
    return vis

def _ring_blocks(S, n_blocks):
    edges = [round(i * S / n_blocks) for i in range(n_blocks + 1)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]

