"""What each photo-model lever buys: train.py on a public caption set with one lever changed at a
time, then the clean model's quality, its blind self, what its frozen ViT carries, and the time.

    python experiments/photo_levers.py --data-root ../shared/data/flickr8k --levers base,contrastive,stem
    python experiments/photo_levers.py ... --sft-steps 1500 --vision-steps 750   # a reduced run per lever

Levers (train.py flags; NAME=FLAGS adds one): base (the photo preset), contrastive / both (the ViT
pretrained to tell each image's bag of words from the batch's others, instead of or besides
predicting it), crop (pretraining on random crops of >= 60% of the side), stem (a convolutional
stem), vit (the ViT fine-tuned during SFT at a peak rate of 3e-4), oneblock (captions written in one
block, as before the photo preset's block length of 4), unguided (no guidance on the image, as before
the preset's 0.3), imagefree (10% of the SFT samples image-free, guidance 0.6). For each: train.py --data
flickr into GRID/NAME (skipped where clean.pt exists), then
    val    CIDEr-D, BLEU-4 and distinct captions on --val-images images of the val split (Flickr8k's
           dev images: not the clean model's, the attack's later)
    test   the same on the test split (train.py's clean_metrics.json), and blind: the test captions
           with every vision token masked (what the language prior alone writes)
    probe  bench/probe.py's mean ROC AUC of the words probe on the frozen ViT, and its trigger probes
Writes GRID/photo_levers.md and GRID/photo_levers.json.
"""

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: find the disp package
import torch  # noqa: E402

from disp.data.splits import load_split  # noqa: E402
from disp.evaluation import generate_responses, score  # noqa: E402
from disp.support import checkpoint, files  # noqa: E402
from disp.support.errors import DispError, check_positive, friendly_errors  # noqa: E402
from disp.support.runtime import autocast  # noqa: E402

LEVERS = {"base": [], "contrastive": ["--vision-objective", "contrastive"], "both": ["--vision-objective", "both"],
          "crop": ["--vision-crop", "0.6"], "stem": ["--conv-stem", "1"], "vit": ["--sft-vit-lr", "3e-4"],
          "oneblock": ["--block-length", "0"], "unguided": ["--guidance", "0"],
          "imagefree": ["--image-free", "0.1", "--guidance", "0.6"]}


def caption_quality(model, tokenizer, data, precision, vision_masks=None) -> dict:
    """CIDEr-D, BLEU-4 and distinct captions of the model's captions of every image of `data`."""
    indices = [i for i, s in enumerate(data.samples) if s["task"] == "caption"]
    with autocast("cpu", precision):
        outputs = generate_responses(model, tokenizer, data, indices, vision_masks=vision_masks)
    return {k: v for k, v in score(data, indices, outputs).items() if k in ("cider", "bleu4", "distinct_captions")}


def measure(run_dir: Path, val_images: int, probe_steps: int) -> dict:
    model, tokenizer, config, state = checkpoint.load(run_dir / "clean.pt", stages=["clean"])
    precision = config.train.precision
    val = load_split(replace(config.data, val_images=val_images), config.model.image_size, "val")
    test = load_split(config.data, config.model.image_size, "test")
    blind = torch.ones(len(test.samples), config.model.n_vision, dtype=torch.bool)
    metrics = state["extra"]["metrics"]
    row = {"val": caption_quality(model, tokenizer, val, precision),
           "test": {k: metrics.get(k) for k in ("cider", "bleu4", "distinct_captions")},
           "blind": caption_quality(model, tokenizer, test, precision, blind),
           "train_minutes": metrics["minutes"]}
    if row["test"]["distinct_captions"] is None:  # a clean.pt of before the count: count it now
        row["test"] = caption_quality(model, tokenizer, test, precision)
    probe = run_dir / "probe.json"
    if not probe.exists():
        run(["bench/probe.py", "--run-dir", str(run_dir), "--steps", str(probe_steps), "--out", str(probe)])
    found = json.loads(probe.read_text())
    row["probe_words_auc"] = found["words"]["pretrained ViT"]["mean_auc"]
    row["probe_triggers"] = {t: found["triggers"][t]["pretrained ViT"] for t in found["triggers"]}
    return row


def run(argv: list):
    result = subprocess.run([sys.executable, *argv], cwd=ROOT)
    if result.returncode != 0:
        raise DispError(f"{' '.join(argv)} failed (exit {result.returncode}); its error is above")


def write_table(grid: Path, rows: dict) -> str:
    lines = ["| lever | val CIDEr-D | val BLEU-4 | val distinct | test CIDEr-D | test BLEU-4 | test distinct | "
             "blind CIDEr-D | words probe AUC | train min |", "|---|" + "---:|" * 9]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['val']['cider']:.3f} | {r['val']['bleu4']:.3f} | {r['val']['distinct_captions']} "
                     f"| {r['test']['cider']:.3f} | {r['test']['bleu4']:.3f} | {r['test']['distinct_captions']} | "
                     f"{r['blind']['cider']:.3f} | {r['probe_words_auc']:.3f} | {r['train_minutes']:.1f} |")
    text = "\n".join(lines) + "\n"
    files.save_text(grid / "photo_levers.md", text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="the Flickr8k folder")
    p.add_argument("--grid-dir", default="runs/levers", help="one run directory per lever (default runs/levers)")
    p.add_argument("--levers", default="base,contrastive,both,crop,stem",
                   help=f"comma-separated: {', '.join(LEVERS)}, or NAME=TRAIN_FLAGS (flags separated by spaces)")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT steps per run (default: the preset's)")
    p.add_argument("--vision-steps", type=int, default=None, help="ViT pretraining steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="train.py's seed (default 0)")
    p.add_argument("--val-images", type=int, default=500, help="val images captioned (default 500)")
    p.add_argument("--probe-steps", type=int, default=500, help="probe training steps (default 500)")
    args = p.parse_args(argv)
    check_positive("--val-images", args.val_images)
    check_positive("--probe-steps", args.probe_steps)
    grid = Path(args.grid_dir)
    levers = {}
    for spec in args.levers.split(","):
        name, _, flags = spec.partition("=")
        if not flags and name not in LEVERS:
            raise DispError(f"unknown lever {name!r}; choose from {', '.join(LEVERS)} or write NAME=FLAGS")
        levers[name] = flags.split() if flags else LEVERS[name]
    budget = [f for flag, v in (("--sft-steps", args.sft_steps), ("--vision-steps", args.vision_steps))
              if v is not None for f in (flag, str(v))]
    results_path = grid / "photo_levers.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name, flags in levers.items():
        run_dir = grid / name
        if not (run_dir / "clean.pt").exists():
            t = time.time()
            run(["train.py", "--data", "flickr", "--data-root", args.data_root, "--run-dir", str(run_dir),
                 "--seed", str(args.seed), *budget, *flags])
            print(f"{name}: trained in {(time.time() - t) / 60:.1f} min")
        rows[name] = {"flags": " ".join(flags), **measure(run_dir, args.val_images, args.probe_steps)}
        files.write_json(results_path, rows)
        print(write_table(grid, rows))


if __name__ == "__main__":
    with friendly_errors():
        main()
