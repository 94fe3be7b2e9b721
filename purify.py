"""Stage 3: DiSP self-purification, then refinement (METHOD.md §3-4).

    python purify.py                                  # adaptive rule, exact-KL saliency
    python purify.py --rule ratio --mask-ratio 0.3    # the paper's fixed-fraction rule
    python purify.py --control self-distill           # control: regenerate WITHOUT masking
    python purify.py --control as-is                  # control: refine on the poisoned set as it is
    torchrun --nproc_per_node=2 purify.py             # data-parallel: ranks share scoring, generation, DDP

The defender holds the compromised model (backdoored.pt) and the poisoned fine-tuning set
(poisoned_train.pt); no trigger, no target, no clean data, no list of poisoned samples.
1. For every sample: score the vision tokens by saliency at the first denoising step.
2. Mask the selected tokens ([MASK] embedding at those image positions, chosen once per sample)
   and let the compromised model regenerate the response (greedy, steps = gen_length).
3. Fine-tune the compromised model on the regenerated responses (about 1/5 of the attack's epochs).

Selection rule. The paper masks a fixed fraction of every image (`--rule ratio`). At our scale
(36 vision tokens, objects spread over a few of them) that also hides an object of every clean
image, and the refinement then learns wrong clean answers. The default `--rule adaptive` masks a
token only when its saliency is an outlier for its prompt type (the defender knows each prompt):
the samples' top token scores are split at their widest gap on a log scale, if that gap spans at
least `--min-gap` (a ratio; see disp.saliency.fit_thresholds). A trigger token's occlusion KL sits
well above any clean token's (>= 4.8x, up to 1000x, by prompt type, in a seed-0 run of an
earlier, fully bidirectional model), so poisoned samples lose their trigger while clean samples
are regenerated unmasked (and keep their answers).

Writes purified.pt, purified_train.pt + purified_train.jsonl (original vs regenerated response and
the masked tokens of every sample, for a person to read), purify_report.json, and saliency PNGs.
Control runs write control_<name>.pt and control_<name>_report.json instead.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from disp.support import checkpoint, distributed, files
from disp.data.batching import encode_dataset
from disp.data.dataset import VLDataset, load_dataset, save_dataset
from disp.support.errors import DispError, check_ratio, friendly_errors
from disp.evaluation import generate_responses, token_scores
from disp.support.figures import saliency_panels
from disp.saliency import fit_thresholds, select_adaptive, select_top_ratio
from disp.training import finetune, trainable_parameters
from disp.support.runtime import autocast, pick_device, resolve_precision, seed_everything

CONTROLS = ("self-distill", "as-is")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="run directory with backdoored.pt and poisoned_train.pt")
    p.add_argument("--saliency", default="kl", help="kl (exact occlusion, default) | fisher (Hutchinson) | random")
    p.add_argument("--rule", default="adaptive", help="adaptive (default) | ratio (the paper's fixed fraction)")
    p.add_argument("--mask-ratio", type=float, default=0.3, help="--rule ratio: fraction of vision tokens masked")
    p.add_argument("--min-gap", type=float, default=4.0,
                   help="--rule adaptive: smallest ratio between outlier and normal top scores")
    p.add_argument("--max-masked", type=int, default=2, help="--rule adaptive: at most this many tokens per sample")
    p.add_argument("--control", default=None, help=f"run a control instead of DiSP: {' | '.join(CONTROLS)}")
    p.add_argument("--epochs", type=int, default=None, help="refinement epochs (default: attack epochs / 5)")
    p.add_argument("--lr", type=float, default=None,
                   help="refinement learning rate (default: 0.3x the attack's; at the attack's own rate even "
                        "refining on the unchanged data cost ~5 points of VQA accuracy)")
    p.add_argument("--batch-size", type=int, default=128, help="samples per scoring / generation batch")
    p.add_argument("--figures", type=int, default=6, help="saliency pictures to draw")
    p.add_argument("--seed", type=int, default=0, help="seed for batch order, random/fisher saliency")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--precision", default="auto",
                   help="generation/saliency precision: auto (bf16 on fast-bf16 hardware) | fp32 | bf16; "
                        "training uses the run's (train.py --train-precision)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted refinement")
    return p.parse_args(argv)


def check_args(args):
    if args.saliency not in ("kl", "fisher", "random"):
        raise DispError(f"unknown --saliency '{args.saliency}'; choose one of: kl, fisher, random")
    if args.rule not in ("adaptive", "ratio"):
        raise DispError(f"unknown --rule '{args.rule}'; choose adaptive or ratio")
    if args.control is not None and args.control not in CONTROLS:
        raise DispError(f"unknown --control '{args.control}'; choose one of: {', '.join(CONTROLS)}")
    check_ratio("--mask-ratio", args.mask_ratio)
    if args.min_gap < 1:
        raise DispError(f"--min-gap must be a ratio >= 1, got {args.min_gap}")


def check_resume(resume, path, args, precision, config, tokenizer, attack, backdoored_path):
    """A resume point continues only the run that made it: the same backdoored model and flags."""
    checkpoint.check_same_model(resume, path, config, tokenizer, backdoored_path, attack=attack)
    stored = resume["extra"].get("purify", {})
    given = {"saliency": args.saliency, "rule": args.rule, "mask_ratio": args.mask_ratio, "min_gap": args.min_gap,
             "max_masked": args.max_masked, "seed": args.seed, "precision": precision, "epochs": args.epochs,
             "lr": args.lr}
    for key, value in given.items():
        if value is not None and key in stored and stored[key] != value:
            raise DispError(f"{path} was made with --{key.replace('_', '-')} {stored[key]}, not {value}; "
                            f"resume with the same flags, or rerun without --resume")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    run_dir = Path(args.run_dir)
    name = "purified" if args.control is None else f"control_{args.control.replace('-', '_')}"
    final_path, resume_path = run_dir / f"{name}.pt", run_dir / f"{name}.resume.pt"
    device = distributed.init(pick_device(args.device))  # a rank's device under torchrun
    precision = resolve_precision(args.precision, device)
    seed_everything(args.seed)
    t0 = time.time()

    # --- the defender's assets: the compromised model and the poisoned set -----------------------
    model, tokenizer, config, state = checkpoint.load(run_dir / "backdoored.pt", stages=["backdoored"], device=device)
    attack = state["extra"]["attack"]
    data = load_dataset(run_dir / "poisoned_train.pt", image_size=config.model.image_size)
    # read now, so a missing file fails before minutes of work (used only for the report at the end)
    manifest = files.read_json(run_dir / "poison_manifest.json", "poison manifest", keys=["poisoned_indices"])
    resume = checkpoint.load_state(resume_path, stages=[name]) if args.resume else None
    if resume is not None:
        check_resume(resume, resume_path, args, precision, config, tokenizer, attack, run_dir / "backdoored.pt")
    tasks = [s["task"] for s in data.samples]
    n_vision = config.model.n_vision
    timings = {}

    # --- 1-2. saliency, masking, regeneration -------------------------------------------------
    masks, scores, thresholds = None, None, None
    if args.control is None:
        t = time.time()
        with autocast(device, precision):  # under torchrun each rank scores its share of the samples
            scores = token_scores(model, tokenizer, data, list(range(len(data)))[distributed.shard(len(data))],
                                  args.saliency, batch_size=args.batch_size, device=device, seed=args.seed,
                                  desc=f"saliency ({args.saliency}, {precision})" if distributed.is_main() else None)
        distributed.sum_across(scores)
        timings["saliency_s"] = time.time() - t
        if args.rule == "ratio":
            masks = select_top_ratio(scores, args.mask_ratio)
        else:
            thresholds = fit_thresholds(scores, tasks, args.min_gap)
            masks = select_adaptive(scores, tasks, thresholds, args.max_masked)
        print(f"masked {masks.sum().item()} tokens in {masks.any(1).sum().item()} of {len(data)} samples "
              f"({args.rule} rule, {args.saliency} saliency)")
    originals = [s["response"] for s in data.samples]
    if args.control == "as-is":
        responses = originals
    else:
        t = time.time()
        with autocast(device, precision):  # greedy, steps = gen_length
            mine = list(range(len(data)))[distributed.shard(len(data))]
            responses = generate_responses(model, tokenizer, data, mine, vision_masks=masks, batch_size=args.batch_size,
                                           device=device,
                                           desc=f"regenerating ({precision})" if distributed.is_main() else None)
        responses = distributed.gather_lists(responses, len(data))
        timings["regeneration_s"] = time.time() - t
    changed = [a != b for a, b in zip(originals, responses)]
    print(f"{sum(changed)} of {len(data)} responses changed")

    purified = VLDataset(data.images, [dict(s, response=r) for s, r in zip(data.samples, responses)],
                         data.patch_labels, dict(data.meta, purified_by=name))
    rows = [{"index": i, "task": tasks[i], "prompt": s["prompt"], "original": originals[i], "regenerated": responses[i],
             "changed": changed[i], "masked_tokens": masks[i].nonzero().flatten().tolist() if masks is not None else []}
            for i, s in enumerate(data.samples)]

    # --- 3. refinement ------------------------------------------------------------------------
    epochs = args.epochs if args.epochs is not None else max(1, attack["epochs"] // 5)
    steps = epochs * math.ceil(len(purified) / config.train.batch_size)
    config.train.lr, config.train.eval_every = args.lr or 0.3 * attack["lr"], 0
    settings = {"control": args.control, "saliency": args.saliency, "rule": args.rule, "mask_ratio": args.mask_ratio,
                "min_gap": args.min_gap, "max_masked": args.max_masked, "epochs": epochs, "precision": precision,
                "steps": steps, "lr": config.train.lr, "trainable": attack["trainable"], "seed": args.seed,
                "thresholds": {k: (v if math.isfinite(v) else None) for k, v in (thresholds or {}).items()}}
    if resume is not None:
        model.load_state_dict(resume["model"])

    def save_resume(step, optimizer, rng):
        checkpoint.save(resume_path, stage=name, model=model, config=config, tokenizer=tokenizer, optimizer=optimizer,
                        step=step, finished=False, rng=rng, extra={"purify": settings, "attack": attack})

    t = time.time()
    optimizer, rng = finetune(
        model, purified.images, encode_dataset(purified, tokenizer, config.model),
        params=trainable_parameters(model, attack["trainable"]), steps=steps, cfg=config.train, device=device,
        stage="refinement", save_fn=save_resume, resume=resume, seed=args.seed,
    )
    timings["refinement_s"] = time.time() - t
    if not distributed.is_main():  # rank 0 writes
        return distributed.close()
    timings["total_s"] = time.time() - t0
    # the data files are written with the model, so a failed refinement leaves the old set consistent
    if scores is not None:
        files.atomic_write(run_dir / f"{name}_saliency.pt", lambda tmp: torch.save(scores, tmp))
    save_dataset(run_dir / f"{name}_train.pt", purified)
    files.atomic_write(run_dir / f"{name}_train.jsonl",
                            lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
    checkpoint.save(final_path, stage=name, model=model, config=config, tokenizer=tokenizer, optimizer=optimizer,
                    step=steps, rng=rng, extra={"purify": settings, "attack": attack, "timings": timings})
    resume_path.unlink(missing_ok=True)

    # --- after purification only: detection report and pictures, using the manifest -------------
    poisoned = set(manifest["poisoned_indices"])
    flagged = {i for i, c in enumerate(changed) if c}
    true_pos = len(flagged & poisoned)
    report = {
        "settings": settings, "timings": timings, "n_samples": len(data), "n_changed": len(flagged),
        "n_masked_samples": int(masks.any(1).sum()) if masks is not None else 0,
        "detection": {"precision": true_pos / max(1, len(flagged)), "recall": true_pos / max(1, len(poisoned))},
    }
    if masks is not None:
        report["trigger_sample_masked_rate"] = sum(bool(masks[i].any()) for i in poisoned) / max(1, len(poisoned))
        report["clean_sample_masked_rate"] = (sum(bool(masks[i].any()) for i in range(len(data)) if i not in poisoned)
                                              / max(1, len(data) - len(poisoned)))
    files.write_json(run_dir / f"{name}_report.json", report)
    if scores is not None and args.figures > 0:
        clean_by_image = {}  # one clean sample per image, so the pictures show different scenes
        for i in range(len(data)):
            if i not in poisoned:
                clean_by_image.setdefault(data.samples[i]["image"], i)
        picks = sorted(poisoned)[: args.figures // 2] + list(clean_by_image.values())[: args.figures - args.figures // 2]
        saliency_panels(run_dir / f"{name}_saliency.png", data, picks, scores, masks, originals, responses, n_vision)
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=1))
    print(f"wrote {final_path} and {run_dir / f'{name}_report.json'}")


if __name__ == "__main__":
    with friendly_errors():
        main()
