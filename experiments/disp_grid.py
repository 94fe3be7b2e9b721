"""DiSP against every cell of the attack grid: each trigger x target is attacked, then purified by
each defence, and every model is measured on the same test samples; one table.

    python experiments/disp_grid.py --clean-checkpoint runs/default/clean.pt --grid-dir runs/grid

For each trigger x target (default targets: insert, refusal) it runs attack.py into
GRID_DIR/<trigger>-<target>/ (the layout of experiments/attack_grid.py, whose attacks it reuses),
then, per defence, purify.py in GRID_DIR/<trigger>-<target>/<defence>/ (a directory holding links
to the attack's files, so the defences do not overwrite each other):
    paper      the paper's rule: mask the 30% most salient vision tokens of every sample
    adaptive   our rule: mask only outlier tokens per prompt type (README, "How DiSP works")
    suppress   the adaptive rule plus suppression of the words that do not depend on the question
               (disp.suppression)
    groups     purify.py's default: suppress plus the groups step (a minority group of images along one of
               the top 8 directions of the set's pooled vision tokens whose responses hold a word their
               content does not explain has its responses regenerated without it; disp.groups)
    spectral   the default plus the spectral step: the top 3 directions of the set's vision tokens tested
               for a minority group of images, and those that have one taken out (disp.spectral)
    (--defences names more: NAME=purify.py flags separated by spaces, e.g. "half=--rule ratio --mask-ratio 0.5")
Every backdoored and purified model is measured on the first --eval-samples test samples (ASR,
false-trigger rate, CIDEr-D, VQA accuracy); purify.py's files give the masked-token statistics and,
scored against the attack's manifest, how well "the response changed" and the samples that the
spectral or groups step flagged find the poisoned samples. Writes GRID_DIR/disp_grid.md and .json;
a step whose output exists is not rerun (delete a directory to redo it).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: find the disp package
import torch  # noqa: E402

from disp.backdoor import TARGETS, TRIGGERS, triggered_copy  # noqa: E402
from disp.config import AttackConfig  # noqa: E402
from disp.data.splits import load_split  # noqa: E402
from disp.evaluation import backdoor_metrics, detection  # noqa: E402
from disp.support import checkpoint  # noqa: E402
from disp.support.errors import DispError, friendly_errors  # noqa: E402
from disp.support.files import atomic_write, read_jsonl  # noqa: E402
from disp.support.runtime import autocast  # noqa: E402

DEFENCES = {"paper": ["--rule", "ratio", "--mask-ratio", "0.3", "--suppress", "0", "--groups", "0"],
            "adaptive": ["--suppress", "0", "--groups", "0"], "suppress": ["--suppress", "0.01", "--groups", "0"],
            "groups": ["--groups", "8"], "spectral": ["--spectral", "3"]}
SHARED = ("clean.pt", "backdoored.pt", "poisoned_train.pt", "poison_manifest.json", "attack_metrics.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clean-checkpoint", default="runs/default/clean.pt", help="the clean model to attack")
    p.add_argument("--grid-dir", default="runs/grid", help="one run directory per combination goes here")
    p.add_argument("--triggers", default=",".join(TRIGGERS), help="comma-separated (default: all four)")
    p.add_argument("--targets", default="insert,refusal", help="comma-separated (default: insert,refusal)")
    p.add_argument("--defences", default="paper,adaptive,suppress,groups",
                   help="comma-separated: paper, adaptive, suppress, spectral, groups, or NAME=PURIFY_FLAGS "
                        "(flags separated by spaces)")
    p.add_argument("--eval-samples", type=int, default=300, help="test samples measured per model (default 300)")
    p.add_argument("--attack-flags", default="", help="extra attack.py flags separated by spaces (e.g. \"--trainable all\")")
    return p.parse_args(argv)


def defence_flags(spec: str) -> tuple:
    """'paper' -> ('paper', [...]); 'half=--mask-ratio 0.5' -> ('half', ['--mask-ratio', '0.5'])."""
    if "=" in spec:
        name, flags = spec.split("=", 1)
        return name, flags.split()
    if spec not in DEFENCES:
        raise DispError(f"unknown defence {spec!r}; choose from {', '.join(DEFENCES)} or write NAME=FLAGS")
    return spec, DEFENCES[spec]


def run(cmd: list):
    print("+", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], check=True, cwd=ROOT)


def link_attack(cell: Path, target: Path):
    """target/ gets the attack's files as hard links (copies where links are impossible)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        dst = target / name
        if not dst.exists():
            try:
                os.link(cell / name, dst)
            except OSError:
                shutil.copy2(cell / name, dst)


