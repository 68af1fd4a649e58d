"""A study's local multiple-choice task in the training loop: its examples prepared once
into the data folder, and task_<name>_bpb and task_<name>_acc at every evaluation equal to
a computation from the model's own forward pass."""

import json
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from data import DataError
from data.tasks import prepare_task
from data.tokenizer import ByteTokenizer
from runners.config import TrialConfig
from runners.spec import SpecError, load_spec
from runners.train import Trainer
from tests.test_train import options, tiny_trial

EXAMPLES = [
    {"question": "def f(x):\n    return", "choices": [" x", " import", "def"], "answer": 0},
    {"question": "import os\nimport", "choices": [" sys", " (", "]]"], "answer": 0},
    {"question": "for i in range(", "choices": ["10):", "class", " else"], "answer": 0},
    {"question": "class A:\n    def", "choices": [" __init__(self):", " ))"], "answer": 0},
    {"question": "x = [1, 2, 3", "choices": ["]", " def", ":"], "answer": 0},
    {"question": "if x is None:\n    ", "choices": ["return", "]]]", "1 +"], "answer": 1},
]


def write_task(path, examples=EXAMPLES) -> None:
    path.write_text("".join(json.dumps(ex) + "\n" for ex in examples))


def reference_scores(model, examples: list[dict]) -> tuple[float, float]:
    """bpb of the correct choices (mean over examples) and accuracy by lowest choice loss,
    from one plain forward pass per (question, choice), byte tokens after end-of-text."""
    eot, bpb, hits = ByteTokenizer.eot, [], []
    for ex in examples:
        losses = []
        for choice in ex["choices"]:
            tokens = [eot, *ex["question"].encode(), *choice.encode()]
            with torch.no_grad():
                logits = model(torch.tensor([tokens[:-1]]))[0]
            logprobs = torch.log_softmax(logits.double(), -1)
            n = len(choice.encode())
            scored = logprobs[-n:].gather(-1, torch.tensor(tokens[-n:])[:, None])
            losses.append(-scored.sum().item())
        bpb.append(losses[ex["answer"]] / len(ex["choices"][ex["answer"]].encode()) / math.log(2))
        hits.append(min(range(len(losses)), key=losses.__getitem__) == ex["answer"])
    return sum(bpb) / len(bpb), sum(hits) / len(hits)


def test_a_named_task_is_scored_at_every_evaluation(tmp_path, corpus_dir, data_cache):
    path = tmp_path / "code.jsonl"
    write_task(path)
    base = tiny_trial(corpus_dir, eval_every_tokens=64 * 8 * 6)
    raw = base.model_dump(mode="json")
    raw["data"]["tasks"] = {"code": str(path)}
    trial = TrialConfig.model_validate(raw)
    # A spec without tasks keeps its trial id: the empty field is not in the dump.
    assert "tasks" not in base.model_dump()["data"] and trial.trial_id != base.trial_id
    trainer = Trainer(trial, options(tmp_path, data_cache, checkpoint_every_s=math.inf))
    outcome = trainer.run()
    assert outcome.status == "finished", outcome.reason
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = {
        key: client.get_metric_history(outcome.run_id, f"task_code_{key}")
        for key in ("bpb", "acc", "chance")
    }
    assert [m.step for m in history["bpb"]] == [6, 12]
    bpb, accuracy = reference_scores(trainer.model.eval(), EXAMPLES)
    assert history["bpb"][-1].value == pytest.approx(bpb, rel=1e-5)
    assert history["acc"][-1].value == pytest.approx(accuracy)
    assert history["chance"][-1].value == pytest.approx((5 / 3 + 1 / 2) / 6)
    assert history["bpb"][0].value != history["bpb"][-1].value  # it moved as the model trained
    # Prepared once: one file in the data folder, found again rather than rebuilt.
    (prepared,) = (data_cache / "tasks").glob("code-*.npz")
    assert prepare_task("code", str(path), ByteTokenizer(), data_cache).pairs == 17
    assert list((data_cache / "tasks").glob("code-*.npz")) == [prepared]


def test_prepared_examples_are_keyed_by_content(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(EXAMPLES[:2]))  # a JSON list reads as JSONL does
    first = prepare_task("t", str(path), ByteTokenizer(), tmp_path)
    assert first.chance == pytest.approx(1 / 3)
    write_task(path, EXAMPLES[:3])
    second = prepare_task("t", str(path), ByteTokenizer(), tmp_path)
    assert (first.pairs, second.pairs) == (6, 9)
    assert len(list((tmp_path / "tasks").glob("t-*.npz"))) == 2
    write_task(path, [{"question": "q", "choices": ["a"], "answer": 0}])
    with pytest.raises(DataError, match=r"data.tasks.t: .*t.json: example 0 is not"):
        prepare_task("t", str(path), ByteTokenizer(), tmp_path)


def test_a_spec_naming_a_bad_task_file_is_refused(tmp_path):
    spec = tmp_path / "s.yaml"
    base = "name: s\nmodel: {preset: tiny}\ntraining: {tokens: 1M}\n"
    spec.write_text(base + f"data: {{tasks: {{quiz: {tmp_path / 'absent.jsonl'}}}}}\n")
    with pytest.raises(SpecError, match=r"s.yaml: data.tasks.quiz: .*absent.jsonl: no such file"):
        load_spec(spec)
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "choices": ["a", "b"]}\n')
    spec.write_text(base + f"data: {{tasks: {{quiz: {tmp_path / 'bad.jsonl'}}}}}\n")
    with pytest.raises(SpecError, match=r"bad.jsonl: example 0 is not"):
        load_spec(spec)
    write_task(tmp_path / "good.jsonl")
    spec.write_text(base + f"data: {{tasks: {{quiz: {tmp_path / 'good.jsonl'}}}}}\n")
    _, (trial,) = load_spec(spec)
    assert trial.data.tasks == {"quiz": str(tmp_path / "good.jsonl")}
