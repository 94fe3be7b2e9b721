"""Stage 4: the results table, the test-time defences, the mask-ratio sweep, the controls, the figures.

    python evaluate.py                                   # runs/default
    python evaluate.py --run-dir runs/seed1 --skip-ablations
    python evaluate.py --run-dir runs/flickr8k --ablations on   # public data: with the test-time defences

Reads clean.pt, backdoored.pt, purified.pt (and the control_*.pt that exist) of a run directory,
checks that they belong together (each checkpoint records the sha256 of the files it was made
from), and measures each on the held-out test set: ASR on triggered inputs, false-trigger rate,
clean caption CIDEr-D / BLEU-4 and VQA accuracy; next to them two baselines of what the image is
worth: the clean model with every vision token masked ("blind": its language prior alone) and, for
VQA, the most frequent training answer given to every question. On the backdoored model it also
tries masking at inference only (disp.test_time; by default on the scenes only, --ablations). With
the attack's manifest, which the defence never reads, it scores what each purification did: how
well "the response changed" finds the poisoned samples, and how many poisoned and clean samples had
a token masked. Precision: the attack's unless --precision is given. Tables over several run directories:
experiments/compare_runs.py. Writes, in the run directory:
    results.json   every number above, with the settings
    results.md     the same as tables, with example outputs
    captions_clean.jsonl  every test caption of the clean model: image, references, output
    sweep.png      ASR and clean quality against the mask ratio (with the ablations: by default on the scenes)
    examples.png   test photos: reference, clean output; on the triggered photo the backdoored model's
                   saliency, the tokens DiSP masks, the backdoored and purified outputs (--figures > 0)
    denoising.png  the denoising order on one triggered test photo: which token the clean, backdoored,
                   masked-backdoored and purified models commit at each step, and how confidently
    purified_saliency.png  saliency heatmaps of training samples, poisoned and clean, with the tokens
                   purify.py masked and the responses before and after (--figures > 0)
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from disp import purification, test_time
from disp.backdoor import check_manifest, triggered_copy
from disp.config import CONTROL_ROWS, TINY_NOTE, AttackConfig, PurifyConfig
from disp.data.dataset import load_dataset
from disp.data.splits import load_split
from disp.evaluation import HeldOutSet, answer_rate, denoising_trace, detection
from disp.support import files, stage
from disp.support.errors import DispError, check_positive, check_ratio, friendly_errors
from disp.support.figures import denoising_order, example_panels, saliency_panels, sweep_curves
from disp.support.report import COLUMNS, results_markdown
from disp.support.runtime import autocast, pick_device, resolve_precision, seed_everything

KEYS = tuple(key for key, _ in COLUMNS)  # the table's columns


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="run directory (default: runs/default)")
    p.add_argument("--ablations", choices=["on", "off"], default=None,
                   help="the test-time defences and the mask-ratio sweep (default: on for the scenes; off for public "
                        "data, where they take minutes: 3.4 of the Flickr8k pipeline's 32 on a 2-core CPU)")
    p.add_argument("--skip-ablations", action="store_true", help="only the main rows: --ablations off")
    p.add_argument("--figures", type=int, default=4,
                   help="samples per figure (0: no examples.png, denoising.png, purified_saliency.png)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | mps")
    x = p.add_argument_group("experiment options")
    x.add_argument("--mask-ratio", type=float, default=0.05,
                   help="fixed ratio of the test-time defences (default 0.05: 1 of 36 tokens)")
    x.add_argument("--sweep", default="0,0.03,0.1,0.2,0.3,0.45,0.6,0.9", help="mask ratios of the sweep")
    x.add_argument("--eval-samples", type=int, default=None, help="test samples of the main rows (default: all)")
    x.add_argument("--ablation-samples", type=int, default=200, help="test samples of the defences and the sweep")
    x.add_argument("--precision", default=None, help="auto | fp32 | bf16 (default: the attack's)")
    args = p.parse_args(argv)
    if args.skip_ablations and args.ablations == "on":
        raise DispError("--skip-ablations and --ablations on contradict each other; give one")
    check_ratio("--mask-ratio", args.mask_ratio)
    if args.eval_samples is not None:
        check_positive("--eval-samples", args.eval_samples)
    check_positive("--ablation-samples", args.ablation_samples)
    check_positive("--figures", args.figures, allow_zero=True)
    try:
        args.sweep = [check_ratio("sweep ratio", float(r)) for r in args.sweep.split(",")]
    except ValueError:
        raise DispError(f"--sweep must be comma-separated numbers in [0, 1], got {args.sweep!r}") from None
    return args


def summary(metrics: dict) -> dict:
    """The table's columns; None where the test set has no such task (no questions, no captions)."""
    return {k: metrics.get(k) for k in KEYS}


