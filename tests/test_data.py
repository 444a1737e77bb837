"""Data pipeline: tokenizers, synthetic tasks, document sources, packing, resume, errors.

Everything is local: files and tokenizers are written to tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter

import pytest
import torch

from longctx.config import ConfigError, DataConfig
from longctx.trainer.packing import IGNORE_INDEX, KEYS, PackedRows, eval_rows, pad_rows, tokenize_document
from longctx.trainer.sources import check_data, open_documents
from longctx.trainer.synthetic import Document, synthetic_document
from longctx.trainer.tokenizer import ByteTokenizer, build_tokenizer

BYTE = ByteTokenizer()
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


@pytest.fixture(autouse=True, scope="module")
def _private_datasets_cache(tmp_path_factory):
    """Keep the `datasets` cache of these tiny files out of the user's home."""
    import datasets

    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = str(tmp_path_factory.mktemp("hf_cache"))
    yield
    datasets.config.HF_DATASETS_CACHE = old


def make_texts(n: int, prefix: str = "doc") -> list[str]:
    """n distinct documents of varied length (20..120 characters)."""
    return [f"{prefix} {i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + (i * 5) % 17))
            for i in range(n)]


def write(path, texts, fmt, field="text"):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    elif fmt == "json":
        path.write_text(json.dumps([{field: t, "id": i} for i, t in enumerate(texts)]))
    elif fmt == "txt":
        path.write_text("".join(t + "\n" for t in texts))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({field: texts, "id": list(range(len(texts)))}), str(path))
    return str(path)


def files_cfg(paths, **kw) -> DataConfig:
    return DataConfig(source="files", paths=[str(p) for p in paths], **kw)


def one_epoch(stream) -> list[str]:
    """The texts a training stream yields in its first epoch."""
    out = []
    for doc in stream:
        if stream.epoch > 0:
            break
        out.append(doc.text)
    return out


def take(stream, n) -> list[Document]:
    return [next(stream) for _ in range(n)]


def check_rows(batch, pad_id=BYTE.pad_id):
    """The packing invariants, checked token by token."""
    assert set(batch) == set(KEYS)
    B, S = batch["input_ids"].shape
    for key in KEYS:
        assert batch[key].shape == (B, S)
    assert batch["answer_mask"].dtype == torch.bool
    for b in range(B):
        ids, labels, pos, doc, ans = (batch[k][b].tolist() for k in KEYS)
        pad = [t == pad_id for t in ids]
        assert labels[-1] == IGNORE_INDEX and pos[0] == 0 and doc[0] == 0
        for i in range(S - 1):
            same = doc[i] == doc[i + 1]
            assert labels[i] == (ids[i + 1] if same and not pad[i] else IGNORE_INDEX), (b, i)
            assert pos[i + 1] == (pos[i] + 1 if same else 0)
            assert doc[i + 1] in (doc[i], doc[i] + 1)
        assert all(labels[i] != IGNORE_INDEX for i in range(S) if ans[i])


def real_tokens(batches, pad_id=BYTE.pad_id) -> list[int]:
    return [t for batch in batches for t in batch["input_ids"].flatten().tolist() if t != pad_id]


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for key in KEYS:
            assert torch.equal(x[key], y[key]), key


def assert_resumes(make, *, skip=3, then=4, batch_size=2):
    """Consume `skip` batches, save, rebuild, load: the next batches match the uninterrupted run."""
    first = make()
    for _ in range(skip):
        first.next_batch(batch_size)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    expected = [first.next_batch(batch_size) for _ in range(then)]
    second = make()
    second.load_state_dict(state)
    assert_same_batches([second.next_batch(batch_size) for _ in range(then)], expected)


# ---------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips():
    tok = build_tokenizer("byte")
    assert tok.vocab_size == 259 and tok.name == "byte"
    assert len({tok.pad_id, tok.eos_id, tok.bos_id}) == 3 and min(tok.pad_id, tok.eos_id) >= 256
    text = "héllo wörld ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("ab") + [tok.eos_id]) == "ab"


