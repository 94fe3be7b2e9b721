"""Stage 4: the results table, the test-time defences, the mask-ratio sweep, the controls, the figures.

    python evaluate.py                                   # runs/default
    python evaluate.py --run-dir runs/seed1 --skip-ablations
    python evaluate.py --compare runs/default,runs/vit-attack,runs/projector-attack   # -> runs/comparison.md
    python evaluate.py --aggregate runs/seed0,runs/seed1,runs/seed2                   # -> runs/aggregate.md

Reads clean.pt, backdoored.pt, purified.pt (and the control_*.pt that exist) of a run directory,
checks that they belong together (each checkpoint records the sha256 of the files it was made
from), and measures each on the held-out test set: ASR on triggered inputs, false-trigger rate,
clean caption CIDEr-D / BLEU-4 and VQA accuracy; next to them two baselines of what the image is
worth: the clean model with every vision token masked ("blind": its language prior alone) and, for
VQA, the most frequent training answer given to every question. On the backdoored model it also
tries masking at inference only (no refinement): saliency masking (kl, fisher; fixed ratio and the
adaptive rule), random masking, and CleanSight-style attention pruning; and sweeps the mask ratio
for kl vs random selection. Precision: the attack's unless --precision is given. Writes, in the run directory:
    results.json   every number above, with the settings
    results.md     the same as tables, with example outputs
    sweep.png      ASR and clean quality against the mask ratio (not with --skip-ablations)
    examples.png   test photos: reference, clean output; on the triggered photo the backdoored model's
                   saliency, the tokens DiSP masks, the backdoored and purified outputs (--figures > 0)
    denoising.png  the denoising order on one triggered test photo: which token the clean, backdoored,
                   masked-backdoored and purified models commit at each step, and how confidently
"""

import argparse
import math
import time
from pathlib import Path

import torch

from disp.backdoor import asr_eligible, triggered_copy
from disp.config import CONTROLS, TINY_NOTE, AttackConfig, PurifyConfig
from disp.data.dataset import load_dataset
from disp.data.splits import load_split
from disp.evaluation import answer_rate, backdoor_metrics, denoising_trace, token_scores
from disp.saliency import SALIENCY_METHODS, fit_thresholds, select_adaptive, select_top_ratio
from disp.support import checkpoint, files
from disp.support.errors import DispError, check_positive, check_ratio, friendly_errors
from disp.support.figures import denoising_order, example_panels, sweep_curves
from disp.support.report import aggregate_table, comparison_table, results_markdown
from disp.support.runtime import autocast, pick_device, resolve_precision, seed_everything

KEYS = ("asr", "false_trigger_rate", "cider", "bleu4", "vqa_accuracy")
# results.json key of each control -> its row in the tables
CONTROL_ROWS = {PurifyConfig(control=c).stage: label for c, label in CONTROLS.items()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="run directory (default: runs/default)")
    p.add_argument("--mask-ratio", type=float, default=0.05,
                   help="fixed ratio of the test-time defences (default 0.05: 1 of 36 tokens)")
    p.add_argument("--sweep", default="0,0.03,0.1,0.2,0.3,0.45,0.6,0.9", help="mask ratios of the sweep")
    p.add_argument("--eval-samples", type=int, default=None, help="test samples of the main rows (default: all)")
    p.add_argument("--ablation-samples", type=int, default=200, help="test samples of the defences and the sweep")
    p.add_argument("--skip-ablations", action="store_true", help="only the main rows (for attack variants)")
    p.add_argument("--figures", type=int, default=4, help="test samples in examples.png (0: no examples.png, denoising.png)")
    p.add_argument("--compare", default=None, help="comma-separated run dirs already evaluated: one table")
    p.add_argument("--aggregate", default=None, help="comma-separated run dirs (seeds): mean ± std table")
    p.add_argument("--precision", default=None, help="auto | fp32 | bf16 (default: the attack's)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | mps")
    return p.parse_args(argv)


