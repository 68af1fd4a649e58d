"""What branching budgets saves on a GPU: a WSD study's trials trained twice through the
study path, with its shorter budgets branched from each model's longest run, then with
every budget from step 0 (branch_budgets: false), as two studies of one results folder.
The wall-clock of each study (one GPU, trials packed on it as a study packs them) beside
`plan`'s FLOPs. Branched runs first, so it pays the workers' start-up; the data and Ray are
ready before either clock starts. --max-params keeps the trials up to that size, and
--only runs one of the two studies (a call each where a machine's time limit is short;
--results, a folder these studies have not run in, keeps their data between calls).

On one GPU that packs many small trials, a study's wall-clock is bounded below by its
longest trial, which branching does not shorten: the saving shows once the GPU is busy.

    python bench/branch_budgets.py studies/scaling_1gpu_wsd.yaml --max-params 0.5M [--out FILE]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from pydantic import TypeAdapter

from arch.accounting import param_counts
from arch.config import Count
from data import open_data
from runners.branching import plan_branches
from runners.cost import load_throughput, study_cost
from runners.driver import StudyOptions, start_ray
from runners.scheduler import run_study
from runners.spec import load_spec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--max-params", help="keep trials up to this many parameters, e.g. 1.5M")
    parser.add_argument("--only", choices=["branched", "alone"], help="run one study only")
    parser.add_argument("--results", help="results folder (default: a new temporary one)")
    parser.add_argument("--out")
    args = parser.parse_args()
    spec, trials = load_spec(args.spec)
    if args.max_params:
        top = TypeAdapter(Count).validate_python(args.max_params)  # as a spec reads counts
        trials = [t for t in trials if param_counts(t.model)["total"] <= top]
    cost = study_cost(trials, load_throughput(), plan_branches(trials))
    print(f"{len(trials)} trials; plan: {cost.describe()}", flush=True)
    results = Path(args.results or tempfile.mkdtemp(prefix="branch_budgets_"))
    options = StudyOptions(results_dir=results)
    start_ray(options)
    for data in {t.data.model_dump_json(): t.data for t in trials}.values():
        open_data(data, options.results_dir / "data")  # prepared before either clock
    result = {"spec": args.spec, "trials": len(trials), "plan_flops": cost.flops,
              "plan_spent_flops": cost.spent_flops}  # fmt: skip
    for name, branch in (("branched", True), ("alone", False)):
        if args.only not in (None, name):
            continue
        study = spec.model_copy(update={"name": f"{spec.name}_{name}", "branch_budgets": branch})
        start = time.perf_counter()
        rows = run_study(study, trials, options)
        result[f"{name}_s"] = time.perf_counter() - start
        result[f"{name}_finished"] = sum(r["status"] == "finished" for r in rows)
        result[f"{name}_spent_flops"] = sum(r["spent_flops"] for r in rows)
    if not args.only:
        result["time_ratio"] = result["branched_s"] / result["alone_s"]
    print(json.dumps(result, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
