"""Probe tasks of in-context recall and copying, generated on the fly from a seed.

Each probe writes an example as text segments, some marked as answers: what the model must
produce from the context. As a row, an example is end-of-text then its segments' tokens
(tokenized one by one, so answers are whole tokens); targets are the answer tokens only,
IGNORE elsewhere, so a probe row trains and scores recall, not guesses at random content.
An example holds as many items (pairs, entries, letters) as fit seq_len bytes: the task is
then the same under every byte-level tokenizer.
"""

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from data.corpus import DataError

IGNORE = -100  # F.cross_entropy's default ignore_index
LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))
CONSONANTS = np.array(list("bdfghjklmnprstvz"))
VOWELS = np.array(list("aeiou"))
TRAIN_STREAM, EVAL_STREAM = 1, 2  # seeds of training rows and of held-out evaluation


@dataclass
class Example:
    segments: list[tuple[str, bool]]  # (text, is an answer), in order

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)

    @property
    def answers(self) -> list[str]:
        return [text for text, answer in self.segments if answer]


def _letters(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(LETTERS, n))


def _words(rng: np.random.Generator, alphabets: list[np.ndarray], n: int) -> list[str]:
    """n words, letter i drawn from alphabets[i]."""
    letters = np.stack([rng.choice(alphabet, n) for alphabet in alphabets], axis=1)
    return ["".join(word) for word in letters]


def mqar(rng: np.random.Generator, n: int) -> Example:
    """Multi-query associative recall (Zoology): n distinct key:value pairs, then every
    key again in a new order, each to be completed with its value."""
    codes = rng.choice(26**4, size=n, replace=False)  # distinct four-letter keys
    keys = ["".join(word) for word in LETTERS[codes[:, None] // 26 ** np.arange(4) % 26]]
    values = [f"{v:02d}" for v in rng.integers(0, 100, size=n)]
    segments = [(" ".join(f"{k}:{v}" for k, v in zip(keys, values, strict=True)) + " |", False)]
    for i in rng.permutation(n):
        segments += [(f" {keys[i]}:", False), (values[i], True)]
    return Example(segments)


def phonebook(rng: np.random.Generator, n: int, queries: int = 1) -> Example:
    """Phonebook lookup (the paper's): n "Name Surname: 123-4567" lines, then one name
    again, to be completed with its number (" 123-4567"). As a training format, ``queries``
    names in a new order, one a line: more lookups per row; the first is asked as the
    paper's is."""
    while True:  # names are distinct (a clash among billions of names: draw again)
        first = _words(rng, [CONSONANTS, VOWELS] * 2, n)
        last = _words(rng, [CONSONANTS, VOWELS] * 3, n)
        names = [f"{a.title()} {b.title()}" for a, b in zip(first, last, strict=True)]
        if len(set(names)) == n:
            break
    numbers = [f"{a:03d}-{b:04d}" for a, b in rng.integers(0, [1000, 10000], size=(n, 2))]
    book = "".join(f"{name}: {number}\n" for name, number in zip(names, numbers, strict=True))
    # One query is drawn as it always was, so the held-out examples stay the same.
    asked = [int(rng.integers(n))] if queries == 1 else rng.permutation(n)[:queries]
    # The answer takes the space before the number, as the book's lines do: byte-level BPE
    # joins a space to the digits after it, so the book holds " 123" and an answer starting
    # after the space would be other tokens, which recall could not copy.
    segments = []
    for i, prefix in zip(asked, [book, *["\n"] * (len(asked) - 1)], strict=True):
        segments += [(f"{prefix}? {names[i]}:", False), (f" {numbers[i]}", True)]
    return Example(segments)


def copying(rng: np.random.Generator, n: int) -> Example:
    """Copying: n random letters, a bar, then the same letters again."""
    letters = _letters(rng, n)
    return Example([(letters + "|", False), (letters, True)])


def selective_copying(rng: np.random.Generator, n: int) -> Example:
    """Selective copying (Mamba's): n letters scattered among 3n dots, a bar, then the
    letters alone, in order."""
    region = np.full(4 * n, ".")
    letters = _letters(rng, n)
    region[np.sort(rng.choice(4 * n, size=n, replace=False))] = list(letters)
    return Example([("".join(region) + "|", False), (letters, True)])


PROBES: dict[str, Callable[[np.random.Generator, int], Example]] = {
    "mqar": mqar,
    "phonebook": phonebook,
    "copy": copying,
    "selective_copy": selective_copying,
}
# What trials train on: the phonebook asks every name of its book, as many lookups a row as
# it holds entries (with one, small models did not learn it: tests/test_phonebook_learning);
# the other probes train on the examples they are scored on.
TRAINING_FORMATS = PROBES | {"phonebook": lambda rng, n: phonebook(rng, n, queries=n)}


@functools.cache
def items_that_fit(name: str, budget: int, training: bool = False) -> int:
    """The most items whose example text (or training row's, ``training``) fits ``budget``
    bytes. Every field has a fixed width, so the length depends on the number of items
    alone, not on the seed."""
    generate = (TRAINING_FORMATS if training else PROBES)[name]

    def fits(n: int) -> bool:
        return len(generate(np.random.default_rng(0), n).text.encode()) <= budget

    if not fits(1):
        raise DataError(f"data.seq_len: {budget} is too short for the {name} probe")
    low = 1
    while fits(2 * low):
        low *= 2
    high = 2 * low  # fits(low), not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def example(
    name: str, seed: Sequence[int], seq_len: int, items: int | None = None, training: bool = False
) -> Example:
    """The probe's example for ``seed`` (its training format, ``training``): as many items
    as fit seq_len, or ``items``."""
    rng = np.random.default_rng(list(seed))
    generate = (TRAINING_FORMATS if training else PROBES)[name]
    return generate(rng, items or items_that_fit(name, seq_len, training))


def probe_row(example: Example, tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray, list]:
    """(inputs, targets, answer spans): targets hold the answers' tokens, IGNORE elsewhere;
    spans are the (start, end) target positions of each answer."""
    encoded = tokenizer.encode_batch([text for text, _ in example.segments])
    tokens = np.concatenate([[tokenizer.eot], *encoded])
    ends = np.cumsum([len(ids) for ids in encoded])  # in targets: one before the row's
    spans = [
        (int(end) - len(ids), int(end))
        for (_, answer), ids, end in zip(example.segments, encoded, ends, strict=True)
        if answer
    ]
    if len(tokens) > seq_len + 1:
        raise DataError(f"data.tokenizer: a probe example of {len(tokens)} tokens exceeds seq_len")
    row = np.full(seq_len + 1, tokenizer.eot, np.int64)
    row[: len(tokens)] = tokens
    targets = np.full(seq_len, IGNORE, np.int64)
    for start, end in spans:
        targets[start:end] = row[start + 1 : end + 1]
    return row[:-1], targets, spans


def probe_batch(
    name: str, seeds: list[Sequence[int]], tokenizer, seq_len: int, items: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Rows of one probe for ``seeds``: inputs and targets [rows, seq_len], and spans."""
    rows = [probe_row(example(name, seed, seq_len, items), tokenizer, seq_len) for seed in seeds]
    inputs, targets, spans = zip(*rows, strict=True)
    return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(targets)), list(spans)
