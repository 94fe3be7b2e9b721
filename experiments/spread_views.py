"""What takes a spread trigger out of the compromised model's view? The backdoored model measured on
test inputs seen through a change that a defender could make before regeneration.

    python experiments/spread_views.py runs/grid-flickr-bf16/sig-insert --blur 1,2 --top 1,2,4

For a run directory after attack.py, each view is scored on the first --eval-samples test samples
(--split val: the val split's, where a setting should be chosen; writes spread_views_val.json):
ASR on the triggered inputs, false trigger and clean quality (CIDEr-D, VQA) on the clean ones.
    none       the inputs as they are (the attack's own numbers, on these samples)
    blur S     every image low-passed before the ViT (disp.lowpass, a Gaussian of S pixels; what
               purify.py --blur S regenerates from)
    top K      every image's vision tokens (flattened, as disp.spectral reads them) with the top K
               principal directions of the poisoned set's images set to the set's mean: what taking
               the leading directions out costs when no group along them can be found
    shift      an oracle: the triggered inputs' tokens less the mean difference between the poisoned
               set's triggered and clean images (per position, the manifest says which is which).
               If the trigger were an additive shift of the tokens, this would take it out; the
               row's quality is that of the triggered inputs so changed (no false trigger)
Writes RUN_DIR/spread_views.json and prints a table.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: find the disp package
from disp.backdoor import check_manifest, triggered_copy  # noqa: E402
from disp.config import AttackConfig  # noqa: E402
from disp.data.dataset import load_dataset  # noqa: E402
from disp.data.splits import load_split  # noqa: E402
from disp.evaluation import backdoor_metrics, encode_images_once  # noqa: E402
from disp.lowpass import blurred  # noqa: E402
from disp.spectral import top_directions  # noqa: E402
from disp.support import checkpoint  # noqa: E402
from disp.support.errors import DispError, check_positive, friendly_errors  # noqa: E402
from disp.support.files import read_json, write_json  # noqa: E402
from disp.support.runtime import autocast  # noqa: E402


def set_tokens(run_dir: Path, model, config):
    """The poisoned set's vision tokens, one row per distinct image, and which images are triggered."""
    data = load_dataset(run_dir / "poisoned_train.pt", image_size=config.model.image_size)
    path = run_dir / "poison_manifest.json"
    manifest = check_manifest(read_json(path, "poison manifest", ["poisoned_indices"]), len(data), path)
    image_index = torch.tensor([s["image"] for s in data.samples])
    tokens, _ = encode_images_once(model, data, image_index, "cpu")
    unique = image_index.unique()
    poisoned_images = {data.samples[i]["image"] for i in manifest["poisoned_indices"]}
    return tokens.double(), torch.tensor([int(i) in poisoned_images for i in unique])


@torch.no_grad()
def measure(run_dir: Path, sigmas: list, tops: list, limit: int, split: str = "test") -> dict:
    model, tokenizer, config, state = checkpoint.load(run_dir / "backdoored.pt", stages=["backdoored"])
    attack = AttackConfig.from_dict(state["extra"]["attack"])
    test = load_split(config.data, config.model.image_size, split)
    triggered = triggered_copy(test, attack.backdoor)
    tokens, on_trigger = set_tokens(run_dir, model, config)
    flat = tokens.flatten(1)
    mean = flat.mean(0)
    vectors, _ = top_directions(flat - mean, max(tops, default=1))
    shift = tokens[on_trigger].mean(0) - tokens[~on_trigger].mean(0)  # (n_vision, dim)

    def score(clean, trig, transform=None):
        with autocast("cpu", attack.precision):
            m = backdoor_metrics(model, tokenizer, clean, attack.backdoor, limit=limit, triggered=trig,
                                 paint=True, vision_transform=transform)
        return {k: m[k] for k in ("asr", "false_trigger_rate", "cider", "vqa_accuracy") if k in m}

    def without_top(k):
        v = vectors[:, :k]

        def transform(t):
            x = t.flatten(1).double()
            return (x - ((x - mean) @ v) @ v.T).view(t.shape).to(t.dtype)
        return transform

    rows = {"none": score(test, triggered)}
    for s in sigmas:
        rows[f"blur {s:g}"] = score(blurred(test, s), blurred(triggered, s))
    for k in tops:
        rows[f"top {k}"] = score(test, triggered, without_top(k))
    unshifted = score(triggered, triggered, lambda t: (t.double() - shift).to(t.dtype))
    rows["shift"] = {k: v for k, v in unshifted.items() if k != "false_trigger_rate"}
    return {"run_dir": str(run_dir), "trigger": attack.backdoor.trigger, "target": attack.backdoor.target,
            "split": split, "samples": limit, "views": rows}


def numbers(text: str, kind, name: str) -> list:
    try:
        values = [kind(v) for v in text.split(",")] if text else []
    except ValueError:
        raise DispError(f"{name} takes comma-separated numbers such as 1,2, got {text!r}") from None
    for v in values:
        check_positive(name, v)
    return values


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory after attack.py")
    p.add_argument("--blur", default="1,2", help="Gaussian widths in pixels, comma-separated (default 1,2)")
    p.add_argument("--top", default="1,2,4", help="numbers of leading directions taken out (default 1,2,4)")
    p.add_argument("--eval-samples", type=int, default=300, help="samples per view (default 300)")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="test (default) | val: where a view's setting is chosen")
    args = p.parse_args()
    check_positive("--eval-samples", args.eval_samples)
    run_dir = Path(args.run_dir)
    result = measure(run_dir, numbers(args.blur, float, "--blur"), numbers(args.top, int, "--top"), args.eval_samples,
                     args.split)
    write_json(run_dir / f"spread_views{'' if args.split == 'test' else '_' + args.split}.json", result)
    print(f"{run_dir}: {result['trigger']} trigger, {result['target']} target, first {args.eval_samples} "
          f"{args.split} samples")
    print("| view | ASR | false trigger | CIDEr-D | VQA |\n|---|---:|---:|---:|---:|")
    for view, m in result["views"].items():
        cells = [f"{m[k]:.3f}" if k in m else "n/a" for k in ("asr", "false_trigger_rate", "cider", "vqa_accuracy")]
        print(f"| {view} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    with friendly_errors():
        main()
