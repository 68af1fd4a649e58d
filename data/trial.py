"""A trial's data behind the small interface the trainer uses: the vocabulary size, a
training batch drawn from (seed, step) alone, and an evaluation."""

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.config import DataConfig
from data.corpus import resolve_sources
from data.evaluate import probe_scores, task_scores, validation_metrics
from data.loader import TokenWindows
from data.probes import TRAIN_STREAM, example, probe_row
from data.shards import prepare_shards, read_split
from data.tasks import PreparedTask, check_fits, prepare_task
from data.tokenizer import tokenizer_for


@dataclass
class TrialData:
    config: DataConfig
    tokenizer: object
    train: TokenWindows
    val: TokenWindows
    folder: Path  # the shard folder, with its manifest
    tasks: dict[str, PreparedTask]  # the local tasks, prepared
    _ahead: tuple | None = None  # ((seed, step, batch_size), the future drawing it)
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1), repr=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        return self.tokenizer.token_bytes()

    def train_batch(self, seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, ...]:
        """The batch ``draw`` gives; the next step's is drawn on a thread meanwhile, while the
        model trains on this one (the GIL is free while it waits on the GPU)."""
        key, ahead = (seed, step, batch_size), self._ahead
        batch = ahead[1].result() if ahead and ahead[0] == key else self.draw(*key)
        following = (seed, step + 1, batch_size)
        self._ahead = following, self._pool.submit(self.draw, *following)
        return batch

    def draw(self, seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, ...]:
        """(inputs, targets) [batch, seq_len]: corpus windows, and probe rows in the configured
        fractions, drawn from (seed, step) alone: a resumed run sees the same batches."""
        rng = np.random.default_rng([seed, step])
        rows = self.train.sample(rng, batch_size)
        inputs, targets = rows[:, :-1].copy(), rows[:, 1:].copy()
        if self.config.probes:
            names = list(self.config.probes)
            bounds = np.cumsum(list(self.config.probes.values()))
            for i, u in enumerate(rng.random(batch_size)):
                k = int(np.searchsorted(bounds, u, side="right"))
                if k < len(names):  # past the last bound: a corpus row
                    seq_len = self.config.seq_len
                    probe = example(names[k], (TRAIN_STREAM, seed, step, i), seq_len, training=True)
                    inputs[i], targets[i], _ = probe_row(probe, self.tokenizer, seq_len)
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def evaluate(self, model, device: torch.device) -> dict:
        """val_loss, val_bpb, probe_<name>_acc and probe_<name>_bpb for each configured
        probe, and task_<name>_acc, task_<name>_bpb and task_<name>_chance for each local
        task."""
        config = self.config
        metrics = validation_metrics(model, self.val, self.token_bytes, config.eval_tokens, device)
        for name in config.probes:
            scores = probe_scores(
                model,
                name,
                self.tokenizer,
                self.token_bytes,
                config.seq_len,
                device,
                config.probe_examples,
            )
            metrics |= {f"probe_{name}_{key}": value for key, value in scores.items()}
        for name, task in self.tasks.items():
            scores = task_scores(
                model, task, self.tokenizer.eot, self.token_bytes, config.seq_len, device
            )
            metrics |= {f"task_{name}_{key}": value for key, value in scores.items()}
        return metrics


def open_data(config: DataConfig, data_dir: Path) -> TrialData:
    """The trial's data; tokenizer, shards and tasks are prepared under data_dir the first
    time."""
    return _open(config.model_dump_json(), str(data_dir))


@functools.cache
def _open(config_json: str, data_dir: str) -> TrialData:
    config = DataConfig.model_validate_json(config_json)
    sources = resolve_sources(config.paths, config.corpus)
    tokenizer = tokenizer_for(config, sources, Path(data_dir))
    folder = prepare_shards(sources, tokenizer, config.text_field, config.val_fraction, data_dir)
    train = TokenWindows(read_split(folder, "train"), config.seq_len, "train")
    val = TokenWindows(read_split(folder, "val"), config.seq_len, "validation")
    tasks = {name: prepare_task(name, path, tokenizer, Path(data_dir))
             for name, path in config.tasks.items()}  # fmt: skip
    for name, task in tasks.items():
        check_fits(name, task, config.seq_len)
    return TrialData(config, tokenizer, train, val, folder, tasks)
