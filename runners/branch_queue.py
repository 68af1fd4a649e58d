"""A study's branched budgets between the plan and the driver: each waits until its trunk
has left the state it starts from, then starts from it; if the trunk ends for good without
it (crashed past its retries, or the file was moved), the budget trains from step 0. Each
says which it did. The trunks themselves are told where to leave their states."""

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from runners.branching import Branch
from runners.checkpoint import branch_point, checkpoint_path
from runners.config import TrialConfig
from runners.train import TrainOptions, TrialOutcome

Job = tuple[TrialConfig, TrainOptions]


class BranchQueue:
    def __init__(
        self,
        todo: list[TrialConfig],
        branches: dict[str, Branch],
        train: TrainOptions,
        say: Callable[[str], None],
    ) -> None:
        self.train, self.say = train, say
        self.todo = {t.trial_id for t in todo}
        self.branches = {t.trial_id: branches[t.trial_id] for t in todo if t.trial_id in branches}
        # Branches whose trunk is yet to reach their step; the rest start at once.
        self.held = [t for t in todo if t.trial_id in self.branches]
        points: dict[str, set[int]] = {}
        for branch in self.branches.values():
            points.setdefault(branch.trunk.trial_id, set()).add(branch.step)
        self.start = [
            (t, replace(train, branch_points=tuple(sorted(points.get(t.trial_id, ())))))
            for t in todo
            if t.trial_id not in self.branches
        ]

    def __len__(self) -> int:
        return len(self.held)

    def ready(self) -> list[Job]:
        """The jobs to start now: the trunks and trials alone at first, then each branch
        once its trunk's state exists, or at once if its trunk finished before this run."""
        jobs, self.start = self.start, []
        for trial in list(self.held):
            trunk = self.branches[trial.trial_id].trunk.trial_id
            if self._state_exists(trial):
                jobs.append(self._branched(trial))
            elif trunk not in self.todo:
                jobs.append(self._alone(trial, "finished"))
            else:
                continue
            self.held.remove(trial)
        return jobs

    def trunk_ended(self, trunk: TrialConfig, outcome: TrialOutcome) -> list[Job]:
        """The held branches of a trunk that ended for good without their state."""
        mine = self._waiting_for(trunk)
        for trial in mine:
            self.held.remove(trial)
        return [self._alone(trial, outcome.status) for trial in mine]

    def retrying(self, trunk: TrialConfig) -> None:
        """A trunk is retried: its held branches wait for it."""
        mine = self._waiting_for(trunk)
        if mine:
            ids = ", ".join(t.trial_id for t in mine)
            self.say(f"{ids} wait for trunk {trunk.trial_id}'s retry")

    def _waiting_for(self, trunk: TrialConfig) -> list[TrialConfig]:
        return [t for t in self.held if self.branches[t.trial_id].trunk.trial_id == trunk.trial_id]

    def _point(self, trial: TrialConfig) -> Path:
        branch = self.branches[trial.trial_id]
        return branch_point(self.train.workdir, branch.trunk.trial_id, branch.step)

    def _state_exists(self, trial: TrialConfig) -> bool:
        """Its trunk's state, or a checkpoint of its own from an earlier run."""
        own = checkpoint_path(self.train.workdir, trial.trial_id)
        return self._point(trial).exists() or own.exists()

    def _branched(self, trial: TrialConfig) -> Job:
        branch = self.branches[trial.trial_id]
        self.say(f"{trial.trial_id} branches from {branch.trunk.trial_id} at step {branch.step}")
        return trial, replace(self.train, branch_from=(branch.trunk.trial_id, branch.step))

    def _alone(self, trial: TrialConfig, trunk_status: str) -> Job:
        branch = self.branches[trial.trial_id]
        self.say(
            f"{trial.trial_id} trains from step 0: trunk {branch.trunk.trial_id} {trunk_status} "
            f"without its state at step {branch.step} ({self._point(trial)})"
        )
        return trial, self.train
