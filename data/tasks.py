"""Local multiple-choice tasks, scored at every evaluation (data/evaluate.py task_scores).

A task file is JSON (a list of examples) or JSONL (an example a line), each example
{"question": str, "choices": [str, ...], "answer": index of the correct choice}: the
format of the README's local lm-evaluation-harness tasks. Each choice is scored as the
question's continuation, verbatim (a choice meant to follow a space starts with one),
after an end-of-text token, as a document starts in training.

A task is tokenized once into ``<data_dir>/tasks/<name>-<key>.npz``, the key hashing the
file's content and the tokenizer's identity: every trial and evaluation reads the same
prepared arrays, and an edited file or another tokenizer gets new ones.
"""

import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.corpus import DataError, stable_hash
from data.probes import IGNORE

FORMAT = 1  # bump when the prepared layout changes


@dataclass(frozen=True)
class PreparedTask:
    """One (example, choice) pair per entry: its tokens (question then choice, concatenated
    in ``tokens`` from ``offsets``), how many of them are the choice, its example, and
    whether it is that example's correct choice."""

    tokens: np.ndarray
    offsets: np.ndarray  # pairs + 1 bounds into tokens
    continuation: np.ndarray  # the choice's token count, per pair
    example: np.ndarray  # the example of each pair, 0..examples-1
    correct: np.ndarray  # bool per pair

    @property
    def pairs(self) -> int:
        return len(self.continuation)

    @property
    def chance(self) -> float:
        """The accuracy of a uniform guess among each example's choices."""
        return float(np.mean(1 / np.bincount(self.example)))

    def by_example(self) -> list[np.ndarray]:
        """The pairs of each example, in order."""
        return np.split(np.arange(self.pairs), np.cumsum(np.bincount(self.example))[:-1])

    def choice_tokens(self, pair: int) -> np.ndarray:
        end = self.offsets[pair + 1]
        return self.tokens[end - self.continuation[pair] : end]

    def rows(self, pairs: range, eot: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) [len(pairs), width]: end-of-text, the question, the choice, the
        oldest question tokens dropped past seq_len; targets are the choice's tokens, IGNORE
        elsewhere. Rows are right-padded: every layer is causal, so padding changes nothing."""
        whole = [np.concatenate([[eot], self.tokens[self.offsets[p] : self.offsets[p + 1]]])
                 for p in pairs]  # fmt: skip
        whole = [w[-(seq_len + 1) :] for w in whole]
        width = max(len(w) for w in whole) - 1
        inputs = np.full((len(whole), width), eot, np.int64)
        targets = np.full((len(whole), width), IGNORE, np.int64)
        for row, (w, p) in enumerate(zip(whole, pairs, strict=True)):
            inputs[row, : len(w) - 1] = w[:-1]
            n = self.continuation[p]
            targets[row, len(w) - 1 - n : len(w) - 1] = w[-n:]
        return torch.from_numpy(inputs), torch.from_numpy(targets)


def task_file(name: str, path: str) -> Path:
    source = Path(path).expanduser()
    if not source.is_file():
        raise DataError(f"data.tasks.{name}: {source}: no such file")
    return source


def read_examples(name: str, path: str) -> list[dict]:
    """The task's examples, checked: a bad one is an error naming the file and example."""
    path = task_file(name, path)
    text = path.read_text()
    try:
        if text.lstrip().startswith("["):
            examples = json.loads(text)
        else:
            examples = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise DataError(f"data.tasks.{name}: {path}: not JSON or JSONL ({err})") from None
    for i, ex in enumerate(examples):
        choices, answer = ex.get("choices"), ex.get("answer")
        if not (isinstance(ex.get("question"), str) and isinstance(choices, list)
                and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
                and isinstance(answer, int) and 0 <= answer < len(choices)):  # fmt: skip
            raise DataError(
                f"data.tasks.{name}: {path}: example {i} is not {{question: text, choices: [2+ "
                "non-empty texts], answer: index of a choice}"
            )
    if not examples:
        raise DataError(f"data.tasks.{name}: {path}: no examples")
    return examples


def _tokenize(examples: list[dict], tokenizer) -> dict[str, np.ndarray]:
    questions = tokenizer.encode_batch([ex["question"] for ex in examples])
    choices = tokenizer.encode_batch([c for ex in examples for c in ex["choices"]])
    pieces, continuation, example, correct = [], [], [], []
    for i, ex in enumerate(examples):
        for j in range(len(ex["choices"])):
            choice = choices[len(example)]
            pieces.append(np.concatenate([questions[i], choice]))
            continuation.append(len(choice))
            example.append(i)
            correct.append(j == ex["answer"])
    return {
        "tokens": np.concatenate(pieces).astype(np.int64),
        "offsets": np.concatenate([[0], np.cumsum([len(p) for p in pieces])]),
        "continuation": np.array(continuation),
        "example": np.array(example),
        "correct": np.array(correct),
    }


def prepare_task(name: str, path: str, tokenizer, data_dir: Path) -> PreparedTask:
    """The task's prepared pairs, tokenized the first time and read back after."""
    content = hashlib.sha256(task_file(name, path).read_bytes()).hexdigest()
    key = stable_hash({"format": FORMAT, "content": content, "tokenizer": tokenizer.identity})
    prepared = Path(data_dir) / "tasks" / f"{name}-{key}.npz"
    if not prepared.exists():
        buffer = io.BytesIO()
        np.savez(buffer, **_tokenize(read_examples(name, path), tokenizer))
        prepared.parent.mkdir(parents=True, exist_ok=True)
        scratch = prepared.with_name(f".{prepared.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        scratch.write_bytes(buffer.getvalue())
        os.replace(scratch, prepared)  # whole or absent, whoever else prepares it at once
    with np.load(prepared) as arrays:
        return PreparedTask(**{k: arrays[k] for k in arrays.files})


def check_fits(name: str, task: PreparedTask, seq_len: int) -> None:
    """Every choice fits the model's window (a question may lose its oldest tokens)."""
    longest = int(task.continuation.max())
    if longest > seq_len:
        raise DataError(
            f"data.tasks.{name}: a choice of {longest} tokens is longer than seq_len {seq_len}"
        )
