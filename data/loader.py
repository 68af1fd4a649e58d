"""Fixed-length token windows from memory-mapped shards.

Training draws windows uniformly over every start position of every shard (a window never
crosses a shard), from a generator the caller seeds with (seed, step): a resumed trial
sees exactly the batches it would have seen. Validation reads disjoint windows in order.
"""

import itertools
from collections.abc import Iterator

import numpy as np

from data.corpus import DataError


class TokenWindows:
    def __init__(self, shards: list[np.ndarray], seq_len: int, split: str = "train") -> None:
        # Windows hold seq_len + 1 tokens: inputs, and targets shifted by one.
        self.shards = [s for s in shards if len(s) > seq_len]
        if not self.shards:
            longest = max((len(s) for s in shards), default=0)
            raise DataError(
                f"data.seq_len: {seq_len} is longer than the {split} split allows ({longest - 1})"
            )
        self.seq_len = seq_len
        self.starts = np.array([len(s) - seq_len for s in self.shards])  # start positions
        self.ends = np.cumsum(self.starts)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` windows [n, seq_len + 1] (int64), uniform over every start of every shard."""
        index = rng.integers(0, self.ends[-1], size=n)
        shard = np.searchsorted(self.ends, index, side="right")
        offset = index - (self.ends[shard] - self.starts[shard])
        rows = np.empty((n, self.seq_len + 1), np.int64)
        for i, (s, o) in enumerate(zip(shard, offset, strict=True)):
            rows[i] = self.shards[s][o : o + self.seq_len + 1]
        return rows

    def sequential(self, max_tokens: int, rows_per_batch: int) -> Iterator[np.ndarray]:
        """Disjoint windows in order, at most ``max_tokens`` targets, in batches of rows."""
        length = self.seq_len
        windows = (
            (shard, s) for shard in self.shards for s in range(0, len(shard) - length, length)
        )
        windows = itertools.islice(windows, max(1, max_tokens // length))
        while chunk := list(itertools.islice(windows, rows_per_batch)):
            yield np.stack([shard[s : s + length + 1] for shard, s in chunk]).astype(np.int64)
