"""Long-context skill of a model: needle in a haystack (NIAH) and perplexity by position.

Both run on every worker of a `Trainer` (built with `for_training=False` by `longctx eval`,
or the training one at the end of `longctx train`) through the training machinery: each
batch of rows goes through `Trainer.shard_batch` (padding to the row multiple, the CP
layout), the model runs on local tokens, and counts are reduced over the mesh. A length
that does not fit one device therefore runs with context parallelism, and cp=N gives the
cp=1 numbers.

- **NIAH** (`run_niah`): for each context length L and needle depth d, a prompt of about L
  tokens: haystack text with the passkey needle "The pass key is NNNNN. Remember it." at
  fraction d of the haystack, then "What is the pass key? The pass key is ", then the key
  (the synthetic `passkey` task's wording). A sample is correct when every key token is
  the argmax given the correct prefix: exactly when greedy decoding writes the key, yet
  one forward per prompt. Accuracy per cell = correct samples / samples.
- **Perplexity by position** (`run_ppl`): rows holding one document each (position ids
  0..L-1), per-token losses bucketed by position in the document; ppl = exp(mean loss)
  per bucket, and separately for positions inside / beyond the training length
  `data.seq_len`: the curve that shows whether a context extension worked.

Rows are assigned to data-parallel ranks round robin, padded with empty rows so every
rank runs the same number of forwards (ZeRO-3 gathers parameters in forward).
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from longctx.config import Config, ConfigError
from longctx.trainer.loss import IGNORE_INDEX
from longctx.plots import pyplot, save_line_plot
from longctx.trainer.packing import empty_rows, tokenize_document
from longctx.trainer.sources import derive_seed, open_documents
from longctx.trainer.synthetic import FILLER, PASSKEY_NEEDLE, PASSKEY_QUESTION, passkey, synthetic_document

HAYSTACKS = ("filler", "data")


# ---------------------------------------------------------------------------- options


@dataclass
class NiahOptions:
    """The NIAH grid. Lengths are in tokens (prompt + answer); depths are fractions of the
    haystack in [0, 1] before the needle."""

    lengths: list[int]
    depths: list[float] = field(default_factory=lambda: [i / 10 for i in range(11)])
    samples: int = 2  # prompts per cell (different keys and haystack phases)
    haystack: str = "filler"  # filler: the passkey task's filler; data: held-out documents of the data config
    batch_size: int = 4  # rows per forward
    seed: int = 0


@dataclass
class PplOptions:
    """Perplexity by position: `docs` documents of `length` tokens, `buckets` equal-width buckets."""

    length: int
    buckets: int = 16
    docs: int = 4
    batch_size: int = 1  # rows per forward


def min_niah_length(tokenizer) -> int:
    """Tokens of a prompt without haystack: needle, question and key."""
    key = "12345"
    return len(tokenizer.encode(PASSKEY_NEEDLE.format(key=key) + PASSKEY_QUESTION)) + len(tokenizer.encode(key))


def _lengths(seq_len: int, fractions: Sequence[float], tokenizer) -> list[int]:
    """`seq_len * fraction` for each fraction, raised to the shortest possible prompt."""
    return sorted({max(int(seq_len * f), min_niah_length(tokenizer)) for f in fractions})


def default_niah(cfg: Config, tokenizer) -> NiahOptions:
    """Up to and beyond the training length: seq_len x (1/4, 1/2, 1, 2), 11 depths, 2 samples."""
    return NiahOptions(lengths=_lengths(cfg.data.seq_len, (0.25, 0.5, 1, 2), tokenizer),
                       haystack="filler" if cfg.data.source == "synthetic" else "data")


def train_end_niah(cfg: Config, tokenizer) -> NiahOptions:
    """The cheap grid `longctx train` ends with: 3 lengths up to seq_len x 5 depths, one sample each."""
    return NiahOptions(lengths=_lengths(cfg.data.seq_len, (0.25, 0.5, 1), tokenizer),
                       depths=[0.0, 0.25, 0.5, 0.75, 1.0], samples=1, haystack="filler",
                       batch_size=cfg.train.micro_batch_size)


def default_ppl(cfg: Config) -> PplOptions:
    """Twice the training length, 16 buckets, 4 documents."""
    return PplOptions(length=2 * cfg.data.seq_len)


def trains_passkey(cfg: Config) -> bool:
    """The training data teaches passkey retrieval (the skill NIAH measures)."""
    return cfg.data.source == "synthetic" and cfg.data.task in ("passkey", "mix")


def check_niah(opt: NiahOptions, tokenizer) -> None:
    shortest = min_niah_length(tokenizer)
    if not opt.lengths or min(opt.lengths) < shortest:
        raise ConfigError(f"--lengths={opt.lengths}: a prompt needs at least {shortest} tokens to hold the needle, "
                          f"question and key")
    if not opt.depths or any(not 0.0 <= d <= 1.0 for d in opt.depths):
        raise ConfigError(f"--depths: expected fractions in [0, 1] (e.g. 0,0.5,1), got {opt.depths}")
    if opt.samples < 1 or opt.batch_size < 1:
        raise ConfigError(f"--samples and --batch-size must be positive (got {opt.samples}, {opt.batch_size})")
    if opt.haystack not in HAYSTACKS:
        raise ConfigError(f"--haystack={opt.haystack!r}: expected one of {', '.join(HAYSTACKS)}")


def check_ppl(opt: PplOptions) -> None:
    if opt.length < 2:
        raise ConfigError(f"--length must be at least 2 tokens, got {opt.length}")
    if not 1 <= opt.buckets <= opt.length:
        raise ConfigError(f"--buckets must be in [1, --length={opt.length}], got {opt.buckets}")
    if opt.docs < 1 or opt.batch_size < 1:
        raise ConfigError(f"--docs and --batch-size must be positive (got {opt.docs}, {opt.batch_size})")


# ---------------------------------------------------------------------------- shared machinery


def rank_share(items: list, mesh) -> list:
    """This data-parallel rank's items (round robin), padded with None to the same count on
    every rank, so all ranks run the same number of forwards."""
    per_rank = math.ceil(len(items) / mesh.dp_size)
    mine = items[mesh.dp_rank::mesh.dp_size]
    return mine + [None] * (per_rank - len(mine))


def batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """`module.eval()` and no autograd inside; the previous mode after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def local_losses(trainer, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """fp32 token losses and argmax predictions of this rank's tokens of `batch` (padded and
    sharded like a training row), from the lm head without the full logits."""
    local = trainer.shard_batch(batch)
    with trainer.autocast():
        losses, predictions = trainer.module(local["input_ids"], local["position_ids"], local["doc_ids"],
                                             labels=local["labels"])
    return losses, predictions, local


def single_document_rows(docs: Sequence[Optional[tuple[list[int], list[int]]]], length: int, pad_id: int) -> dict:
    """`[B, length]` rows; row i holds `docs[i] = (input ids, labels)` from position 0, then
    padding (its own doc id, labels -100). None = an empty row (every label -100)."""
    rows = empty_rows(len(docs), length, pad_id)
    for i, doc in enumerate(docs):
        ids, labels = doc if doc is not None else ([], [])
        n = len(ids)
        rows["input_ids"][i, :n] = torch.tensor(ids, dtype=torch.long)
        rows["labels"][i, :n] = torch.tensor(labels, dtype=torch.long)
        rows["doc_ids"][i, n:] = 1
        rows["position_ids"][i, n:] = torch.arange(length - n)
    del rows["answer_mask"]
    return rows


# ---------------------------------------------------------------------------- NIAH prompts


@dataclass
class NiahPrompt:
    length: int  # the cell's nominal length (tokens)
    depth: float
    sample: int
    key: str
    ids: list[int]  # prompt then answer
    answer_len: int  # the last `answer_len` ids are the key

    def row(self) -> tuple[list[int], list[int]]:
        """(input ids, labels): labels are the key tokens at the positions that predict them."""
        n, a = len(self.ids), self.answer_len
        labels = [IGNORE_INDEX] * n
        labels[n - a - 1:n - 1] = self.ids[n - a:]
        return self.ids, labels


def _sentences(text: str) -> list[str]:
    """`text` cut after each sentence end (whitespace kept with the sentence before)."""
    return [s for s in re.split(r"(?<=[.!?])(?=\s)", text) if s.strip()]


class Haystack:
    """Sentences to hide the needle in: the passkey filler cycle (`filler`) or the held-out
    documents of the data config (`data`), read once and rotated per prompt."""

    def __init__(self, cfg: Config, tokenizer, kind: str, tokens_needed: int):
        if kind == "filler":
            self.pool = list(FILLER)
            return
        self.pool, have = [], 0
        docs = open_documents(cfg.data, split="eval", dp_rank=0, dp_size=1)
        for doc in docs:
            sentences = _sentences(doc.text.replace("\n", " "))
            self.pool += [s if s.endswith(" ") else s + " " for s in sentences]
            have += len(tokenizer.encode(doc.text))
            if have >= tokens_needed:
                break
        if not self.pool:
            raise ConfigError("--haystack=data: the held-out documents of the data config are empty")

    def sentences(self, rng: random.Random, count: int) -> list[str]:
        start = rng.randrange(len(self.pool))
        return [self.pool[(start + i) % len(self.pool)] for i in range(count)]


def niah_prompt(tokenizer, haystack: Haystack, length: int, depth: float, sample: int, seed: int) -> NiahPrompt:
    """The prompt of one cell sample: as many haystack sentences as fit in `length` tokens
    with the needle, question and key, the needle after `round(depth * sentences)` of them.
    The prompt is tokenised in one piece and the key in another, as training documents are
    (`tokenize_document` splits at answer spans)."""
    rng = random.Random(f"niah/{seed}/{length}/{depth}/{sample}")
    key = passkey(rng)
    needle = PASSKEY_NEEDLE.format(key=key)
    key_ids = tokenizer.encode(key)
    phase = rng.random()  # the haystack rotation, the same for every sentence count tried

    def build(count: int) -> list[int]:
        sentences = haystack.sentences(random.Random(phase), count)
        at = round(depth * count)
        return tokenizer.encode("".join(sentences[:at]) + needle + "".join(sentences[at:]) + PASSKEY_QUESTION)

    def fits(ids: list[int]) -> bool:
        return len(ids) + len(key_ids) <= length

    fixed = len(tokenizer.encode(needle + PASSKEY_QUESTION)) + len(key_ids)
    per_sentence = max(len(tokenizer.encode("".join(haystack.sentences(random.Random(phase), 64)))) / 64, 1.0)
    count = int((length - fixed) / per_sentence)
    ids = build(count)
    while count > 0 and not fits(ids):  # too long: drop about the excess
        count = max(0, count - max(1, math.ceil((len(ids) + len(key_ids) - length) / per_sentence)))
        ids = build(count)
    for _ in range(8):  # room left: add sentences while they fit
        more = build(count + 1)
        if not fits(more):
            break
        count, ids = count + 1, more
    return NiahPrompt(length=length, depth=depth, sample=sample, key=key, ids=ids + key_ids,
                      answer_len=len(key_ids))


# ---------------------------------------------------------------------------- NIAH scoring


def answer_errors(trainer, rows: dict) -> list[float]:
    """Per row of `rows` (one forward): answer tokens that are not the argmax given the
    correct prefix, summed over the cp group. 0 = greedy decoding writes the answer."""
    _, predictions, local = local_losses(trainer, rows)
    labels = local["labels"]
    wrong = ((predictions != labels) & (labels != IGNORE_INDEX)).sum(dim=1)
    return trainer.mesh.all_reduce(wrong.tolist(), group="cp")


def run_niah(trainer, opt: NiahOptions) -> dict:
    """The NIAH grid on this trainer's model (every rank calls it); results on every rank."""
    cfg, tok, mesh = trainer.cfg, trainer.tokenizer, trainer.mesh
    check_niah(opt, tok)
    haystack = Haystack(cfg, tok, opt.haystack, max(opt.lengths))
    cells = [(n, d) for n in opt.lengths for d in opt.depths]
    tally = {cell: [0.0, 0.0, 0.0] for cell in cells}  # correct samples, correct answer tokens, answer tokens
    with eval_mode(trainer.module):
        for length in opt.lengths:
            mine = rank_share([(d, s) for d in opt.depths for s in range(opt.samples)], mesh)
            prompts = [niah_prompt(tok, haystack, length, *spec, opt.seed) if spec else None for spec in mine]
            for group in batches(prompts, opt.batch_size):
                rows = single_document_rows([p.row() if p else None for p in group], length, tok.pad_id)
                for p, wrong in zip(group, answer_errors(trainer, rows)):
                    if p is not None:
                        t = tally[(p.length, p.depth)]
                        t[0] += float(wrong == 0)
                        t[1] += p.answer_len - wrong
                        t[2] += p.answer_len
    trainer.parallel.attention.drain()  # evaluation traffic is not a training step's
    # After the cp reduction each cp rank holds its group's counts: sum over data-parallel groups.
    flat = mesh.all_reduce([v for cell in cells for v in tally[cell]], group="dp")
    counts = {cell: flat[3 * i:3 * i + 3] for i, cell in enumerate(cells)}
    return niah_results(cfg, opt, counts)


def niah_results(cfg: Config, opt: NiahOptions, counts: dict) -> dict:
    """The JSON of a NIAH grid from per-cell (correct samples, correct answer tokens, answer tokens)."""
    def accuracy(cells) -> float:
        return sum(counts[c][0] for c in cells) / (opt.samples * len(cells))

    cells = list(counts)
    return {
        "task": "niah", "seq_len": cfg.data.seq_len, "lengths": list(opt.lengths), "depths": list(opt.depths),
        "samples": opt.samples, "haystack": opt.haystack,
        "accuracy": accuracy(cells),
        "token_accuracy": sum(counts[c][1] for c in cells) / max(sum(counts[c][2] for c in cells), 1.0),
        "accuracy_by_length": {str(n): accuracy([c for c in cells if c[0] == n]) for n in opt.lengths},
        "accuracy_by_depth": {str(d): accuracy([c for c in cells if c[1] == d]) for d in opt.depths},
        "grid": [[accuracy([(n, d)]) for n in opt.lengths] for d in opt.depths],  # rows: depths, columns: lengths
    }


# ---------------------------------------------------------------------------- perplexity by position


def ppl_documents(cfg: Config, tokenizer, opt: PplOptions, max_scan: int = 10_000) -> tuple[list[list[int]], str]:
    """`opt.docs` token lists of `opt.length + 1` tokens (inputs and their next tokens), and
    where they come from. Synthetic data: long `lm` documents (the language every synthetic
    seed shares) from a stream of their own; files / hf: the held-out documents at least that
    long (the first `max_scan` held-out documents are searched)."""
    need = opt.length + 1
    if cfg.data.source == "synthetic":
        seed, docs = derive_seed(cfg.data.seed, "ppl"), []
        for index in range(opt.docs):
            chars = need + 64
            while len(ids := tokenize_document(tokenizer, synthetic_document("lm", seed, index, chars, chars))[0]) < need:
                chars *= 2
            docs.append(ids[:need].tolist())
        return docs, "synthetic lm documents"
    docs = []
    stream = open_documents(cfg.data, split="eval", dp_rank=0, dp_size=1)
    for scanned, doc in enumerate(stream):
        ids = tokenize_document(tokenizer, doc)[0]
        if len(ids) >= need:
            docs.append(ids[:need].tolist())
        if len(docs) == opt.docs or scanned + 1 >= max_scan:
            break
    if not docs:
        raise ConfigError(f"--length={opt.length}: no held-out document of the data config has {need} tokens "
                          f"or more (in the first {max_scan}); lower --length")
    return docs, "held-out documents"


def run_ppl(trainer, opt: PplOptions) -> dict:
    """Perplexity by position in the document on this trainer's model (every rank calls it)."""
    check_ppl(opt)
    cfg, tok, mesh = trainer.cfg, trainer.tokenizer, trainer.mesh
    docs, source = ppl_documents(cfg, tok, opt)
    width = math.ceil(opt.length / opt.buckets)
    n_buckets = math.ceil(opt.length / width)
    # per bucket: loss sum, tokens; then inside / beyond seq_len: loss sum, tokens
    totals = torch.zeros(2 * n_buckets + 4, dtype=torch.float64)
    with eval_mode(trainer.module):
        for group in batches(rank_share(docs, mesh), opt.batch_size):
            rows = single_document_rows([(d[:-1], d[1:]) if d else None for d in group], opt.length, tok.pad_id)
            losses, _, local = local_losses(trainer, rows)
            valid = local["labels"] != IGNORE_INDEX
            losses = losses[valid].double().cpu()
            pos = local["position_ids"][valid].cpu()
            bucket = pos // width
            ones = torch.ones_like(losses)
            totals.index_add_(0, bucket, losses)
            totals.index_add_(0, n_buckets + bucket, ones)
            beyond = (pos >= cfg.data.seq_len).long()
            totals.index_add_(0, 2 * n_buckets + 2 * beyond, losses)
            totals.index_add_(0, 2 * n_buckets + 2 * beyond + 1, ones)
    trainer.parallel.attention.drain()
    # Every rank holds distinct tokens (cp) of distinct rows (dp; padding rows count nothing).
    t = mesh.all_reduce(totals.tolist(), group="world")
    return ppl_results(cfg, opt, len(docs), source, t[:n_buckets], t[n_buckets:2 * n_buckets], t[2 * n_buckets:], width)


def _ppl(loss_sum: float, tokens: float) -> Optional[float]:
    return math.exp(min(loss_sum / tokens, 50.0)) if tokens else None


def ppl_results(cfg: Config, opt: PplOptions, n_docs: int, source: str, sums, tokens, split, width: int) -> dict:
    """The JSON of a perplexity-by-position run from per-bucket loss sums and token counts."""
    buckets = [{"start": i * width, "end": min((i + 1) * width, opt.length), "tokens": int(n),
                "loss": s / n if n else None, "ppl": _ppl(s, n)}
               for i, (s, n) in enumerate(zip(sums, tokens))]
    return {"task": "ppl", "seq_len": cfg.data.seq_len, "length": opt.length, "docs": n_docs, "source": source,
            "loss": sum(sums) / max(sum(tokens), 1.0), "ppl": _ppl(sum(sums), sum(tokens)),
            "ppl_within_seq_len": _ppl(split[0], split[1]), "ppl_beyond_seq_len": _ppl(split[2], split[3]),
            "buckets": buckets}


# ---------------------------------------------------------------------------- results


def summary_metrics(results: dict) -> dict:
    """The step-less scalars of a result (what MLflow and the terminal get)."""
    if results["task"] == "niah":
        out = {"niah/accuracy": results["accuracy"], "niah/token_accuracy": results["token_accuracy"]}
        out.update({f"niah/accuracy_len_{n}": v for n, v in results["accuracy_by_length"].items()})
        return out
    out = {"ppl/ppl": results["ppl"], "ppl/loss": results["loss"]}
    for key in ("ppl_within_seq_len", "ppl_beyond_seq_len"):
        if results[key] is not None:
            out[f"ppl/{key[4:]}"] = results[key]
    return out


def curve_metrics(results: dict) -> tuple[str, list[tuple[int, float]]]:
    """The result's curve as one MLflow metric whose step is the x axis: NIAH accuracy by
    context length, or perplexity by position (the end of each bucket)."""
    if results["task"] == "niah":
        return "niah/accuracy_by_length", [(int(n), v) for n, v in results["accuracy_by_length"].items()]
    return "ppl/by_position", [(b["end"], b["ppl"]) for b in results["buckets"] if b["ppl"] is not None]


def plot_niah(results: dict, out_png: str, title: str = "") -> str:
    """Heatmap: needle depth (y) x context length (x), colour = accuracy, each cell annotated;
    a dashed line marks the training length."""
    plt = pyplot()
    lengths, depths, grid = results["lengths"], results["depths"], results["grid"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.4 + 0.42 * len(depths)), dpi=120)
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="black")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    inside = sum(1 for n in lengths if n <= results["seq_len"])
    if 0 < inside < len(lengths):
        ax.axvline(inside - 0.5, color="black", ls="--", lw=1.2)
    ax.set_title(title or f"needle in a haystack: accuracy {results['accuracy']:.2f} (trained at {results['seq_len']})",
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, label="accuracy")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def plot_ppl(results: dict, out_png: str, title: str = "") -> str:
    """Perplexity per position bucket against the bucket's middle position; a dashed line
    marks the training length."""
    plt = pyplot()
    points = [((b["start"] + b["end"]) / 2, b["ppl"]) for b in results["buckets"] if b["ppl"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*points), "o-", lw=1.4)
    ax.axvline(results["seq_len"], color="black", ls="--", lw=1.2, label=f"training length {results['seq_len']}")
    ax.set_xlabel("position in the document (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or f"perplexity by position: {results['docs']} {results['source']}", fontsize=9)
    return save_line_plot(fig, ax, out_png)


def run_task(trainer, task: str, options) -> dict:
    """`niah` or `ppl` with their options (every rank calls it)."""
    return run_niah(trainer, options) if task == "niah" else run_ppl(trainer, options)


def plot(results: dict, out_png: str) -> str:
    return plot_niah(results, out_png) if results["task"] == "niah" else plot_ppl(results, out_png)


def options_from_dict(task: str, data: dict):
    """Options back from `dataclasses.asdict` (they travel to Ray workers as plain data)."""
    return (NiahOptions if task == "niah" else PplOptions)(**data)


__all__ = ["NiahOptions", "PplOptions", "run_niah", "run_ppl", "run_task", "plot", "plot_niah", "plot_ppl",
           "summary_metrics", "curve_metrics", "default_niah", "default_ppl", "train_end_niah", "trains_passkey",
           "niah_prompt", "answer_errors", "HAYSTACKS"]
