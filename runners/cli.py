"""The ``hybridscale`` command line: plan, train, study, search, results, analyze, eval."""

import argparse
import json
import sys
from pathlib import Path

from arch.accounting import param_counts
from arch.allocation import layer_counts
from arch.config import position_encoding
from runners.branching import Branch, study_branches
from runners.config import TrialConfig
from runners.cost import load_throughput, study_cost, train_flops
from runners.spec import SpecError, load_spec, load_trial


def _row(trial: TrialConfig, branch: Branch | None) -> dict:
    model, training = trial.model, trial.training
    return {
        "id": trial.trial_id,
        "pattern": model.pattern,
        **layer_counts(model.pattern),
        "d_model": model.d_model,
        "n_layers": model.n_layers,
        "position": position_encoding(model.rotary_fraction),
        "params": param_counts(model)["total"],
        "tokens": trial.tokens,
        "train_flops": f"{train_flops(trial):.3g}",
        "lr": training.lr,
        "seed": training.seed,
        **({"branches_from": f"{branch.trunk.trial_id} @ {branch.step}"} if branch else {}),
    }


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(c for row in rows for c in row))
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def plan(args: argparse.Namespace) -> int:
    spec, trials = load_spec(args.spec)
    branches = study_branches(spec, trials)
    rows = [_row(t, branches.get(t.trial_id)) for t in trials]
    if args.json:
        configs = [t.model_dump(mode="json") for t in trials]
        out = [{**row, "config": c} for row, c in zip(rows, configs, strict=True)]
        print(json.dumps({"study": spec.name, "trials": out}, indent=2))
    else:
        print(f"study {spec.name}: {len(trials)} trial(s)")
        print_table(rows)
        print(study_cost(trials, load_throughput(), branches).describe())
    return 0


def _study_options(args: argparse.Namespace):
    from runners.driver import StudyOptions

    every_s = getattr(args, "checkpoint_every_s", None)  # 0 is a choice: every step
    profile_steps = getattr(args, "profile_steps", None)  # argparse gives [first, last]
    return StudyOptions(
        results_dir=Path(args.results), tracking_uri=args.tracking_uri,
        address=getattr(args, "address", None), max_retries=getattr(args, "retries", 2),
        device=getattr(args, "device", None), cpus=getattr(args, "cpus", None),
        profile_steps=tuple(profile_steps) if profile_steps else None,
        **({} if every_s is None else {"checkpoint_every_s": every_s}),
    )  # fmt: skip


def study(args: argparse.Namespace) -> int:
    spec, trials = load_spec(args.spec)  # every error surfaces before Ray starts
    from runners.scheduler import flops_line, run_study

    options = _study_options(args)
    rows = run_study(spec, trials, options)
    _print_results(rows)
    print(flops_line(rows))
    failed = [r for r in rows if r["status"] != "finished"]
    for row in failed:
        print(f"trial {row['trial']} {row['status']}: {row['reason']}", file=sys.stderr)
    print(f"\nBrowse the runs: make dashboard  (MLflow UI over {options.uri()})")
    return 1 if failed else 0


def search(args: argparse.Namespace) -> int:
    from runners.search_space import load_search

    spec = load_search(args.spec)  # every error surfaces before Ray starts
    from runners.search import SearchOptions, run_search, serve_dashboard, storage_url

    options = _study_options(args)
    settings = SearchOptions(storage=args.storage, trials=args.trials, parallel=args.parallel,
                             timeout_s=args.timeout)  # fmt: skip
    if args.dashboard:
        try:
            serve_dashboard(storage_url(spec, options, settings), args.port)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    report = run_search(spec, options, settings)
    hidden = {"mlflow_run_id", "reason"}
    title = "Pareto front" if len(spec.search.objectives) > 1 else "best trials"
    print(f"\n{title}:")
    print_table([{k: v for k, v in row.items() if k not in hidden} for row in report.best])
    for objective, importances in report.importances.items():
        ranked = ", ".join(f"{k} {v:.2f}" for k, v in importances.items())
        print(f"importance for {objective}: {ranked}")
    print(f"\nReport: {report.folder}  (trials, best, pareto .csv/.png, importances.json)")
    print("Browse the trials: make optuna-dashboard  (or make dashboard for MLflow)")
    return 0 if report.best else 1


