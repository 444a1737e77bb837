"""Triton kernels for real GPUs: they compile for sm_80 / sm_90 without a GPU, and with CUDA their
bf16 / fp16 accuracy is checked against torch SDPA (skipped without CUDA). Tolerances: see
test_kernels_triton.py."""

from __future__ import annotations

import math

import pytest
import torch

from longctx.kernels import _select_backend, attention
from triton_cases import CASES, _brute_visible, _ta, make_inputs, requires_cuda

# ---------------------------------------------------------------------------
# compiled kernels: they must compile for real GPU targets (no GPU needed)
# ---------------------------------------------------------------------------


def _compile_for_target(fn, arch, dtype, consts, warps, stages):
    """triton.compile one kernel for ``sm_<arch>`` down to a cubin, with the
    specialisations a real launch gets (unit head-dim strides, 16-divisible
    pointers/strides). Returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    unit = {"sqd", "skd", "svd", "sod", "sid", "sdd", "sdkd", "sdvd", "sdqd"}
    consts = dict(consts, **{n: 1 for n in fn.arg_names if n in unit})
    floats = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n in consts:
            sig[n] = "constexpr"
        elif n in floats:
            sig[n] = f"*{dtype}"
        elif n in ("OutIn", "Lse", "LseIn", "Delta"):
            sig[n] = "*fp32"
        elif n in ("QIdx", "KIdx", "QDoc", "KDoc", "QBnd", "KBnd"):
            sig[n] = "*i32"
        elif n in ("qk_scale", "sm_scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
        if sig[n].startswith("*") or (sig[n] == "i32" and n.startswith("s") and n not in ("sqdoc", "skdoc", "sbnd")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=True))


@pytest.mark.parametrize("arch, dtype, D", [(90, "bf16", 128), (80, "fp16", 64)], ids=["sm90_bf16_d128", "sm80_fp16_d64"])
def test_kernels_compile_for_gpu_targets(monkeypatch, arch, dtype, D):
    """The interpreter is lenient; compiling catches typing/lowering errors in
    the real kernels (forward with acc + causal + documents, dK/dV, dQ)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    km = _ta()._kernel_module()
    assert not km.INTERPRET
    base = dict(IS_CAUSAL=True, HAS_DOC=True, BLOCK_D=D, EVEN_D=True, PREC="tf32")
    try:
        k = _compile_for_target(km._attn_fwd, arch, dtype, dict(base, ACC=True, BLOCK_M=128, BLOCK_N=32), 8, 3)
    except RuntimeError as err:  # no ptxas / CUDA toolchain bundled with this triton
        if "ptxas" in str(err).lower():
            pytest.skip(f"no CUDA toolchain to compile with: {err}")
        raise
    assert k.asm["cubin"]
    for fn, tiles in ((km._attn_bwd_dkdv, dict(BLOCK_M=32, BLOCK_N=64)), (km._attn_bwd_dq, dict(BLOCK_M=64, BLOCK_N=32))):
        assert _compile_for_target(fn, arch, dtype, dict(base, **tiles), 4, 2).asm["cubin"]


# ---------------------------------------------------------------------------
# GPU: bf16 / fp16 accuracy vs torch SDPA (skipped without CUDA)
# ---------------------------------------------------------------------------


def _sdpa_dense(q, k, v, mask, scale):
    """torch SDPA in q's dtype with a dense boolean mask; rows with nothing visible -> 0."""
    import torch.nn.functional as F

    G = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2).nan_to_num(0.0)


# Cases where every query sees some key: SDPA gives NaN rows (and NaN
# gradients) otherwise, so rows with no visible key are checked on CPU only.
GPU_CASES = [c for c in CASES if c.id in ("causal", "full", "causal_docs", "full_docs", "ring_q_after_k",
                                         "striped_q1_k0", "causal_scale_mqa", "d64", "d128_docs", "d24_full")]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("gc", GPU_CASES)
@pytest.mark.parametrize("scale_up", [1, 16], ids=["small", "x16"])
def test_gpu_accuracy_vs_sdpa(monkeypatch, gc, dtype, scale_up):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    c = dict(gc)
    if scale_up > 1:  # longer sequences: many full tiles, real autotuned tiles
        f = scale_up
        c.update(S_q=c["S_q"] * f, S_k=c["S_k"] * f, D=max(c["D"], 64))
        c["q_index"] = torch.arange(c["S_q"]) + (c["q_index"][0].item() * f)
        c["k_index"] = torch.arange(c["S_k"]) + (c["k_index"][0].item() * f)
        if c["q_doc"] is not None:
            c["q_doc"] = c["q_doc"].repeat_interleave(f, dim=1)
            c["k_doc"] = c["k_doc"].repeat_interleave(f, dim=1)
    q32, k32, v32, do32, kw = make_inputs(c, torch.float32, "cuda")
    scale = kw["softmax_scale"] or 1.0 / math.sqrt(c["D"])
    mask = _brute_visible(kw["q_index"], kw["k_index"], kw["q_doc"], kw["k_doc"], kw["causal"]).expand(
        c["B"], -1, -1).to("cuda")

    leaves32 = [t.clone().requires_grad_() for t in (q32, k32, v32)]
    ref = attention(*leaves32, backend="torch", **kw)
    ref.backward(do32)
    lo = [t.to(dtype).requires_grad_() for t in (q32, k32, v32)]
    ours = attention(*lo, backend="triton", **kw)
    ours.backward(do32.to(dtype))
    sd = [t.to(dtype).requires_grad_() for t in (q32, k32, v32)]
    theirs = _sdpa_dense(*sd, mask, scale)
    theirs.backward(do32.to(dtype))

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()

    floor = 1e-3 if dtype == torch.float16 else 8e-3
    assert err(ours, ref) <= 2 * err(theirs, ref) + floor
    for a, s_, r in zip(lo, sd, leaves32):
        assert torch.isfinite(a.grad).all()
        assert err(a.grad, r.grad) <= 2 * err(s_.grad, r.grad) + floor


@requires_cuda
def test_gpu_auto_uses_triton():
    q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert _select_backend("auto", q) is _ta()
