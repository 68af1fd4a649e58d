"""The data a trial trains and evaluates on, behind the small interface the trainer uses."""

import functools
import glob
import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from runners.config import DataConfig

EOT = 256  # byte-level tokens 0..255, then one end-of-text token between documents
STDLIB_BYTES = 8_000_000  # the built-in corpus: the first 8 MB of the standard library


class DataError(Exception):
    """A corpus that cannot be read; the message names the path."""


def _sources(config: DataConfig) -> list[Path]:
    if not config.paths:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files, total = [], 0
        for path in sorted(stdlib.rglob("*.py")):
            if "site-packages" in path.parts or total > STDLIB_BYTES:
                continue
            files.append(path)
            total += path.stat().st_size
        return files
    files = []
    for pattern in config.paths:
        matched = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        if not matched:
            raise DataError(f"{pattern}: no such file (or the glob matches nothing)")
        files.extend(matched)
    return files


@dataclass
class TrialData:
    train: np.ndarray  # uint16 tokens
    val: np.ndarray
    val_bytes_per_token: float
    seq_len: int
    vocab_size: int = EOT + 1

    def train_batch(self, seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, ...]:
        """Random windows drawn from (seed, step) alone: a resumed run sees the same batches."""
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.train) - self.seq_len - 1, size=batch_size)
        return self._windows(self.train, starts)

    def _windows(self, tokens: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, ...]:
        rows = np.stack([tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def evaluate(self, model, device: torch.device, max_tokens: int = 32768) -> dict:
        """Mean validation loss over fixed windows, and bits per byte."""
        n = min(len(self.val) - 1, max_tokens) // self.seq_len
        starts = np.arange(n) * self.seq_len
        total = 0.0
        for chunk in np.array_split(starts, max(1, math.ceil(n / 16))):
            inputs, targets = (t.to(device) for t in self._windows(self.val, chunk))
            logits = model(inputs).float()
            total += F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), reduction="sum"
            ).item()
        loss = total / (n * self.seq_len)
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / self.val_bytes_per_token}


@functools.cache
def _load(config_json: str, data_dir: str) -> TrialData:
    config = DataConfig.model_validate_json(config_json)
    docs = []
    for path in _sources(config):
        tokens = np.frombuffer(path.read_bytes(), np.uint8).astype(np.uint16)
        # Split by document, from a hash of its name: stable across machines and runs.
        digest = hashlib.sha256(path.name.encode()).digest()
        docs.append((int.from_bytes(digest[:8], "big") / 2**64, np.append(tokens, EOT)))
    if len(docs) < 2:
        raise DataError(f"{config.paths or 'the standard library'}: needs at least 2 documents")
    docs.sort(key=lambda doc: doc[0])
    # At least one validation document, however small the corpus.
    n_val = max(1, sum(u < config.val_fraction for u, _ in docs))
    val, train = [d for _, d in docs[:n_val]], [d for _, d in docs[n_val:]]
    val_bytes = sum(len(d) - 1 for d in val)
    train_tokens, val_tokens = np.concatenate(train), np.concatenate(val)
    return TrialData(train_tokens, val_tokens, val_bytes / len(val_tokens), config.seq_len)


def open_data(config: DataConfig, data_dir: Path) -> TrialData:
    return _load(config.model_dump_json(), str(data_dir))
