"""A study's wall-clock on one GPU under two settings, side by side in one run: the same
trials trained as two studies of one results folder (trials packed on the GPU as a study
packs them), each timed, with the GPU's busy fraction (nvidia-smi, once a second) from the
first trial's start to the last one's end, as the MLflow store records them.

--compare branching (issue 26): the shorter WSD budgets branched from each model's longest
run, against every budget from step 0 (branch_budgets: false); `plan`'s FLOPs beside. On
one GPU packing many small trials, the wall-clock is bounded below by the longest trial,
which branching does not shorten: the saving shows once the GPU is busy.
--compare compile (issue 29): the study's defaults (compile: auto, CUDA graphs for small
trials) against the old default, eager (compile: false).

The first setting runs first, so it pays the Ray workers' start-up and, for compile, every
compilation; the data and Ray are ready before either clock starts. --max-params keeps the
trials up to that size; --only runs one setting (a call each where a machine's time limit
is short; --results, a folder these studies have not run in, keeps their data between
calls).

    python bench/study_wall.py studies/scaling_1gpu_wsd.yaml --compare branching --max-params 1M
    python bench/study_wall.py studies/scaling_1gpu.yaml --compare compile --max-params 0.6M
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from gpu_util import GpuSampler  # bench/, beside this script
from mlflow.tracking import MlflowClient
from pydantic import TypeAdapter

from arch.accounting import param_counts
from arch.config import Count
from data import open_data
from records.trial_run import trial_runs
from runners.branching import plan_branches
from runners.config import TrialConfig
from runners.cost import load_throughput, study_cost
from runners.driver import StudyOptions, start_ray
from runners.scheduler import run_study
from runners.spec import StudySpec, load_spec


def settings(compare: str, spec: StudySpec, trials: list[TrialConfig]) -> dict:
    """name -> (spec, trials) of each study to time, ours first."""
    if compare == "branching":
        return {name: (spec.model_copy(update={"branch_budgets": branch}), trials)
                for name, branch in (("branched", True), ("alone", False))}  # fmt: skip
    eager = [t.model_copy(update={"training": t.training.model_copy(update={"compile": False})})
             for t in trials]  # fmt: skip
    return {"defaults": (spec, trials), "eager": (spec, eager)}


def busy(sampler: GpuSampler, client: MlflowClient, study: str) -> dict:
    """The trials' span (first start to last end) and the GPU's mean utilisation in it."""
    runs = [r.run.info for r in trial_runs(client, study).values()]
    start, end = min(r.start_time for r in runs) / 1e3, max(r.end_time for r in runs) / 1e3
    inside = [
        s[0] for s, t in zip(sampler.samples, sampler.times, strict=True) if start <= t <= end
    ]
    return {"trials_span_s": end - start,
            "gpu_busy": sum(inside) / len(inside) / 100 if inside else None}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--compare", choices=["branching", "compile"], required=True)
    parser.add_argument("--max-params", help="keep trials up to this many parameters, e.g. 1.5M")
    parser.add_argument("--only", choices=["branched", "alone", "defaults", "eager"],
                        help="run one setting only (of --compare's two)")  # fmt: skip
    parser.add_argument("--results", help="results folder (default: a new temporary one)")
    parser.add_argument("--out")
    args = parser.parse_args()
    spec, trials = load_spec(args.spec)
    if args.max_params:
        top = TypeAdapter(Count).validate_python(args.max_params)  # as a spec reads counts
        trials = [t for t in trials if param_counts(t.model)["total"] <= top]
    timed = settings(args.compare, spec, trials)
    if args.only and args.only not in timed:
        parser.error(f"--only {args.only}: --compare {args.compare} has {' and '.join(timed)}")
    cost = study_cost(trials, load_throughput(), plan_branches(trials))
    print(f"{len(trials)} trials, {sum(t.tokens for t in trials):.4g} tokens; plan: "
          f"{cost.describe()}", flush=True)  # fmt: skip
    results = Path(args.results or tempfile.mkdtemp(prefix="study_wall_"))
    options = StudyOptions(results_dir=results)
    start_ray(options)
    for data in {t.data.model_dump_json(): t.data for t in trials}.values():
        open_data(data, options.results_dir / "data")  # prepared before either clock
    client = MlflowClient(options.uri())
    result = {"spec": args.spec, "compare": args.compare, "trials": len(trials),
              "tokens": sum(t.tokens for t in trials), "plan_flops": cost.flops,
              "plan_spent_flops": cost.spent_flops}  # fmt: skip
    for name, (study, study_trials) in timed.items():
        if args.only not in (None, name):
            continue
        study = study.model_copy(update={"name": f"{spec.name}_{name}"})
        with GpuSampler() as sampler:
            start = time.perf_counter()
            rows = run_study(study, study_trials, options)
            result[f"{name}_s"] = time.perf_counter() - start
        result[f"{name}_finished"] = sum(r["status"] == "finished" for r in rows)
        result[f"{name}_spent_flops"] = sum(r["spent_flops"] for r in rows)
        result |= {f"{name}_{k}": v for k, v in busy(sampler, client, study.name).items()}
        print(json.dumps({k: v for k, v in result.items() if k.startswith(name)}), flush=True)
    first, second = timed
    if f"{first}_s" in result and f"{second}_s" in result:
        result["time_ratio"] = result[f"{first}_s"] / result[f"{second}_s"]
    print(json.dumps(result, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
