"""DAQUAR: what a question alone is worth, and how long the VQA model should fine-tune.

    python experiments/daquar.py --data-root ../shared/data/daquar --out runs/daquar-curve.json
    python experiments/daquar.py --data-root ../shared/data/daquar --vision-from runs/flickr/clean.pt \
        --out runs/daquar-curve-flickr-vit.json
    python experiments/daquar.py --data-root ../shared/data/daquar --vision-from runs/flickr/clean.pt \
        --steps 0 --out runs/daquar-probe.json     # the references and the image probes only

On the split train.py reads (DAQUAR full; val = every DAQUAR_VAL_EVERY-th training image, the fine-tuning set):
1. Question-only references, fitted here on the training questions: the majority answer, and a
   bag-of-words softmax regression from the question's words to the answer (one class per training
   answer), its epoch picked on val. No image: what the language prior is worth on this split.
   The same regression with the image appended: the mean colour of each cell of a 4 x 4 grid (raw
   pixels, no encoder), and the frozen ViT's tokens mean-pooled over the image and each quarter of
   it, each reduced to its top 4 and 32 principal components on the training images (standardised).
   Each with its test accuracy per kind of question (count, colour, other). If the ViT's features
   lift the regression above the question alone, the encoder carries what DAQUAR asks about and the
   SFT does not use it; if not, the encoder is what falls short (experiments/README.md, "Is the
   image worth anything to DAQUAR's questions?").
2. How many test answers the model can write at all: every word in the vocabulary (no [UNK]) and
   within the response length.
3. The SFT curve: the `daquar` preset's model, its ViT pretrained as train.py does (or taken from
   another run's clean.pt with --vision-from, e.g. one trained on Flickr8k's photos), then SFT for
   --steps with VQA accuracy on val, test, and test with every vision token masked (blind) every
   --every steps. The learning rate follows the cosine schedule of --steps, so a point of the curve
   is close to, not equal to, a run of that many steps; train.py --sft-steps checks the pick.
Writes --out (JSON) and prints the tables.
"""

import argparse
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: find the disp package
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from disp.config import fit_to_data, get_preset  # noqa: E402
from disp.data.batching import encode_dataset  # noqa: E402
from disp.data.splits import load_splits  # noqa: E402
from disp.evaluation import generate_responses, score  # noqa: E402
from disp.metrics import vqa_accuracy  # noqa: E402
from disp.support import checkpoint  # noqa: E402
from disp.support.errors import DispError, check_positive, friendly_errors  # noqa: E402
from disp.support.files import write_json  # noqa: E402
from disp.support.runtime import autocast, resolve_precision, seed_everything  # noqa: E402
from disp.training import Finetuner, vision_phase  # noqa: E402


def question_kind(question: str) -> str:
    """DAQUAR's questions by what they ask: counting, a colour, or the rest (mostly object names)."""
    if question.startswith("how many"):
        return "count"
    return "colour" if "color" in question or "colour" in question else "other"


