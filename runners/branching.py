"""Which trials of a study share a trunk: budgets of one model branched from the longest.

Under a warmup-stable-decay schedule with its warmup in absolute tokens, trials whose
resolved configs differ only in the token budget compute the same steps until their decay
begins: the same initial weights, the same (seed, step) batches, the same learning rates.
So a shorter budget can start from the longest one's state at the step its decay begins
and train only its decay (as the model ladders of OLMo and MiniCPM do). Under a cosine
schedule, or a warmup that is a fraction of each budget, every step's learning rate
depends on the budget, and no two budgets share a step.
"""

import json
from dataclasses import dataclass

from runners.config import TrialConfig
from runners.spec import StudySpec


@dataclass(frozen=True)
class Branch:
    """A trial that starts from ``trunk``'s state after ``step`` steps."""

    trunk: TrialConfig
    step: int

    @property
    def tokens(self) -> int:
        """The tokens it takes from its trunk rather than training them."""
        return self.step * self.trunk.tokens_per_step


def _shared_steps_key(trial: TrialConfig) -> str | None:
    """Equal for trials that differ only in budget and can share steps; None for a trial
    that can share none (not WSD, or a warmup that scales with the budget)."""
    t = trial.training
    if t.schedule != "wsd" or t.warmup_tokens is None:
        return None
    config = trial.model_dump(mode="json")
    config["training"].pop("tokens", None)
    config["training"].pop("tokens_per_param", None)
    return json.dumps(config, sort_keys=True)


def plan_branches(trials: list[TrialConfig]) -> dict[str, Branch]:
    """Trial id -> its branch, for every trial that can start from a longer budget's
    state: the longest of its group's budgets is the trunk; a budget whose decay would
    begin inside the warmup trains alone."""
    groups: dict[str, list[TrialConfig]] = {}
    for trial in trials:
        key = _shared_steps_key(trial)
        if key is not None:
            groups.setdefault(key, []).append(trial)
    branches = {}
    for group in groups.values():
        trunk = max(group, key=lambda t: (t.total_steps, t.trial_id))
        for trial in group:
            step = trial.decay_start
            if trial is not trunk and step >= max(1, trial.warmup_steps):
                branches[trial.trial_id] = Branch(trunk, step)
    return branches


def study_branches(spec: StudySpec, trials: list[TrialConfig]) -> dict[str, Branch]:
    """The study's branches, none where its spec opts out."""
    return plan_branches(trials) if spec.branch_budgets else {}
