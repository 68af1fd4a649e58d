"""Corpora to token shards, the loader, bits per byte: checked against plain-Python readings
of the same files and hand-computed numbers."""

import gzip
import hashlib
import json
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from data import DataError, open_data
from data.config import DataConfig
from data.corpus import resolve_sources
from data.evaluate import bits_per_byte, validation_metrics
from data.loader import TokenWindows
from data.shards import prepare_shards, read_manifest, read_split, token_dtype
from data.tokenizer import ByteTokenizer, load_tokenizer, tokenizer_for, train_bpe

EOT = ByteTokenizer.eot


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory, corpus_dir):
    """Text files, JSONL, Parquet, Arrow IPC in file and stream format; one duplicate."""
    folder = tmp_path_factory.mktemp("mixed")
    for path in sorted(corpus_dir.glob("*.py"))[:3]:
        (folder / f"a_{path.name}.txt").write_text(path.read_text())
    rng = np.random.default_rng(0)
    words = ["state", "space", "model", "attention", "héllo", "token", "layer", "mamba"]
    records = [" ".join(rng.choice(words, int(rng.integers(3, 40)))) for _ in range(120)]
    records[7] = records[3]  # a duplicate lands in its twin's split
    with open(folder / "b.jsonl", "w") as f:
        for text in records[:60]:
            f.write(json.dumps({"text": text, "id": 1}) + "\n")
    pq.write_table(pa.table({"text": records[60:90]}), folder / "c.parquet", row_group_size=7)
    schema = pa.schema([("text", pa.string())])
    with pa.ipc.new_file(folder / "d.arrow", schema) as writer:
        writer.write_table(pa.table({"text": records[90:105]}), max_chunksize=11)
    with pa.ipc.new_stream(folder / "e.arrow", schema) as writer:  # as datasets caches are
        writer.write_table(pa.table({"text": records[105:]}), max_chunksize=4)
    return folder, records


def documents(folder, records) -> list[tuple[bytes, str]]:
    """(key, text) of every document in source order, read without the data package."""
    docs = []
    for path in sorted(folder.glob("a_*.txt")):
        docs.append((hashlib.sha256(path.read_bytes()).digest(), path.read_text()))
    for text in records:
        docs.append((hashlib.blake2b(text.encode(), digest_size=8).digest(), text))
    return docs


def in_val(key: bytes, fraction: float) -> bool:
    return int.from_bytes(key[:8], "big") < fraction * 2**64


def test_shards_round_trip_to_the_token_stream(mixed_corpus, tmp_path):
    folder, records = mixed_corpus
    sources = resolve_sources([str(folder / "a_*.txt"), str(folder / "[b-e].*")])
    assert [s.path.name for s in sources[3:]] == ["b.jsonl", "c.parquet", "d.arrow", "e.arrow"]
    tokenizer = ByteTokenizer()
    shards = prepare_shards(sources, tokenizer, "text", 0.3, tmp_path, shard_tokens=1000)
    manifest = read_manifest(shards)
    expected = {"train": [], "val": []}
    for key, text in documents(folder, records):
        expected["val" if in_val(key, 0.3) else "train"] += [*text.encode(), EOT]
    for split, stream in expected.items():
        tokens = read_split(shards, split)
        assert all(t.dtype == np.uint16 for t in tokens)
        assert np.array_equal(np.concatenate(tokens), stream), split
        assert manifest["splits"][split]["tokens"] == len(stream)
    assert len(manifest["splits"]["train"]["shards"]) > 5  # cut at 1000 tokens
    assert [s["path"] for s in manifest["sources"]] == [str(s.path) for s in sources]
    assert (
        manifest["sources"][-1]["sha256"]
        == hashlib.sha256((folder / "e.arrow").read_bytes()).hexdigest()
    )
    assert manifest["tokenizer"] == {"identity": "byte", "vocab_size": 257, "eot": EOT}


