"""What a study costs before it runs: training FLOPs, and GPU-hours from measured throughput.

The throughput table (configs/throughput/<gpu>.yaml) holds the tokens per second one GPU
trained, all its trials together, on trials of a given size run the way a study runs them
(packed onto a shared GPU when small, one per GPU when large). Tokens, not FLOPs: small
trials are bound by kernel launches, so their tokens/s varies far less with size than
their FLOP/s. Sizes between measured points are interpolated in log-log. Below the smallest, trials
keep its tokens/s (launch-bound, so an overestimate of their time); above the largest, its
FLOP/s (compute-bound: tokens/s falls as 1/N). The plan says how many trials lie outside.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import PositiveFloat

from arch.accounting import flops_per_token, param_counts
from arch.config import StrictModel
from runners.branching import Branch
from runners.config import TrialConfig

THROUGHPUT_DIR = Path(__file__).resolve().parent.parent / "configs" / "throughput"


class ThroughputPoint(StrictModel):
    params: PositiveFloat
    tokens_per_s: PositiveFloat  # of one whole GPU, all its trials together
    source: str  # where the figure was measured


class Throughput(StrictModel):
    gpu: str
    points: list[ThroughputPoint]

    def rate(self, params: int) -> tuple[float, bool]:
        """One GPU's training tokens/s at this size, and whether it lies outside the table."""
        pts = sorted(self.points, key=lambda p: p.params)
        low, high = pts[0], pts[-1]
        if params < low.params:
            return low.tokens_per_s, True  # launch-bound: tokens/s no higher than measured
        if params > high.params:
            return high.tokens_per_s * high.params / params, True  # compute-bound: FLOP/s held
        lo = max((p for p in pts if p.params <= params), key=lambda p: p.params)
        hi = min((p for p in pts if p.params >= params), key=lambda p: p.params)
        if lo is hi:
            return lo.tokens_per_s, False
        t = math.log(params / lo.params) / math.log(hi.params / lo.params)
        return lo.tokens_per_s ** (1 - t) * hi.tokens_per_s**t, False


def load_throughput(gpu: str = "h100") -> Throughput:
    path = THROUGHPUT_DIR / f"{gpu}.yaml"
    return Throughput.model_validate(yaml.safe_load(path.read_text()))


def train_flops(trial: TrialConfig) -> float:
    return flops_per_token(trial.model, trial.data.seq_len)["training"] * trial.tokens


@dataclass(frozen=True)
class StudyCost:
    flops: float  # every trial trained alone
    gpu_hours: float
    gpu: str
    outside: int  # trials whose size lies outside the measured table
    spent_flops: float  # with budgets branched from their trunks
    spent_gpu_hours: float

    def describe(self) -> str:
        note = (f"; {self.outside} trial(s) outside the measured sizes, extrapolated"
                if self.outside else "")  # fmt: skip
        flops, hours = f"training FLOPs {self.flops:.3g}", f"about {self.gpu_hours:.2g} GPU-hours"
        if self.spent_flops < self.flops:
            saved = 1 - self.spent_flops / self.flops
            flops += f", {self.spent_flops:.3g} with budgets branched ({saved:.0%} fewer)"
            hours += f" ({self.spent_gpu_hours:.2g} branched)"
        return f"{flops}; {hours} on one {self.gpu} from measured throughput{note}"


def study_cost(
    trials: list[TrialConfig], throughput: Throughput, branches: dict[str, Branch] | None = None
) -> StudyCost:
    """What the trials cost trained alone, and with ``branches`` (runners/branching.py)
    training only the steps their trunks do not."""
    flops = hours = spent_flops = spent_hours = 0.0
    outside = 0
    for trial in trials:
        rate, out = throughput.rate(param_counts(trial.model)["total"])
        branch = (branches or {}).get(trial.trial_id)
        own = 1 - min(1.0, branch.tokens / trial.tokens) if branch else 1.0
        flops += train_flops(trial)
        hours += trial.tokens / rate / 3600
        spent_flops += own * train_flops(trial)
        spent_hours += own * trial.tokens / rate / 3600
        outside += out
    return StudyCost(flops, hours, throughput.gpu, outside, spent_flops, spent_hours)
