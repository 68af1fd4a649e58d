"""Tokenizers: plain bytes (tests, smoke runs), a byte-level BPE trained on the corpus with
Hugging Face ``tokenizers``, or a user's ``tokenizer.json``.

Each knows its vocabulary size, its end-of-text token (between documents), an identity
(shards are keyed by it) and how many bytes of text each token stands for (bits per byte).
"""

import functools
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.config import DataConfig
from data.corpus import DataError, Source, in_validation, pieces, stable_hash

EOT_TEXT = "<|endoftext|>"
# End-of-text spellings of common tokenizers, tried in order on a user's tokenizer.json.
EOT_NAMES = (EOT_TEXT, "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
BPE_SAMPLE_CHARS = 100_000_000  # a BPE learns its merges from this much training text


class ByteTokenizer:
    """UTF-8 bytes 0..255, then one end-of-text token."""

    vocab_size = 257
    eot = 256
    identity = "byte"

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode(), np.uint8).astype(np.uint32) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i != self.eot).decode(errors="replace")

    def token_bytes(self) -> np.ndarray:
        lengths = np.ones(self.vocab_size, np.int64)
        lengths[self.eot] = 0  # a separator, not text
        return lengths


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer."""

    def __init__(self, tokenizer: Tokenizer, origin: str) -> None:
        self.tokenizer = tokenizer
        found = (tokenizer.token_to_id(name) for name in EOT_NAMES)
        eot = next((i for i in found if i is not None), None)
        if eot is None:
            raise DataError(f"{origin}: no end-of-text token (one of {', '.join(EOT_NAMES)})")
        self.eot = eot
        # One past the largest id, which a vocabulary with gaps in its ids exceeds in size.
        self.vocab_size = 1 + max(tokenizer.get_vocab(with_added_tokens=True).values())
        self.identity = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.uint32) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """Bytes of text per token; special tokens stand for none."""
        special = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
        decoder = json.loads(self.tokenizer.to_str()).get("decoder") or {}
        byte_level = decoder.get("type") == "ByteLevel"
        alphabet = _byte_level_alphabet()
        lengths = np.zeros(self.vocab_size, np.int64)
        for token, i in self.tokenizer.get_vocab(with_added_tokens=True).items():
            if token in special:
                continue
            if byte_level and all(c in alphabet for c in token):
                lengths[i] = len(token)  # one character per byte
            else:
                lengths[i] = len(self.decode([i]).encode())
        return lengths


@functools.cache
def _byte_level_alphabet() -> frozenset[str]:
    """The 256 characters byte-level BPE spells bytes with, one per byte (as GPT-2 does)."""
    return frozenset(pre_tokenizers.ByteLevel.alphabet())


def load_tokenizer(path: str | Path) -> HFTokenizer:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.tokenizer: {path}: no such tokenizer.json")
    try:
        return HFTokenizer(Tokenizer.from_file(str(path)), str(path))
    except Exception as err:  # tokenizers raises plain Exceptions on bad files
        raise DataError(f"data.tokenizer: {path}: not a tokenizer.json ({err})") from None


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE (every byte has a token, so any text encodes) of ``vocab_size``."""
    if vocab_size <= 257:
        raise DataError(f"data.bpe_vocab_size: {vocab_size} leaves no room for merges (> 257)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return HFTokenizer(tokenizer, "the trained BPE")


def vocabulary_size(config: DataConfig) -> int | None:
    """The size of the config's tokenizer's vocabulary, known before any text is read (a BPE
    is trained to bpe_vocab_size); None for a tokenizer.json that is not there yet."""
    if config.tokenizer == "byte":
        return ByteTokenizer.vocab_size
    if config.tokenizer == "bpe":
        return config.bpe_vocab_size
    path = Path(config.tokenizer).expanduser()
    return load_tokenizer(path).vocab_size if path.is_file() else None


def tokenizer_for(config: DataConfig, sources: list[Source], data_dir: Path):
    """The trial's tokenizer; a BPE is trained on the corpus once and kept in data_dir."""
    if config.tokenizer == "byte":
        return ByteTokenizer()
    if config.tokenizer != "bpe":
        return load_tokenizer(config.tokenizer)
    key = stable_hash(
        [
            [s.stamp() for s in sources],
            config.text_field,
            config.val_fraction,
            config.bpe_vocab_size,
            BPE_SAMPLE_CHARS,
        ]
    )
    path = data_dir / "tokenizers" / f"bpe{config.bpe_vocab_size}-{key}.json"
    if not path.exists():
        print(f"training a byte-level BPE of {config.bpe_vocab_size} tokens", file=sys.stderr)
        trained = train_bpe(_train_texts(sources, config), config.bpe_vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        trained.tokenizer.save(str(scratch))
        os.replace(scratch, path)  # whole or absent, whoever else trains at once
    return load_tokenizer(path)


def _train_texts(sources: list[Source], config: DataConfig) -> Iterator[str]:
    """The first BPE_SAMPLE_CHARS of training text (validation documents left out)."""
    chars = 0
    for source in sources:
        sha256 = source.sha256() if source.kind == "text" else ""
        for piece in pieces(source, config.text_field, sha256):
            if not in_validation(piece.key, config.val_fraction):
                yield piece.text
                chars += len(piece.text)
                if chars >= BPE_SAMPLE_CHARS:
                    return
