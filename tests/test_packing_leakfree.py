"""Packing is leak-free: rewriting one document of a packed row leaves the logits of
every other document in that row bit-identical (document mask + per-document RoPE
positions), while the rewritten document's own logits do change."""

from __future__ import annotations

import torch

from longctx.config import load_config
from longctx.models.llama import Transformer
from longctx.trainer.packing import PackedRows
from longctx.trainer.tokenizer import build_tokenizer


def test_changing_one_document_leaves_the_others_unchanged():
    cfg = load_config(None, ["data.task=mix", "data.seq_len=512", "data.min_doc_len=40", "data.max_doc_len=160",
                             "model.attention_backend=torch"])
    tok = build_tokenizer("byte")
    row = PackedRows(cfg.data, tok, seq_len=512, dp_rank=0, dp_size=1).next_batch(1)
    docs = row["doc_ids"][0]
    assert docs.unique().numel() >= 3, "the row should hold several documents"
    victim = int(docs.unique()[1])  # a document in the middle of the row
    inside = docs == victim

    changed = row["input_ids"].clone()
    g = torch.Generator().manual_seed(0)
    changed[0, inside] = torch.randint(0, 256, (int(inside.sum()),), generator=g)
    assert not torch.equal(changed, row["input_ids"])

    torch.manual_seed(0)
    model = Transformer(cfg.model, tok.vocab_size).eval()
    with torch.no_grad():
        before = model(row["input_ids"], row["position_ids"], row["doc_ids"])
        after = model(changed, row["position_ids"], row["doc_ids"])
    assert torch.equal(before[0, ~inside], after[0, ~inside]), "another document's logits moved"
    assert not torch.allclose(before[0, inside], after[0, inside]), "the rewritten document did not change"
