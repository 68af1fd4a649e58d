import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from analysis.fit import check_law_points
from arch.accounting import param_counts
from data.tokenizer import train_bpe
from runners.spec import Resources, SpecError, load_spec

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
name: t
model: {preset: tiny}
training: {tokens: 1M}
sweep:
  attention_ratio: [0.0, 0.25, 0.5]
  mlp_ratio: [0.0, 0.25, 0.25]
  zip: [attention_ratio, mlp_ratio]
  seed: [0, 1]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runners.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_zip_and_cross(tmp_path):
    _, trials = load_spec(write(tmp_path, GOOD))
    points = [(t.model.attention_ratio, t.model.mlp_ratio, t.training.seed) for t in trials]
    assert points == [
        (0.0, 0.0, 0),
        (0.0, 0.0, 1),
        (0.25, 0.25, 0),
        (0.25, 0.25, 1),
        (0.5, 0.25, 0),
        (0.5, 0.25, 1),
    ]
    assert [t.model.pattern for t in trials[::2]] == ["MMMM", "MM*-", "M**-"]
    assert len({t.trial_id for t in trials}) == 6


def test_presets_and_overrides(tmp_path):
    spec = """
    name: t
    model: {preset: tiny, d_model: 96}
    training: {preset: smoke, lr: 1.0e-3}
    sweep: {size: [tiny, {d_model: 32, n_heads: 2}], tokens_per_param: [20]}
    """
    _, trials = load_spec(write(tmp_path, spec))
    assert [t.model.d_model for t in trials] == [64, 32]
    assert [t.model.n_heads for t in trials] == [4, 2]
    assert all(t.training.lr == 1e-3 and t.training.tokens is None for t in trials)
    assert trials[0].training.tokens_per_param == 20


def test_pattern_sweep_sets_depth(tmp_path):
    spec = "name: t\nmodel: {preset: tiny}\ntraining: {tokens: 2e6}\n"
    spec += "sweep: {pattern: ['*-*-*-', Mm]}\n"
    _, trials = load_spec(write(tmp_path, spec))
    assert [(t.model.pattern, t.model.n_layers) for t in trials] == [("*-*-*-", 6), ("Mm", 2)]
    assert trials[0].training.tokens == 2_000_000