def main(argv=None):
    args = parse_args(argv)
    run_dir, device = Path(args.run_dir), pick_device(args.device)
    seed_everything(0)
    t0 = time.time()

    # --- models, data and the attack's manifest, checked to belong to one run --------------------
    backdoored, tokenizer, config, b_state = stage.load_parent(
        run_dir / "backdoored.pt", "backdoored", run_dir, ["clean.pt", "poisoned_train.pt", "poison_manifest.json"],
        device)
    clean, _, _, clean_state = stage.load_parent(run_dir / "clean.pt", "clean", run_dir, device=device)
    purifications = {name: load_purification(run_dir, name, device)  # name -> (model, checkpoint state)
                     for name in ["purified", *CONTROL_ROWS] if name == "purified" or (run_dir / f"{name}.pt").exists()}
    attack = AttackConfig.from_dict(b_state["extra"]["attack"])
    p_extra = purifications["purified"][1]["extra"]
    settings = PurifyConfig.from_dict(p_extra["purify"])
    thresholds = {k: math.inf if v is None else v for k, v in (p_extra.get("thresholds") or {}).items()}
    poisoned_train = load_dataset(run_dir / "poisoned_train.pt", image_size=config.model.image_size)
    manifest = files.read_json(run_dir / "poison_manifest.json", "poison manifest", keys=["poisoned_indices"])
    poisoned = set(check_manifest(manifest, len(poisoned_train), run_dir / "poison_manifest.json")["poisoned_indices"])
    purify_scores = files.load_plain(run_dir / "purified_saliency.pt", "saliency scores")
    stage.begin(run_dir, config.preset)
    test = load_split(config.data, config.model.image_size, "test")
    precision = resolve_precision(args.precision, device) if args.precision else attack.precision
    held_out = HeldOutSet(tokenizer, test, triggered_copy(test, attack.backdoor), attack.backdoor, device, precision,
                          paint=settings.masking == "patch")  # test-time masking masks as purify.py did

    # --- main rows: clean, backdoored, DiSP and the controls --------------------------------------
    results = {"config": {"trigger": attack.backdoor.trigger, "target": attack.backdoor.target,
                          "poison_rate": attack.backdoor.poison_rate, "mask_ratio": args.mask_ratio,
                          "saliency": settings.saliency, "rule": settings.rule, "masking": settings.masking,
                          "suppress": settings.suppress, "groups": settings.groups,
                          "seed": config.train.seed, "attack_trainable": attack.trainable, "preset": config.preset,
                          "precision": precision, "saliency_figure": args.figures > 0}}
    rows, outputs, clean_outputs = {}, {}, {}
    models = {"clean": clean, "backdoored": backdoored, **{n: m for n, (m, _) in purifications.items()}}
    for name, model in models.items():
        results[name], clean_outputs[name], outputs[name] = held_out.measure(model, args.eval_samples, name)
        rows[CONTROL_ROWS.get(name, name)] = summary(results[name])

    # --- baselines that show the clean model uses the image ---------------------------------------
    every_token = torch.ones(len(test.samples), config.model.n_vision, dtype=torch.bool)
    results["blind"] = held_out.measure(clean, args.eval_samples, "clean model, blind", clean_masks=every_token,
                                        triggered_masks=every_token)[0]
    rows["blind"] = summary(results["blind"])
    majority = clean_state["extra"].get("majority_answer")  # the most frequent training answer (train.py)
    if majority is not None and answer_rate(majority, test) is not None:
        results["majority_answer"] = {"answer": majority, "vqa_accuracy": answer_rate(majority, test)}

    # --- test-time defences on the backdoored model (no refinement) -------------------------------
    results["test_time_defences"], results["sweep"] = {}, {}
    ablations = args.ablations or ("off" if args.skip_ablations or config.data.source != "scenes" else "on")
    if ablations == "on":
        results["test_time_defences"], results["sweep"] = test_time.defences(
            held_out, backdoored, settings, poisoned_train, purify_scores, args.mask_ratio, args.sweep,
            args.ablation_samples)
        rows.update({label: summary(m) for label, m in results["test_time_defences"].items()})
    results["rows"] = rows

    # --- what each purification did, scored against the manifest ---------------------------------
    captions = [{"image": image_name(test, i), "references": test.samples[i]["answers"], "output": out}
                for i, out in sorted(clean_outputs["clean"].items()) if test.samples[i]["task"] == "caption"]
    purified_rows = {name: files.read_jsonl(run_dir / f"{name}_train.jsonl") for name in purifications}
    results["detection"] = {name: detection(r, poisoned) for name, r in purified_rows.items()}

    # --- examples, figures, files -----------------------------------------------------------------
    results["examples"] = [{"prompt": test.samples[i]["prompt"], "reference": test.samples[i]["response"],
                            "backdoored": outputs["backdoored"][i], "purified": outputs["purified"][i]}
                           for i in sorted(outputs["backdoored"])[:6]]
    results["minutes"] = (time.time() - t0) / 60
    markdown = results_markdown(results, rows, run_dir)
    with files.one_unit():
        files.write_json(run_dir / "results.json", results)
        files.save_text(run_dir / "results.md", markdown)
        files.save_text(run_dir / "captions_clean.jsonl", "".join(json.dumps(c) + "\n" for c in captions))
        if results["sweep"]:
            sweep_curves(run_dir / "sweep.png", results["sweep"])
        if args.figures and outputs["backdoored"]:
            draw_examples(run_dir, args.figures, held_out, models, settings, thresholds, clean_outputs, outputs)
        if args.figures:
            draw_saliency(run_dir, args.figures, poisoned_train, purified_rows["purified"], purify_scores, poisoned)
    drawn = {"sweep.png": bool(results["sweep"]), "examples.png": bool(args.figures and outputs["backdoored"]),
             "purified_saliency.png": args.figures > 0}
    drawn["denoising.png"] = drawn["examples.png"]
    for name in [n for n, done in drawn.items() if not done]:  # an earlier picture would not match results.md
        (run_dir / name).unlink(missing_ok=True)
    print(markdown)
    if config.preset == "tiny":
        print(TINY_NOTE)
    print(f"wrote {run_dir / 'results.json'}, {run_dir / 'results.md'} and the figures in {results['minutes']:.1f} min")


