"""Probe tasks: every generator's answers against an independent solver reading its text,
the row format, and the accuracy metric against an oracle, a near miss and chance."""

import math
import re
from typing import get_args

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from data import open_data
from data.config import DataConfig, ProbeName
from data.evaluate import probe_scores
from data.probes import IGNORE, PROBES, example, items_that_fit, probe_row
from data.tokenizer import ByteTokenizer, train_bpe
from runners.config import TrialConfig
from runners.train import TrainOptions, train_trial

SEEDS = [(2, i) for i in range(40)]


def solve_mqar(text: str) -> list[str]:
    context, queries = text.split(" |")
    pairs = re.findall(r"([a-z]{4}):(\d\d)", context)
    table = dict(pairs)
    assert len(table) == len(pairs)  # keys are distinct
    asked = re.findall(r" ([a-z]{4}):", queries)
    assert sorted(asked) == sorted(table)  # every key is asked once
    return [table[key] for key in asked]


def solve_phonebook(text: str) -> list[str]:
    lines = text.split("\n")
    entries = [line for line in lines if not line.startswith("? ")]
    queries = lines[len(entries) :]  # every query comes after the whole book
    book = dict(
        re.fullmatch(r"([A-Z][a-z]+ [A-Z][a-z]+):( \d{3}-\d{4})", line).groups() for line in entries
    )
    assert len(book) == len(entries)  # names are distinct
    return [book[re.fullmatch(r"\? (.+): .*", query)[1]] for query in queries]


def solve_copy(text: str) -> list[str]:
    return [text.split("|")[0]]


def solve_selective_copy(text: str) -> list[str]:
    region = text.split("|")[0]
    assert set(region) - set("abcdefghijklmnopqrstuvwxyz") == {"."}
    return [region.replace(".", "")]


SOLVERS = {
    "mqar": solve_mqar,
    "phonebook": solve_phonebook,
    "copy": solve_copy,
    "selective_copy": solve_selective_copy,
}


@pytest.mark.parametrize("name", PROBES)
@pytest.mark.parametrize("seq_len", [64, 256])
def test_generators_agree_with_independent_solvers(name, seq_len):
    n = items_that_fit(name, seq_len)
    for seed in SEEDS:
        probe = example(name, seed, seq_len)
        text = probe.text  # the text with its answers in place: the solver reads the context
        answers = SOLVERS[name](text)
        assert probe.answers == answers
        assert len(text.encode()) <= seq_len
    # As many items as fit: one more would not.
    assert len(PROBES[name](np.random.default_rng(0), n + 1).text.encode()) > seq_len
    assert example(name, SEEDS[0], seq_len).text == example(name, SEEDS[0], seq_len).text
    assert example(name, SEEDS[0], seq_len).text != example(name, SEEDS[1], seq_len).text


def test_phonebook_training_format_asks_every_name_once():
    for seed in SEEDS:
        probe = PROBES["phonebook"](np.random.default_rng(seed), 6, queries=6)
        assert probe.answers == solve_phonebook(probe.text)
        asked = re.findall(r"^\? (.+):", probe.text, re.MULTILINE)
        book = re.findall(r"^([A-Z][a-z]+ [A-Z][a-z]+):", probe.text, re.MULTILINE)
        assert sorted(asked) == sorted(book) and len(asked) == 6


def test_phonebook_list_length_is_chosen():
    for items in (1, 5, 20):
        text = example("phonebook", (2, 0), 512, items=items).text
        assert text.count("\n") == items and solve_phonebook(text)


@pytest.fixture(scope="module")
def bpe(corpus_dir):
    return train_bpe((p.read_text() for p in sorted(corpus_dir.glob("*.py"))), 320)


@pytest.fixture(scope="module")
def probes_bpe():
    """A BPE trained on the probes' own text: its vocabulary merges spaces with digits."""
    texts = [example(probe, (3, i), 256).text for probe in PROBES for i in range(300)]
    return train_bpe(texts, 600)


@pytest.mark.parametrize("name", ["mqar", "phonebook", "copy"])
def test_answers_are_the_tokens_the_context_holds(name, probes_bpe):
    """Recall copies tokens, so an answer must be tokenized as its text is in the context.
    The phonebook's was not under BPE: its answer began after ": ", where the book holds
    " 123" as one token. (Selective copying's answer is not in the context verbatim.)"""
    for seed in SEEDS[:20]:
        probe = example(name, seed, 256)
        context = probes_bpe.encode_batch([probe.segments[0][0]])[0].tolist()
        for answer in probes_bpe.encode_batch(probe.answers):
            k = len(answer)
            assert any(context[i : i + k] == answer.tolist() for i in range(len(context)))


@pytest.mark.parametrize("name", PROBES)
def test_rows_mark_exactly_the_answer_tokens(name, bpe):
    for tokenizer in (ByteTokenizer(), bpe):
        probe = example(name, (2, 5), 128)
        inputs, targets, spans = probe_row(probe, tokenizer, 128)
        assert inputs.shape == targets.shape == (128,)
        assert inputs[0] == tokenizer.eot
        marked = np.flatnonzero(targets != IGNORE)
        assert marked.tolist() == [i for start, end in spans for i in range(start, end)]
        assert [tokenizer.decode(targets[start:end]) for start, end in spans] == probe.answers
        # Targets are the next inputs: the answer is not visible where it is predicted.
        assert np.array_equal(targets[marked[:-1]], inputs[marked[:-1] + 1])


