"""A tiny trained checkpoint through lm-evaluation-harness: its loglikelihoods and greedy
generations against our model's own forward pass, and local tasks end to end through
``hybridscale eval`` into the trial's MLflow run."""

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from runners.cli import main
from runners.evaluate import from_run, from_spec, harness_model, run_tasks
from runners.train import TrainOptions, train_trial
from tests.test_train import tiny_trial

pytest.importorskip("lm_eval")

STUDY = "harness"
MC_QUESTIONS = ["def f(x):", "import os\nimport", "for i in range(", "class A:", "return x"]
CHOICES = [" return", " sys", " 10)", " pass", "\n"]
GEN_PROMPTS = ["def g(", "def h(", "import ", "class B(", "    return self."]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_dir, data_cache):
    results = tmp_path_factory.mktemp("results")
    uri = f"sqlite:///{results / 'mlflow.db'}"
    options = TrainOptions(workdir=results / STUDY / "trials", tracking_uri=uri,
                           data_dir=data_cache, experiment=STUDY)  # fmt: skip
    outcome = train_trial(tiny_trial(corpus_dir), options)
    assert outcome.status == "finished"
    trial = from_run(MlflowClient(uri), outcome.run_id, results)
    model = harness_model(trial, data_cache, "cpu", batch_size=3)
    return SimpleNamespace(results=results, uri=uri, run_id=outcome.run_id, trial=trial, lm=model)


def test_a_spec_and_trial_id_find_the_same_checkpoint_and_run(trained, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": STUDY, **trained.trial.trial.model_dump(mode="json")}))
    found = from_spec(spec, trained.trial.trial.trial_id, trained.results)
    assert (found.checkpoint, found.run_id) == (trained.trial.checkpoint, trained.run_id)


def reference_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log p(token t | tokens before it) for t >= 1, from one plain forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0, :-1]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]


def reference_greedy(model, tokens: list[int], max_new: int, eot: int) -> list[int]:
    """Argmax decoding by a full forward pass over the whole sequence at every step."""
    new = []
    for _ in range(max_new):
        with torch.no_grad():
            token = int(model(torch.tensor([tokens + new]))[0, -1].argmax())
        if token == eot:
            break
        new.append(token)
    return new


def encode(lm, text: str) -> list[int]:
    return lm.tokenizer.encode_batch([text])[0].tolist()


