"""The adaptive masking rule on the saliency scores that finished runs stored: what it masks, and
what the previous rule (split at an empty 4x gap) masked on the same scores.

    python experiments/adaptive_rule.py runs/px-seed0 runs/flickr8k-v2 runs/grid-px/*/suppress

For each run directory holding purify.py's purified_saliency.pt, the poisoned set and the poison
manifest: per prompt type, the two-group valley of disp.saliency.prompt_type_valleys (<= 0.25 splits by
default; a real second group is near 0), then the samples each rule masks, how many of them are
poisoned (precision) and the share of the poisoned samples masked (recall). Nothing is retrained:
the scores are the ones the run's purify.py computed. The manifest is read only to score the rules.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: find the disp package
from disp.config import PurifyConfig  # noqa: E402
from disp.data.dataset import load_dataset  # noqa: E402
from disp.saliency import fit_thresholds, prompt_type_valleys, select_adaptive  # noqa: E402
from disp.support.errors import DispError, friendly_errors  # noqa: E402
from disp.support.files import load_plain  # noqa: E402


def gap_thresholds(scores, tasks, min_gap: float = 4.0) -> dict:
    """The previous rule, for comparison: per prompt type, split the sorted log top scores above
    their median at the widest gap between neighbours, if it is at least min_gap (a ratio)."""
    out = {}
    top = scores.max(dim=1).values.clamp_min(1e-12).log()
    for task in sorted(set(tasks)):
        values = top[torch.tensor([t == task for t in tasks])].sort().values
        upper = values[len(values) // 2:]
        out[task] = math.inf
        if len(upper) >= 2:
            gaps = upper[1:] - upper[:-1]
            widest = int(gaps.argmax())
            if gaps[widest] >= math.log(min_gap):
                out[task] = math.exp((upper[widest] + upper[widest + 1]).item() / 2)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories after purify.py (DiSP, adaptive rule)")
    p.add_argument("--max-valley", type=float, default=PurifyConfig.max_valley, help="the rule's setting")
    args = p.parse_args(argv)
    max_masked = PurifyConfig.max_masked
    header = "| run | prompt types: valley | masked / poisoned among them / recall: two groups | previous (4x gap) |"
    print(header + "\n|---|---|---|---|")
    for run in map(Path, args.runs):
        files = [run / "purified_saliency.pt", run / "poisoned_train.pt", run / "poison_manifest.json"]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise DispError(f"{run} lacks {', '.join(missing)}; run attack.py and purify.py there first")
        scores = load_plain(files[0], "saliency scores").float()
        tasks = [s["task"] for s in load_dataset(files[1]).samples]
        if len(tasks) != len(scores):
            raise DispError(f"{run}: {len(scores)} saliency rows for {len(tasks)} samples; rerun purify.py")
        poisoned = torch.zeros(len(tasks), dtype=torch.bool)
        poisoned[json.loads(files[2].read_text())["poisoned_indices"]] = True
        valleys = [f"{t} {valley:.2f}" for t, (valley, _) in prompt_type_valleys(scores, tasks).items()]
        cells = []
        for thresholds in (fit_thresholds(scores, tasks, args.max_valley), gap_thresholds(scores, tasks)):
            masked = select_adaptive(scores, tasks, thresholds, max_masked).any(dim=1)
            hits = (masked & poisoned).sum().item()
            cells.append(f"{masked.sum().item()} / {hits} / {hits / max(1, poisoned.sum().item()):.3f}")
        print(f"| {run} | {', '.join(valleys)} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    with friendly_errors():
        main()