def train_bpe(tmp_path, specials):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_texts(50) + ["The pass key is 12345. Remember it."], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tok


def test_hf_tokenizer_from_folder_and_file(tmp_path):
    trained = train_bpe(tmp_path, ["<pad>", "</s>"])
    for spec in (str(tmp_path), str(tmp_path / "tokenizer.json")):
        tok = build_tokenizer(spec)
        assert tok.name == spec
        assert tok.eos_id == trained.token_to_id("</s>") and tok.pad_id == trained.token_to_id("<pad>")
        assert tok.vocab_size == trained.get_vocab_size()
        text = "gamma delta, the pass key is 98765!"
        ids = tok.encode(text)
        assert all(isinstance(i, int) for i in ids) and tok.decode(ids) == text
        assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text


def test_hf_tokenizer_without_specials_gets_an_eos(tmp_path):
    trained = train_bpe(tmp_path, [])
    tok = build_tokenizer(str(tmp_path))
    assert tok.eos_id == trained.get_vocab_size() and tok.vocab_size == trained.get_vocab_size() + 1
    assert tok.pad_id == tok.eos_id  # padding is never a target, so eos doubles as pad


def test_hf_tokenizer_answer_mask_marks_the_key(tmp_path):
    train_bpe(tmp_path, ["<pad>", "</s>"])
    tok = build_tokenizer(str(tmp_path))
    cfg = DataConfig(task="passkey", tokenizer=str(tmp_path), min_doc_len=100, max_doc_len=300)
    batch = PackedRows(cfg, tok, seq_len=4096, dp_rank=0, dp_size=1).next_batch(1)
    check_rows(batch, pad_id=-1)
    ids, labels, doc, ans = batch["input_ids"][0], batch["labels"][0], batch["doc_ids"][0], batch["answer_mask"][0]
    complete = [d for d in doc.unique().tolist() if ids[doc == d][-1] == tok.eos_id]
    assert len(complete) >= 5
    for d in complete:
        in_doc = doc == d
        text = tok.decode(ids[in_doc].tolist())
        key = re.search(r"The pass key is (\d{5})\. Remember", text).group(1)
        assert text.endswith("The pass key is " + key)
        assert tok.decode(labels[in_doc & ans].tolist()) == key


# ---------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("task", ["passkey", "mqar", "lm", "mix"])
def test_synthetic_is_deterministic_and_sized(task):
    docs = [synthetic_document(task, 7, i, 200, 800) for i in range(30)]
    assert docs == [synthetic_document(task, 7, i, 200, 800) for i in range(30)]
    assert docs != [synthetic_document(task, 8, i, 200, 800) for i in range(30)]
    assert len({d.text for d in docs}) == 30
    for doc in docs:
        assert 200 - 40 <= len(doc.text) <= 800  # whole sentences / pairs: a little short at most


def test_synthetic_answers():
    for i in range(20):
        text, spans = synthetic_document("passkey", 1, i, 100, 1000)
        (lo, hi), = spans
        key = re.search(r"The pass key is (\d{5})\. Remember it\.", text).group(1)
        assert text[lo:hi] == key and hi == len(text) and text[:lo].endswith("What is the pass key? The pass key is ")

        text, spans = synthetic_document("mqar", 1, i, 100, 1000)
        pairs = dict(re.findall(r"(\w{4}):(\d{4})", text))
        queries = re.findall(r"(\w{4}) -> (\d{4})", text)
        assert len(queries) == len(spans) >= 1
        for (key, value), (lo, hi) in zip(queries, spans):
            assert pairs[key] == value == text[lo:hi]

        text, spans = synthetic_document("lm", 1, i, 100, 1000)
        assert spans == () and re.fullmatch(r"[A-Za-z .]+", text)
    kinds = [bool(re.search("pass key", synthetic_document("mix", 1, i, 100, 300).text)) for i in range(6)]
    assert kinds == [True, False, False, True, False, False]