def bag_of_words_baseline(train, val, test, image_features=None, epochs=30, seed=0):
    """Softmax regression from the question's word set (and, if given, its image's features) to the
    training answers; the epoch with the best val accuracy -> (val accuracy, epoch, test accuracy,
    test accuracy per question_kind).

    image_features: optional function dataset -> (N_images, F) float; standardised with the training
    images' statistics and appended to each question's word set. Without it: the question alone."""
    vocab = {w: i for i, w in enumerate(sorted({w for s in train.samples for w in s["prompt"].split()}))}
    answers = sorted({s["response"] for s in train.samples})
    if image_features is not None:
        train_images = image_features(train)
        mean, std = train_images.mean(0), train_images.std(0).clamp_min(1e-6)

    def features(ds):
        x = torch.zeros(len(ds.samples), len(vocab))
        for i, s in enumerate(ds.samples):
            x[i, [vocab[w] for w in s["prompt"].split() if w in vocab]] = 1.0
        if image_features is None:
            return x
        images = (image_features(ds) - mean) / std
        return torch.cat([x, images[[s["image"] for s in ds.samples]]], dim=1)

    def accuracies(linear, x, ds):
        with torch.no_grad():
            picks = linear(x).argmax(1).tolist()
        right = [vqa_accuracy(answers[k], s["answers"]) for k, s in zip(picks, ds.samples)]
        kinds = [question_kind(s["prompt"]) for s in ds.samples]
        per_kind = {k: sum(r for r, q in zip(right, kinds) if q == k) / max(1, kinds.count(k)) for k in set(kinds)}
        return sum(right) / len(right), per_kind

    torch.manual_seed(seed)
    x_train, x_val, x_test = features(train), features(val), features(test)
    index = {a: k for k, a in enumerate(answers)}
    y = torch.tensor([index[s["response"]] for s in train.samples])
    linear = torch.nn.Linear(x_train.shape[1], len(answers))
    optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    best = (-1.0, 0, 0.0, {})
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(linear(x_train[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val_acc = accuracies(linear, x_val, val)[0]
        if val_acc > best[0]:
            best = (val_acc, epoch, *accuracies(linear, x_test, test))
    return best


def cell_colours(ds, grid: int = 4):
    """Each image's mean colour in each cell of a grid x grid layout: (N_images, 3 * grid^2), no
    learned encoder: what the raw pixels say about a room's colours and layout."""
    images = ds.images.float() / 255
    return F.adaptive_avg_pool2d(images, grid).flatten(1)


def leading_components(features: dict, train, k: int):
    """Each split's image features (features: {id(split): (N_images, F)}, computed once) reduced to
    their top k principal components on the training images: a probe with fewer dimensions can learn
    less of each training room by heart."""
    mean = features[id(train)].mean(0)
    _, _, v = torch.linalg.svd(features[id(train)] - mean, full_matrices=False)
    return lambda ds: (features[id(ds)] - mean) @ v[:k].T


@torch.no_grad()
def vit_features(model, ds, device):
    """Each image's frozen ViT tokens mean-pooled over the whole image and over each quarter of it:
    (N_images, 5 * vit_dim), what the model's encoder hands the text side."""
    side, out = model.cfg.image_size // model.cfg.patch_size, []
    for batch in ds.images.split(256):
        tokens = model.vit(model.to_float(batch).to(device)).float()  # (B, side^2, vit_dim)
        grid = tokens.view(len(batch), side, side, -1).permute(0, 3, 1, 2)
        quarters = F.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2).flatten(1)
        out.append(torch.cat([tokens.mean(1), quarters], dim=1).cpu())
    return torch.cat(out)


PROBE_DIMS = (4, 32)  # the image probes' sizes: the features' top principal components on the training images


def show_regression(result: dict, name: str, fit) -> None:
    val_acc, epoch, test_acc, per_kind = fit
    result[name] = {"val": val_acc, "epoch": epoch, "test": test_acc, "test_by_kind": per_kind}
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in sorted(per_kind.items()))
    print(f"{name}: epoch {epoch} picked on val {val_acc:.3f} -> test {test_acc:.3f} ({kinds})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="the DAQUAR folder (qa.894.raw.*.txt, nyu_depth_images/)")
    p.add_argument("--vision-from", default=None, help="take the ViT from this clean.pt instead of pretraining it")
    p.add_argument("--vision-steps", type=int, default=None,
                   help="ViT pretraining steps on DAQUAR's photos (default: the preset's; with --vision-from 0, "
                        "more continue from the copied ViT)")
    p.add_argument("--steps", type=int, default=3000,
                   help="SFT steps (default 3000, the preset's; 0: the references and probes only, no SFT)")
    p.add_argument("--every", type=int, default=250, help="measure every this many steps (default 250)")
    p.add_argument("--vision-mask-max", type=float, default=None,
                   help="each SFT sample masks U(0, this) of its vision tokens (default: the preset's, 0.15)")
    p.add_argument("--image-free", type=float, default=0.0,
                   help="this share of the SFT samples sees no image (every vision token masked; default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    check_positive("--steps", args.steps, allow_zero=True)
    check_positive("--every", args.every)
    vision_steps = args.vision_steps if args.vision_steps is not None else 0 if args.vision_from else None
    if args.vision_mask_max is not None and not 0 <= args.vision_mask_max <= 1:
        raise DispError(f"--vision-mask-max must be in [0, 1], got {args.vision_mask_max}")
    if not 0 <= args.image_free < 1:
        raise DispError(f"--image-free must be in [0, 1), got {args.image_free}")

    config = get_preset("daquar")
    config = replace(config, data=replace(config.data, source="daquar", data_root=str(Path(args.data_root).resolve()),
                                          seed=args.seed),
                     train=replace(config.train, seed=args.seed, sft_steps=max(1, args.steps),
                                   vision_steps=config.train.vision_steps if vision_steps is None else vision_steps,
                                   vision_from=str(Path(args.vision_from).resolve()) if args.vision_from else "",
                                   vision_mask_max=config.train.vision_mask_max if args.vision_mask_max is None
                                   else args.vision_mask_max, image_free=args.image_free,
                                   precision=resolve_precision("auto", torch.device("cpu"))))
    seed_everything(args.seed)
    train, val, test = load_splits(config.data, config.model.image_size)
    config, tokenizer = fit_to_data(config, train)
    result = {"config": config.to_dict()}

    # --- 1. question-only references -----------------------------------------------------------
    majority = Counter(s["response"] for s in train.samples).most_common(1)[0][0]
    result["majority"] = {"answer": majority,
                          "test": sum(vqa_accuracy(majority, s["answers"]) for s in test.samples) / len(test.samples)}
    print(f"question only: majority {majority!r} {result['majority']['test']:.3f}")
    show_regression(result, "bag_of_words", bag_of_words_baseline(train, val, test))
    colours = {id(ds): cell_colours(ds) for ds in (train, val, test)}
    for k in PROBE_DIMS:
        show_regression(result, f"bag_of_words+cell_colours_{k}",
                        bag_of_words_baseline(train, val, test, leading_components(colours, train, k)))

    # --- 2. what the model can write -------------------------------------------------------------
    def writable(s):
        ids = tokenizer.encode(s["response"])
        return tokenizer.unk_id not in ids and len(ids) <= config.model.response_len and \
            vqa_accuracy(tokenizer.decode(ids), s["answers"]) == 1
    result["writable_test"] = sum(map(writable, test.samples)) / len(test.samples)
    result["multi_word_test"] = sum("," in s["response"] for s in test.samples) / len(test.samples)
    print(f"test answers the model can write: {result['writable_test']:.3f} (lists of words: "
          f"{result['multi_word_test']:.3f}); vocabulary {len(tokenizer)}, response_len {config.model.response_len}")

    # --- 3. the SFT curve ------------------------------------------------------------------------
    device, precision = torch.device("cpu"), config.train.precision
    model = checkpoint.build_model(config, tokenizer)
    t0 = time.time()
    source = checkpoint.load(args.vision_from, stages=("clean",))[0] if args.vision_from else None
    print(vision_phase(model, train, tokenizer, config.train, device, source))
    result["vision_minutes"] = (time.time() - t0) / 60
    model.eval()
    vit = {id(ds): vit_features(model, ds, device) for ds in (train, val, test)}
    for k in PROBE_DIMS:
        show_regression(result, f"bag_of_words+vit_{k}",
                        bag_of_words_baseline(train, val, test, leading_components(vit, train, k)))
    write_json(Path(args.out), result)
    if args.steps == 0:
        return
    model.train()
    n_vision = config.model.n_vision
    blind = torch.ones(len(test.samples), n_vision, dtype=torch.bool)

    def accuracy(ds, masks=None):
        with autocast(device, precision):
            preds = generate_responses(model, tokenizer, ds, vision_masks=masks, device=device)
        return score(ds, range(len(ds.samples)), preds)["vqa_accuracy"]

    trainer = Finetuner(model, train.images, encode_dataset(train, tokenizer, config.model),
                        params=model.text_parameters(), steps=args.steps, cfg=config.train, device=device,
                        vision_mask_max=config.train.vision_mask_max, seed=args.seed,
                        image_free=config.train.image_free)
    curve, t0, losses = [], time.time(), []
    for step in range(args.steps):
        losses.append(trainer.step(step, "SFT").item())
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            model.eval()
            point = {"step": step + 1, "epochs": (step + 1) * config.train.batch_size / len(train.samples),
                     "loss": sum(losses[-50:]) / len(losses[-50:]), "val": accuracy(val), "test": accuracy(test),
                     "blind_test": accuracy(test, blind), "sft_minutes": (time.time() - t0) / 60}
            curve.append(point)
            print(f"step {point['step']:5d} ({point['epochs']:.1f} epochs) loss {point['loss']:.3f}  val "
                  f"{point['val']:.3f}  test {point['test']:.3f}  blind {point['blind_test']:.3f}", flush=True)
            write_json(Path(args.out), {**result, "curve": curve})
    best = max(curve, key=lambda c: c["val"])
    print(f"best on val: step {best['step']} -> test {best['test']:.3f} (blind {best['blind_test']:.3f}); "
          f"wrote {args.out}")


if __name__ == "__main__":
    with friendly_errors():
        main()