def test_a_text_file_read_in_pieces_is_the_same_stream(corpus_dir, tmp_path, monkeypatch):
    """Text files stream in bounded pieces (a corpus may not fit in memory)."""
    monkeypatch.setattr("data.corpus.PIECE_BYTES", 50)
    monkeypatch.setattr("data.shards.ENCODE_CHARS", 300)
    sources = resolve_sources([str(corpus_dir / "*.py")])
    shards = prepare_shards(sources, ByteTokenizer(), "text", 0.0, tmp_path)
    manifest = read_manifest(shards)
    stream = np.concatenate([read_split(shards, s)[0] for s in ("train", "val")])
    docs = np.split(stream, np.flatnonzero(stream == EOT) + 1)[:-1]
    expected = [[*s.path.read_bytes(), EOT] for s in sources]
    assert sorted(d.tolist() for d in docs) == sorted(expected)
    # No document drew validation at fraction 0: the lowest-hashed one was moved there.
    assert manifest["splits"]["val"]["documents"] == 1


def test_bpe_shards_decode_to_the_original_documents(mixed_corpus, tmp_path):
    folder, records = mixed_corpus
    config = DataConfig(
        paths=[str(folder / "b.jsonl")], tokenizer="bpe", bpe_vocab_size=300, val_fraction=0.2
    )
    data = open_data(config, tmp_path)
    shards = data.folder
    assert (shards / "tokenizer.json").exists()
    assert data.tokenizer.identity == load_tokenizer(shards / "tokenizer.json").identity
    train = np.concatenate(read_split(shards, "train"))
    docs = np.split(train, np.flatnonzero(train == data.tokenizer.eot) + 1)[:-1]
    expected = [
        t
        for t in records[:60]
        if not in_val(hashlib.blake2b(t.encode(), digest_size=8).digest(), 0.2)
    ]
    assert [data.tokenizer.decode(doc[:-1]) for doc in docs] == expected
    assert len(train) < sum(len(t.encode()) + 1 for t in expected) / 2  # merges were learnt


