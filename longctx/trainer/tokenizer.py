"""Tokenizers: a dependency-free byte tokenizer, or a local HuggingFace `tokenizer.json`.

Both expose the same small interface the data pipeline needs:
`encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `eos_id`, `pad_id`, `name`.
Nothing here touches the network: `data.tokenizer` is `"byte"` or a local path.
"""

from __future__ import annotations

import os
from typing import Sequence

from longctx.config import ConfigError

# Special-token spellings used by common tokenizers, most common first.
EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|eos|>", "<|end_of_text|>", "<|im_end|>", "[SEP]")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then pad, bos, eos. Round-trips any text."""

    name = "byte"

    def __init__(self) -> None:
        self.pad_id = 256
        self.bos_id = 257
        self.eos_id = 258
        self.vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # Specials are not text; a split multi-byte character decodes to U+FFFD.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from a local `tokenizer.json`."""

    def __init__(self, tokenizer, name: str) -> None:
        self._tok = tokenizer
        self.name = name
        self.eos_id = self._find_or_add(EOS_NAMES, add="<eos>")
        # Padding never reaches the loss (labels are -100 there), so reusing eos is safe
        # and keeps the vocabulary the size the tokenizer was trained with.
        self.pad_id = self._find(PAD_NAMES)
        if self.pad_id is None:
            self.pad_id = self.eos_id
        self.bos_id = self._find(("<s>", "<|begin_of_text|>", "<bos>", "[CLS]"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _find(self, names: Sequence[str]):
        for token in names:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def _find_or_add(self, names: Sequence[str], add: str) -> int:
        token_id = self._find(names)
        if token_id is None:
            self._tok.add_special_tokens([add])
            token_id = self._tok.token_to_id(add)
        return token_id

    def encode(self, text: str) -> list[int]:
        # No template specials (BOS/CLS...): the packer adds eos between documents itself,
        # and answer spans are encoded piecewise, which templates would break.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def build_tokenizer(spec: str):
    """`"byte"` -> ByteTokenizer; otherwise a local `tokenizer.json` file or a folder holding one.
    `"auto"` is resolved by `load_config` (model.init_from's tokenizer, else byte); a config
    built in code without that step has no pretrained folder, so auto is byte."""
    if spec in ("byte", "auto"):
        return ByteTokenizer()
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ConfigError(f"data.tokenizer='{spec}': folder has no tokenizer.json "
                              f"(expected 'byte', a tokenizer.json file, or a folder holding one)")
    elif not os.path.isfile(path):
        raise ConfigError(f"data.tokenizer='{spec}': path does not exist "
                          f"(expected 'byte', a tokenizer.json file, or a folder holding one)")
    from tokenizers import Tokenizer  # local import: the byte path needs no extra library

    try:
        tok = Tokenizer.from_file(path)
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise ConfigError(f"data.tokenizer='{spec}': cannot load '{path}': {err}") from None
    return HFTokenizer(tok, name=spec)


__all__ = ["ByteTokenizer", "HFTokenizer", "build_tokenizer"]
