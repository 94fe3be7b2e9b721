"""One table over several evaluated run directories (each with the results.json of evaluate.py).

    python experiments/compare_runs.py --compare runs/default,runs/vit-attack   # -> runs/comparison.md
    python experiments/compare_runs.py --aggregate runs/px-seed0,runs/px-seed1,runs/px-seed2   # -> runs/aggregate.md

--compare: attack variants, the backdoored model and DiSP of each run. --aggregate: seeds, mean ± std
of every row that all runs have (clean, backdoored, the controls, DiSP). The table is written beside
the first run directory and printed.
"""

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: find the disp package
from disp.config import CONTROL_ROWS  # noqa: E402
from disp.support import files  # noqa: E402
from disp.support.errors import DispError, friendly_errors  # noqa: E402
from disp.support.report import COLUMNS, table  # noqa: E402

# results.json key -> row label, as in evaluate.py's results.md
LABELS = {**CONTROL_ROWS, "purified": "DiSP (purified)"}


def comparison_table(loaded: dict) -> str:
    """One row block per run directory (attack variants): backdoored vs DiSP."""
    rows = {}
    for run, res in loaded.items():
        label = f"{run} ({res['config']['trigger']}/{res['config']['target']}, trains {res['config']['attack_trainable']})"
        rows[f"{label}: backdoored"] = {k: res["backdoored"].get(k) for k, _ in COLUMNS}
        rows[f"{label}: DiSP"] = {k: res["purified"].get(k) for k, _ in COLUMNS}
    return "# Attack variants through the same DiSP pipeline\n\n" + table(rows)


def aggregate_table(loaded: dict) -> str:
    """mean ± std over run directories (seeds) of every row all of them have."""
    stages = ["clean", "backdoored"] + [k for k in LABELS if all(k in res for res in loaded.values())]
    rows = {}
    for stage in stages:
        row = {}
        for k, _ in COLUMNS:
            values = [res[stage][k] for res in loaded.values() if res[stage].get(k) is not None]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            row[k] = f"{statistics.mean(values):.3f} ± {std:.3f}" if values else None
        rows[LABELS.get(stage, stage)] = row
    return f"# Mean ± std over {len(loaded)} runs: {', '.join(loaded)}\n\n" + table(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--compare", help="comma-separated run dirs already evaluated: one table")
    mode.add_argument("--aggregate", help="comma-separated run dirs (seeds): mean ± std table")
    args = p.parse_args(argv)
    dirs = [Path(d) for d in (args.compare or args.aggregate).split(",")]
    loaded = {}
    for d in dirs:
        if not (d / "results.json").exists():
            raise DispError(f"{d / 'results.json'} does not exist; run evaluate.py --run-dir {d} first")
        loaded[str(d)] = files.read_json(d / "results.json", "results file", keys=["config", "clean", "backdoored",
                                                                                   "purified"])
    out = dirs[0].parent / ("comparison.md" if args.compare else "aggregate.md")
    text = comparison_table(loaded) if args.compare else aggregate_table(loaded)
    files.save_text(out, text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    with friendly_errors():
        main()
