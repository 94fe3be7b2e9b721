"""DAQUAR: what a question alone is worth, and how long the VQA model should fine-tune.

    python experiments/daquar.py --data-root ../shared/data/daquar --out runs/daquar-curve.json
    python experiments/daquar.py --data-root ../shared/data/daquar --vision-from runs/flickr/clean.pt \
        --out runs/daquar-curve-flickr-vit.json

On the split train.py reads (DAQUAR full; val = every DAQUAR_VAL_EVERY-th training image, the fine-tuning set):
1. Question-only references, fitted here on the training questions: the majority answer, and a
   bag-of-words softmax regression from the question's words to the answer (one class per training
   answer), its epoch picked on val. No image: what the language prior is worth on this split.
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


def bag_of_words_baseline(train, val, test, epochs=30, seed=0):
    """Softmax regression from the question's word set to the training answers; the epoch with the
    best val accuracy -> (val accuracy, epoch, test accuracy)."""
    vocab = {w: i for i, w in enumerate(sorted({w for s in train.samples for w in s["prompt"].split()}))}
    answers = sorted({s["response"] for s in train.samples})

    def features(ds):
        x = torch.zeros(len(ds.samples), len(vocab))
        for i, s in enumerate(ds.samples):
            x[i, [vocab[w] for w in s["prompt"].split() if w in vocab]] = 1.0
        return x

    def accuracy(linear, x, ds):
        with torch.no_grad():
            picks = linear(x).argmax(1).tolist()
        return sum(vqa_accuracy(answers[k], s["answers"]) for k, s in zip(picks, ds.samples)) / len(ds.samples)

    torch.manual_seed(seed)
    x_train, x_val, x_test = features(train), features(val), features(test)
    index = {a: k for k, a in enumerate(answers)}
    y = torch.tensor([index[s["response"]] for s in train.samples])
    linear = torch.nn.Linear(len(vocab), len(answers))
    optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    best = (-1.0, 0, 0.0)
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(linear(x_train[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val_acc = accuracy(linear, x_val, val)
        if val_acc > best[0]:
            best = (val_acc, epoch, accuracy(linear, x_test, test))
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="the DAQUAR folder (qa.894.raw.*.txt, nyu_depth_images/)")
    p.add_argument("--vision-from", default=None, help="take the ViT from this clean.pt instead of pretraining it")
    p.add_argument("--vision-steps", type=int, default=None,
                   help="ViT pretraining steps on DAQUAR's photos (default: the preset's; with --vision-from 0, "
                        "more continue from the copied ViT)")
    p.add_argument("--steps", type=int, default=3000, help="SFT steps (default 3000, the preset's)")
    p.add_argument("--every", type=int, default=250, help="measure every this many steps (default 250)")
    p.add_argument("--vision-mask-max", type=float, default=None,
                   help="each SFT sample masks U(0, this) of its vision tokens (default: the preset's, 0.15)")
    p.add_argument("--image-free", type=float, default=0.0,
                   help="this share of the SFT samples sees no image (every vision token masked; default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    check_positive("--steps", args.steps)
    check_positive("--every", args.every)
    vision_steps = args.vision_steps if args.vision_steps is not None else 0 if args.vision_from else None
    if args.vision_mask_max is not None and not 0 <= args.vision_mask_max <= 1:
        raise DispError(f"--vision-mask-max must be in [0, 1], got {args.vision_mask_max}")
    if not 0 <= args.image_free < 1:
        raise DispError(f"--image-free must be in [0, 1), got {args.image_free}")

    config = get_preset("daquar")
    config = replace(config, data=replace(config.data, source="daquar", data_root=str(Path(args.data_root).resolve()),
                                          seed=args.seed),
                     train=replace(config.train, seed=args.seed, sft_steps=args.steps,
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
    val_acc, epoch, test_acc = bag_of_words_baseline(train, val, test)
    result["bag_of_words"] = {"val": val_acc, "epoch": epoch, "test": test_acc}
    print(f"question only: majority {majority!r} {result['majority']['test']:.3f}; bag of words (epoch {epoch} "
          f"picked on val {val_acc:.3f}) test {test_acc:.3f}")

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