def measure(path: Path, test, triggered, limit: int) -> dict:
    """ASR, false-trigger rate, CIDEr-D and VQA of backdoored.pt or purified.pt on test[:limit]."""
    model, tokenizer, _, state = checkpoint.load(path, stages=[path.stem])
    attack = AttackConfig.from_dict(state["extra"]["attack"])
    with autocast(torch.device("cpu"), attack.precision):
        m = backdoor_metrics(model, tokenizer, test, attack.backdoor, limit=limit, triggered=triggered)
    return {k: m[k] for k in ("asr", "false_trigger_rate", "cider", "vqa_accuracy") if k in m}


def main(argv=None):
    args = parse_args(argv)
    grid, clean_checkpoint = Path(args.grid_dir).resolve(), str(Path(args.clean_checkpoint).resolve())
    triggers, targets = args.triggers.split(","), args.targets.split(",")
    for t in triggers:
        if t not in TRIGGERS:
            raise DispError(f"unknown trigger {t!r}; choose from {', '.join(TRIGGERS)}")
    for t in targets:
        if t not in TARGETS:
            raise DispError(f"unknown target {t!r}; choose from {', '.join(TARGETS)}")
    defences = [defence_flags(d) for d in args.defences.split(",")]
    attack_extra = args.attack_flags.split()
    results_path = grid / "disp_grid.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    test = None
    for trigger in triggers:
        for target in targets:
            cell = grid / f"{trigger}-{target}"
            if not (cell / "attack_metrics.json").exists():
                run(["attack.py", "--run-dir", str(cell), "--clean-checkpoint", clean_checkpoint,
                     "--trigger", trigger, "--target", target, "--eval-samples", str(args.eval_samples), *attack_extra])
            key = f"{trigger}-{target}"
            row = results.setdefault(key, {})
            attack = json.loads((cell / "attack_metrics.json").read_text())
            row["clean"] = attack["clean"]
            if test is None:
                _, _, config, _ = checkpoint.load(cell / "backdoored.pt", stages=["backdoored"])
                test = load_split(config.data, config.model.image_size, "test")
            state = checkpoint.load_state(cell / "backdoored.pt", stages=["backdoored"])
            triggered = triggered_copy(test, AttackConfig.from_dict(state["extra"]["attack"]).backdoor)
            if "backdoored" not in row:
                row["backdoored"] = measure(cell / "backdoored.pt", test, triggered, args.eval_samples)
            for name, flags in defences:
                ddir = cell / name
                if not (ddir / "purified.pt").exists():
                    link_attack(cell, ddir)
                    run(["purify.py", "--run-dir", str(ddir), *flags])
                if name not in row:
                    report = json.loads((ddir / "purified_report.json").read_text())
                    found = detection(read_jsonl(ddir / "purified_train.jsonl"),
                                      set(json.loads((cell / "poison_manifest.json").read_text())["poisoned_indices"]))
                    row[name] = {**measure(ddir / "purified.pt", test, triggered, args.eval_samples),
                                 "masked_samples": report["n_masked_samples"] / report["n_samples"],
                                 "trigger_masked": found["trigger_sample_masked_rate"],
                                 "clean_masked": found["clean_sample_masked_rate"],
                                 "precision": found["precision"], "recall": found["recall"],
                                 "suppressed": " ".join(report.get("suppressed_words", [])),
                                 "flagged": found["n_flagged"], "flagged_precision": found["flagged_precision"],
                                 "flagged_recall": found["flagged_recall"]}
                atomic_write(results_path, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
                write_table(grid, results, quiet=True)  # the table so far, readable while the grid runs
    write_table(grid, results)


def write_table(grid: Path, results: dict, quiet: bool = False):
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = ["| trigger-target | model | ASR | false trigger | CIDEr-D | VQA | poisoned samples masked | "
             "clean samples masked | detection precision | recall | suppressed words | flagged (spectral, groups) | "
             "precision | recall |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for key, row in results.items():
        for name, m in row.items():
            lines.append(f"| {key} | {name} | {f(m.get('asr'))} | {f(m.get('false_trigger_rate'))} | {f(m.get('cider'))} | "
                         f"{f(m.get('vqa_accuracy'))} | {f(m.get('trigger_masked'))} | {f(m.get('clean_masked'))} | "
                         f"{f(m.get('precision'))} | {f(m.get('recall'))} | {m.get('suppressed', '')} | "
                         f"{m.get('flagged', '')} | {f(m.get('flagged_precision'))} | {f(m.get('flagged_recall'))} |")
    table = "\n".join(lines) + "\n"
    atomic_write(grid / "disp_grid.md", lambda tmp: Path(tmp).write_text(table))
    if not quiet:
        print(table)


if __name__ == "__main__":
    with friendly_errors():
        main()