def test_synthetic_lm_language_is_shared_and_zipfian():
    words = lambda seed: [w.lower().strip(".") for i in range(100) for w in synthetic_document("lm", seed, i, 500, 500).text.split()]
    train, other = Counter(words(1)), Counter(words(99))
    top = lambda counts: {w for w, _ in counts.most_common(10)}
    assert len(top(train) & top(other)) >= 8  # one language for every seed
    counts = sorted(train.values(), reverse=True)
    assert counts[0] > 20 * counts[len(counts) // 2]  # a few words dominate
    # Markov structure: a word's most common successor is far more likely than chance.
    pairs = Counter(zip(words(1), words(1)[1:]))
    first = top(train).pop()
    after = {b: n for (a, b), n in pairs.items() if a == first}
    assert max(after.values()) > 0.2 * sum(after.values())


def test_synthetic_stream_train_eval_and_ranks_differ():
    cfg = DataConfig(task="mix", min_doc_len=50, max_doc_len=200)
    train = {d.text for d in take(open_documents(cfg), 60)}
    evals = {d.text for d in take(open_documents(cfg, split="eval"), 60)}
    assert not train & evals
    r0 = [d.text for d in take(open_documents(cfg, dp_rank=0, dp_size=3), 20)]
    r1 = [d.text for d in take(open_documents(cfg, dp_rank=1, dp_size=3), 20)]
    single = [d.text for d in take(open_documents(cfg), 60)]
    assert r0 == single[0::3] and r1 == single[1::3]


# ---------------------------------------------------------------------------- packing


def test_packing_invariants_and_long_documents_split():
    cfg = DataConfig(task="mix", min_doc_len=20, max_doc_len=400)
    tok = BYTE
    rows = PackedRows(cfg, tok, seq_len=128, dp_rank=0, dp_size=1)
    batches = [rows.next_batch(4) for _ in range(6)]
    for batch in batches:
        check_rows(batch)
        assert (batch["input_ids"] != tok.pad_id).all()  # training rows are always full
    # The rows, read in order, are exactly the documents' tokens each followed by eos.
    tokens = real_tokens(batches)
    expected = []
    for doc in open_documents(cfg):
        expected += tokenize_document(tok, doc)[0].tolist()
        if len(expected) >= len(tokens):
            break
    assert tokens == expected[: len(tokens)]
    # Some row starts in the middle of a document (a split), at position 0, as segment 0.
    ids = torch.cat([b["input_ids"] for b in batches])
    prev_last = torch.cat([torch.tensor([tok.eos_id]), ids[:-1, -1]])
    assert (prev_last != tok.eos_id).sum() >= 5
    assert (torch.cat([b["position_ids"][:, 0] for b in batches]) == 0).all()
    assert torch.cat([b["doc_ids"] for b in batches]).max() >= 1


def test_packing_answer_mask_is_exactly_the_passkey():
    cfg = DataConfig(task="passkey", min_doc_len=100, max_doc_len=300)
    # The first row starts with a fresh document: every segment but the last is a whole one.
    batch = PackedRows(cfg, BYTE, seq_len=2048, dp_rank=0, dp_size=1).next_batch(1)
    check_rows(batch)
    ids, labels, doc, ans = (batch[k][0] for k in ("input_ids", "labels", "doc_ids", "answer_mask"))
    n_docs = int(doc.max())
    assert n_docs >= 5
    for d in range(n_docs):
        idx = (doc == d).nonzero().flatten()
        text = BYTE.decode(ids[idx].tolist())
        key = re.search(r"The pass key is (\d{5})\. Remember", text).group(1)
        # L text bytes then eos; the key is the last 5 bytes, the labels of positions L-6..L-2.
        L = len(idx) - 1
        expected = torch.zeros(len(idx), dtype=torch.bool)
        expected[L - 6:L - 1] = True
        assert torch.equal(ans[idx], expected)
        assert BYTE.decode(labels[idx][expected].tolist()) == key


def test_packing_mqar_answer_mask_matches_values():
    cfg = DataConfig(task="mqar", min_doc_len=100, max_doc_len=300)
    batch = PackedRows(cfg, BYTE, seq_len=4096, dp_rank=0, dp_size=1).next_batch(1)
    ids, labels, doc, ans = (batch[k][0] for k in ("input_ids", "labels", "doc_ids", "answer_mask"))
    for d in doc.unique().tolist()[:-1]:  # the last segment may be cut by the row end
        in_doc = doc == d
        text = BYTE.decode(ids[in_doc].tolist())
        values = "".join(v for _, v in re.findall(r"(\w{4}) -> (\d{4})", text))
        assert BYTE.decode(labels[in_doc & ans].tolist()) == values


def test_packing_is_deterministic_and_resumes_synthetic():
    cfg = DataConfig(task="mix", min_doc_len=30, max_doc_len=300)
    make = lambda: PackedRows(cfg, BYTE, seq_len=96, dp_rank=1, dp_size=2)
    a, b = make(), make()
    assert_same_batches([a.next_batch(2) for _ in range(5)], [b.next_batch(2) for _ in range(5)])
    assert_resumes(make, skip=3)
    assert_resumes(make, skip=0)


def test_pad_rows():
    cfg = DataConfig(task="mix", min_doc_len=30, max_doc_len=100)
    batch = PackedRows(cfg, BYTE, seq_len=10, dp_rank=0, dp_size=1).next_batch(2)
    padded = pad_rows(batch, 4, pad_id=BYTE.pad_id)
    assert all(v.shape == (2, 12) for v in padded.values())
    for key in KEYS:
        assert torch.equal(padded[key][:, :10], batch[key])
    assert (padded["input_ids"][:, 10:] == BYTE.pad_id).all()
    assert (padded["labels"][:, 10:] == IGNORE_INDEX).all()
    assert padded["position_ids"][:, 10:].tolist() == [[0, 1], [0, 1]]
    assert (padded["doc_ids"][:, 10:] == batch["doc_ids"].max(1, keepdim=True).values + 1).all()
    assert not padded["answer_mask"][:, 10:].any()
    check_rows(padded)
    assert pad_rows(batch, 5)["input_ids"].shape == (2, 10)  # already a multiple: unchanged


# ---------------------------------------------------------------------------- files


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "txt"])
def test_each_file_format(tmp_path, fmt):
    texts = make_texts(9)
    path = write(tmp_path / f"data.{fmt}", texts, fmt)
    cfg = files_cfg([path], eval_fraction=0.0)
    check_data(cfg)
    assert sorted(one_epoch(open_documents(cfg))) == sorted(texts)
    # An explicit data.format overrides the suffix.
    odd = tmp_path / "data.dat"
    odd.write_bytes((tmp_path / f"data.{fmt}").read_bytes())
    cfg = files_cfg([odd], format=fmt, eval_fraction=0.0)
    check_data(cfg)
    assert sorted(one_epoch(open_documents(cfg))) == sorted(texts)


