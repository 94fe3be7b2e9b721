"""Stage 4: the results table, the test-time defences, the mask-ratio sweep, the controls, the figures.

    python evaluate.py                                   # runs/default -> results.json, results.md, PNGs
    python evaluate.py --compare runs/default,runs/vit-attack,runs/projector-attack
    python evaluate.py --aggregate runs/seed0,runs/seed1,runs/seed2

Reads clean.pt, backdoored.pt, purified.pt (and the control_*.pt that exist) of a run directory and
measures each on the held-out test set: ASR on triggered inputs, false-trigger rate, clean caption
CIDEr-D / BLEU-4 and VQA accuracy. On the backdoored model it also tries masking at inference only
(no refinement): saliency masking (kl, fisher; fixed ratio and the adaptive rule), random masking,
and CleanSight-style attention pruning; and sweeps the mask ratio for kl vs random selection.
"""

import argparse
import time
from pathlib import Path

import torch

from disp.support import checkpoint, files
from disp.backdoor import BackdoorConfig, asr_eligible, triggered_copy
from disp.data.dataset import load_dataset
from disp.support.errors import DispError, check_ratio, friendly_errors
from disp.evaluation import backdoor_metrics, token_scores
from disp.support.figures import sweep_curves
from disp.support.report import aggregate_table, comparison_table, results_markdown
from disp.saliency import fit_thresholds, select_adaptive, select_top_ratio
from disp.data.splits import load_splits
from disp.support.runtime import autocast, pick_device, resolve_precision, seed_everything

KEYS = ("asr", "false_trigger_rate", "cider", "bleu4", "vqa_accuracy")
CONTROLS = {"control_self_distill": "control: regenerate without masking + refine",
            "control_as_is": "control: refine on the poisoned set as-is"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="run directory to evaluate")
    p.add_argument("--mask-ratio", type=float, default=0.05,
                   help="fixed ratio for the test-time defences (0.05 of 36 tokens = 1 token)")
    p.add_argument("--sweep", default="0,0.03,0.1,0.2,0.3,0.45,0.6,0.9", help="mask ratios of the sweep")
    p.add_argument("--eval-samples", type=int, default=None, help="test samples for the main rows (default: all)")
    p.add_argument("--ablation-samples", type=int, default=200, help="test samples for defences and the sweep")
    p.add_argument("--skip-ablations", action="store_true", help="only the main rows (for attack variants)")
    p.add_argument("--compare", default=None, help="comma-separated run dirs already evaluated: one table")
    p.add_argument("--aggregate", default=None, help="comma-separated run dirs (seeds): mean ± std table")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--precision", default="auto",
                   help="generation/saliency precision: auto (bf16 on fast-bf16 hardware) | fp32 | bf16")
    return p.parse_args(argv)