def test_split_is_by_document_deterministic_and_disjoint(mixed_corpus, tmp_path):
    folder, records = mixed_corpus
    # The same records, cut into files differently, split the same way.
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    whole.mkdir(), halves.mkdir()
    (whole / "all.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    for i, part in enumerate((records[:50], records[50:])):
        (halves / f"{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))

    def split_texts(path) -> dict[str, set[str]]:
        data = open_data(DataConfig(paths=[str(path / "*.jsonl*")], val_fraction=0.2), tmp_path)
        splits = {}
        for split in ("train", "val"):
            stream = np.concatenate(read_split(data.folder, split))
            docs = np.split(stream, np.flatnonzero(stream == EOT) + 1)[:-1]
            splits[split] = {bytes(d[:-1].astype(np.uint8)).decode() for d in docs}
        return splits

    zipped = tmp_path / "zipped"
    zipped.mkdir()
    with gzip.open(zipped / "all.jsonl.gz", "wt") as f:
        f.write((whole / "all.jsonl").read_text())
    first, second = split_texts(whole), split_texts(halves)
    assert first == second == split_texts(zipped)
    assert not first["train"] & first["val"]
    assert first["train"] | first["val"] == set(records)
    assert 10 <= len(first["val"]) <= 40  # about 20% of 119 distinct documents


def test_shards_are_reused_and_rebuilt_only_when_inputs_change(corpus_dir, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for path in sorted(corpus_dir.glob("*.py")):
        (folder / path.name).write_text(path.read_text())
    sources = resolve_sources([str(folder / "*.py")])
    built = prepare_shards(sources, ByteTokenizer(), "text", 0.01, tmp_path / "data")
    stamp = (built / "manifest.json").stat().st_mtime_ns
    assert prepare_shards(sources, ByteTokenizer(), "text", 0.01, tmp_path / "data") == built
    assert (built / "manifest.json").stat().st_mtime_ns == stamp  # not rewritten
    elsewhere = prepare_shards(sources, ByteTokenizer(), "text", 0.01, tmp_path / "other")
    for shard in built.glob("*.arrow"):  # built again from scratch: the very same bytes
        assert (elsewhere / shard.name).read_bytes() == shard.read_bytes()
    with open(folder / "bisect.py", "a") as f:
        f.write("# changed\n")
    sources = resolve_sources([str(folder / "*.py")])
    rebuilt = prepare_shards(sources, ByteTokenizer(), "text", 0.01, tmp_path / "data")
    assert rebuilt != built and (built / "manifest.json").exists()
    assert read_manifest(rebuilt)["splits"]["train"]["tokens"] + read_manifest(rebuilt)["splits"][
        "val"
    ]["tokens"] == sum(s.path.stat().st_size + 1 for s in sources)


def test_concurrent_builders_agree(corpus_dir, tmp_path):
    sources = resolve_sources([str(corpus_dir / "*.py")])
    folders = []

    def build() -> None:
        folders.append(prepare_shards(sources, ByteTokenizer(), "text", 0.01, tmp_path))

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(folders) == 3 and len(set(folders)) == 1
    assert [p.name for p in (tmp_path / "shards").iterdir()] == [folders[0].name]  # no debris
    assert read_manifest(folders[0])["splits"]["train"]["documents"] == len(sources) - 1


def test_loader_is_deterministic_per_seed_and_step(corpus_dir, data_cache):
    data = open_data(DataConfig(paths=[str(corpus_dir / "*.py")], seq_len=32), data_cache)
    x1, y1 = data.train_batch(seed=3, step=17, batch_size=8)
    data.train_batch(seed=3, step=5, batch_size=8)  # what came before does not matter
    x2, y2 = data.train_batch(seed=3, step=17, batch_size=8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, data.train_batch(seed=3, step=18, batch_size=8)[0])
    assert not torch.equal(x1, data.train_batch(seed=4, step=17, batch_size=8)[0])
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    for step in range(4):  # step after step: the batch drawn ahead is the batch drawn now
        ahead, now = data.train_batch(3, step, 8), data.draw(3, step, 8)
        assert all(torch.equal(a, b) for a, b in zip(ahead, now, strict=True))
    # Every row is a window of the training stream.
    stream = bytes(np.concatenate(read_split(data.folder, "train")).astype(np.uint8))
    for row in torch.cat([x1, y1[:, -1:]], 1):
        assert bytes(row.to(torch.uint8).tolist()) in stream


def test_windows_cover_every_start_uniformly():
    shards = [np.arange(10), np.arange(100, 104)]  # 7 and 1 starts for seq_len 3
    windows = TokenWindows(shards, seq_len=3)
    rows = windows.sample(np.random.default_rng(0), 8000)
    starts, counts = np.unique(rows[:, 0], return_counts=True)
    assert starts.tolist() == [0, 1, 2, 3, 4, 5, 6, 100]
    assert counts.min() > 850 and counts.max() < 1150  # 1000 each
    assert np.array_equal(rows[:, 1:] - rows[:, :-1], np.ones((8000, 3)))  # never across shards
    val = list(windows.sequential(max_tokens=1000, rows_per_batch=2))
    assert [r.tolist() for batch in val for r in batch] == [
        [0, 1, 2, 3],
        [3, 4, 5, 6],
        [6, 7, 8, 9],
        [100, 101, 102, 103],
    ]
    with pytest.raises(DataError, match="data.seq_len"):
        TokenWindows(shards, seq_len=10)


class Unigram(torch.nn.Module):
    """A model with the same next-token distribution everywhere."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.logits = probs.log()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*inputs.shape, -1)


def test_bits_per_byte_by_hand_byte_tokenizer():
    text = "hello, world\n"
    tokens = np.array([*text.encode(), EOT, *text.encode()])  # a document boundary too
    probs = torch.full((257,), 0.5 / 255)
    probs[ord("l")], probs[EOT] = 0.25, 0.25
    windows = TokenWindows([tokens], seq_len=9)  # two windows: targets are tokens[1:19]
    metrics = validation_metrics(
        Unigram(probs), windows, ByteTokenizer().token_bytes(), 10**6, torch.device("cpu")
    )
    targets = tokens[1:19]
    bits = sum(-math.log2(probs[t]) for t in targets)
    n_bytes = sum(t != EOT for t in targets)  # the separator stands for no text
    assert metrics["val_bpb"] == pytest.approx(bits / n_bytes)
    assert metrics["val_loss"] == pytest.approx(bits * math.log(2) / 18)
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)


def test_bits_per_byte_by_hand_bpe(corpus_dir):
    tokenizer = train_bpe((p.read_text() for p in sorted(corpus_dir.glob("*.py"))), 320)
    text = "def wrap(text, width=70):\n    return TextWrapper(width=width).wrap(text)\n"
    tokens = tokenizer.encode_batch([text])[0]
    seq_len = (len(tokens) - 1) // 2
    windows = TokenWindows([tokens], seq_len=seq_len)
    uniform = Unigram(torch.full((tokenizer.vocab_size,), 1 / tokenizer.vocab_size))
    metrics = validation_metrics(
        uniform, windows, tokenizer.token_bytes(), 10**6, torch.device("cpu")
    )
    targets = tokens[1 : 1 + 2 * seq_len]
    n_bytes = len(tokenizer.decode(targets).encode())  # ASCII: the targets' own text
    assert len(targets) < n_bytes  # BPE tokens span several bytes
    assert metrics["val_bpb"] == pytest.approx(
        len(targets) * math.log2(tokenizer.vocab_size) / n_bytes
    )


def test_bpe_is_trained_once_and_a_users_tokenizer_loads(corpus_dir, tmp_path):
    config = DataConfig(paths=[str(corpus_dir / "*.py")], tokenizer="bpe", bpe_vocab_size=320)
    sources = resolve_sources(config.paths)
    first = tokenizer_for(config, sources, tmp_path)
    saved = list((tmp_path / "tokenizers").iterdir())
    assert len(saved) == 1 and first.vocab_size == 320
    stamp = saved[0].stat().st_mtime_ns
    assert tokenizer_for(config, sources, tmp_path).identity == first.identity
    assert saved[0].stat().st_mtime_ns == stamp
    user = DataConfig(paths=config.paths, tokenizer=str(saved[0]))
    assert tokenizer_for(user, sources, tmp_path).identity == first.identity
    with pytest.raises(DataError, match="data.tokenizer: .*missing.json"):
        tokenizer_for(DataConfig(tokenizer=str(tmp_path / "missing.json")), sources, tmp_path)


def test_bad_inputs_name_the_path_or_field(mixed_corpus, tmp_path):
    folder, _ = mixed_corpus
    cases = {
        str(tmp_path / "nothing*.txt"): "nothing\\*.txt: no such file",
        str(folder / "b.jsonl"): "b.jsonl:1: no 'body' field",
        str(folder / "c.parquet"): "c.parquet: no column 'body'",
    }
    for path, message in cases.items():
        with pytest.raises(DataError, match=message):
            open_data(DataConfig(paths=[path], text_field="body"), tmp_path)
    with pytest.raises(DataError, match="data.seq_len"):
        open_data(DataConfig(paths=[str(folder / "a_*.txt")], seq_len=100_000), tmp_path)
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "alone"}\n')
    with pytest.raises(DataError, match="data.paths: 1 document"):
        open_data(DataConfig(paths=[str(one)]), tmp_path)
    # Not UTF-8: Latin-1 "\xe9" at line 3, byte 8 of the text file; line 2, byte 25 of the JSONL.
    (tmp_path / "latin.txt").write_bytes(b"one\ntwo\n\xe9t\xe9\n")
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xe9t\xe9"}\n')
    with gzip.open(tmp_path / "latin.jsonl.gz", "wb") as f:  # offsets in the unzipped text
        f.write((tmp_path / "latin.jsonl").read_bytes())
    undecodable = {
        "latin.txt": r"latin.txt:3: not UTF-8 text \(byte 8: invalid continuation byte\)$",
        "latin.jsonl": r"latin.jsonl:2: not UTF-8 text \(byte 25: invalid continuation byte\)$",
        "latin.jsonl.gz": r"latin.jsonl.gz:2: not UTF-8 text \(byte 25: ",
    }
    for name, message in undecodable.items():
        with pytest.raises(DataError, match=message):
            open_data(DataConfig(paths=[str(tmp_path / name)]), tmp_path)
    scratch = [p for p in (tmp_path / "shards").iterdir() if p.name.startswith(".")]
    assert not scratch  # failed builds leave nothing behind


def test_shards_hold_every_token_id_or_refuse_the_tokenizer(mixed_corpus, tmp_path):
    """A user's tokenizer whose ids pass uint16 (a small vocabulary, with gaps in its ids)
    gets uint32 shards with every id intact; a vocabulary past uint32 fits no shard."""
    folder, records = mixed_corpus
    words = sorted({word for text in records for word in text.split()})
    vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {w: 70_000 + i for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "gaps.json"))
    config = DataConfig(
        paths=[str(folder / "b.jsonl")], tokenizer=str(tmp_path / "gaps.json"), val_fraction=0.2
    )
    data = open_data(config, tmp_path)
    assert data.vocab_size == 70_000 + len(words)  # one past the largest id, not 2 + len(words)
    assert read_manifest(data.folder)["dtype"] == "uint32"
    expected = [
        id
        for text in records[:60]
        if not in_val(hashlib.blake2b(text.encode(), digest_size=8).digest(), 0.2)
        for id in [*(vocab[word] for word in text.split()), 0]
    ]
    assert np.concatenate(read_split(data.folder, "train")).tolist() == expected
    assert token_dtype(2**16) is np.uint16 and token_dtype(2**16 + 1) is np.uint32
    with pytest.raises(DataError, match="^data.tokenizer: a vocabulary of 4294967297 tokens"):
        token_dtype(2**32 + 1)


def test_a_copied_file_is_trained_once_and_listed_as_a_copy(corpus_dir, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("bisect.py", "heapq.py"):
        shutil.copy(corpus_dir / name, folder / name)
    shutil.copy(corpus_dir / "bisect.py", folder / "vendored_bisect.py")  # same bytes
    sources = resolve_sources([str(folder / "*.py")])
    manifest = read_manifest(prepare_shards(sources, ByteTokenizer(), "text", 0.01, tmp_path))
    listed = {s["path"].rsplit("/", 1)[-1]: s for s in manifest["sources"]}
    assert listed["vendored_bisect.py"]["duplicate_of"].endswith("/bisect.py")
    assert "duplicate_of" not in listed["bisect.py"]
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 2
    unique = [folder / "bisect.py", folder / "heapq.py"]
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == sum(
        p.stat().st_size + 1 for p in unique
    )


def test_the_python_corpus_adds_installed_packages_to_the_standard_library():
    stdlib = resolve_sources([], "stdlib")
    python = resolve_sources([], "python")
    assert [s.name for s in python[: len(stdlib)]] == [s.name for s in stdlib]
    packages = {s.name for s in python[len(stdlib) :]}
    # This project's own dependencies are installed wherever it runs.
    assert "packages/pyarrow/__init__.py" in packages
    assert any(name.startswith("packages/torch/") for name in packages)
    assert {Path(name).suffix for name in packages} <= {".py", ".pyi", ".md", ".rst"}
    assert len(packages) == len(python) - len(stdlib)  # no file listed twice
