"""Triton kernels for masked attention (forward, delta preprocessing, dK/dV, dQ).

This file is loaded by ``triton_attention._kernel_module()`` under one of two
module names, once with ``TRITON_INTERPRET=1`` (kernels become interpreted
functions, one small fixed tile config) and once without (compiled kernels,
wrapped in ``triton.autotune``). ``triton.jit`` reads the interpreter switch
when it decorates, so the two variants must be separate module objects; the
kernels themselves live in ``_triton_fwd`` / ``_triton_bwd`` (shared helpers
in ``_triton_common``), loaded here for the same mode.

Layouts: q/out/dout/dq ``[B, S_q, H, D]``, k/v/dk/dv ``[B, S_k, H_kv, D]`` (any
strides), lse/delta ``[B, H, S_q]`` fp32 contiguous, indices int32 ``[S]``,
documents int32 ``[B, S]`` shifted to >= 0 (row stride passed), bounds int32
``[Bb, 4, S]`` (see ``triton_attention._bounds``; ``Bb`` is B with documents,
else 1 with batch stride 0).

Tile iteration (forward and dQ loop over key tiles of one query tile; dK/dV
loops over query tiles of one key tile):

* The host gives, for every row on this side, the first/last position on the
  other side that can be visible (``lo``/``hi``) and, for rows whose visible
  set is exactly the interval ``[lo, hi]``, that interval again (``flo``/``fhi``;
  empty otherwise). The kernel reduces them over its tile: tiles outside
  ``[min lo, max hi]`` are never visited; tiles inside ``[max flo, min fhi]``
  are fully visible to every row of the tile and run without any mask
  (phase B); the remaining boundary tiles (phases A and C) load the other
  side's indices/doc ids and compare the two tiles' index and document
  ranges (min/max, including the sliding window: a tile entirely below the
  window of every row is skipped): a tile that cannot be visible is skipped
  before K/V (or Q/dO) are loaded; otherwise the element mask is built after
  the QK^T dot. With a window the host bounds already start each row at its
  window, so for sorted layouts tiles below it are not even visited.
"""

from __future__ import annotations

import os

import triton

from longctx.kernels.triton_mode import load_kernel_module


def _load(name):
    here = os.path.dirname(os.path.abspath(__file__))
    return load_kernel_module(f"longctx.kernels.{name}", os.path.join(here, f"{name}.py"))


_common, _fwd, _bwd = _load("_triton_common"), _load("_triton_fwd"), _load("_triton_bwd")
INTERPRET = _common.INTERPRET
LOG2E_F = _common.LOG2E_F
NO_WINDOW = _common.NO_WINDOW
PRE_BLOCK_M = _common.PRE_BLOCK_M
_attn_fwd = _fwd._attn_fwd
_bwd_preprocess = _bwd._bwd_preprocess
_attn_bwd_dkdv = _bwd._attn_bwd_dkdv
_attn_bwd_dq = _bwd._attn_bwd_dq


# ---------------------------------------------------------------------------
# autotuning (compiled mode only)
# ---------------------------------------------------------------------------

# Keys: head dim (BLOCK_D), power-of-two buckets of the sequence lengths, the
# mask kind; the autotuner adds the tensor dtypes itself.
_KEY = ["Q_BUCKET", "K_BUCKET", "BLOCK_D", "IS_CAUSAL", "HAS_DOC"]


def _smem_limit() -> int:
    try:
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "shared_memory_per_block_optin", 0) or 101376)
    except Exception:  # pragma: no cover - no CUDA
        return 101376


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Candidate tiles (BLOCK_M, BLOCK_N, warps, stages) per head-dim bucket
# (<= 64, 128, 256). Chosen by compiling every kernel for sm_90 and sm_80
# (bf16, causal + documents, the heaviest variant) and keeping the configs
# that do not spill registers (or spill a few bytes); the autotuner then
# picks the fastest on the actual GPU per key. Hopper tends to win with
# 128-row query tiles and 8 warps, Ampere with 4-warp 64/128 x 32/64 tiles.
# For dK/dV, BLOCK_N is the key tile a program owns and BLOCK_M the query
# tile of its loop.
_TILES = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 4), (64, 32, 4, 4), (128, 64, 8, 3), (128, 64, 8, 2)],
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 4)],
        256: [(128, 32, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2)],
    },
    "dkdv": {
        64: [(64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (16, 64, 4, 4), (32, 32, 4, 2)],
        128: [(32, 128, 8, 3), (16, 128, 8, 3), (32, 64, 8, 3), (32, 32, 4, 2)],
        256: [(16, 32, 4, 2), (32, 32, 4, 2)],
    },
    "dq": {
        64: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (64, 16, 4, 4), (32, 32, 4, 2)],
        128: [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 16, 4, 4)],
        256: [(32, 32, 8, 2), (32, 16, 4, 2), (32, 32, 4, 2)],
    },
}


def _d_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def _configs(kernel):
    seen = dict.fromkeys(t for tiles in _TILES[kernel].values() for t in tiles)
    return [_cfg(*t) for t in seen]


def _prune(kernel, kv_tiles_per_stage):
    """early_config_prune: the head-dim bucket's configs that fit in shared memory."""

    def prune(configs, named_args, **kwargs):
        d = int(kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128)))
        allowed = set(_TILES[kernel][_d_bucket(d)])
        q = named_args.get("Q", None)
        esize = q.element_size() if hasattr(q, "element_size") else 2
        limit = _smem_limit()
        keep, fallback = [], []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            if (bm, bn, c.num_warps, c.num_stages) not in allowed:
                continue
            need = esize * d * (bm + kv_tiles_per_stage(bm, bn) * max(c.num_stages - 1, 1))
            (keep if need <= limit * 0.9 else fallback).append(c)
        if keep:
            return keep
        smallest = min(fallback or configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))
        return [smallest]

    return prune


FWD_CONFIGS = _configs("fwd")
BWD_KV_CONFIGS = _configs("dkdv")
BWD_Q_CONFIGS = _configs("dq")

if INTERPRET:
    attn_fwd = _attn_fwd
    attn_bwd_dkdv = _attn_bwd_dkdv
    attn_bwd_dq = _attn_bwd_dq
    FIXED = {"fwd": _common.INTERP_FWD, "dkdv": _common.INTERP_BWD_KV, "dq": _common.INTERP_BWD_Q}
else:
    attn_fwd = triton.autotune(
        configs=FWD_CONFIGS, key=_KEY + ["ACC"],
        prune_configs_by={"early_config_prune": _prune("fwd", lambda bm, bn: 2 * bn)},
    )(_attn_fwd)
    attn_bwd_dkdv = triton.autotune(
        configs=BWD_KV_CONFIGS, key=_KEY,
        prune_configs_by={"early_config_prune": _prune("dkdv", lambda bm, bn: 2 * bm + bn)},
    )(_attn_bwd_dkdv)
    attn_bwd_dq = triton.autotune(
        configs=BWD_Q_CONFIGS, key=_KEY,
        prune_configs_by={"early_config_prune": _prune("dq", lambda bm, bn: 2 * bn)},
    )(_attn_bwd_dq)
    FIXED = {"fwd": {}, "dkdv": {}, "dq": {}}
bwd_preprocess = _bwd_preprocess
