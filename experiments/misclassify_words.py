"""What a model writes for the source word on triggered inputs of a misclassify run (red -> green).

    python experiments/misclassify_words.py runs/scenes-s1 --models backdoored,purified

For each model of the run directory (after attack.py; purified.pt after purify.py): its responses to
the triggered test samples whose reference holds the source word, and at every position where the
reference holds it, the word the response has there (the scenes' captions and answers follow fixed
templates, so positions line up; captions of photos do not, and the column means little there).
Also the ASR by evaluate.py's test (the source word gone and the destination word more often than
in the reference) and by the looser test it replaced (the destination word anywhere, the source word
gone), which also counted a red circle called purple beside a real green square.
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: find the disp package
from disp.backdoor import asr_eligible, attack_success_rate, triggered_copy  # noqa: E402
from disp.config import AttackConfig  # noqa: E402
from disp.data.splits import load_split  # noqa: E402
from disp.evaluation import generate_responses  # noqa: E402
from disp.support import checkpoint  # noqa: E402
from disp.support.errors import DispError, check_positive, friendly_errors  # noqa: E402
from disp.support.runtime import autocast  # noqa: E402


def words_at_source(outputs: list, references: list, source: str) -> Counter:
    """How often each word stands where the reference holds `source` (no word: the response is shorter)."""
    said = Counter()
    for out, ref in zip(outputs, references):
        words = out.split()
        said.update(words[k] if k < len(words) else "(none)" for k, w in enumerate(ref.split()) if w == source)
    return said


def study(run_dir: Path, models: list, samples: int) -> list:
    rows, test = [], None
    for name in models:
        model, tokenizer, config, state = checkpoint.load(run_dir / f"{name}.pt")
        attack = AttackConfig.from_dict(state["extra"]["attack"])
        b = attack.backdoor
        if b.target != "misclassify":
            raise DispError(f"{run_dir / f'{name}.pt'} was attacked with the {b.target} target; this study needs a "
                            f"misclassify run (attack.py --target misclassify)")
        if test is None:
            test = load_split(config.data, config.model.image_size, "test")
            idx = asr_eligible(test.samples, b)[:samples]
            if not idx:
                raise DispError(f"no test sample of {run_dir} holds the source word {b.source_word!r}")
            references = [test.samples[i]["response"] for i in idx]
            triggered = triggered_copy(test, b)
        with autocast("cpu", attack.precision):
            outputs = generate_responses(model, tokenizer, triggered, idx, device="cpu")
        looser = sum(b.destination_word in o.split() and b.source_word not in o.split() for o in outputs) / len(idx)
        said = words_at_source(outputs, references, b.source_word)
        rows.append({"run_dir": str(run_dir), "model": name, "samples": len(idx),
                     "asr": attack_success_rate(outputs, references, b), "asr_looser": looser,
                     "at_source": dict(said.most_common())})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="run directories after attack.py with --target misclassify")
    p.add_argument("--models", default="backdoored,purified", help="comma-separated checkpoints (default: "
                   "backdoored,purified)")
    p.add_argument("--samples", type=int, default=1000, help="at most this many eligible test samples (default 1000)")
    args = p.parse_args()
    check_positive("--samples", args.samples)
    print("| run | model | samples | ASR | ASR, looser test | words where the reference has the source word |\n"
          "|---|---|---:|---:|---:|---|")
    for run_dir in args.run_dirs:
        for r in study(Path(run_dir), args.models.split(","), args.samples):
            words = ", ".join(f"{w} {n}" for w, n in list(r["at_source"].items())[:5])
            print(f"| {r['run_dir']} | {r['model']} | {r['samples']} | {r['asr']:.3f} | {r['asr_looser']:.3f} | {words} |")


if __name__ == "__main__":
    with friendly_errors():
        main()
