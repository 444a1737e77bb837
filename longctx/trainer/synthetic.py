"""Deterministic synthetic documents for long-context training and evaluation.

Document `index` of a stream is a pure function of `(task, seed, index, lengths)`, so any
document can be regenerated on its own: streams are infinite, cheap, need no storage,
and resuming only needs the index.

Tasks:
- `passkey`: filler text hiding "The pass key is NNNNN. Remember it." at a random depth,
  ending with a question; the key after the question is the answer.
- `mqar`: multi-query associative recall: `key:value` pairs, then queries `key -> value`
  where each value is an answer.
- `lm`: sentences of pseudo-words drawn from a Zipf law with Markov structure (a fixed
  "language" shared by every seed), so a small model's loss falls.
- `mix`: round-robin of the three, by document index.

Lengths are in characters, drawn in `[min_len, max_len]`; a document can come out a few
characters shorter (whole sentences / pairs), and never shorter than its task's minimum.
"""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Iterator, NamedTuple

TASKS = ("passkey", "mqar", "lm", "mix")
_MIX = ("passkey", "mqar", "lm")


class Document(NamedTuple):
    text: str
    answer_spans: tuple[tuple[int, int], ...] = ()  # [start, end) character ranges that are answers


def synthetic_document(task: str, seed: int, index: int, min_len: int, max_len: int) -> Document:
    """Document `index` of the `task` stream with this seed."""
    if task == "mix":
        task = _MIX[index % len(_MIX)]
    if task not in _GENERATORS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {', '.join(TASKS)}")
    # A string seed is hashed with SHA-512 by `random`: stable across runs and processes.
    rng = random.Random(f"{task}/{seed}/{index}")
    length = rng.randint(min_len, max(min_len, max_len))
    return _GENERATORS[task](rng, length)


def synthetic_documents(task: str, seed: int, min_len: int, max_len: int, start: int = 0) -> Iterator[Document]:
    """The infinite stream `synthetic_document(task, seed, i, ...)` for i = start, start+1, ..."""
    index = start
    while True:
        yield synthetic_document(task, seed, index, min_len, max_len)
        index += 1


# ---------------------------------------------------------------------------- passkey

FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
          "There and back again. ")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. "  # hidden in the filler
PASSKEY_QUESTION = "What is the pass key? The pass key is "  # ends the prompt; the key follows


def passkey(rng: random.Random) -> str:
    """A random 5-digit pass key."""
    return str(rng.randint(10000, 99999))


def _passkey(rng: random.Random, length: int) -> Document:
    key = passkey(rng)
    needle = PASSKEY_NEEDLE.format(key=key)
    question = PASSKEY_QUESTION
    budget = length - len(needle) - len(question) - len(key)
    filler: list[str] = []
    phase = rng.randrange(len(FILLER))  # start the cycle anywhere so documents differ
    while budget > 0:
        sentence = FILLER[(phase + len(filler)) % len(FILLER)]
        if len(sentence) > budget:
            break
        filler.append(sentence)
        budget -= len(sentence)
    depth = rng.randint(0, len(filler))
    prompt = "".join(filler[:depth]) + needle + "".join(filler[depth:]) + question
    return Document(prompt + key, ((len(prompt), len(prompt) + len(key)),))


# ---------------------------------------------------------------------------- mqar

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _mqar(rng: random.Random, length: int) -> Document:
    # One pair "abcd:1234 " is 10 characters, one query "abcd -> 1234\n" is 13, and a
    # document queries about half its keys: about 16.5 characters per pair, plus headers.
    header, middle = "Remember: ", "\nRecall:\n"
    n_pairs = max(1, (length - len(header) - len(middle)) * 2 // 33)
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < n_pairs:
        key = "".join(rng.choice(_LETTERS) for _ in range(4))
        if key not in seen:
            seen.add(key)
            keys.append(key)
    values = [str(rng.randint(1000, 9999)) for _ in keys]
    queries = rng.sample(range(n_pairs), max(1, (n_pairs + 1) // 2))
    text = header + " ".join(f"{k}:{v}" for k, v in zip(keys, values)) + middle
    spans = []
    for q in queries:
        text += f"{keys[q]} -> "
        spans.append((len(text), len(text) + len(values[q])))
        text += values[q] + "\n"
    return Document(text, tuple(spans))


# ---------------------------------------------------------------------------- lm

_LANGUAGE_SEED = 20240601  # fixed: train and eval streams (any seed) speak the same language
_VOCAB = 512
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr", "ch", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")


@lru_cache(maxsize=1)
def _language():
    """Pseudo-words, Zipf cumulative weights, and each word's few likely successors."""
    rng = random.Random(_LANGUAGE_SEED)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < _VOCAB:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((1, 1, 2, 2, 3))))
        if word not in seen:
            seen.add(word)
            words.append(word)
    weights = [1.0 / (rank + 1) ** 1.1 for rank in range(_VOCAB)]
    cum, total = [], 0.0
    for w in weights:
        total += w
        cum.append(total)
    successors = [rng.choices(range(_VOCAB), cum_weights=cum, k=3) for _ in range(_VOCAB)]
    return words, cum, successors


def _sentence(rng: random.Random) -> str:
    words, cum, successors = _language()
    current = rng.choices(range(_VOCAB), cum_weights=cum)[0]
    out = [words[current].capitalize()]
    for _ in range(rng.randint(3, 11)):
        if rng.random() < 0.8:  # mostly follow the Markov chain: that is what a model learns
            current = successors[current][rng.choices((0, 1, 2), weights=(6, 3, 1))[0]]
        else:
            current = rng.choices(range(_VOCAB), cum_weights=cum)[0]
        out.append(words[current])
    return " ".join(out) + ". "


def _lm(rng: random.Random, length: int) -> Document:
    parts: list[str] = []
    size = 0
    while size < length:
        sentence = _sentence(rng)
        parts.append(sentence)
        size += len(sentence)
    text = "".join(parts)[:length]
    # End on a whole word (any truncated sentence is still plausible text).
    cut = text.rfind(" ") if len(text) == length and " " in text else len(text)
    return Document(text[:cut].rstrip())


_GENERATORS = {"passkey": _passkey, "mqar": _mqar, "lm": _lm}

__all__ = ["Document", "TASKS", "synthetic_document", "synthetic_documents", "FILLER", "PASSKEY_NEEDLE",
           "PASSKEY_QUESTION", "passkey"]
