"""Which budgets share a trunk, and how the scheduler holds them until its state exists;
without Ray (tests/test_study.py trains them)."""

import textwrap
from pathlib import Path

import pytest

from runners.branch_queue import BranchQueue
from runners.branching import plan_branches, study_branches
from runners.checkpoint import branch_point
from runners.optim import Schedule
from runners.spec import SpecError, load_spec
from runners.train import TrainOptions, TrialOutcome

STEP_TOKENS = 4 * 64  # batch_size x seq_len
WSD = f"schedule: wsd, warmup_tokens: {2 * STEP_TOKENS}"


def load(tmp_path: Path, training: str, extra: str = ""):
    """Two patterns at budgets of 8, 16 and 32 steps, decaying over their last quarter."""
    path = tmp_path / "b.yaml"
    path.write_text(
        textwrap.dedent(f"""
        name: b
        model: {{d_model: 32, n_heads: 4, d_state: 8, ssm_headdim: 16, chunk_size: 16,
                 vocab_size: 264}}
        data: {{seq_len: 64}}
        training: {{batch_size: 4, decay_fraction: 0.25, {training}}}
        sweep:
          pattern: ["M*-", "*-"]
          tokens: [{8 * STEP_TOKENS}, {16 * STEP_TOKENS}, {32 * STEP_TOKENS}]
        """)
        + extra
    )
    return load_spec(path)


def by_steps(trials, pattern: str) -> dict:
    return {t.tokens // STEP_TOKENS: t for t in trials if t.model.pattern == pattern}


def test_budgets_of_one_wsd_model_branch_from_the_longest_at_their_decay(tmp_path):
    _, trials = load(tmp_path, WSD)
    branches = plan_branches(trials)
    for pattern in ("M*-", "*-"):
        mine = by_steps(trials, pattern)
        # Decay over the last quarter: 8 steps decay from step 6, 16 from step 12.
        for steps, decay in ((8, 6), (16, 12)):
            branch = branches[mine[steps].trial_id]
            assert (branch.trunk.trial_id, branch.step) == (mine[32].trial_id, decay)
    assert len(branches) == 4


def test_a_branch_has_its_trunks_learning_rates_until_its_decay(tmp_path):
    _, trials = load(tmp_path, WSD)
    mine = by_steps(trials, "M*-")
    short, trunk = Schedule.of(mine[8]), Schedule.of(mine[32])
    peak = mine[8].training.lr
    expected = [peak / 2, peak, peak, peak, peak, peak]  # 2 warmup steps, then constant
    assert [short.lr(s) for s in range(6)] == [trunk.lr(s) for s in range(6)] == expected
    assert short.lr(6) == peak and short.lr(7) < peak == trunk.lr(7)


@pytest.mark.parametrize(
    ("training", "branched"),
    [
        (f"schedule: cosine, warmup_tokens: {2 * STEP_TOKENS}", set()),  # lr depends on budget
        ("schedule: wsd", set()),  # a warmup_fraction of each budget: warmups differ
        (f"schedule: wsd, warmup_tokens: {7 * STEP_TOKENS}", {16}),  # 8 steps decay at step 6
    ],
)
def test_budgets_that_share_no_steps_train_alone(tmp_path, training, branched):
    _, trials = load(tmp_path, training)
    branches = plan_branches(trials)
    assert {t.tokens // STEP_TOKENS for t in trials if t.trial_id in branches} == branched


def test_a_spec_opts_out_and_the_warmup_fields_keep_trial_ids(tmp_path):
    spec, trials = load(tmp_path, WSD, "branch_budgets: false\n")
    assert study_branches(spec, trials) == {}
    # warmup_tokens at its default is no part of the dump, so of no trial's id.
    _, plain = load(tmp_path, "schedule: wsd")
    assert all("warmup_tokens" not in t.model_dump()["training"] for t in plain)


@pytest.mark.parametrize(
    ("training", "message"),
    [
        (
            f"warmup_tokens: {8 * STEP_TOKENS}",
            r"sweep point \(.*\): training\.warmup_tokens: 2048 is not below the budget",
        ),
        ("warmup_tokens: 512, warmup_fraction: 0.1", "warmup_tokens or warmup_fraction"),
    ],
)
def test_bad_warmups_are_one_line_errors(tmp_path, training, message):
    with pytest.raises(SpecError, match=message) as err:
        load(tmp_path, training)
    assert "\n" not in str(err.value)


@pytest.fixture
def queue(tmp_path):
    """A queue of one pattern's budgets, none run yet; what it says lands in ``said``."""
    _, trials = load(tmp_path, WSD)
    mine = by_steps(trials, "M*-")
    options = TrainOptions(workdir=tmp_path / "trials", tracking_uri="", data_dir=tmp_path)
    said: list[str] = []
    return mine, BranchQueue(list(mine.values()), plan_branches(trials), options, said.append), said


def test_branches_wait_for_their_trunks_state_then_start_from_it(queue):
    mine, q, said = queue
    (trunk, options), = q.ready()  # fmt: skip
    assert trunk is mine[32] and options.branch_points == (6, 12)
    assert len(q) == 2 and q.ready() == []
    point = branch_point(options.workdir, trunk.trial_id, 6)
    point.parent.mkdir(parents=True)
    point.touch()  # the trunk passed step 6
    (branch, options), = q.ready()  # fmt: skip
    assert branch is mine[8] and options.branch_from == (trunk.trial_id, 6)
    assert said == [f"{branch.trial_id} branches from {trunk.trial_id} at step 6"]
    q.retrying(trunk)
    assert said[-1] == f"{mine[16].trial_id} wait for trunk {trunk.trial_id}'s retry"


def test_a_branch_whose_trunk_ended_without_its_state_trains_from_step_0(queue):
    mine, q, said = queue
    (trunk, _), = q.ready()  # fmt: skip
    jobs = q.trunk_ended(trunk, TrialOutcome(trunk.trial_id, "crashed", ""))
    assert {t.trial_id for t, _ in jobs} == {mine[8].trial_id, mine[16].trial_id}
    assert all(o.branch_from is None and o.branch_points == () for _, o in jobs)
    assert len(q) == 0
    assert f"trains from step 0: trunk {trunk.trial_id} crashed without its state" in said[0]


def test_a_branch_of_a_trunk_finished_earlier_starts_at_once(tmp_path):
    _, trials = load(tmp_path, WSD)
    mine = by_steps(trials, "M*-")
    options = TrainOptions(workdir=tmp_path / "trials", tracking_uri="", data_dir=tmp_path)
    said: list[str] = []
    q = BranchQueue([mine[8], mine[16]], plan_branches(trials), options, said.append)
    point = branch_point(options.workdir, mine[32].trial_id, 12)
    point.parent.mkdir(parents=True)
    point.touch()  # the trunk's state for 16 steps is there, for 8 it is not (moved)
    jobs = {t.tokens // STEP_TOKENS: o for t, o in q.ready()}
    assert jobs[16].branch_from == (mine[32].trial_id, 12) and jobs[8].branch_from is None
    assert any("trains from step 0: trunk" in line and "finished without" in line for line in said)