def test_loglikelihoods_match_the_models_forward_pass(trained):
    lm = trained.lm
    # the model's own greedy continuation of each question, and three others
    greedy_text = [lm.tokenizer.decode(reference_greedy(lm.model, encode(lm, q), 3, -1))
                   for q in MC_QUESTIONS]  # fmt: skip
    pairs = [(q, c) for q in MC_QUESTIONS for c in CHOICES[:3]] + [("", "import sys")]
    pairs += list(zip(MC_QUESTIONS, greedy_text, strict=True))
    got = lm.loglikelihood([SimpleNamespace(args=pair) for pair in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        before = encode(lm, context) if context else [lm.tokenizer.eot]
        tokens = before + encode(lm, continuation)
        scored = reference_logprobs(lm.model, tokens)[len(before) - 1 :]
        assert logprob == pytest.approx(scored.sum().item(), abs=1e-4)
        with torch.no_grad():
            argmax = lm.model(torch.tensor([tokens]))[0, len(before) - 1 : -1].argmax(-1)
        assert greedy == (argmax.tolist() == tokens[len(before) :])
    assert [greedy for _, greedy in got[-len(MC_QUESTIONS) :]] == [True] * len(MC_QUESTIONS)


def test_rolling_loglikelihood_sums_disjoint_windows(trained):
    lm, width = trained.lm, trained.lm.max_length
    text = "def f(x):\n    return x * 2\n" * 6
    tokens = encode(lm, text)
    assert len(tokens) > 2 * width  # three windows, the last one short
    (got,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    # Blocks of ``width`` tokens: the first predicted after the end-of-text token, each
    # later one after the tokens before it, in one window of width + 1 tokens.
    expected = reference_logprobs(lm.model, [lm.tokenizer.eot] + tokens[:width]).sum()
    for start in range(width, len(tokens), width):
        end = min(start + width, len(tokens))
        window = tokens[end - width - 1 : end]
        expected += reference_logprobs(lm.model, window)[-(end - start) :].sum()
    assert got == pytest.approx(expected.item(), abs=1e-3)


def test_greedy_generation_matches_full_forward_passes(trained):
    lm = trained.lm
    options = {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}
    got = lm.generate_until([SimpleNamespace(args=(p, options)) for p in GEN_PROMPTS])
    for prompt, text in zip(GEN_PROMPTS, got, strict=True):
        new = reference_greedy(lm.model, encode(lm, prompt), 12, lm.tokenizer.eot)
        assert text == lm.tokenizer.decode(new).split("\n")[0]


def write_tasks(folder, lm) -> tuple[float, float]:
    """A multiple-choice and a generation task of local JSONL files, each answered as the
    model would for its first three documents and otherwise not: the expected accuracy and
    exact match are 3/5."""
    mc, gen = [], []
    for i, question in enumerate(MC_QUESTIONS):
        scores = [lp for lp, _ in lm.loglikelihood(
            [SimpleNamespace(args=(question, c)) for c in CHOICES])]  # fmt: skip
        best = max(range(len(CHOICES)), key=scores.__getitem__)
        mc.append({"question": question, "choices": CHOICES,
                   "answer": best if i < 3 else (best + 1) % len(CHOICES)})  # fmt: skip
    for i, prompt in enumerate(GEN_PROMPTS):
        new = reference_greedy(lm.model, encode(lm, prompt), 12, lm.tokenizer.eot)
        text = lm.tokenizer.decode(new).split("\n")[0]
        gen.append({"prompt": prompt, "target": text if i < 3 else text + "~"})
    for name, rows in (("mc", mc), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "local_mc.yaml").write_text(
        f"task: local_mc\n{common}"
        f"dataset_kwargs: {{data_files: {{test: {folder / 'mc.jsonl'}}}}}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "local_gen.yaml").write_text(
        f"task: local_gen\n{common}"
        f"dataset_kwargs: {{data_files: {{test: {folder / 'gen.jsonl'}}}}}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "target_delimiter: ''\n"
        "generation_kwargs: {until: ['\\n'], max_gen_toks: 12, do_sample: false}\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return 3 / 5, 3 / 5


def test_cli_runs_local_tasks_and_logs_them_to_the_trials_run(trained, tmp_path):
    accuracy, exact_match = write_tasks(tmp_path, trained.lm)
    code = main(["eval", trained.run_id, "--tasks", "local_mc,local_gen",
                 "--include-path", str(tmp_path), "--device", "cpu", "--batch-size", "4",
                 "--results", str(trained.results), "--tracking-uri", trained.uri])  # fmt: skip
    assert code == 0
    metrics = MlflowClient(trained.uri).get_run(trained.run_id).data.metrics
    assert metrics["task/local_mc/acc"] == pytest.approx(accuracy)
    assert metrics["task/local_gen/exact_match"] == pytest.approx(exact_match)
    assert metrics["task/local_mc/acc_stderr"] > 0


def test_few_shot_contexts_hold_another_question_and_are_logged_apart(trained, tmp_path):
    write_tasks(tmp_path, trained.lm)
    lm, contexts = trained.lm, []
    answer = lm.loglikelihood

    def recording(requests):
        contexts.extend(r.args[0] for r in requests)
        return answer(requests)

    lm.loglikelihood = recording
    try:
        metrics = run_tasks(lm, ["local_mc"], [str(tmp_path)], num_fewshot=1)
    finally:
        del lm.loglikelihood
    assert set(metrics) == {"local_mc_1shot"}
    # One shot: each context is another document's question and answer, then its own.
    assert len(contexts) == len(MC_QUESTIONS) * len(CHOICES)
    for context in contexts:
        assert sum(context.count(q) for q in MC_QUESTIONS) == 2, context
        assert context.endswith(tuple(MC_QUESTIONS)), context