def results(args: argparse.Namespace) -> int:
    spec, trials = load_spec(args.spec)
    from mlflow.tracking import MlflowClient

    from runners.scheduler import flops_line, summary_rows

    options = _study_options(args)
    client = MlflowClient(options.uri())
    if client.get_experiment_by_name(spec.name) is None:
        print(f"error: no runs of study {spec.name!r} in {options.uri()}", file=sys.stderr)
        return 2
    rows = summary_rows(client, spec.name, trials, {})
    _print_results(rows)
    print(flops_line(rows))
    return 0


def analyze(args: argparse.Namespace) -> int:
    spec, _ = load_spec(args.spec)
    from mlflow.tracking import MlflowClient

    from analysis.report import run
    from records.store import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri(Path(args.results))
    client = MlflowClient(uri)
    if client.get_experiment_by_name(spec.name) is None:
        print(f"error: no runs of study {spec.name!r} in {uri}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.results) / spec.name / "analysis"
    folder, parent = run(
        client, spec.name, out, resamples=args.resamples, seed=args.seed, holdout=args.holdout
    )
    print(f"Report: {folder / 'report.html'} and {folder / 'report.md'}")
    if parent:
        print(f"Logged to the study's parent run {parent}")
    else:
        print("No parent run of this study in the store: the report is not in MLflow")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from records.store import default_tracking_uri
    from runners.evaluate import from_run, from_spec, harness_model, log_task_metrics, run_tasks

    results = Path(args.results)
    client = MlflowClient(args.tracking_uri or default_tracking_uri(results))
    if Path(args.target).is_file():
        if not args.trial:
            print("error: name the spec's trial with --trial ID", file=sys.stderr)
            return 2
        trained = from_spec(args.target, args.trial, results)
    else:
        trained = from_run(client, args.target, results)
    device = args.device or ("cuda" if _cuda() else "cpu")
    model = harness_model(trained, results / "data", device, args.batch_size)
    metrics = run_tasks(model, args.tasks.split(","), args.include_path, args.limit,
                        args.num_fewshot)  # fmt: skip
    log_task_metrics(client, trained.run_id, metrics)
    print_table([{"task": task, **values} for task, values in metrics.items()])
    print(f"Logged to run {trained.run_id}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _print_results(rows: list[dict]) -> None:
    hidden = {"run_id", "reason"}
    print_table([{k: v for k, v in row.items() if k not in hidden} for row in rows])


def train(args: argparse.Namespace) -> int:
    trial = load_trial(args.config, args.set)
    from records.store import default_tracking_uri
    from runners.train import TrainOptions, train_trial

    results = Path(args.results)
    options = TrainOptions(
        workdir=results / "trials", data_dir=results / "data", device=args.device,
        cache_dir=results / "cache",
        tracking_uri=args.tracking_uri or default_tracking_uri(results),
    )  # fmt: skip
    outcome = train_trial(trial, options)
    print(json.dumps({"trial": trial.trial_id, "status": outcome.status,
                      "reason": outcome.reason, **outcome.metrics}, indent=2))  # fmt: skip
    return 0 if outcome.status == "finished" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybridscale", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("plan", help="print a study's trials without computing anything")
    p.add_argument("spec", help="a study spec, e.g. studies/smoke.yaml")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=plan)

    def storage(p: argparse.ArgumentParser) -> None:
        p.add_argument("--results", default="results", help="results folder (default results/)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in results/)")

    def ray_workers(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", help="an existing Ray cluster (default: $RAY_ADDRESS or local)")
        p.add_argument("--retries", type=int, default=2, help="retries of a crashed trial")
        p.add_argument("--device", help="force a torch device, e.g. cpu")
        p.add_argument("--cpus", type=int, help="CPUs of the local Ray (default: all)")
        p.add_argument("--checkpoint-every-s", type=float,
                       help="seconds between a trial's checkpoints (default 600)")  # fmt: skip
        p.add_argument("--profile-steps", type=int, nargs=2, metavar=("FIRST", "LAST"),
                       help="trace these steps of every trial with PyTorch's profiler "
                            "(profile/rank<R>.json in each trial's folder)")  # fmt: skip

    p = commands.add_parser("study", help="run a study's unfinished trials on Ray")
    p.add_argument("spec")
    ray_workers(p)
    storage(p)
    p.set_defaults(run=study)

    p = commands.add_parser("search", help="run (or continue) a spec's Optuna search on Ray")
    p.add_argument("spec", help="a study spec with a search section, e.g. studies/search.yaml")
    p.add_argument("--storage", help="Optuna storage: an RDB URL or a journal file "
                   "(default: results/<study>/optuna.journal)")  # fmt: skip
    p.add_argument("--trials", type=int, help="trials in the study (default: search.trials)")
    p.add_argument("--parallel", type=int, help="trials at once (default: search.parallel)")
    p.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    p.add_argument("--dashboard", action="store_true",
                   help="serve optuna-dashboard over the storage instead of searching")  # fmt: skip
    p.add_argument("--port", type=int, default=8080, help="the dashboard's port (default 8080)")
    ray_workers(p)
    storage(p)
    p.set_defaults(run=search)

    p = commands.add_parser("results", help="print a study's results table from MLflow")
    p.add_argument("spec")
    storage(p)
    p.set_defaults(run=results)

    p = commands.add_parser("analyze", help="fit scaling laws, extrapolate to 8B, write a report")
    p.add_argument("spec")
    p.add_argument("--resamples", type=int, default=200, help="bootstrap resamples (default 200)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", help="report folder (default results/<study>/analysis/)")
    p.add_argument("--holdout", type=float, metavar="C",
                   help="backtest: refit without trials above C FLOPs (e.g. 1e15) and predict "
                        "them (default: hold out each mix's largest model size)")  # fmt: skip
    storage(p)
    p.set_defaults(run=analyze)

    p = commands.add_parser("train", help="train one trial config")
    p.add_argument("config", help="YAML with model/data/training sections")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set training.lr=1e-3")  # fmt: skip
    p.add_argument("--device", help="force a torch device, e.g. cpu")
    storage(p)
    p.set_defaults(run=train)

    p = commands.add_parser("eval", help="evaluate a trial's checkpoint on lm-evaluation-harness "
                            "tasks, logging task/<task>/<metric> to its MLflow run")  # fmt: skip
    p.add_argument("target", help="a study spec (with --trial) or a trial's MLflow run id")
    p.add_argument("--trial", help="the spec's trial id (hybridscale plan lists them)")
    p.add_argument("--tasks", required=True, help="harness tasks, e.g. hellaswag,arc_easy")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of task YAMLs of your own (repeatable)")  # fmt: skip
    p.add_argument("--limit", type=float, help="examples per task (a fraction if below 1)")
    p.add_argument("--num-fewshot", type=int, metavar="K",
                   help="K examples before each question (the paper's MMLU: 5); "
                        "metrics logged as task/<task>_<K>shot/<metric>")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--device", help="a torch device (default: cuda if there is one)")
    storage(p)
    p.set_defaults(run=evaluate)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # mlflow is imported late, so its error class is too
        from mlflow.exceptions import MlflowException

        if not isinstance(err, MlflowException):
            raise
        # e.g. a store written by another MLflow version (a GPU machine's): one line
        print(f"error: the MLflow store: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
