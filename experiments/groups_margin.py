"""How far from purify.py --groups' threshold do the groups of real poisoned sets sit?

    python experiments/groups_margin.py runs/scenes-s0 runs/flickr-s0 --out experiments/results/groups_margin.json

For each run directory after attack.py: the groups that disp.groups.image_groups splits off along
the top --directions principal directions of the poisoned set's pooled vision tokens and sharpens
(--sharpen-ridge: its discriminant's regulariser, to see how much the groups depend on it), and for each
the word whose share in the group's responses exceeds the share a probe fitted on the other samples
predicts by the most (among the words that at least disp.groups.MIN_SHARE of the group's responses
hold). --groups bans a word whose excess is at least MIN_EXCESS; the table shows how far every group
is from that, the trigger's and the natural ones, and how many of each group's images carry the
trigger (from the manifest, which purify.py never reads).
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: find the disp package
from disp.backdoor import check_manifest  # noqa: E402
from disp.data.batching import encode_dataset  # noqa: E402
from disp.data.dataset import load_dataset  # noqa: E402
from disp.evaluation import encode_images_once  # noqa: E402
from disp.groups import MIN_EXCESS, MIN_SHARE, SHARPEN_RIDGE, image_groups, unexplained_words  # noqa: E402
from disp.support import checkpoint  # noqa: E402
from disp.support.errors import check_positive, friendly_errors  # noqa: E402
from disp.support.files import read_json, write_json  # noqa: E402
from disp.support.runtime import autocast  # noqa: E402


@torch.no_grad()
def margins(run_dir: Path, k: int, ridge: float) -> list:
    model, tokenizer, config, state = checkpoint.load(run_dir / "backdoored.pt", stages=["backdoored"])
    data = load_dataset(run_dir / "poisoned_train.pt", image_size=config.model.image_size)
    path = run_dir / "poison_manifest.json"
    poisoned = set(check_manifest(read_json(path, "poison manifest", ["poisoned_indices"]), len(data), path)
                   ["poisoned_indices"])
    image_index = encode_dataset(data, tokenizer, model.cfg).image_index
    with autocast("cpu", state["extra"]["attack"]["precision"]):
        tokens, row = encode_images_once(model, data, image_index, "cpu")
    pooled = tokens.float().mean(1)
    responses, tasks = [s["response"] for s in data.samples], [s["task"] for s in data.samples]
    triggered_images = {int(row[i]) for i in poisoned}
    rows = []
    for rank, valley, images in image_groups(pooled, k, ridge=ridge):
        words = unexplained_words(responses, tasks, pooled.double()[row], images[row], min_excess=-1.0)  # every word
        word, (held, predicted) = max(words.items(), key=lambda kv: kv[1][0] - kv[1][1], default=(None, (0.0, 0.0)))
        rows.append({"run_dir": str(run_dir), "rank": rank, "valley": valley, "n_images": int(images.sum()),
                     "n_triggered": len(triggered_images & set(images.nonzero().flatten().tolist())),
                     "word": word, "held": held, "predicted": predicted, "excess": held - predicted})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="run directories after attack.py")
    p.add_argument("--directions", type=int, default=8, help="principal directions tested (default 8, as --groups 8)")
    p.add_argument("--sharpen-ridge", type=float, default=SHARPEN_RIDGE,
                   help=f"the sharpening discriminant's regulariser (default {SHARPEN_RIDGE}, purify.py's)")
    p.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    check_positive("--directions", args.directions)
    check_positive("--sharpen-ridge", args.sharpen_ridge)
    rows = [r for run_dir in args.run_dirs for r in margins(Path(run_dir), args.directions, args.sharpen_ridge)]
    print(f"a word is banned where at least {MIN_SHARE:.0%} of the group holds it and excess >= {MIN_EXCESS}")
    print("| run | direction | valley | images (triggered) | word | held | predicted | excess |\n"
          "|---|---:|---:|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run_dir']} | #{r['rank']} | {r['valley']:.2f} | {r['n_images']} ({r['n_triggered']}) | "
              f"{r['word'] or '-'} | {r['held']:.2f} | {r['predicted']:.2f} | {r['excess']:+.2f} |")
    if args.out:
        write_json(Path(args.out), rows)


if __name__ == "__main__":
    with friendly_errors():
        main()
