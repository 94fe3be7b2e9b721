"""Linear probes on the frozen vision encoder: what do the ViT's features carry?

    python bench/probe.py --run-dir runs/flickr8k      # after train.py on Flickr8k
    python bench/probe.py --run-dir runs/default       # the scenes

Two probes, each a logistic regression on the mean-pooled features of the frozen ViT of clean.pt
(standardised; full-batch Adam), next to the same probe on a randomly initialised ViT of the same
shape (the control: what the architecture and raw pixels alone give):
    words     for each of the --words most frequent words of the training responses that appear
              for 2-50% of the images: does any text of the image contain the word? Trained on the
              train split, scored on the test split by ROC AUC (0.5 = chance), averaged over words.
    triggers  for each trigger of disp.backdoor at its default strength: is this image
              triggered? Fitted on --fit-images training images (each clean and triggered),
              scored on every test image (each clean and triggered) by accuracy (0.5 = chance).
Writes bench/results/probe.json (or --out).
"""

import argparse
from collections import Counter
from pathlib import Path

from _common import DispError, command_line, machine, machine_line, pick_device, require, save_results, table

import torch  # noqa: E402

from disp.backdoor import TRIGGERS, BackdoorConfig, apply_trigger  # noqa: E402
from disp.data.splits import load_split  # noqa: E402
from disp.model import ViT  # noqa: E402
from disp.support import checkpoint  # noqa: E402
from disp.support.errors import friendly_errors  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="run directory with clean.pt")
    p.add_argument("--words", type=int, default=50, help="words probed (default 50)")
    # 300 steps had not converged: WaNet on the scenes read 0.938 there, 0.978 from 2,000 steps on
    p.add_argument("--steps", type=int, default=2000, help="probe training steps, full batch (default 2000)")
    p.add_argument("--fit-images", type=int, default=2000,
                   help="training images the trigger probe is fitted on, each clean and triggered (default 2000)")
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda | auto")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/probe.json)")
    return p.parse_args(argv)


@torch.no_grad()
def pooled_features(vit, images, device, batch_size=256):
    """(N, vit_dim): the mean over patches of the ViT's output, for uint8 images."""
    vit.eval()
    return torch.cat([vit(images[i:i + batch_size].to(device).float() / 255).mean(1).cpu()
                      for i in range(0, len(images), batch_size)])


def fit_probe(x, y, steps: int):
    """Logistic regression(s) x (N, D) -> y (N, K) in {0, 1}; returns a predict(x) -> (N, K) logits."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    layer = torch.nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.Adam(layer.parameters(), lr=0.02, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(layer((x - mean) / std), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda z: layer((z - mean) / std).detach()


def roc_auc(scores, labels) -> float:
    """Probability that a random positive scores above a random negative (ties count 1/2)."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return (greater + 0.5 * ties).item()


def word_labels(dataset, words: list):
    """(N_images, len(words)) 1 where any text of the image contains the word."""
    labels = torch.zeros(len(dataset.images), len(words))
    column = {w: k for k, w in enumerate(words)}
    for s in dataset.samples:
        for w in set(s["response"].split()):
            if w in column:
                labels[s["image"], column[w]] = 1.0
    return labels


def probe_words(vits, train, test, n_words: int, steps: int, device) -> dict:
    per_image = Counter()
    texts = {}
    for s in train.samples:
        texts.setdefault(s["image"], set()).update(s["response"].split())
    for words in texts.values():
        per_image.update(words)
    n = len(train.images)
    words = [w for w, c in per_image.most_common() if 0.02 * n <= c <= 0.5 * n][:n_words]
    if not words:
        raise DispError("no word appears for 2-50% of the training images: nothing to probe")
    y_train, y_test = word_labels(train, words), word_labels(test, words)
    out = {"words": words}
    for name, vit in vits.items():
        predict = fit_probe(pooled_features(vit, train.images, device), y_train, steps)
        logits = predict(pooled_features(vit, test.images, device))
        aucs = [roc_auc(logits[:, k], y_test[:, k]) for k in range(len(words))]
        valid = [a for a in aucs if a == a]
        out[name] = {"mean_auc": sum(valid) / len(valid), "auc": dict(zip(words, aucs))}
    return out


