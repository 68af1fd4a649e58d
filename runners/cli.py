"""The ``hybridscale`` command line."""

import argparse
import json
import sys

from arch.accounting import flops_per_token, param_counts
from arch.allocation import layer_counts
from runners.config import TrialConfig
from runners.spec import SpecError, load_spec


def _row(trial: TrialConfig) -> dict:
    model, training = trial.model, trial.training
    params = param_counts(model)["total"]
    flops = flops_per_token(model, trial.data.seq_len)["training"]
    return {
        "id": trial.trial_id,
        "pattern": model.pattern,
        **layer_counts(model.pattern),
        "d_model": model.d_model,
        "n_layers": model.n_layers,
        "params": params,
        "tokens": trial.tokens,
        "train_flops": f"{flops * trial.tokens:.3g}",
        "lr": training.lr,
        "seed": training.seed,
    }


def _print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def plan(args: argparse.Namespace) -> int:
    spec, trials = load_spec(args.spec)
    if args.json:
        out = [{**_row(t), "config": t.model_dump(mode="json")} for t in trials]
        print(json.dumps({"study": spec.name, "trials": out}, indent=2))
    else:
        print(f"study {spec.name}: {len(trials)} trial(s)")
        _print_table([_row(t) for t in trials])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybridscale", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("plan", help="print a study's trials without computing anything")
    p.add_argument("spec", help="a study spec, e.g. studies/smoke.yaml")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(run=plan)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
