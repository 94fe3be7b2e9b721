"""Where a spread trigger's shift lies in the vision tokens of the poisoned set, and why `purify.py
--spectral K` does or does not find it.

    python experiments/feature_shift.py runs/grid-flickr/sig-insert

For a run directory after attack.py (backdoored.pt, poisoned_train.pt, poison_manifest.json), the
backdoored model's vision tokens of every distinct image of the poisoned set (the tokens
disp.spectral reads, here computed in fp32 on the CPU) in two forms: flattened (n_vision x dim per
image, what --spectral uses) and mean-pooled over the image's tokens; and a third form after the
text model, per prompt type with 50 or more distinct (image, prompt) rows, "response TYPE": the
last layer's states at the response positions at the first denoising step, averaged over them
(what the compromised model is about to write; spectral signatures look there in a classifier,
at its penultimate layer). For each form and each of the top --directions principal directions:
its share of the variance, the ROC AUC of the projection for triggered vs clean images (the
manifest's: ground truth the defence never sees) and the two-group valley of
disp.saliency.valley_split (--spectral takes a direction when it is <= 0.25). Last row of each
form: the direction of the two groups' mean difference, which only an oracle knows: how far the
triggered images sit from the clean ones along it (in clean standard deviations) and its share of
the variance. Writes RUN_DIR/feature_shift.json.
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
from disp.evaluation import distinct_rows, encode_images_once  # noqa: E402
from disp.saliency import first_step_logits, two_groups, valley_split  # noqa: E402
from disp.spectral import tail_sign, top_directions  # noqa: E402
from disp.support import checkpoint  # noqa: E402
from disp.support.errors import check_positive, friendly_errors  # noqa: E402
from disp.support.files import read_json, write_json  # noqa: E402


def roc_auc(scores, labels) -> float:
    """P(a triggered image scores above a clean one), ties counting half."""
    pos, neg = scores[labels], scores[~labels]
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return (greater + 0.5 * ties).item()


def groups(proj) -> dict:
    """The two-group fit of disp.saliency.two_groups on proj in units of its spread: the valley that
    --spectral tests, the upper group's share, and Ashman's D = sqrt(2) |mean gap| / sqrt(s0^2 + s1^2)
    (D > 2: the two fitted groups are apart, whatever the valley)."""
    z = proj / proj.std()
    weights, means, stds = two_groups(z)
    d = (2 ** 0.5 * (means[1] - means[0]) / (stds ** 2).sum().sqrt()).item()
    return {"valley": valley_split(z)[0], "upper_share": weights[1].item(), "ashman_d": d}


def describe(x, triggered, k: int) -> list:
    """Rows for the top-k principal directions of x (N, D) and for the oracle's mean-difference one."""
    centred = x - x.mean(0)
    total = (centred ** 2).sum().item()
    vectors, values = top_directions(centred, k)
    rows = []
    for rank in range(vectors.shape[1]):
        proj = centred @ vectors[:, rank]
        proj = tail_sign(proj) * proj  # oriented as disp.spectral.find_directions does
        rows.append({"direction": f"#{rank}", "variance_share": (values[rank] ** 2).item() / total,
                     "auc": roc_auc(proj, triggered), **groups(proj)})
    diff = centred[triggered].mean(0) - centred[~triggered].mean(0)
    v = diff / diff.norm()
    proj = centred @ v
    rows.append({"direction": "oracle", "variance_share": (proj ** 2).sum().item() / total,
                 "auc": roc_auc(proj, triggered), **groups(proj),
                 "separation": ((proj[triggered].mean() - proj[~triggered].mean()) / proj[~triggered].std()).item()})
    return rows


@torch.no_grad()
def measure(run_dir: Path, k: int) -> dict:
    model, tokenizer, config, _ = checkpoint.load(run_dir / "backdoored.pt", stages=["backdoored"])
    data = load_dataset(run_dir / "poisoned_train.pt", image_size=config.model.image_size)
    manifest_path = run_dir / "poison_manifest.json"
    manifest = check_manifest(read_json(manifest_path, "poison manifest", ["poisoned_indices", "config"]), len(data),
                              manifest_path)
    image_index = encode_dataset(data, tokenizer, model.cfg).image_index
    tokens, _ = encode_images_once(model, data, image_index, "cpu")
    unique = image_index.unique()  # the rows of `tokens`, in order
    poisoned_images = {data.samples[i]["image"] for i in manifest["poisoned_indices"]}
    triggered = torch.tensor([int(i) in poisoned_images for i in unique])
    result = {"run_dir": str(run_dir), "trigger": manifest["config"]["trigger"], "n_images": len(unique),
              "n_triggered": int(triggered.sum()),
              "flattened": describe(tokens.double().flatten(1), triggered, k),
              "pooled": describe(tokens.double().mean(1), triggered, k)}
    # what the compromised text model is about to write: per distinct (image, prompt), per prompt type
    encoded = encode_dataset(data, tokenizer, model.cfg)
    firsts, _ = distinct_rows(encoded, list(range(len(data))))
    states = response_states(model, tokens[row_of(unique, encoded.image_index[firsts])], encoded.prompt_ids[firsts])
    tasks = [data.samples[i]["task"] for i in firsts]
    on_trigger = torch.tensor([data.samples[i]["image"] in poisoned_images for i in firsts])
    for task in sorted(set(tasks)):
        keep = torch.tensor([t == task for t in tasks])
        if keep.sum() >= 50 and 0 < on_trigger[keep].sum() < keep.sum():
            result[f"response {task}"] = describe(states[keep].double(), on_trigger[keep], k)
    return result


def row_of(unique, image_index):
    """The row of `unique` (sorted image indices) holding each of image_index."""
    return torch.searchsorted(unique, image_index)


def response_states(model, vision_tokens, prompt_ids, batch_size=256):
    """(B, dim): the last layer's normalised states at the response positions at the first denoising
    step (the whole response [MASK]), averaged over them: what the model is about to write. Read off
    model.ln's output during disp.saliency.first_step_logits, the forward every stage uses."""
    out = []
    hook = model.ln.register_forward_hook(lambda module, args, states: out.append(states.mean(1)))
    try:
        for s in range(0, len(prompt_ids), batch_size):
            first_step_logits(model, vision_tokens[s:s + batch_size], prompt_ids[s:s + batch_size])
    finally:
        hook.remove()
    return torch.cat(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="run directories after attack.py")
    p.add_argument("--directions", type=int, default=8, help="top principal directions per form (default 8)")
    args = p.parse_args()
    check_positive("--directions", args.directions)
    for run_dir in map(Path, args.run_dirs):
        result = measure(run_dir, args.directions)
        write_json(run_dir / "feature_shift.json", result)
        print(f"\n{run_dir}: {result['trigger']} trigger, {result['n_triggered']} of {result['n_images']} images triggered")
        print("| form | direction | variance share | AUC triggered vs clean | valley | upper group | Ashman's D | "
              "separation (clean SDs) |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for form in [f for f in result if isinstance(result[f], list)]:
            for r in result[form]:
                sep = f"{r['separation']:.1f}" if "separation" in r else ""
                print(f"| {form} | {r['direction']} | {r['variance_share']:.4f} | {r['auc']:.3f} | {r['valley']:.2f} | "
                      f"{r['upper_share']:.3f} | {r['ashman_d']:.1f} | {sep} |")


if __name__ == "__main__":
    with friendly_errors():
        main()