def probe_triggers(vits, train, test, image_size: int, steps: int, device, fit_images: int) -> dict:
    """Held-out accuracy of a clean-vs-triggered probe, per trigger and encoder: fitted on the first
    fit_images training images (each once clean, once triggered), scored on every test image (the same)."""
    fit = train.images[:fit_images]
    if len(fit) < 2 or len(test.images) < 1:
        raise DispError("the trigger probe needs at least 2 training images and 1 test image")
    feats = {name: (pooled_features(vit, fit, device), pooled_features(vit, test.images, device))
             for name, vit in vits.items()}  # clean features, once per encoder
    y_fit = torch.cat([torch.zeros(len(fit), 1), torch.ones(len(fit), 1)])
    y_held = torch.cat([torch.zeros(len(test.images)), torch.ones(len(test.images))])
    out = {}
    for trigger in TRIGGERS:
        bcfg = BackdoorConfig(trigger=trigger).validate(image_size)
        fit_trig, test_trig = apply_trigger(fit, bcfg), apply_trigger(test.images, bcfg)
        change = (test_trig.float() - test.images.float()).abs() / 255  # the trigger's strength on these images
        out[trigger] = {"max pixel change": change.max().item(), "mean pixel change": change.mean().item()}
        for name, vit in vits.items():
            (fit_f, test_f) = feats[name]
            predict = fit_probe(torch.cat([fit_f, pooled_features(vit, fit_trig, device)]), y_fit, steps)
            logits = predict(torch.cat([test_f, pooled_features(vit, test_trig, device)]))[:, 0]
            out[trigger][name] = ((logits > 0).float() == y_held).float().mean().item()
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.words < 1 or args.steps < 1 or args.fit_images < 2:
        raise DispError("--words and --steps must be >= 1, --fit-images >= 2")
    device = pick_device(args.device)
    run_dir = Path(args.run_dir)
    require(run_dir / "clean.pt", "the clean model")
    info = machine()
    print(f"machine: {machine_line(info)}")
    torch.manual_seed(0)
    model, _, config, _ = checkpoint.load(run_dir / "clean.pt", stages=["clean"], device=device)
    vits = {"pretrained ViT": model.vit, "random ViT (control)": ViT(model.cfg).to(device)}
    train = load_split(config.data, config.model.image_size, "train")
    test = load_split(config.data, config.model.image_size, "test")
    print(f"{run_dir}: {config.data.source} data, {len(train.images)} train / {len(test.images)} test images")

    words = probe_words(vits, train, test, args.words, args.steps, device)
    print(f"\nwords: does an image's text contain the word? ({len(words['words'])} words, test ROC AUC)")
    print(table(["encoder", "mean AUC", "best words"], [
        [name, f"{words[name]['mean_auc']:.3f}",
         ", ".join(f"{w} {a:.2f}" for w, a in sorted(words[name]["auc"].items(), key=lambda kv: -kv[1])[:5])]
        for name in vits]))
    triggers = probe_triggers(vits, train, test, config.model.image_size, args.steps, device, args.fit_images)
    print("\ntriggers: is the image triggered? (held-out accuracy, 0.5 = chance; pixel changes in [0, 1] units)")
    print(table(["trigger", "max pixel change", "mean pixel change"] + list(vits),
                [[t, f"{triggers[t]['max pixel change']:.3f}", f"{triggers[t]['mean pixel change']:.4f}"] +
                 [f"{triggers[t][n]:.3f}" for n in vits] for t in TRIGGERS]))
    path = save_results("probe", {"machine": info, "command": command_line(), "run_dir": str(run_dir),
                                  "words": words, "triggers": triggers}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    with friendly_errors():
        main()
