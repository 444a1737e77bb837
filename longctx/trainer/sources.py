"""Document sources: synthetic tasks, local files, or a HuggingFace dataset.

`open_documents(cfg, split=..., dp_rank=..., dp_size=...)` gives the documents one
data-parallel rank reads, in a deterministic order, with a JSON-serialisable resumable
position (`state_dict()` / `load_state_dict()`).

Order and sharding:
- Training loops over epochs. Map-style datasets are shuffled per epoch with a
  permutation derived from `data.seed` and the epoch; streaming datasets are read in
  order. Document `i` of an epoch's order goes to dp rank `i % dp_size`, so the ranks
  read disjoint documents.
- Eval reads `data.eval_split` if set (hf), else the held-out documents of the training
  split: every `round(1 / eval_fraction)`-th document by index, which training skips.
  Eval is one pass in dataset order. With `eval_fraction=0` (and no eval split) nothing
  is held out and eval reads the training documents. Synthetic eval is an infinite
  stream with its own derived seed. (`data.eval_split` applies to hf only: files have
  no named splits.)
- The position is `{"epoch", "cursor", "seen"}`: the next index into the epoch's order
  (the raw record index for streaming, resumed with `.skip()`), so resuming never
  re-reads or re-tokenises what came before.

`check_data(cfg)` validates the data settings quickly on the driver (it only peeks at the
first record of each file / split).
"""

from __future__ import annotations

import abc

import dataclasses
import hashlib
import os
from typing import Any, Callable, Iterator, Optional

import numpy as np

from longctx.config import ConfigError, DataConfig
from longctx.trainer.synthetic import Document, synthetic_document
from longctx.trainer.tokenizer import build_tokenizer

SPLITS = ("train", "eval")

