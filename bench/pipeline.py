"""Wall time of each pipeline stage: the python commands of run.sh, run one after another.

    flock /tmp/torch.lock python bench/pipeline.py --preset tiny --run-dir /tmp/bench-tiny   # seconds
    flock /tmp/torch.lock python bench/pipeline.py --preset cpu --run-dir runs/bench-cpu      # ~20 min

The commands are read from run.sh (its `python ...` lines, with $RUN, $PRESET, $DATA, $DATA_ROOT,
$VISION_FROM and $SEED filled in), so this measures exactly what `bash run.sh` runs. Each stage's
output passes through; the table and bench/results/pipeline.json (rewritten after every stage, so a
stopped run keeps what it measured) come at the end. The run directory must be new or empty
(train.py would start over in it anyway; --overwrite allows a used one). Run it under the torch
lock: the stages do not take it themselves.
"""

import argparse
import shlex
import string
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, DispError, command_line, machine, machine_line, save_results, table

from disp.support.errors import friendly_errors  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", help="cpu (default) | auto | small | photo | gpu | tiny")
    p.add_argument("--data", default="scenes", help="scenes (default) | coco | karpathy | flickr | vqav2 | daquar")
    p.add_argument("--data-root", default="", help="folder of the public dataset (as run.sh's DATA_ROOT)")
    p.add_argument("--vision-from", default="", help="a clean.pt whose ViT train.py starts from (as run.sh's VISION_FROM)")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/bench-<preset>; never runs/default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="allow a run directory that already holds files")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/pipeline.json)")
    return p.parse_args(argv)


def stage_commands(run_dir: str, preset: str, seed: int, data: str = "scenes", data_root: str = "",
                   vision_from: str = ""):
    """[(stage name, argv)] from run.sh's python lines."""
    script = ROOT / "run.sh"
    if not script.exists():
        raise DispError(f"{script} does not exist")
    values = {"RUN": run_dir, "PRESET": preset, "SEED": str(seed), "DATA": data, "DATA_ROOT": data_root,
              "VISION_FROM": vision_from}
    stages = []
    for line in script.read_text().splitlines():
        line = line.strip()
        if not line.startswith("python "):
            continue
        try:
            argv = [string.Template(tok).substitute(values) for tok in shlex.split(line, comments=True)[1:]]
        except (KeyError, ValueError) as err:
            raise DispError(f"run.sh line {line!r} uses a variable this bench does not know ({err})")
        name, rest = [argv[0]], iter(argv[1:])
        for a in rest:  # the name keeps what tells stages apart (e.g. --control as-is), not the shared flags
            if a in ("--run-dir", "--preset", "--seed", "--data", "--data-root", "--vision-from"):
                next(rest, None)
            else:
                name.append(a)
        stages.append((" ".join(name), argv))
    if not stages:
        raise DispError(f"no 'python ...' lines found in {script}")
    return stages


def main(argv=None):
    args = parse_args(argv)
    run_dir = Path(args.run_dir or f"runs/bench-{args.preset}")
    if run_dir.resolve() == (ROOT / "runs" / "default").resolve():
        raise DispError("refusing to benchmark into runs/default (it would overwrite the default run); pick another --run-dir")
    stages = stage_commands(str(run_dir), args.preset, args.seed, args.data, args.data_root, args.vision_from)
    if args.dry_run:
        for name, cmd in stages:
            print(f"{name:45} python {shlex.join(cmd)}")
        return
    if run_dir.exists() and any(run_dir.iterdir()) and not args.overwrite:
        raise DispError(f"{run_dir} already holds files; pick a new --run-dir or pass --overwrite")
    info = machine()
    print(f"machine: {machine_line(info)}")
    results = {"machine": info, "command": command_line(), "preset": args.preset, "seed": args.seed, "data": args.data,
               "run_dir": str(run_dir), "stages": [], "complete": False}
    t_all = time.perf_counter()
    for name, cmd in stages:
        print(f"\n=== {name}: python {shlex.join(cmd)}", flush=True)
        t = time.perf_counter()
        rc = subprocess.run([sys.executable] + cmd, cwd=ROOT).returncode
        secs = time.perf_counter() - t
        results["stages"].append({"stage": name, "command": "python " + shlex.join(cmd), "seconds": secs, "rc": rc})
        results["total_seconds"] = time.perf_counter() - t_all
        path = save_results("pipeline", results, args.out)
        if rc != 0:
            raise DispError(f"stage '{name}' failed with exit code {rc} after {secs:.1f}s (its output is above); "
                            f"times so far in {path}")
    results["complete"] = True
    results["total_seconds"] = time.perf_counter() - t_all
    path = save_results("pipeline", results, args.out)
    print()
    rows = [[s["stage"], f"{s['seconds']:.1f}", f"{s['seconds'] / 60:.2f}"] for s in results["stages"]]
    rows.append(["total", f"{results['total_seconds']:.1f}", f"{results['total_seconds'] / 60:.2f}"])
    print(f"preset {args.preset}, data {args.data}, seed {args.seed}, {run_dir}; {machine_line(info)}")
    print(table(["stage", "seconds", "minutes"], rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    with friendly_errors():
        main()