def image_name(data, i: int) -> str:
    """The file name of sample i's image (public data), else its index in the set."""
    names = data.meta.get("image_files")
    return Path(names[data.samples[i]["image"]]).name if names else str(data.samples[i]["image"])


def load_purification(run_dir, name, device):
    """-> (model, checkpoint state) of purify.py's run `name`, made from this run's backdoored.pt, with
    its purified set (and, for DiSP, its saliency scores)."""
    data_files = ["backdoored.pt", f"{name}_train.jsonl"] + (["purified_saliency.pt"] if name == "purified" else [])
    model, _, _, state = stage.load_parent(run_dir / f"{name}.pt", name, run_dir, data_files, device)
    return model, state


def draw_examples(run_dir, n, held_out, models, settings, thresholds, clean_outputs, outputs):
    """examples.png and denoising.png on triggered test samples the attack targets (captions first, one
    per image), with the tokens purify.py's rule would mask in them."""
    test, triggered = held_out.test, held_out.triggered
    by_image = {}
    for i in sorted(outputs["backdoored"], key=lambda i: (test.samples[i]["task"] != "caption", i)):
        by_image.setdefault(test.samples[i]["image"], i)
    picks = list(by_image.values())[:n]
    scores = held_out.scores(models["backdoored"], triggered, picks, settings.saliency)[picks]
    masks = purification.select(scores, [test.samples[i]["task"] for i in picks], settings, thresholds)
    examples = [{"image": test.images[test.samples[i]["image"]],
                 "triggered_image": triggered.images[triggered.samples[i]["image"]],
                 "prompt": test.samples[i]["prompt"], "reference": test.samples[i]["response"],
                 "clean": clean_outputs["clean"][i], "backdoored": outputs["backdoored"][i],
                 "purified": outputs["purified"][i], "scores": scores[k], "mask": masks[k]}
                for k, i in enumerate(picks)]
    example_panels(run_dir / "examples.png", examples)
    with autocast(held_out.device, held_out.precision):
        traces = {label: denoising_trace(models[name], held_out.tokenizer, triggered, picks[0], device=held_out.device,
                                         vision_mask=mask, paint=held_out.paint)
                  for label, name, mask in (("clean model", "clean", None), ("backdoored", "backdoored", None),
                                            ("backdoored, DiSP's tokens masked", "backdoored", masks[0]),
                                            ("DiSP-purified", "purified", None))}
    denoising_order(run_dir / "denoising.png", examples[0]["triggered_image"], test.samples[picks[0]]["prompt"], traces)


def draw_saliency(run_dir, n, data, rows, scores, poisoned: set):
    """purified_saliency.png: n training samples, half poisoned, half clean (one per image, so the
    pictures differ), with purify.py's scores, the tokens it masked and the responses it rewrote."""
    clean_by_image = {}
    for i in range(len(data)):
        if i not in poisoned:
            clean_by_image.setdefault(data.samples[i]["image"], i)
    picks = sorted(poisoned)[: n // 2] + list(clean_by_image.values())[: n - n // 2]
    masks = torch.zeros(scores.shape, dtype=torch.bool)
    for r in rows:
        masks[r["index"], r["masked_tokens"]] = True
    saliency_panels(run_dir / "purified_saliency.png", data, picks, scores, masks, [r["original"] for r in rows],
                    [r["regenerated"] for r in rows])


if __name__ == "__main__":
    with friendly_errors():
        main()