# File suffix -> `datasets` builder name.
_SUFFIX_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
_FORMAT_BUILDERS = {"json": "json", "jsonl": "json", "parquet": "parquet", "txt": "text"}
FORMATS = tuple(_FORMAT_BUILDERS)  # data.format
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def derive_seed(seed: int, *tags: Any) -> int:
    """A 63-bit seed from `seed` and tags; stable across processes (unlike `hash`)."""
    digest = hashlib.sha256("/".join(map(str, (seed,) + tags)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------- loading


def file_builder(path: str, fmt: Optional[str] = None) -> str:
    """The `datasets` builder for a data file: from `data.format`, else its suffix."""
    if fmt is not None:
        return _FORMAT_BUILDERS[fmt]
    name = path.lower()
    for comp in _COMPRESSION:  # datasets decompresses these itself
        if name.endswith(comp):
            name = name[: -len(comp)]
    suffix = os.path.splitext(name)[1]
    if suffix not in _SUFFIX_FORMATS:
        raise ConfigError(f"data.paths: cannot tell the format of '{path}' from its suffix; "
                          f"use .json/.jsonl/.parquet/.txt or set data.format")
    return _SUFFIX_FORMATS[suffix]


def _text_column(cfg: DataConfig, builder: str) -> str:
    # The text builder always names its single column "text", one document per line.
    return "text" if builder == "text" else cfg.text_field


def _load(what: str, *args, local: bool = True, **kwargs):
    """`datasets.load_dataset`, with its failures turned into a ConfigError naming `what`."""
    import datasets

    counts = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    try:
        # Local data: skip the download-count ping to the Hub that `datasets` sends on every
        # load (a DNS timeout of seconds per load on machines without internet).
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counts and not local
        return datasets.load_dataset(*args, **kwargs)
    except ConfigError:
        raise
    except StopIteration:  # datasets' json builder raises this on an empty file
        raise ConfigError(f"{what} is empty (no documents)") from None
    except Exception as err:
        raise ConfigError(f"{what}: cannot load: {type(err).__name__}: {err}") from None
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counts


def _text_only(ds, column: str, what: str):
    """Keep only the text column, named `text` (so file groups concatenate and rows stay small)."""
    if ds.column_names is not None and column not in ds.column_names:
        raise ConfigError(f"{what}: no column data.text_field='{column}'; found: {', '.join(ds.column_names)}")
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


def _load_file_group(cfg: DataConfig, builder: str, paths: list[str], streaming: bool):
    what = "data.paths " + ", ".join(f"'{p}'" for p in paths)
    ds = _load(what, builder, data_files=list(paths), split="train", streaming=streaming)
    return _text_only(ds, _text_column(cfg, builder), what)


def load_files(cfg: DataConfig):
    """All `data.paths` as one dataset with a single `text` column, in the order given."""
    import datasets

    for path in cfg.paths:
        if not os.path.isfile(path):
            raise ConfigError(f"data.paths: file '{path}' does not exist")
    # Consecutive files of one format load together; formats can be mixed.
    groups: list[tuple[str, list[str]]] = []
    for path in cfg.paths:
        builder = file_builder(path, cfg.format)
        if groups and groups[-1][0] == builder:
            groups[-1][1].append(path)
        else:
            groups.append((builder, [path]))
    parts = [_load_file_group(cfg, b, ps, cfg.streaming) for b, ps in groups]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)


def _hf_what(cfg: DataConfig, split: str) -> str:
    return f"data.name='{cfg.name}' (data.subset={cfg.subset!r}, split={split!r})"


def _load_hf_raw(cfg: DataConfig, split: str):
    """`datasets.load_dataset(data.name, data.subset, split=split, streaming=data.streaming)`.

    `data.name` may also be a local folder of data files, or a folder written by `save_to_disk`.
    """
    name = os.path.expanduser(cfg.name or "")
    what = _hf_what(cfg, split)
    if _looks_like_path(name) and not os.path.exists(name):
        raise ConfigError(f"data.name: local dataset folder '{cfg.name}' does not exist")
    if os.path.isdir(name) and (os.path.isfile(os.path.join(name, "dataset_dict.json"))
                                or os.path.isfile(os.path.join(name, "state.json"))):
        ds = _load_from_disk(name, split, what)
        return ds.to_iterable_dataset() if cfg.streaming else ds
    return _load(what, name, cfg.subset, split=split, streaming=cfg.streaming, local=os.path.isdir(name))


def _load_from_disk(path: str, split: str, what: str):
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as err:
        raise ConfigError(f"{what}: cannot load: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"{what}: no split '{split}'; found: {', '.join(ds)}")
        ds = ds[split]
    return ds


def load_hf(cfg: DataConfig, split: str):
    """The HF dataset split with a single `text` column (from `data.text_field`)."""
    return _text_only(_load_hf_raw(cfg, split), cfg.text_field, _hf_what(cfg, split))


def load_split(cfg: DataConfig, split: str):
    """The dataset (map-style or streaming) that holds the documents of `split`."""
    if cfg.source == "files":
        return load_files(cfg)
    hf_split = cfg.eval_split if split == "eval" and cfg.eval_split else cfg.split
    return load_hf(cfg, hf_split)


# ---------------------------------------------------------------------------- hold-out


def holdout_period(cfg: DataConfig) -> Optional[int]:
    """Every `period`-th document (index % period == 0) is held out for eval; None = no hold-out."""
    if cfg.source == "hf" and cfg.eval_split:
        return None  # eval has its own split
    if cfg.eval_fraction <= 0:
        return None
    return max(2, round(1 / cfg.eval_fraction))


def _in_split(index: int, split: str, period: Optional[int]) -> bool:
    if period is None:
        return True
    return (index % period == 0) == (split == "eval")


# ---------------------------------------------------------------------------- streams


class DocumentStream(abc.ABC):
    """Documents of one split for one dp rank. Iterate for `Document`s; resumable."""

    def __init__(self, cfg: DataConfig, *, split: str, dp_rank: int, dp_size: int) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        self.cfg, self.split, self.dp_rank, self.dp_size = cfg, split, dp_rank, dp_size
        self.epoch = 0
        self.cursor = 0  # next index into this epoch's order (raw record index when streaming)
        self.seen = 0  # streaming: training-split documents met so far this epoch
        self._it: Optional[Iterator[Document]] = None

    def __iter__(self) -> "DocumentStream":
        return self

    def __next__(self) -> Document:
        if self._it is None:
            self._it = self._documents()
        return next(self._it)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.seen = int(state["epoch"]), int(state["cursor"]), int(state.get("seen", 0))
        self._it = None  # restart the generator from the restored position

    def _next_mine(self, position: int) -> int:
        """The first position >= `position` that belongs to this dp rank."""
        return position + (self.dp_rank - position) % self.dp_size

    @abc.abstractmethod
    def _documents(self) -> Iterator[Document]:
        """Yields this rank's documents from the current position on."""

    def _epochs(self, epoch_texts: Callable[[], Iterator[str]], describe: Callable[[], str]) -> Iterator[Document]:
        """Documents of the non-empty texts of epoch after epoch (`epoch_texts()` reads the
        rest of the current one); eval is one pass. Training fails clearly when this rank
        gets nothing two epochs running, instead of looping forever."""
        empty_epochs = 0
        while True:
            found = False
            for text in epoch_texts():
                if text:
                    found = True
                    yield Document(text)
            if self.split == "eval":
                return
            empty_epochs = 0 if found else empty_epochs + 1
            if empty_epochs >= 2:
                raise ConfigError(f"data: dp rank {self.dp_rank} of {self.dp_size} gets no non-empty training "
                                  f"documents ({describe()})")
            self.epoch, self.cursor, self.seen = self.epoch + 1, 0, 0


class SyntheticStream(DocumentStream):
    """Infinite: document i of the seed's stream goes to rank i % dp_size."""

    def __init__(self, cfg: DataConfig, **kw) -> None:
        super().__init__(cfg, **kw)
        self.seed = derive_seed(cfg.seed, "synthetic", self.split)  # eval: a different stream

    def _documents(self) -> Iterator[Document]:
        cfg = self.cfg
        while True:
            index = self._next_mine(self.cursor)
            self.cursor = index + 1
            yield synthetic_document(cfg.task, self.seed, index, cfg.min_doc_len, cfg.max_doc_len)


class MapStream(DocumentStream):
    """A map-style dataset: training shuffles each epoch and loops; eval is one ordered pass."""

    def __init__(self, cfg: DataConfig, dataset, **kw) -> None:
        super().__init__(cfg, **kw)
        self.dataset = dataset
        period = holdout_period(cfg)
        self.indices = np.arange(len(dataset), dtype=np.int64)
        if period is not None:
            held_out = self.indices % period == 0  # same rule as `_in_split`, vectorised
            self.indices = self.indices[held_out if self.split == "eval" else ~held_out]
        if period is not None and len(self.indices) == 0:
            # Too few documents to hold any out (or to train on): use them all for both.
            self.indices = np.arange(len(dataset), dtype=np.int64)
        if len(self.indices) == 0:
            raise ConfigError(f"data: the {self.split} documents are empty ({_describe(cfg)})")
        self._order_epoch = -1
        self._order = self.indices

    def _epoch_order(self) -> np.ndarray:
        if self.split == "eval":
            return self.indices
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng(derive_seed(self.cfg.seed, "epoch", self.epoch))
            self._order = self.indices[rng.permutation(len(self.indices))]
            self._order_epoch = self.epoch
        return self._order

    def _epoch_texts(self) -> Iterator[str]:
        order = self._epoch_order()
        while (position := self._next_mine(self.cursor)) < len(order):
            self.cursor = position + 1
            yield _text(self.dataset[int(order[position])]["text"], self.cfg)

    def _documents(self) -> Iterator[Document]:
        return self._epochs(self._epoch_texts, lambda: f"{len(self._epoch_order())} in all; {_describe(self.cfg)}")


class IterStream(DocumentStream):
    """A streaming dataset, read in order; training loops over it, eval reads it once."""

    def __init__(self, cfg: DataConfig, dataset, **kw) -> None:
        super().__init__(cfg, **kw)
        self.dataset = dataset
        self.period = holdout_period(cfg)

    def _epoch_texts(self) -> Iterator[str]:
        # Resume by skipping raw records: no re-reading of documents already used.
        records = self.dataset.skip(self.cursor) if self.cursor else self.dataset
        for record in records:
            index = self.cursor
            self.cursor += 1
            if not _in_split(index, self.split, self.period):
                continue
            mine = self.seen % self.dp_size == self.dp_rank
            self.seen += 1
            yield _text(record["text"], self.cfg) if mine else ""

    def _documents(self) -> Iterator[Document]:
        return self._epochs(self._epoch_texts, lambda: _describe(self.cfg))


def _text(value: Any, cfg: DataConfig) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"data.text_field='{cfg.text_field}' holds {type(value).__name__} values, "
                          f"not text ({_describe(cfg)})")
    return value


def _describe(cfg: DataConfig) -> str:
    if cfg.source == "files":
        return "data.paths=" + ", ".join(cfg.paths)
    if cfg.source == "hf":
        return f"data.name={cfg.name}"
    return f"synthetic task {cfg.task}"


def open_documents(cfg: DataConfig, *, split: str = "train", dp_rank: int = 0, dp_size: int = 1) -> DocumentStream:
    """The document stream of `split` ("train" | "eval") for one data-parallel rank."""
    kw = dict(split=split, dp_rank=dp_rank, dp_size=dp_size)
    if cfg.source == "synthetic":
        return SyntheticStream(cfg, **kw)
    if cfg.source not in ("files", "hf"):
        raise ConfigError(f"data.source={cfg.source!r}: expected synthetic, files or hf")
    dataset = load_split(cfg, split)
    if cfg.streaming:
        return IterStream(cfg, dataset, **kw)
    return MapStream(cfg, dataset, **kw)


# ---------------------------------------------------------------------------- checks


def check_data(cfg: DataConfig) -> None:
    """Fail fast, with a ConfigError naming the key/file, on data settings that cannot work.

    Cheap for any data size: it only opens each file / split in streaming mode and reads
    its first record.
    """
    build_tokenizer(cfg.tokenizer)
    if cfg.source == "synthetic":
        synthetic_document(cfg.task, cfg.seed, 0, cfg.min_doc_len, cfg.max_doc_len)
    elif cfg.source == "files":
        _check_files(cfg)
    elif cfg.source == "hf":
        _check_hf(cfg)
    else:
        raise ConfigError(f"data.source={cfg.source!r}: expected synthetic, files or hf")


def _check_files(cfg: DataConfig) -> None:
    if not cfg.paths:
        raise ConfigError("data.source=files needs data.paths (a list of json/jsonl/parquet/txt files)")
    for path in cfg.paths:
        if not os.path.isfile(path):
            raise ConfigError(f"data.paths: file '{path}' does not exist")
    for path in cfg.paths:
        builder = file_builder(path, cfg.format)
        ds = _load(f"data.paths '{path}'", builder, data_files=[path], split="train", streaming=True)
        _check_first_record(ds, _text_column(cfg, builder), f"data.paths '{path}'")


def _check_hf(cfg: DataConfig) -> None:
    if not cfg.name:
        raise ConfigError("data.source=hf needs data.name (a dataset name or local folder)")
    splits = [cfg.split] + ([cfg.eval_split] if cfg.eval_split else [])
    peek = dataclasses.replace(cfg, streaming=True)
    for split in splits:
        _check_first_record(_load_hf_raw(peek, split), cfg.text_field, _hf_what(cfg, split))


def _check_first_record(ds, field: str, what: str) -> None:
    try:
        record = next(iter(ds), None)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"{what}: cannot read: {type(err).__name__}: {err}") from None
    if record is None:
        raise ConfigError(f"{what} is empty (no documents)")
    if field not in record:
        raise ConfigError(f"{what}: no field data.text_field='{field}'; found: {', '.join(record)}")
    if record[field] is not None and not isinstance(record[field], str):
        raise ConfigError(f"{what}: data.text_field='{field}' holds {type(record[field]).__name__}, not text")


__all__ = ["Document", "DocumentStream", "open_documents", "check_data", "derive_seed", "load_split",
           "holdout_period", "file_builder"]
