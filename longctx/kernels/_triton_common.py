"""Shared Triton helpers of the attention kernels: reductions, tile visibility, tile loads.

Loaded once per interpreter mode by ``_triton_fwd`` / ``_triton_bwd`` (through
``triton_mode.load_kernel_module``), never imported directly: ``triton.jit``
decides at decoration time whether a function is compiled or interpreted.

Visibility (ARCHITECTURE.md, "Kernels"): key j is visible to query i when
``(not causal or q_idx[i] >= k_idx[j]) and q_doc[i] == k_doc[j] and
q_idx[i] - k_idx[j] < window``. The kernels always take a ``window`` (the host
passes 2**31 - 1 for "no window"; token indices must span less than 2**31, so
``q_idx - k_idx`` never overflows int32 and the test is then always true).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

INTERPRET = bool(knobs.runtime.interpret)

LOG2E_F = 1.4426950408889634  # host-side float
LOG2E = tl.constexpr(LOG2E_F)
LN2 = tl.constexpr(0.6931471805599453)
NO_WINDOW = 2**31 - 1  # host-side window value meaning "no window"

# Fixed tiles for the interpreter: small, and different in M and N so tests
# exercise edge tiles and both loop directions.
INTERP_FWD = dict(BLOCK_M=16, BLOCK_N=32)
INTERP_BWD_KV = dict(BLOCK_M=32, BLOCK_N=16)
INTERP_BWD_Q = dict(BLOCK_M=16, BLOCK_N=32)
PRE_BLOCK_M = 64 if not INTERPRET else 16


# Reductions go through ``tl.reduce`` with triton's standard combine functions
# instead of ``tl.max``/``tl.min``/``tl.sum``: those are themselves ``@jit``
# functions decorated when triton was first imported, so they would be
# compiled-mode objects inside our interpreted kernels whenever triton was
# imported before ``TRITON_INTERPRET=1`` was set. The interpreter recognises
# these combine functions and reduces with numpy; compiled code is identical
# to ``tl.max`` etc. on fp32/int32 inputs.
# If triton itself was imported in the other mode, its combine functions are
# the wrong kind of object for this variant: the compiled variant then uses
# its own (identical) combine functions; the interpreted one only needs the
# identity for numpy's fast path (it never calls them).
@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit
def _sum_combine(a, b):
    return a + b


def _pick_combine(name, own):
    std = getattr(getattr(tl, "standard", None), name, None)
    if std is None:  # pragma: no cover - other triton versions
        return own
    if INTERPRET:
        return std
    from triton.runtime.jit import JITFunction

    return std if isinstance(std, JITFunction) else own


_MAX_COMBINE = _pick_combine("_elementwise_max", _max_combine)
_MIN_COMBINE = _pick_combine("_elementwise_min", _min_combine)
_SUM_COMBINE = _pick_combine("_sum_combine", _sum_combine)


@triton.jit
def rmax(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MAX_COMBINE)


@triton.jit
def rmin(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MIN_COMBINE)


@triton.jit
def rsum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _SUM_COMBINE)


# ---------------------------------------------------------------------------
# tile iteration
#
# A program owns one tile ("own": query tile for forward / dQ, key tile for
# dK/dV) and loops over tiles of the other side. Its context is passed as
# tuples: own = (idx, doc, lo, hi, d_lo, d_hi, row_lo, row_hi) (the tile's
# indices, doc ids, their ranges and the rows' host bounds), tiles = (t_lo,
# f_lo, f_hi, t_hi) (loop tile numbers, see ``phase_range``), side = (Idx,
# Doc, S) (the other side's index/doc pointers and length).
# ---------------------------------------------------------------------------


@triton.jit
def tile_meta(Idx, Doc, offs, valid, DOC_PAD: tl.constexpr, HAS_DOC: tl.constexpr):
    """A tile's indices and doc ids (padding: index 0, doc ``DOC_PAD``) and their
    ranges over its valid rows: (idx, doc, lo, hi, d_lo, d_hi); lo > hi when no
    row is valid. Without documents ``doc`` is ``idx`` and unused."""
    idx = tl.load(Idx + offs, mask=valid, other=0)
    lo = rmin(tl.where(valid, idx, 2147483647), axis=0)
    hi = rmax(tl.where(valid, idx, -2147483647), axis=0)
    doc = idx
    d_lo = lo
    d_hi = hi
    if HAS_DOC:
        doc = tl.load(Doc + offs, mask=valid, other=DOC_PAD)
        d_lo = rmin(tl.where(valid, doc, 2147483647), axis=0)
        d_hi = rmax(tl.where(valid, doc, -1), axis=0)
    return idx, doc, lo, hi, d_lo, d_hi


@triton.jit
def own_tile(pid, Idx, Doc, Bnd, S_this, S_other, DOC_PAD: tl.constexpr, HAS_DOC: tl.constexpr,
             BLOCK: tl.constexpr, BLOCK_OTHER: tl.constexpr):
    """The program's own tile -> (offs, valid, own, tiles).

    ``Bnd`` points at this batch row's ``[4, S_this]`` int32 host bounds
    (``triton_attention._bounds``); they are reduced over the tile to the
    range of other-side tiles to visit, ``[t_lo, t_hi)``, and the band
    ``[f_lo, f_hi)`` of tiles fully visible to every row.
    """
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < S_this
    idx, doc, lo, hi, d_lo, d_hi = tile_meta(Idx, Doc, offs, valid, DOC_PAD, HAS_DOC)
    row_lo = tl.load(Bnd + offs, mask=valid, other=S_other)
    row_hi = tl.load(Bnd + S_this + offs, mask=valid, other=-1)
    flo = rmax(tl.load(Bnd + 2 * S_this + offs, mask=valid, other=0), axis=0)
    fhi = rmin(tl.load(Bnd + 3 * S_this + offs, mask=valid, other=S_other), axis=0)
    t_lo = rmin(row_lo, axis=0) // BLOCK_OTHER
    t_hi = (rmax(row_hi, axis=0) + BLOCK_OTHER) // BLOCK_OTHER  # cdiv(hi + 1, BLOCK); hi = -1 -> 0
    f_lo = (flo + BLOCK_OTHER - 1) // BLOCK_OTHER  # first tile starting at or after flo
    f_hi = (fhi + 1) // BLOCK_OTHER  # tiles ending at or before fhi
    has_full = f_lo < f_hi
    f_lo = tl.where(has_full, f_lo, t_hi)
    f_hi = tl.where(has_full, f_hi, t_hi)
    return offs, valid, (idx, doc, lo, hi, d_lo, d_hi, row_lo, row_hi), (t_lo, f_lo, f_hi, t_hi)


@triton.jit
def phase_range(PHASE: tl.constexpr, tiles):
    """Tiles of loop phase 0 (boundary tiles before the fully visible band),
    1 (the band: no mask at all) and 2 (boundary tiles after it, e.g. the
    causal diagonal). Phases 0 and 2 run masked."""
    t_lo, f_lo, f_hi, t_hi = tiles
    if PHASE == 0:
        start = t_lo
        end = f_lo
    elif PHASE == 1:
        start = f_lo
        end = f_hi
    else:
        start = f_hi
        end = t_hi
    return start, end


@triton.jit
def may_see(q_lo, q_hi, qd_lo, qd_hi, k_lo, k_hi, kd_lo, kd_hi, window,
            IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr):
    """Can any query of a tile with these index/doc ranges see any key of a tile
    with these? Scalars only, so a tile that fails costs its index/doc loads,
    never a K/V (or Q/dO) load."""
    run = (q_lo <= q_hi) & (k_lo <= k_hi)  # both tiles have valid rows
    if IS_CAUSAL:
        run = run & (q_hi >= k_lo)
    run = run & (q_lo - k_hi < window)  # not entirely below the window
    if HAS_DOC:
        run = run & (qd_hi >= kd_lo) & (qd_lo <= kd_hi)
    return run


@triton.jit
def rows_touch(row_lo, row_hi, start, BLOCK: tl.constexpr):
    """Does any row's [lo, hi] bound intersect positions [start, start + BLOCK)?

    Exact for sorted layouts (visible sets are intervals); a superset test
    otherwise. Catches tiles between two documents of one query tile.
    """
    touch = (row_lo < start + BLOCK) & (row_hi >= start)
    return rmax(touch.to(tl.int32), axis=0) > 0


@triton.jit
def loop_tile(side, start, offs0, own, window, MASKED: tl.constexpr, KEYS: tl.constexpr,
              IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK: tl.constexpr):
    """A tile of the inner loop (key tiles when ``KEYS``, else query tiles) ->
    (run, offs, valid, idx, doc). On boundary tiles (``MASKED``) ``run`` says
    whether it can hold a pair visible to the program's own tile, from the
    ranges alone; full tiles always run and need no indices."""
    Idx, Doc, S_other = side
    offs = start + offs0
    valid = offs < S_other
    run = True
    idx = offs
    doc = offs
    if MASKED:
        _, _, o_lo, o_hi, od_lo, od_hi, row_lo, row_hi = own
        run = rows_touch(row_lo, row_hi, start, BLOCK)
        if KEYS:
            idx, doc, lo, hi, d_lo, d_hi = tile_meta(Idx, Doc, offs, valid, -1, HAS_DOC)
            run = run & may_see(o_lo, o_hi, od_lo, od_hi, lo, hi, d_lo, d_hi, window, IS_CAUSAL, HAS_DOC)
        else:
            idx, doc, lo, hi, d_lo, d_hi = tile_meta(Idx, Doc, offs, valid, -2, HAS_DOC)
            run = run & may_see(lo, hi, d_lo, d_hi, o_lo, o_hi, od_lo, od_hi, window, IS_CAUSAL, HAS_DOC)
    return run, offs, valid, idx, doc


@triton.jit
def visible(q_idx, k_idx, q_doc, k_doc, valid, window, IS_CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr):
    """Element mask from broadcastable query/key index and doc tensors (either
    orientation: ``[M, 1]`` vs ``[1, N]`` or the transpose)."""
    vis = valid & (q_idx - k_idx < window)
    if IS_CAUSAL:
        vis = vis & (q_idx >= k_idx)
    if HAS_DOC:
        vis = vis & (q_doc == k_doc)
    return vis


@triton.jit
def load_rows(Ptr, offs_r, offs_d, s_r, s_d, r_valid, d_valid, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
              TRANS: tl.constexpr = False):
    """A ``[rows, BLOCK_D]`` tile (``[BLOCK_D, rows]`` with ``TRANS``): rows and
    head dim masked on boundary tiles, only the padded head dim (if any) on
    full tiles. ``TRANS`` loads K^T straight from memory for ``q @ K^T``: on
    sm_80 that needs fewer registers than ``tl.trans`` of a row tile."""
    if TRANS:
        ptrs = Ptr + offs_r[None, :] * s_r + offs_d[:, None] * s_d
        r_mask = r_valid[None, :]
        d_mask = d_valid[:, None]
    else:
        ptrs = Ptr + offs_r[:, None] * s_r + offs_d[None, :] * s_d
        r_mask = r_valid[:, None]
        d_mask = d_valid[None, :]
    if MASKED:
        x = tl.load(ptrs, mask=r_mask & d_mask, other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=d_mask, other=0.0)
    return x


@triton.jit
def load_pair(ptrs, strides, offs_r, offs_d, r_valid, d_valid, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """Two tiles on the same rows (K and V, or Q and dO): ptrs = (A, B),
    strides = (A row, A dim, B row, B dim)."""
    A, B = ptrs
    sa_r, sa_d, sb_r, sb_d = strides
    a = load_rows(A, offs_r, offs_d, sa_r, sa_d, r_valid, d_valid, MASKED, EVEN_D)
    b = load_rows(B, offs_r, offs_d, sb_r, sb_d, r_valid, d_valid, MASKED, EVEN_D)
    return a, b


@triton.jit
def load_vec(Ptr, offs, valid, other, MASKED: tl.constexpr):
    """A per-row vector (lse, delta); masked on boundary tiles only."""
    if MASKED:
        x = tl.load(Ptr + offs, mask=valid, other=other)
    else:
        x = tl.load(Ptr + offs)
    return x


@triton.jit
def program_tile(H, G, REVERSE: tl.constexpr):
    """(tile, b, h, kvh) of this program; ``REVERSE`` visits the heaviest (last)
    query tiles first, for better tail balance under causal masks."""
    pid = tl.program_id(0)
    if REVERSE:
        pid = tl.num_programs(0) - 1 - pid
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    return pid, b, h, h // G