def test_mixed_formats_and_other_text_field(tmp_path):
    a = write(tmp_path / "a.jsonl", make_texts(4, "a"), "jsonl", field="body")
    b = write(tmp_path / "b.parquet", make_texts(3, "b"), "parquet", field="body")
    cfg = files_cfg([a, b], text_field="body", eval_fraction=0.0)
    check_data(cfg)
    assert sorted(one_epoch(open_documents(cfg))) == sorted(make_texts(4, "a") + make_texts(3, "b"))


@pytest.mark.parametrize("streaming", [False, True])
def test_files_epochs_sharding_and_holdout(tmp_path, streaming):
    texts = make_texts(40)
    cfg = files_cfg([write(tmp_path / "d.jsonl", texts, "jsonl")], eval_fraction=0.25, streaming=streaming)
    held_out = {texts[i] for i in range(0, 40, 4)}
    train = set(texts) - held_out
    # dp ranks read disjoint documents that together make the training split.
    r0, r1 = one_epoch(open_documents(cfg, dp_rank=0, dp_size=2)), one_epoch(open_documents(cfg, dp_rank=1, dp_size=2))
    assert len(r0) == len(r1) == 15 and not set(r0) & set(r1) and set(r0) | set(r1) == train
    # Eval: the held-out documents, once, disjoint from training.
    evals = [d.text for d in open_documents(cfg, split="eval")]
    assert sorted(evals) == sorted(held_out)
    # Epochs: every epoch is the whole split; map-style epochs are reshuffled.
    stream = open_documents(cfg)
    epochs = [[d.text for d in take(stream, 30)] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(train)
    if streaming:
        assert epochs[0] == epochs[1]  # streaming: always in dataset order
    else:
        assert epochs[0] != epochs[1]  # map-style: a new permutation each epoch


@pytest.mark.parametrize("streaming", [False, True])
def test_files_packing_resumes(tmp_path, streaming):
    cfg = files_cfg([write(tmp_path / "d.jsonl", make_texts(12), "jsonl")], eval_fraction=0.2, streaming=streaming)
    make = lambda: PackedRows(cfg, BYTE, seq_len=48, dp_rank=1, dp_size=2)
    for skip in (0, 1, 4, 9):  # 9 batches span several epochs of this rank's 4 documents
        assert_resumes(make, skip=skip)
    batches = [make().next_batch(2) for _ in range(2)]
    assert_same_batches(batches[:1], batches[1:])
    for batch in batches:
        check_rows(batch)


def test_eval_rows_are_fixed_and_padded(tmp_path):
    texts = make_texts(20)
    cfg = files_cfg([write(tmp_path / "d.txt", texts, "txt")], eval_fraction=0.25)
    batches = eval_rows(cfg, BYTE, seq_len=64, dp_rank=0, dp_size=2, num_batches=4, batch_size=2)
    assert len(batches) == 4
    for batch in batches:
        check_rows(batch)
    # Held out: documents 0, 4, 8, 12, 16; rank 0 of 2 reads 0, 8, 16, then pads.
    expected = [t for i in (0, 8, 16) for t in tokenize_document(BYTE, Document(texts[i]))[0].tolist()]
    assert real_tokens(batches) == expected
    assert (batches[-1]["labels"] == IGNORE_INDEX).all() and (batches[-1]["input_ids"] == BYTE.pad_id).all()
    again = eval_rows(cfg, BYTE, seq_len=64, dp_rank=0, dp_size=2, num_batches=4, batch_size=2)
    assert_same_batches(batches, again)


def test_synthetic_eval_rows_differ_from_training():
    cfg = DataConfig(task="passkey", min_doc_len=50, max_doc_len=200)
    evals = eval_rows(cfg, BYTE, seq_len=256, dp_rank=0, dp_size=1, num_batches=2, batch_size=2)
    train = PackedRows(cfg, BYTE, seq_len=256, dp_rank=0, dp_size=1)
    assert not torch.equal(evals[0]["input_ids"], train.next_batch(2)["input_ids"])
    assert all(b["answer_mask"].any() for b in evals)


# ---------------------------------------------------------------------------- hf


def hf_folder(tmp_path, fmt="jsonl"):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write(folder / f"train.{fmt}", make_texts(16, "train"), fmt, field="content")
    write(folder / f"test.{fmt}", make_texts(5, "test"), fmt, field="content")
    return folder


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_local_folder(tmp_path, streaming):
    folder = hf_folder(tmp_path, "parquet" if streaming else "jsonl")
    cfg = DataConfig(source="hf", name=str(folder), text_field="content", streaming=streaming)
    check_data(cfg)
    # Hold-out from the train split (every 20th document: index 0).
    assert sorted(one_epoch(open_documents(cfg))) == sorted(make_texts(16, "train")[1:])
    assert [d.text for d in open_documents(cfg, split="eval")] == make_texts(16, "train")[:1]
    # A named eval split replaces the hold-out.
    cfg = dataclasses.replace(cfg, eval_split="test")
    check_data(cfg)
    assert sorted(one_epoch(open_documents(cfg))) == sorted(make_texts(16, "train"))
    assert [d.text for d in open_documents(cfg, split="eval")] == make_texts(5, "test")


def test_hf_streaming_packing_resumes(tmp_path):
    cfg = DataConfig(source="hf", name=str(hf_folder(tmp_path)), text_field="content", streaming=True,
                     eval_split="test")
    make = lambda: PackedRows(cfg, BYTE, seq_len=40, dp_rank=0, dp_size=2)
    for skip in (2, 12):  # 12 batches go past the end of the split: resume in a later epoch
        assert_resumes(make, skip=skip)
    check_rows(make().next_batch(4))


def test_hf_save_to_disk_folder(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": make_texts(6)})}).save_to_disk(str(tmp_path / "saved"))
    for streaming in (False, True):
        cfg = DataConfig(source="hf", name=str(tmp_path / "saved"), eval_fraction=0.0, streaming=streaming)
        check_data(cfg)
        assert sorted(one_epoch(open_documents(cfg))) == sorted(make_texts(6))


# ---------------------------------------------------------------------------- errors


def raises_naming(fn, *words):
    with pytest.raises(ConfigError) as info:
        fn()
    for word in words:
        assert str(word) in str(info.value), (word, str(info.value))


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    raises_naming(lambda: check_data(files_cfg([missing])), missing, "does not exist")
    raises_naming(lambda: open_documents(files_cfg([missing])), missing)

    for name in ("empty.jsonl", "empty.txt"):
        (tmp_path / name).write_text("")
        raises_naming(lambda: check_data(files_cfg([tmp_path / name])), tmp_path / name, "empty")

    path = write(tmp_path / "body.jsonl", make_texts(3), "jsonl", field="body")
    raises_naming(lambda: check_data(files_cfg([path])), path, "data.text_field='text'", "body")
    raises_naming(lambda: open_documents(files_cfg([path])), path, "data.text_field='text'", "body")
    path = write(tmp_path / "body.parquet", make_texts(3), "parquet", field="body")
    raises_naming(lambda: check_data(files_cfg([path])), path, "data.text_field='text'", "body")

    odd = tmp_path / "data.csv"
    odd.write_text("text\nhello\n")
    raises_naming(lambda: check_data(files_cfg([odd])), odd, "data.format")

    path = write(tmp_path / "ints.jsonl", [1, 2], "jsonl")
    raises_naming(lambda: check_data(files_cfg([path])), path, "data.text_field='text'", "int")


def test_tokenizer_errors(tmp_path):
    missing = tmp_path / "no_tokenizer_here"
    raises_naming(lambda: build_tokenizer(str(missing)), missing, "data.tokenizer")
    raises_naming(lambda: check_data(DataConfig(tokenizer=str(missing))), missing, "data.tokenizer")
    raises_naming(lambda: build_tokenizer(str(tmp_path)), tmp_path, "data.tokenizer", "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    raises_naming(lambda: build_tokenizer(str(tmp_path)), "data.tokenizer", "tokenizer.json")


def test_hf_errors(tmp_path):
    missing = tmp_path / "no_dataset"
    raises_naming(lambda: check_data(DataConfig(source="hf", name=str(missing))), missing, "data.name")
    folder = hf_folder(tmp_path)
    raises_naming(lambda: check_data(DataConfig(source="hf", name=str(folder))), folder, "data.text_field='text'", "content")
    raises_naming(lambda: open_documents(DataConfig(source="hf", name=str(folder))), "data.text_field='text'", "content")
    cfg = DataConfig(source="hf", name=str(folder), text_field="content", eval_split="validation")
    raises_naming(lambda: check_data(cfg), folder, "validation")


def test_check_data_accepts_good_configs(tmp_path):
    check_data(DataConfig())
    for task in ("passkey", "mqar", "lm", "mix"):
        check_data(DataConfig(task=task))
    train_bpe(tmp_path, ["</s>"])
    check_data(DataConfig(tokenizer=str(tmp_path)))


def test_too_few_documents_for_the_ranks(tmp_path):
    cfg = files_cfg([write(tmp_path / "d.jsonl", make_texts(2), "jsonl")], eval_fraction=0.0)
    raises_naming(lambda: take(open_documents(cfg, dp_rank=2, dp_size=3), 1), "dp rank 2 of 3", "d.jsonl")
