"""Pack documents on the fly into rows of `seq_len` tokens.

Each document is tokenised and followed by eos, then copied into the current row; a
document longer than the space left is split, and the rest starts the next row as a new
segment (position ids restart at 0 there). Per row:

- `input_ids`   token ids; `pad_id` on padding
- `labels`      `input_ids[i+1]` when tokens i and i+1 belong to the same segment, else
                -100 (document ends, the row's last token, padding)
- `position_ids` 0, 1, 2... inside each segment (RoPE uses them)
- `doc_ids`     segment number inside the row, 0, 1, 2...; padding gets its own number
- `answer_mask` True where the *label* is an answer token of a synthetic task

Packing is lazy and deterministic. Its position is the document stream's position before
the document being packed, plus how many of that document's tokens are used, so a restore
re-tokenises at most one document.
"""

from __future__ import annotations

from typing import Optional

import torch

from longctx.config import DataConfig
from longctx.trainer.sources import Document, open_documents

IGNORE_INDEX = -100
KEYS = ("input_ids", "labels", "position_ids", "doc_ids", "answer_mask")


def tokenize_document(tokenizer, doc: Document) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (followed by eos) and a per-token "is an answer" flag.

    Answer spans are encoded as separate pieces, so token boundaries fall exactly on span
    boundaries and the mask marks exactly the answer tokens, for any tokenizer.
    """
    ids: list[int] = []
    answer: list[bool] = []
    start = 0
    for lo, hi in sorted(doc.answer_spans):
        for piece, is_answer in ((doc.text[start:lo], False), (doc.text[lo:hi], True)):
            if piece:
                piece_ids = tokenizer.encode(piece)
                ids += piece_ids
                answer += [is_answer] * len(piece_ids)
        start = hi
    tail = tokenizer.encode(doc.text[start:]) if start < len(doc.text) else []
    ids += tail + [tokenizer.eos_id]
    answer += [False] * (len(tail) + 1)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(answer, dtype=torch.bool)


class PackedRows:
    """Rows of packed documents for one dp rank; `next_batch(B)` gives `[B, seq_len]` tensors.

    Training streams never run out. Eval streams are finite: once they do, rows are
    padded (labels -100), so every rank can still produce the same number of batches.
    """

    def __init__(self, cfg: DataConfig, tokenizer, *, seq_len: int, dp_rank: int, dp_size: int,
                 split: str = "train") -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.docs = open_documents(cfg, split=split, dp_rank=dp_rank, dp_size=dp_size)
        self._doc: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # document being packed
        self._doc_state: dict = {}  # stream position just before `_doc`
        self._offset = 0  # tokens of `_doc` already packed
        self.exhausted = False

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        if self._doc is None:
            return {"docs": self.docs.state_dict(), "offset": 0, "exhausted": self.exhausted}
        return {"docs": dict(self._doc_state), "offset": self._offset, "exhausted": self.exhausted}

    def load_state_dict(self, state: dict) -> None:
        self.docs.load_state_dict(state["docs"])
        self._doc, self._offset = None, 0
        self.exhausted = bool(state.get("exhausted", False))
        if state["offset"]:
            # Re-read and re-tokenise just the one partly packed document.
            if not self._fetch():
                raise ValueError("packing state points past the end of the documents")
            self._offset = int(state["offset"])

    # ------------------------------------------------------------------ rows

    def _fetch(self) -> bool:
        """Tokenise the next document into `_doc`; False when the stream has ended."""
        if self.exhausted:
            return False
        self._doc_state = self.docs.state_dict()
        try:
            doc = next(self.docs)
        except StopIteration:
            self.exhausted = True
            return False
        self._doc = tokenize_document(self.tokenizer, doc)
        self._offset = 0
        return True

    def next_row(self) -> dict[str, torch.Tensor]:
        S = self.seq_len
        row = empty_rows(1, S, self.tokenizer.pad_id)
        row = {k: v[0] for k, v in row.items()}
        fill, segment = 0, 0
        while fill < S and (self._doc is not None or self._fetch()):
            tokens, answer = self._doc
            take = min(S - fill, len(tokens) - self._offset)
            src = slice(self._offset, self._offset + take)
            dst = slice(fill, fill + take)
            row["input_ids"][dst] = tokens[src]
            # Label = next token of the same segment; the segment's last token keeps -100.
            row["labels"][fill:fill + take - 1] = tokens[src][1:]
            row["answer_mask"][fill:fill + take - 1] = answer[src][1:]
            row["position_ids"][dst] = torch.arange(take)
            row["doc_ids"][dst] = segment
            fill, segment = fill + take, segment + 1
            self._offset += take
            if self._offset == len(tokens):
                self._doc, self._offset = None, 0
        if fill < S:  # documents ran out (eval only): the padding is one more segment
            row["doc_ids"][fill:] = segment
            row["position_ids"][fill:] = torch.arange(S - fill)
        return row

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        rows = [self.next_row() for _ in range(batch_size)]
        return {k: torch.stack([r[k] for r in rows]) for k in KEYS}


def empty_rows(batch_size: int, seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """All-padding rows: what a row holds before documents are copied in."""
    shape = (batch_size, seq_len)
    return {
        "input_ids": torch.full(shape, pad_id, dtype=torch.long),
        "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.arange(seq_len, dtype=torch.long).expand(shape).clone(),
        "doc_ids": torch.zeros(shape, dtype=torch.long),
        "answer_mask": torch.zeros(shape, dtype=torch.bool),
    }


def eval_rows(cfg: DataConfig, tokenizer, *, seq_len: int, dp_rank: int, dp_size: int,
              num_batches: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """A fixed list of `num_batches` held-out batches for this dp rank.

    Always exactly `num_batches` (so dp ranks stay in step); rows after the held-out
    documents run out are padding, with every label -100.
    """
    rows = PackedRows(cfg, tokenizer, seq_len=seq_len, dp_rank=dp_rank, dp_size=dp_size, split="eval")
    return [rows.next_batch(batch_size) for _ in range(num_batches)]


def pad_rows(batch: dict[str, torch.Tensor], multiple: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad every `[B, S]` tensor so S is a multiple of `multiple` (CP needs 2 * cp).

    Padding: `pad_id` inputs, -100 labels, positions 0.., a fresh doc id per row (so it
    attends to nothing real), answer_mask False. Other `[B, S]` tensors get zeros.
    """
    seq_len = next(iter(batch.values())).shape[1]
    extra = -seq_len % multiple
    if extra == 0:
        return dict(batch)
    out = {}
    for key, value in batch.items():
        if value.dim() != 2 or value.shape[1] != seq_len:
            out[key] = value
            continue
        pad = torch.zeros(value.shape[0], extra, dtype=value.dtype, device=value.device)
        if key == "input_ids":
            pad.fill_(pad_id)
        elif key == "labels":
            pad.fill_(IGNORE_INDEX)
        elif key == "position_ids":
            pad += torch.arange(extra, dtype=value.dtype, device=value.device)
        elif key == "doc_ids":
            pad += value.max(dim=1, keepdim=True).values + 1
        out[key] = torch.cat([value, pad], dim=1)
    return out


__all__ = ["PackedRows", "eval_rows", "pad_rows", "tokenize_document", "empty_rows", "IGNORE_INDEX", "KEYS"]
