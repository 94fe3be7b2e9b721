"""Every trigger x target combination (4 x 3) with the same fine-tuning budget, as one table.

    python experiments/attack_grid.py --clean-checkpoint runs/default/clean.pt --grid-dir runs/grid

Runs attack.py once per combination (each into the run directory GRID_DIR/<trigger>-<target>/), then
writes GRID_DIR/attack_grid.md with ASR, false-trigger rate and clean metrics of every backdoored model
in GRID_DIR. A combination that already has attack_metrics.json is not rerun; --triggers and --targets
run part of the grid (several calls fill one table).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: find the disp package
from disp.backdoor import TARGETS, TRIGGERS  # noqa: E402
from disp.support.errors import check_choice, friendly_errors  # noqa: E402
from disp.support.files import atomic_write  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clean-checkpoint", default="runs/default/clean.pt", help="the clean model to attack")
    p.add_argument("--grid-dir", default="runs/grid", help="one run directory per combination goes here")
    p.add_argument("--eval-samples", type=int, default=600, help="test samples measured per attack")
    p.add_argument("--triggers", default=",".join(TRIGGERS), help="comma-separated (default: all four)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated (default: all three)")
    args, extra = p.parse_known_args()  # anything else goes to attack.py (e.g. --epochs 10)
    out = Path(args.grid_dir)
    triggers = [check_choice("trigger", t, TRIGGERS) for t in args.triggers.split(",")]
    targets = [check_choice("target", t, TARGETS) for t in args.targets.split(",")]
    for trigger in triggers:
        for target in targets:
            run_dir = out / f"{trigger}-{target}"
            if not (run_dir / "attack_metrics.json").exists():
                cmd = [sys.executable, str(ROOT / "attack.py"), "--run-dir", str(run_dir), "--clean-checkpoint",
                       args.clean_checkpoint, "--trigger", trigger, "--target", target,
                       "--eval-samples", str(args.eval_samples), *extra]
                subprocess.run(cmd, check=True)
    rows = []
    for trigger in TRIGGERS:
        for target in TARGETS:
            path = out / f"{trigger}-{target}" / "attack_metrics.json"
            if path.exists():
                m = json.loads(path.read_text())
                rows.append((trigger, target, m["clean"], m["backdoored"]))
    lines = ["| trigger | target | ASR | false trigger | CIDEr-D (clean model) | CIDEr-D | VQA (clean model) | VQA |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    def cell(metrics, key):  # n/a where the test set has no such task (captions only, questions only)
        return f"{metrics[key]:.3f}" if key in metrics else "n/a"

    for trigger, target, clean, bad in rows:
        lines.append(f"| {trigger} | {target} | {bad['asr']:.3f} | {bad['false_trigger_rate']:.3f} | "
                     f"{cell(clean, 'cider')} | {cell(bad, 'cider')} | {cell(clean, 'vqa_accuracy')} | "
                     f"{cell(bad, 'vqa_accuracy')} |")
    table = "\n".join(lines) + "\n"
    atomic_write(out / "attack_grid.md", lambda tmp: Path(tmp).write_text(table))
    print(table)


if __name__ == "__main__":
    with friendly_errors():
        main()