class CopyOracle(torch.nn.Module):
    """Copies perfectly: after the bar, predicts the token that many places back."""

    def __init__(self, shift: int = 1, vocab_size: int = 257) -> None:
        super().__init__()
        self.shift, self.vocab_size = shift, vocab_size

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        logits = torch.randn(
            *inputs.shape, self.vocab_size, generator=torch.Generator().manual_seed(0)
        )
        for row, tokens in enumerate(inputs):
            bars = (tokens == ord("|")).nonzero()
            if not len(bars):
                continue  # not a copying row
            bar = int(bars[0])
            for p in range(bar, inputs.shape[1]):
                logits[row, p, tokens[p - bar + self.shift]] = 100.0
        return logits


class RandomModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.randn(*inputs.shape, 257, generator=self.generator)


def test_copy_accuracy_and_answer_loss_of_an_oracle_a_near_miss_and_chance():
    cpu, byte = torch.device("cpu"), ByteTokenizer()

    def scores(model, **kwargs) -> dict:
        return probe_scores(model, "copy", byte, byte.token_bytes(), 64, cpu, **kwargs)

    oracle, near_miss, chance = (scores(m, examples=24) for m in (CopyOracle(), CopyOracle(0),
                                                                  RandomModel()))  # fmt: skip
    assert (oracle["acc"], near_miss["acc"], chance["acc"]) == (1.0, 0.0, 0.0)
    # Chance is (1/257)^31 for a 31-letter copy; per token 1/257.
    short = scores(RandomModel(), examples=2000, items=1)
    assert short["acc"] == pytest.approx(1 / 257, abs=0.006)
    # Answer loss: ~0 for the oracle (logit 100 on the answer); for standard normal logits
    # over 257 tokens, E[logsumexp] - E[z] = ln 257 + 1/2 nats per one-byte token.
    assert oracle["bpb"] < 1e-6 and near_miss["bpb"] > 50
    assert chance["bpb"] == pytest.approx((math.log(257) + 0.5) / math.log(2), rel=0.02)


def test_probes_mix_into_training_and_are_evaluated(corpus_dir, data_cache):
    config = DataConfig(
        paths=[str(corpus_dir / "*.py")],
        seq_len=64,
        probes={"copy": 0.25, "mqar": 0.25, "phonebook": 0.0},
    )
    data = open_data(config, data_cache)
    rows = probe_rows = 0
    for step in range(40):
        inputs, targets = data.train_batch(seed=0, step=step, batch_size=8)
        is_probe = (targets == IGNORE).any(1)
        rows += 8
        probe_rows += int(is_probe.sum())
        for row in inputs[is_probe]:
            text = ByteTokenizer().decode(row.tolist())
            assert "|" in text and "?" not in text  # copy or mqar, never phonebook
    assert 0.4 < probe_rows / rows < 0.6
    again = data.train_batch(seed=0, step=39, batch_size=8)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)
    metrics = data.evaluate(CopyOracle(), torch.device("cpu"))
    assert set(metrics) == {
        "val_loss",
        "val_bpb",
        *(f"probe_{name}_{score}" for name in ("copy", "mqar", "phonebook")
          for score in ("acc", "bpb")),
    }  # fmt: skip
    assert metrics["probe_copy_acc"] == 1.0 and metrics["probe_mqar_acc"] < 0.1


def test_trials_train_phonebook_rows_that_ask_every_name(corpus_dir, data_cache):
    config = DataConfig(paths=[str(corpus_dir / "*.py")], seq_len=160, probes={"phonebook": 0.99})
    inputs, targets = open_data(config, data_cache).train_batch(seed=0, step=0, batch_size=8)
    tokenizer = ByteTokenizer()
    probes = (targets == IGNORE).any(1)  # a corpus row, 1% of them, has no IGNORE
    assert probes.sum() >= 6
    for row, target in zip(inputs[probes].tolist(), targets[probes].tolist(), strict=True):
        # the row's tokens: the inputs, then the one the last position predicts
        tokens = [t for t in row + [target[-1]] if t not in (tokenizer.eot, IGNORE)]
        answers = solve_phonebook(tokenizer.decode(tokens))
        assert len(answers) == items_that_fit("phonebook", 160, training=True) > 1
        answered = [t for t in target if t != IGNORE]  # the numbers, in the order asked
        assert tokenizer.decode(answered) == "".join(answers)


def test_a_trial_trains_on_probes_and_logs_their_accuracy(tmp_path, corpus_dir, data_cache):
    trial = TrialConfig.model_validate({
        "model": {"pattern": "M*", "d_model": 32, "n_heads": 4, "d_state": 8, "ssm_headdim": 16,
                  "chunk_size": 16, "vocab_size": 264},
        "data": {"paths": [str(corpus_dir / "*.py")], "seq_len": 64,
                 "probes": {"copy": 0.5, "phonebook": 0.0}, "probe_examples": 16},
        "training": {"tokens": 64 * 8 * 6, "batch_size": 8},
    })  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = TrainOptions(workdir=tmp_path / "trials", data_dir=data_cache, tracking_uri=uri)
    outcome = train_trial(trial, options)
    assert outcome.status == "finished", outcome.reason
    metrics = MlflowClient(uri).get_run(outcome.run_id).data.metrics
    assert 0.0 <= metrics["probe_copy_acc"] <= 1.0 and "probe_phonebook_acc" in metrics
    assert metrics["probe_copy_bpb"] > 0 and "probe_phonebook_bpb" in metrics
    assert math.isfinite(metrics["train_loss"]) and metrics["val_bpb"] > 0


def test_the_config_knows_every_probe():
    assert set(get_args(ProbeName)) == set(PROBES)