def test_default_study_plans():
    result = cli("plan", "studies/smoke.yaml", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["study"] == "smoke"
    assert {t["pattern"] for t in plan["trials"]} == {"*-*-", "MMMM", "M*M-"}
    # Each mix has the sizes and budgets an L(N, D) fit needs, with its largest size to spare
    # for the backtest.
    for pattern in ("*-*-", "MMMM", "M*M-"):
        rows = [t for t in plan["trials"] if t["pattern"] == pattern]
        params, tokens = (np.array([t[k] for t in rows], float) for k in ("params", "tokens"))
        check_law_points(params, tokens)
        largest = params == params.max()
        check_law_points(params[~largest], tokens[~largest])


def test_trial_ids_stable_across_processes(tmp_path):
    path = write(tmp_path, GOOD)
    first, second = cli("plan", str(path), "--json"), cli("plan", str(path), "--json")
    ids = [t["id"] for t in json.loads(first.stdout)["trials"]]
    assert ids == [t["id"] for t in json.loads(second.stdout)["trials"]]
    _, trials = load_spec(path)
    assert ids == [t.trial_id for t in trials]


@pytest.mark.parametrize(
    "field, value",
    [
        ("model", {"d_state": 17}),
        ("model", {"rotary_fraction": 0.5}),
        ("data", {"seq_len": 129}),
        ("training", {"lr": 0.0031}),
        ("training", {"seed": 5}),
        ("training", {"tokens": 1000001}),
    ],
)
def test_any_change_changes_id(tmp_path, field, value):
    _, (base,) = load_spec(
        write(tmp_path, "name: t\nmodel: {preset: tiny}\ntraining: {tokens: 1M}\n")
    )
    changed = base.model_copy(update={field: getattr(base, field).model_copy(update=value)})
    changed = type(base).model_validate(changed.model_dump())
    assert changed.trial_id != base.trial_id


MALFORMED = [
    (
        "unknown key",
        "name: t\nmodel: {preset: tiny, d_modle: 3}\ntraining: {tokens: 1M}\n",
        "model.d_modle: unknown key (did you mean 'd_model'?)",
    ),
    ("unknown top-level key", GOOD + "sweeps: {}\n", "sweeps: unknown key (did you mean 'sweep'?)"),
    ("unknown sweep axis", GOOD.replace("seed:", "sed:"), "sweep.sed: unknown key"),
    (
        "wrong type",
        "name: t\nmodel: {preset: tiny, d_model: big}\ntraining: {tokens: 1M}\n",
        "model.d_model: 'big': Input should be a valid integer",
    ),
    (
        "ratio out of range",
        GOOD.replace("[0.0, 0.25, 0.5]", "[0.0, 0.25, 1.3]"),
        "sweep.attention_ratio[2]: 1.3 is not in [0, 1)",
    ),
    (
        "ratios sum past 1",
        "name: t\nmodel: {n_layers: 8, attention_ratio: 0.6, mlp_ratio: 0.5}\n"
        "training: {tokens: 1M}\n",
        "attention_ratio + mlp_ratio = 1.1 exceeds 1",
    ),
    ("empty sweep", GOOD.replace("seed: [0, 1]", "seed: []"), "sweep.seed: is empty"),
    (
        "bad pattern symbol",
        "name: t\nmodel: {pattern: M*X-}\ntraining: {tokens: 1M}\n",
        "model.pattern: pattern 'M*X-' has unknown symbol(s) 'X'",
    ),
    (
        "missing preset",
        "name: t\nmodel: {preset: huge}\ntraining: {tokens: 1M}\n",
        "model.preset: no preset 'huge' in configs/model/",
    ),
    ("YAML syntax error", "name: t\nmodel: {preset: tiny\n", "YAML syntax error"),
    (
        "zip lengths differ",
        GOOD.replace("[0.0, 0.25, 0.25]", "[0.0, 0.25]"),
        "sweep: zipped axes differ in length",
    ),
    (
        "no token budget",
        "name: t\nmodel: {preset: tiny}\n",
        "training: give exactly one of tokens and tokens_per_param",
    ),
    (
        "pattern length vs n_layers",
        "name: t\nmodel: {pattern: M*, n_layers: 4}\ntraining: {tokens: 1M}\n",
        "pattern 'M*' has 2 layers but n_layers is 4",
    ),
    (
        "heads do not divide",
        "name: t\nmodel: {pattern: '*-', d_model: 66}\ntraining: {tokens: 1M}\n",
        "d_model 66 is not divisible by n_heads 4",
    ),
    (
        "bad token count",
        "name: t\nmodel: {preset: tiny}\ntraining: {tokens: lots}\n",
        "training.tokens: 'lots' is not a count",
    ),
    ("duplicate trials", GOOD.replace("seed: [0, 1]", "seed: [1, 1]"), "gives the same trial as"),
    ("spec not a mapping", "- a\n- b\n", "must be a mapping"),
    ("missing name", "model: {preset: tiny}\ntraining: {tokens: 1M}\n", "name: Field required"),
    (
        "missing size preset",
        GOOD.replace("seed: [0, 1]", "size: [tiny, gigantic]"),
        "sweep.size[1]: no preset 'gigantic' in configs/size/",
    ),
    (
        "repeated key",
        "name: t\nmodel: {preset: tiny}\nname: u\ntraining: {tokens: 1M}\n",
        "line 3: key 'name' is given twice, on lines 1 and 3",
    ),
    (
        "repeated key in a flow mapping",
        "name: t\nmodel: {preset: tiny}\ntraining: {tokens: 1M,\n  tokens: 2M}\n",
        "line 4: key 'tokens' is given twice, on lines 3 and 4",
    ),
    (
        "vocabulary smaller than the byte tokenizer's",
        "name: t\nmodel: {preset: tiny, vocab_size: 100}\ntraining: {tokens: 1M}\n",
        "model.vocab_size: 100 is smaller than the 257 tokens of the byte tokenizer",
    ),
    (
        "vocabulary smaller than the BPE's",
        "name: t\nmodel: {preset: tiny}\ndata: {tokenizer: bpe, bpe_vocab_size: 1024}\n"
        "training: {tokens: 1M}\n",
        "model.vocab_size: 264 is smaller than the 1024 tokens of the BPE",
    ),
]


@pytest.mark.parametrize("case, text, expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_spec_one_line_exit_2(tmp_path, case, text, expected):
    assert_refused(write(tmp_path, text), expected)


def test_spec_that_is_not_utf8_one_line_exit_2(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(bytes([0x00, 0x01, 0x02, 0xFF]))
    assert_refused(path, "not UTF-8 text (byte 0xff at offset 3)")


def assert_refused(path: Path, expected: str) -> None:
    """plan refuses the spec in one line naming the file, exit 2, having written nothing."""
    before = sorted(p.name for p in path.parent.iterdir())
    result = cli("plan", str(path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in path.parent.iterdir()) == before  # wrote nothing


def test_vocabulary_must_hold_a_users_tokenizer(tmp_path):
    tokenizer = train_bpe(["a tokenizer of more than 264 tokens, from this text"] * 50, 300)
    tokenizer.tokenizer.save(str(tmp_path / "tokenizer.json"))
    spec = "name: t\nmodel: {preset: tiny, vocab_size: VOCAB}\ntraining: {tokens: 1M}\n"
    spec += f"data: {{tokenizer: {tmp_path / 'tokenizer.json'}}}\n"
    n = tokenizer.vocab_size
    assert n > 264
    with pytest.raises(SpecError, match=f"model.vocab_size: 264 is smaller than the {n} tokens of"):
        load_spec(write(tmp_path, spec.replace("VOCAB", "264")))
    _, (trial,) = load_spec(write(tmp_path, spec.replace("VOCAB", str(n))))
    assert trial.model.vocab_size == n


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "absent.yaml")


def test_model_axis_takes_presets():
    _, trials = load_spec(ROOT / "studies" / "paper_8b.yaml")
    counts = {t.model.pattern.count("*"): t.model.n_layers for t in trials}
    assert counts == {32: 64, 0: 56, 4: 56}
    assert all(t.tokens == 1_100_000_000_000 for t in trials)


def test_tokens_per_param_resolves_against_counted_params(tmp_path):
    spec = "name: t\nmodel: {preset: tiny}\ntraining: {tokens_per_param: 20}\n"
    _, (trial,) = load_spec(write(tmp_path, spec))
    assert trial.tokens == round(20 * param_counts(trial.model)["total"])


def test_shard_from_picks_trials_by_size(tmp_path):
    # GOOD's patterns MMMM, MM*- and M**- have 129.6K, 122.5K and 110.8K parameters.
    spec, trials = load_spec(write(tmp_path, GOOD + "resources: {workers: 2, shard_from: 120K}\n"))
    assert spec.resources.shard_from == 120_000
    assert [spec.resources.shards(t) for t in trials[::2]] == [True, True, False]
    assert not any(map(Resources().shards, trials))  # by default, data-parallel trials use DDP
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, GOOD + "resources: {shard_from: lots}\n"))
    assert "\n" not in str(err.value)
    assert "resources.shard_from: 'lots' is not a count" in str(err.value)


def test_each_mix_gets_the_papers_position_encoding_by_default(tmp_path):
    # Waleffe et al. 2024: the Transformer rotates half of each head's channels (RoPE); the
    # hybrid, like the pure SSMs, has no position embedding at all.
    spec = """
    name: t
    model: {preset: tiny}
    training: {tokens: 1M}
    sweep:
      pattern: ["*-*-", "*-", "MMMM", "mmmm", "M*M-", "m*m-"]
    """
    _, trials = load_spec(write(tmp_path, spec))
    assert [t.model.rotary_fraction for t in trials] == [0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    _, paper_trials = load_spec(ROOT / "studies" / "paper_8b.yaml")
    paper = {t.model.pattern.count("*"): t.model for t in paper_trials}
    assert paper[32].rotary_fraction == 0.5 and paper[4].rotary_fraction == 0.0
    # A spec that says otherwise is obeyed, and it is a different trial.
    _, (nope,) = load_spec(write(tmp_path, "name: t\nmodel: {preset: tiny, pattern: '*-*-', "
                                 "attention_ratio: 0, mlp_ratio: 0, rotary_fraction: 0.0}\n"
                                 "training: {tokens: 1M}\n"))  # fmt: skip
    assert nope.model.rotary_fraction == 0.0 and nope.trial_id != trials[0].trial_id


def test_lr_rule_sets_each_trials_lr_from_its_size(tmp_path):
    spec = GOOD.replace("sweep:", "lr_rule: {lr_at: 3.0e-3, params: 1M, exponent: -0.5}\nsweep:")
    _, trials = load_spec(write(tmp_path, spec))
    for trial in trials:
        n = param_counts(trial.model)["total"]
        assert trial.training.lr == pytest.approx(3e-3 * (n / 1e6) ** -0.5, rel=1e-3)
    # The default rule: nanoGPT's 6e-4 at 124M parameters, -1/3 in N.
    _, trials = load_spec(write(tmp_path, GOOD.replace("sweep:", "lr_rule: {}\nsweep:")))
    n = param_counts(trials[0].model)["total"]
    assert trials[0].training.lr == pytest.approx(6e-4 * (124e6 / n) ** (1 / 3), rel=1e-3)
    # A swept lr is the trial's lr, rule or not.
    _, trials = load_spec(write(tmp_path, spec.replace("seed: [0, 1]", "lr: [1.0e-2]")))
    assert {t.training.lr for t in trials} == {1e-2}


def test_compile_auto_keeps_the_ids_trials_had_before_it():
    """compile: auto became the default where false was, and a trial keeps the id it had
    (7de5e5be8681: scaling_1gpu's last trial, planned before auto), as how a step is
    compiled does not change what it computes: auto and false name one trial, true and
    graphs others."""
    _, trials = load_spec(ROOT / "studies/scaling_1gpu.yaml")
    last = trials[-1]
    assert last.training.compile == "auto" and last.trial_id == "7de5e5be8681"
    ids = {}
    for setting in ("auto", False, True, "graphs"):
        training = last.training.model_copy(update={"compile": setting})
        trial = type(last).model_validate({**last.model_dump(), "training": training})
        ids[setting] = trial.trial_id
    assert ids["auto"] == ids[False] and len(set(ids.values())) == 3
