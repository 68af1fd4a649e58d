"""Token shards: a corpus tokenized once into Arrow IPC files under data_dir, with a manifest.

A shard folder is keyed by a hash of (sources, text field, split, tokenizer, shard size), so
the same inputs and tokenizer find the same shards and never rebuild them. Each split is a
token stream (documents in source order, each followed by end-of-text) cut into shards of
``shard_tokens``; a shard is one uint16 (or uint32) column, memory-mapped when read.
"""

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data.corpus import DataError, Source, in_validation, pieces, stable_hash

FORMAT = 2  # bump when the layout changes, so old shards are not misread (2: files deduplicated)
SHARD_TOKENS = 1 << 24
ENCODE_CHARS = 1 << 20  # text handed to the tokenizer per call: bounded memory, fast batches
SPLITS = ("train", "val")


def shard_folder(
    sources: list[Source],
    tokenizer,
    text_field: str,
    val_fraction: float,
    data_dir: Path,
    shard_tokens: int = SHARD_TOKENS,
) -> Path:
    key = stable_hash(
        {
            "format": FORMAT,
            "sources": [s.stamp() for s in sources],
            "text_field": text_field,
            "val_fraction": val_fraction,
            "tokenizer": tokenizer.identity,
            "shard_tokens": shard_tokens,
        }
    )
    return Path(data_dir) / "shards" / key


def prepare_shards(
    sources: list[Source],
    tokenizer,
    text_field: str,
    val_fraction: float,
    data_dir: Path,
    shard_tokens: int = SHARD_TOKENS,
) -> Path:
    """The shard folder of this corpus and tokenizer, built if it is not there yet.

    Built aside and renamed into place: concurrent builders never see half a folder, and
    the first to finish wins.
    """
    folder = shard_folder(sources, tokenizer, text_field, val_fraction, data_dir, shard_tokens)
    if (folder / "manifest.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = folder.with_name(f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        _build(sources, tokenizer, text_field, val_fraction, scratch, shard_tokens)
        try:
            os.rename(scratch, folder)
        except OSError:
            if not (folder / "manifest.json").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def read_split(folder: Path, split: str) -> list[np.ndarray]:
    """A split's shards as read-only arrays backed by the memory-mapped files."""
    shards = read_manifest(folder)["splits"][split]["shards"]
    return [read_shard(folder / shard["file"]) for shard in shards]


def read_shard(path: Path) -> np.ndarray:
    batch = pa.ipc.open_file(pa.memory_map(str(path))).get_batch(0)
    return batch.column(0).to_numpy(zero_copy_only=True)


def write_shard(path: Path, tokens: np.ndarray) -> None:
    table = pa.table({"tokens": pa.array(tokens)})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


class ShardWriter:
    """One split's token stream, cut into files of ``shard_tokens`` as it arrives."""

    def __init__(self, folder: Path, split: str, dtype: type, shard_tokens: int) -> None:
        self.folder, self.split = folder, split
        self.buffer = np.empty(shard_tokens, dtype)
        self.filled, self.shards, self.documents, self.bytes = 0, [], 0, 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            n = min(len(tokens), len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + n] = tokens[:n]
            self.filled += n
            tokens = tokens[n:]
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        if self.filled:
            name = f"{self.split}-{len(self.shards):05d}.arrow"
            write_shard(self.folder / name, self.buffer[: self.filled])
            self.shards.append({"file": name, "tokens": self.filled})
            self.filled = 0

    @property
    def tokens(self) -> int:
        return self.filled + sum(s["tokens"] for s in self.shards)

    def summary(self) -> dict:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "shards": self.shards,
        }


def _build(sources, tokenizer, text_field, val_fraction, folder, shard_tokens) -> None:
    started = time.time()
    args = sources, tokenizer, text_field, val_fraction, folder, shard_tokens
    splits, listed, lowest_key = _write(*args)
    if splits["val"]["documents"] == 0 and splits["train"]["documents"] > 1:
        # A small corpus can leave validation empty: its document with the lowest hash
        # goes there instead (one more pass, over a corpus this small).
        shutil.rmtree(folder)
        splits, listed, _ = _write(*args, forced_val=lowest_key)
    total = splits["train"]["documents"] + splits["val"]["documents"]
    if total < 2:
        raise DataError(f"data.paths: {total} document(s); at least 2 are needed, one per split")
    if not splits["train"]["documents"]:
        raise DataError(f"data.val_fraction: {val_fraction} leaves no training document")
    manifest = {
        "format": FORMAT,
        "sources": listed,
        "text_field": text_field,
        "val_fraction": val_fraction,
        "tokenizer": {
            "identity": tokenizer.identity,
            "vocab_size": tokenizer.vocab_size,
            "eot": tokenizer.eot,
        },
        "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
        "splits": splits,
        "build_seconds": round(time.time() - started, 1),
    }
    if hasattr(tokenizer, "tokenizer"):  # a Hugging Face tokenizer: keep it beside its shards
        tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def token_dtype(vocab_size: int) -> type:
    """The smallest dtype that holds every token id below ``vocab_size``."""
    if vocab_size > 2**32:
        raise DataError(f"data.tokenizer: a vocabulary of {vocab_size} tokens does not fit uint32")
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _write(sources, tokenizer, text_field, val_fraction, folder, shard_tokens, forced_val=None):
    """Stream every document through the tokenizer into its split's shards."""
    folder.mkdir(parents=True)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: ShardWriter(folder, split, dtype, shard_tokens) for split in SPLITS}
    eot = np.array([tokenizer.eot])
    listed, pending, pending_chars, lowest_key = [], [], 0, None

    def encode() -> None:
        texts = [piece.text for piece in pending]
        for piece, tokens in zip(pending, tokenizer.encode_batch(texts), strict=True):
            val = in_validation(piece.key, val_fraction) or piece.key == forced_val
            writer = writers["val" if val else "train"]
            writer.write(tokens)
            writer.bytes += len(piece.text.encode())
            if piece.last:
                writer.write(eot)
                writer.documents += 1
        pending.clear()

    first_of = {}  # sha256 -> the first file with that content
    with tqdm(sources, desc="tokenizing", unit="file", disable=None) as progress:
        for source in progress:
            sha256 = source.sha256()
            size = source.path.stat().st_size
            listed.append({"path": source.name, "bytes": size, "sha256": sha256})
            if sha256 in first_of:  # a copy (vendored packages): trained once, not twice
                listed[-1]["duplicate_of"] = first_of[sha256]
                continue
            first_of[sha256] = source.name
            for piece in pieces(source, text_field, sha256):
                lowest_key = piece.key if lowest_key is None else min(lowest_key, piece.key)
                pending.append(piece)
                pending_chars += len(piece.text)
                if pending_chars >= ENCODE_CHARS:
                    encode()
                    pending_chars = 0
            progress.set_postfix(tokens=sum(w.tokens for w in writers.values()), refresh=False)
        encode()
    for writer in writers.values():
        writer.flush()
    return {split: w.summary() for split, w in writers.items()}, listed, lowest_key