def summary(metrics: dict) -> dict:
    """The table's columns; None where the test set has no such task (no questions, no captions)."""
    return {k: metrics.get(k) for k in KEYS}


def main(argv=None):
    args = parse_args(argv)
    if args.compare or args.aggregate:
        dirs = [Path(d) for d in (args.compare or args.aggregate).split(",")]
        loaded = {}
        for d in dirs:
            if not (d / "results.json").exists():
                raise DispError(f"{d / 'results.json'} does not exist; run evaluate.py --run-dir {d} first")
            loaded[str(d)] = files.read_json(d / "results.json", "results file",
                                                  keys=["config", "clean", "backdoored", "purified"])
        out = Path(dirs[0]).parent / ("comparison.md" if args.compare else "aggregate.md")
        table = comparison_table(loaded) if args.compare else aggregate_table(loaded, KEYS, CONTROL_ROWS)
        files.atomic_write(out, lambda tmp: Path(tmp).write_text(table))
        print(table)
        print(f"wrote {out}")
        return

    check_ratio("--mask-ratio", args.mask_ratio)
    if args.eval_samples is not None:
        check_positive("--eval-samples", args.eval_samples)
    check_positive("--ablation-samples", args.ablation_samples)
    check_positive("--figures", args.figures, allow_zero=True)
    try:
        ratios = [check_ratio("sweep ratio", float(r)) for r in args.sweep.split(",")]
    except ValueError:
        raise DispError(f"--sweep must be comma-separated numbers in [0, 1], got {args.sweep!r}") from None
    run_dir, device = Path(args.run_dir), pick_device(args.device)
    seed_everything(0)
    t0 = time.time()

    # --- models and data, checked to belong to one run -----------------------------------------
    backdoored_path = run_dir / "backdoored.pt"
    backdoored, tokenizer, config, b_state = checkpoint.load(backdoored_path, stages=["backdoored"], device=device)
    checkpoint.check_made_from(b_state, backdoored_path, run_dir, ["clean.pt", "poisoned_train.pt"])
    attack = AttackConfig.from_dict(b_state["extra"]["attack"])
    precision = resolve_precision(args.precision, device) if args.precision else attack.precision

    def load_of_this_run(stage):  # a checkpoint made from this run's backdoored.pt, or a one-line error
        path = run_dir / f"{stage}.pt"
        model, _, _, state = checkpoint.load(path, stages=[stage], device=device)
        checkpoint.check_made_from(state, path, run_dir, ["backdoored.pt"])
        return model, state

    clean, _, _, clean_state = checkpoint.load(run_dir / "clean.pt", stages=["clean"], device=device)
    purified, p_state = load_of_this_run("purified")
    settings = PurifyConfig.from_dict(p_state["extra"]["purify"])
    controls = {name: load_of_this_run(name)[0] for name in CONTROL_ROWS if (run_dir / f"{name}.pt").exists()}
    poisoned_train = load_dataset(run_dir / "poisoned_train.pt", image_size=config.model.image_size)
    purify_scores = None  # purify.py's saliency scores of the training set, read now so a bad file fails early
    if settings.control is None and "purified_saliency.pt" in p_state["made_from"]:
        purify_scores = files.load_plain(run_dir / "purified_saliency.pt", "saliency scores")
        checkpoint.check_made_from(p_state, run_dir / "purified.pt", run_dir, ["purified_saliency.pt"])
    bcfg = attack.backdoor
    if config.preset == "tiny":
        print(TINY_NOTE)
    test = load_split(config.data, config.model.image_size, "test")
    triggered = triggered_copy(test, bcfg)

    def measure(model, desc, limit=args.eval_samples, **masks):
        with autocast(device, precision):
            m, clean_out, trig_out = backdoor_metrics(model, tokenizer, test, bcfg, limit=limit, device=device,
                                                      triggered=triggered, desc=desc, return_predictions=True, **masks)
        return m, clean_out, trig_out

    def scores(data, indices, method, desc=None):
        """(N_samples, n_vision) scores of the backdoored model; rows outside `indices` stay 0."""
        full = torch.zeros(len(data.samples), config.model.n_vision)
        with autocast(device, precision):
            full[indices] = token_scores(backdoored, tokenizer, data, indices, method, device=device, desc=desc)
        return full

    def disp_masks(s, picks):
        """The vision tokens purify.py's rule masks, given the backdoored model's scores of `picks`."""
        if settings.rule == "ratio":
            return select_top_ratio(s, settings.mask_ratio)
        limits = {k: (v if v is not None else math.inf) for k, v in (p_state["extra"].get("thresholds") or {}).items()}
        return select_adaptive(s, [test.samples[i]["task"] for i in picks], limits, settings.max_masked)

    def picture_data(picks, s):
        """-> (example_panels' examples, denoising_order's arguments for the first pick)."""
        masks = disp_masks(s, picks)
        examples = [{"image": test.images[test.samples[i]["image"]],
                     "triggered_image": triggered.images[triggered.samples[i]["image"]],
                     "prompt": test.samples[i]["prompt"], "reference": test.samples[i]["response"],
                     "clean": clean_outputs["clean"][i], "backdoored": outputs["backdoored"][i],
                     "purified": outputs["purified"][i], "scores": s[k], "mask": masks[k]}
                    for k, i in enumerate(picks)]
        first = picks[0]
        with autocast(device, precision):
            traces = {"clean model": denoising_trace(clean, tokenizer, triggered, first, device=device),
                      "backdoored": denoising_trace(backdoored, tokenizer, triggered, first, device=device),
                      "backdoored, DiSP's tokens masked": denoising_trace(backdoored, tokenizer, triggered, first,
                                                                          vision_mask=masks[0], device=device),
                      "DiSP-purified": denoising_trace(purified, tokenizer, triggered, first, device=device)}
        return examples, (examples[0]["triggered_image"], test.samples[first]["prompt"], traces)

    # --- main rows -----------------------------------------------------------------------------
    results = {"config": {"trigger": bcfg.trigger, "target": bcfg.target, "poison_rate": bcfg.poison_rate,
                          "mask_ratio": args.mask_ratio, "saliency": settings.saliency, "rule": settings.rule,
                          "suppress": settings.suppress,
                          "seed": config.train.seed, "attack_trainable": attack.trainable,
                          "preset": config.preset, "precision": precision,
                          "saliency_figure": (run_dir / "purified_saliency.png").exists()}}
    rows, outputs, clean_outputs = {}, {}, {}
    for name, model in (("clean", clean), ("backdoored", backdoored), ("purified", purified)):
        m, clean_outputs[name], outputs[name] = measure(model, name)
        results[name] = m
        rows[name] = summary(m)
    for name, label in CONTROL_ROWS.items():
        if name in controls:
            results[name] = measure(controls[name], name)[0]
            rows[label] = summary(results[name])

    # --- baselines that show the clean model uses the image --------------------------------------
    every_token = torch.ones(len(test.samples), config.model.n_vision, dtype=torch.bool)
    results["blind"] = measure(clean, "clean model, blind", clean_masks=every_token, triggered_masks=every_token)[0]
    rows["blind"] = summary(results["blind"])
    majority = clean_state["extra"].get("majority_answer")  # the most frequent training answer (train.py)
    if majority is not None and answer_rate(majority, test) is not None:
        results["majority_answer"] = {"answer": majority, "vqa_accuracy": answer_rate(majority, test)}

    # --- test-time defences on the backdoored model (no refinement) ------------------------------
    results["test_time_defences"], results["sweep"] = {}, {}
    subset = list(range(len(test.samples)))[: args.ablation_samples]
    eligible = [i for i in asr_eligible(test.samples, bcfg) if i < len(subset)]
    tasks = [s["task"] for s in test.samples]
    defended = results["test_time_defences"]
    for method in () if args.skip_ablations else (*SALIENCY_METHODS, "attention"):
        s_clean = scores(test, subset, method, desc=f"scores {method}")
        s_trig = scores(triggered, eligible, method)
        rules = {"ratio": lambda s: select_top_ratio(s, args.mask_ratio)}
        if method in ("kl", "fisher"):  # adaptive thresholds come from the (poisoned) training set, as in purify.py
            if method == settings.saliency and purify_scores is not None:
                train_scores = purify_scores
                fit_idx = list(range(len(train_scores)))
            else:  # a sample of the training set is enough to fit the two groups (>= 50 per prompt type)
                fit_idx = list(range(min(len(poisoned_train.samples), 1000)))
                train_scores = scores(poisoned_train, fit_idx, method)
            thresholds = fit_thresholds(train_scores[fit_idx], [poisoned_train.samples[i]["task"] for i in fit_idx],
                                        settings.max_valley)
            rules["adaptive"] = lambda s: select_adaptive(s, tasks, thresholds, settings.max_masked)
        for rule, select in rules.items():
            label = f"test-time {method} masking ({rule})" if method != "attention" else "test-time CleanSight pruning (ratio)"
            m, _, _ = measure(backdoored, None, limit=len(subset), clean_masks=select(s_clean),
                              triggered_masks=select(s_trig))
            defended[label] = m
            rows[label] = summary(m)
        if method in ("kl", "random"):  # the sweep reuses these scores: only the selection changes
            curve = {"ratio": ratios, "asr": [], "vqa_accuracy": [], "cider": []}
            for r in ratios:
                m, _, _ = measure(backdoored, None, limit=len(subset), clean_masks=select_top_ratio(s_clean, r),
                                  triggered_masks=select_top_ratio(s_trig, r))
                for k in ("asr", "vqa_accuracy", "cider"):
                    curve[k].append(m.get(k, 0.0))
            results["sweep"][method] = curve
    results["rows"] = rows

    # --- examples, figures, files --------------------------------------------------------------
    examples = [{"prompt": test.samples[i]["prompt"], "reference": test.samples[i]["response"],
                 "backdoored": outputs["backdoored"][i], "purified": outputs["purified"][i]}
                for i in sorted(outputs["backdoored"])[:6]]
    results["examples"] = examples
    pictures = []
    if args.figures and outputs["backdoored"]:  # test samples the attack targets: captions first, one per image
        by_image = {}
        for i in sorted(outputs["backdoored"], key=lambda i: (test.samples[i]["task"] != "caption", i)):
            by_image.setdefault(test.samples[i]["image"], i)
        picks = list(by_image.values())[:args.figures]
        pictures = picture_data(picks, scores(triggered, picks, settings.saliency)[picks])
    results["minutes"] = (time.time() - t0) / 60
    written = [run_dir / "results.json", run_dir / "results.md"]
    markdown = results_markdown(results, rows, run_dir)
    with files.one_unit():
        files.write_json(run_dir / "results.json", results)
        files.atomic_write(run_dir / "results.md", lambda tmp: Path(tmp).write_text(markdown))
        if results["sweep"]:
            sweep_curves(run_dir / "sweep.png", results["sweep"])
            written.append(run_dir / "sweep.png")
        if pictures:
            example_panels(run_dir / "examples.png", pictures[0])
            denoising_order(run_dir / "denoising.png", *pictures[1])
            written += [run_dir / "examples.png", run_dir / "denoising.png"]
    # a picture of an earlier evaluation would no longer match results.md
    for stale in ([] if results["sweep"] else ["sweep.png"]) + ([] if pictures else ["examples.png", "denoising.png"]):
        (run_dir / stale).unlink(missing_ok=True)
    print(markdown)
    if config.preset == "tiny":
        print(TINY_NOTE)
    print(f"wrote {', '.join(str(w) for w in written)} in {results['minutes']:.1f} min")


if __name__ == "__main__":
    with friendly_errors():
        main()