def summary(metrics: dict) -> dict:
    return {k: metrics.get(k, 0.0) for k in KEYS}


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
        table = comparison_table(loaded) if args.compare else aggregate_table(loaded, KEYS, CONTROLS)
        files.atomic_write(out, lambda tmp: Path(tmp).write_text(table))
        print(table)
        print(f"wrote {out}")
        return

    check_ratio("--mask-ratio", args.mask_ratio)
    try:
        ratios = [check_ratio("sweep ratio", float(r)) for r in args.sweep.split(",")]
    except ValueError:
        raise DispError(f"--sweep must be comma-separated numbers in [0, 1], got {args.sweep!r}") from None
    run_dir, device = Path(args.run_dir), pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    seed_everything(0)
    t0 = time.time()

    # --- models and data -----------------------------------------------------------------------
    backdoored, tokenizer, config, b_state = checkpoint.load(run_dir / "backdoored.pt", stages=["backdoored"],
                                                             device=device)
    attack = b_state["extra"]["attack"]

    def load_of_this_run(path, stage, made_by=None):  # refuses a checkpoint of another run (one-line error)
        model, _, _, state = checkpoint.load(path, stages=[stage], device=device)
        checkpoint.check_same_model(state, path, config, tokenizer, run_dir / "backdoored.pt", attack=made_by)
        return model, state

    # the clean model the attack started from (attack variants share runs/default/clean.pt)
    clean, _ = load_of_this_run(attack["clean_checkpoint"], "clean")
    purified, p_state = load_of_this_run(run_dir / "purified.pt", "purified", attack)
    controls = {name: load_of_this_run(run_dir / f"{name}.pt", name, attack)[0]
                for name in CONTROLS if (run_dir / f"{name}.pt").exists()}
    poisoned_train = load_dataset(run_dir / "poisoned_train.pt", image_size=config.model.image_size)
    purify_scores = None  # purify.py's saliency scores of the training set, read now so a bad file fails early
    if (run_dir / "purified_saliency.pt").exists():
        purify_scores = files.load_plain(run_dir / "purified_saliency.pt", "saliency scores")
        if not isinstance(purify_scores, torch.Tensor) or len(purify_scores) != len(poisoned_train.samples):
            raise DispError(f"{run_dir / 'purified_saliency.pt'} does not fit poisoned_train.pt; rerun purify.py")
    bcfg = BackdoorConfig.from_dict(attack["backdoor"])
    settings = p_state["extra"]["purify"]
    _, _, test = load_splits(config.data, config.model.image_size)
    triggered = triggered_copy(test, bcfg)

    def measure(model, desc, limit=args.eval_samples, **masks):
        with autocast(device, precision):
            m, clean_out, trig_out = backdoor_metrics(model, tokenizer, test, bcfg, limit=limit, device=device,
                                                      triggered=triggered, desc=desc, return_predictions=True, **masks)
        return m, trig_out

    def scores(data, indices, method, desc=None):  # vision-token scores of the backdoored model
        with autocast(device, precision):
            return token_scores(backdoored, tokenizer, data, indices, method, device=device, desc=desc)

    # --- main rows -----------------------------------------------------------------------------
    results = {"config": {"trigger": bcfg.trigger, "target": bcfg.target, "poison_rate": bcfg.poison_rate,
                          "mask_ratio": args.mask_ratio, "saliency": settings["saliency"], "rule": settings["rule"],
                          "seed": config.train.seed, "attack_trainable": b_state["extra"]["attack"]["trainable"],
                          "preset": config.preset, "precision": precision}}
    rows, outputs = {}, {}
    for name, model in (("clean", clean), ("backdoored", backdoored), ("purified", purified)):
        m, outputs[name] = measure(model, name)
        results[name] = m
        rows[name] = summary(m)
    for name, label in CONTROLS.items():
        if name in controls:
            results[name] = measure(controls[name], name)[0]
            rows[label] = summary(results[name])

    # --- test-time defences on the backdoored model (no refinement) ------------------------------
    results["test_time_defences"], results["sweep"] = {}, {}
    subset = list(range(len(test.samples)))[: args.ablation_samples]
    eligible = [i for i in asr_eligible(test.samples, bcfg) if i < len(subset)]
    tasks = [s["task"] for s in test.samples]
    defended = results["test_time_defences"]
    for method in () if args.skip_ablations else ("kl", "fisher", "random", "attention"):
        s_clean = scores(test, subset, method, desc=f"scores {method}")
        s_trig = scores(triggered, eligible, method)
        rules = {"ratio": lambda s: select_top_ratio(s, args.mask_ratio)}
        if method in ("kl", "fisher"):  # adaptive thresholds come from the (poisoned) training set, as in purify.py
            if method == settings["saliency"] and purify_scores is not None:
                train_scores = purify_scores
                fit_idx = list(range(len(train_scores)))
            else:  # a sample of the training set is enough to place the gap
                fit_idx = list(range(min(len(poisoned_train.samples), 400)))
                train_scores = scores(poisoned_train, fit_idx, method)
            thresholds = fit_thresholds(train_scores[fit_idx], [poisoned_train.samples[i]["task"] for i in fit_idx],
                                        settings["min_gap"])
            rules["adaptive"] = lambda s: select_adaptive(s, tasks, thresholds, settings["max_masked"])
        for rule, select in rules.items():
            label = f"test-time {method} masking ({rule})" if method != "attention" else "test-time CleanSight pruning (ratio)"
            m, trig_out = measure(backdoored, None, limit=len(subset), clean_masks=select(s_clean),
                                  triggered_masks=select(s_trig))
            defended[label] = m
            rows[label] = summary(m)
        if method in ("kl", "random"):  # the sweep reuses these scores: only the selection changes
            curve = {"ratio": ratios, "asr": [], "vqa_accuracy": [], "cider": []}
            for r in ratios:
                m, _ = measure(backdoored, None, limit=len(subset), clean_masks=select_top_ratio(s_clean, r),
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
    results["minutes"] = (time.time() - t0) / 60
    if results["sweep"]:
        sweep_curves(run_dir / "sweep.png", results["sweep"])
    files.write_json(run_dir / "results.json", results)
    markdown = results_markdown(results, rows, run_dir)
    files.atomic_write(run_dir / "results.md", lambda tmp: Path(tmp).write_text(markdown))
    print(markdown)
    print(f"wrote {run_dir / 'results.json'}, {run_dir / 'results.md'}, {run_dir / 'sweep.png'} "
          f"in {results['minutes']:.1f} min")


if __name__ == "__main__":
    with friendly_errors():
        main()
