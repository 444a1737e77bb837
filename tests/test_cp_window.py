"""Sliding-window attention in every CP strategy.

Every strategy of STRATEGIES x windows {none, 1, 7, S/4, > S} x packed
documents whose lengths cross shard and zigzag-chunk boundaries (plus
interleaved doc ids, non-causal and MHA cases) x GQA (H=4, H_kv=2), fp64,
against the dense reference (tolerance 1e-10): forward out and backward
dq/dk/dv on each rank, bytes and FLOPs as in the other CP tests
(cp_cases.py). All cases of one world size run in one spawn. Ring-family
strategies must skip the blocks that fall entirely outside the window.
"""

from __future__ import annotations

import random

import pytest
import torch
from attention_reference import doc_ids_from_lengths
from cp_cases import RING_FAMILY, check_stats, random_qkv, run_and_compare
from distributed_utils import run_distributed

from longctx.parallel import STRATEGIES, build_strategy
from longctx.parallel.cad.tasks import Doc, Mask, Run, pairs_in
from longctx.parallel.ring import plan_block

S = 64
# Shards of 16 (cp=4) / 32 (cp=2) tokens, zigzag chunks of 8 / 16: no document ends on a boundary.
DOC_ROWS = [[5, 17, 9, 30, 3], [40, 11, 13]]
WINDOWS = (None, 1, 7, S // 4, S + 5)

# name, H, H_kv, causal, doc ids ("packed" | "interleaved" | None), windows
CASES = [
    ("gqa2_causal_docs", 4, 2, True, "packed", WINDOWS),
    ("gqa2_noncausal_docs", 4, 2, False, "packed", (7, S // 4)),
    ("gqa2_causal_interleaved_docs", 4, 2, True, "interleaved", (1, 7)),
    ("mha_causal_nodocs", 4, 4, True, None, (S // 4,)),
]


def _doc(kind):
    if kind is None:
        return None
    doc = doc_ids_from_lengths(DOC_ROWS)
    return doc % 2 if kind == "interleaved" else doc  # the same id in non-adjacent runs is one document


def _strategies(world):
    """(label, name, options): every strategy, hybrid with both of its levels at cp=4."""
    out = [(n, n, {}) for n in ("ring", "zigzag", "striped", "burst", "ulysses")]
    out.append(("burst_q", "burst", {"backward": "q", "node_size": 2 if world == 4 else 0}))
    out.append(("hybrid", "hybrid", {"ulysses_size": 2 if world == 4 else 1}))
    out.append(("cad", "cad", {"min_shard_tokens": 1, "tolerance": 0.0}))
    assert {name for _, name, _ in out} == set(STRATEGIES)
    return out


def _body(rank, world):
    flops = {}
    for label, name, opts in _strategies(world):
        strat = build_strategy(name, backend="torch", **opts)
        for case_name, H, H_kv, causal, docs, windows in CASES:
            q, k, v, dout = random_qkv(H, H_kv, S, seed=len(flops))
            for window in windows:
                run = run_and_compare(strat, case_name, q, k, v, dout, _doc(docs), torch.float64,
                                      causal=causal, window=window)
                check_stats(run, S)
                flops[(label, case_name, window)] = float(run.stats["attn_flops"])
                if window == 1 and name in RING_FAMILY:
                    # Only the block holding the query's own token has a visible pair.
                    assert run.stats["blocks_computed"] == 1, run.where
                if window == 1 and name == "hybrid":
                    assert run.stats["ring_blocks_computed"] == 1, run.where
    return flops


def _check_skipping(results):
    """Group totals: with window=1 a strategy computes a small fraction of the full causal work."""
    for label, name, _ in _strategies(len(results)):
        total = {w: sum(r[(label, "gqa2_causal_docs", w)] for r in results) for w in WINDOWS}
        assert total[1] < 0.15 * total[None], (label, total)
        assert total[7] < total[S // 4] < total[None] == total[S + 5], (label, total)


@pytest.mark.distributed
def test_cp_window_world2():
    _check_skipping(run_distributed(_body, 2, timeout=240))


@pytest.mark.distributed
def test_cp_window_world4():
    _check_skipping(run_distributed(_body, 4, timeout=300))


def test_plan_block_window():
    """Blocks entirely outside the window are skipped; others are trimmed to rows/keys that see something."""
    q, k = torch.arange(16, 24), torch.arange(8, 16)  # the previous contiguous block
    assert plan_block(q, k, True, 1) is None  # min(q) - max(k) = 1 >= 1
    p = plan_block(q, k, True, 3)  # rows 16, 17 see keys 14, 15
    assert (p.q0, p.q1, p.k0, p.k1, p.masked, p.window) == (0, 2, 6, 8, False, 3)
    p = plan_block(q, k, True, 9)  # every query sees a key, key 8 only from row 16
    assert (p.q0, p.q1, p.k0, p.k1, p.masked, p.window) == (0, 8, 0, 8, False, 9)
    p = plan_block(q, k, True, 17)  # the whole block is inside the window: no mask at all
    assert (p.q0, p.q1, p.k0, p.k1, p.masked, p.window) == (0, 8, 0, 8, False, None)
    p = plan_block(q, q, True, 4)  # the diagonal block: causal and window masks
    assert (p.q0, p.q1, p.k0, p.k1, p.masked, p.window) == (0, 8, 0, 8, True, 4)
    assert plan_block(k, q, True, 100) is None  # causal future
    p = plan_block(k, q, False, 5)  # non-causal: future keys are visible, the window bounds the past only
    assert (p.q0, p.q1, p.k0, p.k1, p.masked, p.window) == (0, 8, 0, 8, False, None)
    # Zigzag rank 0 of 2 (chunks 0 and 3 of 4, 8 tokens each) against rank 1 (chunks 1 and 2), window 4.
    z0 = torch.cat([torch.arange(0, 8), torch.arange(24, 32)])
    z1 = torch.arange(8, 24)
    p = plan_block(z0, z1, True, 4)  # rows 24..26 see keys 21..23
    assert (p.q0, p.q1, p.k0, p.k1, p.masked, p.window) == (8, 11, 13, 16, False, 4)


def _brute_pairs(pos, a, b, causal, window):
    return sum(1 for i in range(a, b) for j in range(len(pos))
               if (not causal or j <= i) and (window is None or pos[i] - pos[j] < window))


def test_cad_pair_counts_with_window():
    """CAD's pair counts (closed form for contiguous documents, positions for runs far apart),
    and the planner's cuts, against brute force."""
    rng = random.Random(0)
    for _ in range(200):
        L = rng.randint(1, 40)
        a = rng.randint(0, L)
        b = rng.randint(a, L)
        causal = rng.random() < 0.7
        window = rng.choice([None, 1, 2, 5, 17, 100])
        assert pairs_in(a, b, L, causal, window) == _brute_pairs(list(range(L)), a, b, causal, window)
        # The same document in two runs with a gap of `gap` tokens between them.
        cut, gap = rng.randint(0, L), rng.randint(0, 9)
        doc = Doc(0, [Run(0, 0, 0, cut, 3), Run(1, 0, cut, L - cut, 3 + cut + gap)])
        pos = [r.position(x) for r in doc.runs for x in range(r.doc_start, r.doc_end)]
        assert doc.pairs(a, b, causal, window) == _brute_pairs(pos, a, b, causal, window)
        mask, amt = Mask(causal, window), rng.randint(0, 200)
        m = mask.head_end(doc, a, b, amt)
        assert mask.pairs(doc, a, m) <= amt and (m == b or mask.pairs(doc, a, m + 1) > amt)
        m = mask.tail_start(doc, a, b, amt)
        assert mask.pairs(doc, m, b) <= amt and (m == a or mask.pairs(doc, m - 1, b) > amt)


def test_window_is_validated():
    x = torch.randn(1, 8, 2, 4)
    for name in STRATEGIES:
        s = build_strategy(name, backend="torch")
        for bad in (0, -3, 2.5, True):
            with pytest.raises(ValueError, match="window"):
                s.attention(x, x, x, window=bad)
