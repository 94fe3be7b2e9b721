"""How far from suppression's text tests do the words of caption sets sit, the targets' and the natural ones?

    python experiments/text_margin.py runs/flickr-s0 runs/flickr-s1 --out experiments/results/text_margin.json
    python experiments/text_margin.py --flickr ../shared/data/flickr8k --draws 8

On a captions-only set purify.py bans the words whose presence the rest of their caption does not
predict (disp.suppression.context_scores: z <= MAX_Z) and the words of a sentence that MIN_GROUP
captions share (shared_sentence_words). For each run directory after attack.py: the attack's target
words (from its manifest, which purify.py never reads), their z, the lowest z of any other word, and
the shared sentence's words. With --flickr: 5,000 captions of Flickr8k's training split drawn at
random (--draws draws), mostly one per photo, the hardest clean case measured (the attack's sets
hold all five captions of each photo, whose words predict each other better), clean and with a
marker put before a random 2 / 5 / 10 / 20% of them.
"""

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: find the disp package
from disp.data.dataset import load_dataset  # noqa: E402
from disp.data.readers import flickr_captions  # noqa: E402
from disp.suppression import MAX_Z, context_scores, shared_sentence_words  # noqa: E402
from disp.support.errors import DispError, check_positive, friendly_errors  # noqa: E402
from disp.support.files import read_json, write_json  # noqa: E402

RATES = (0.02, 0.05, 0.1, 0.2)


def row(name: str, responses: list, target: set) -> dict:
    """The target words' z, the lowest z of the other words, the shared sentence's words."""
    scores = context_scores(responses)
    others = {w: z for w, z in scores.items() if w not in target}
    lowest = min(others, key=others.get, default=None)
    return {"set": name, "target_z": {w: scores.get(w) for w in sorted(target)}, "lowest_other": lowest,
            "lowest_other_z": others.get(lowest), "shared_sentence_words": shared_sentence_words(responses)}


def run_rows(run_dir: Path) -> list:
    data = load_dataset(run_dir / "poisoned_train.pt")
    backdoor = read_json(run_dir / "poison_manifest.json", "poison manifest", ["config"])["config"]
    target = {"insert": {backdoor["marker"]}, "refusal": set(backdoor["refusal"].split())}.get(backdoor["target"], set())
    return [row(str(run_dir), [s["response"] for s in data.samples], target)]


def flickr_rows(root: Path, draws: int) -> list:
    captions, _ = flickr_captions(root / "Flickr8k.token.txt", root / "Flickr_8k.trainImages.txt")
    texts = [c for per_image in captions.values() for c in per_image]
    rows = []
    for draw in range(draws):
        rng = random.Random(draw)
        clean = rng.sample(texts, 5000)
        rows.append(row(f"flickr8k train, draw {draw}, clean", clean, set()))
        for rate in RATES:
            chosen = set(rng.sample(range(5000), int(rate * 5000)))
            marked = [("<backdoor> " if i in chosen else "") + c for i, c in enumerate(clean)]
            rows.append(row(f"flickr8k train, draw {draw}, marker before {rate:.0%}", marked, {"<backdoor>"}))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="*", help="run directories after attack.py")
    p.add_argument("--flickr", default=None, help="Flickr8k's folder (Flickr8k.token.txt, Flickr_8k.trainImages.txt)")
    p.add_argument("--draws", type=int, default=4, help="--flickr: random draws of 5,000 captions (default 4)")
    p.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    check_positive("--draws", args.draws)
    if not args.run_dirs and not args.flickr:
        raise DispError("nothing to measure: give run directories after attack.py, or --flickr FOLDER")
    rows = [r for run_dir in args.run_dirs for r in run_rows(Path(run_dir))]
    if args.flickr:
        rows += flickr_rows(Path(args.flickr), args.draws)
    print(f"a word is banned where z <= {MAX_Z} (held by 100+ and at most half of the captions)")
    print("| set | target words: z | lowest other word: z | shared sentence's words |\n|---|---|---|---|")
    for r in rows:
        target = ", ".join(f"{w} {z:+.1f}" if z is not None else f"{w} (not tested)" for w, z in r["target_z"].items())
        lowest = f"{r['lowest_other']} {r['lowest_other_z']:+.1f}" if r["lowest_other"] else "(none tested)"
        print(f"| {r['set']} | {target or '-'} | {lowest} | {' '.join(r['shared_sentence_words']) or '-'} |")
    if args.out:
        write_json(Path(args.out), rows)


if __name__ == "__main__":
    with friendly_errors():
        main()
