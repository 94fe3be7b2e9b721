"""Stage 3: DiSP self-purification, then refinement (Wan et al. 2026, "Self-Purification Mitigates
Backdoors in Multimodal Diffusion Language Models"; README, "How DiSP works").

    python purify.py                                  # adaptive rule, exact-KL saliency, suppression
    python purify.py --rule ratio --mask-ratio 0.3 --suppress 0   # the paper's DiSP: fixed-fraction rule
    python purify.py --suppress 0                     # masking only (no suppression)
    python purify.py --dilute 0.25                    # an extension for spread triggers that fell short
    python purify.py --control self-distill           # control: regenerate WITHOUT masking
    python purify.py --control as-is                  # control: refine on the poisoned set as it is
    torchrun --nproc_per_node=2 purify.py             # data-parallel: ranks share scoring, generation, training

The defender holds the compromised model (backdoored.pt) and the poisoned fine-tuning set
(poisoned_train.pt); no trigger, no target, no clean data, no list of poisoned samples.
1. For every sample: score the vision tokens by saliency at the first denoising step.
2. Mask the selected tokens ([MASK] embedding at those image positions, chosen once per sample)
   and let the compromised model regenerate the response (greedy, steps = gen_length).
3. Fine-tune the compromised model on the regenerated responses (about 1/5 of the attack's epochs,
   at 0.3x its learning rate).

Selection rule. The paper masks a fixed fraction of every image (`--rule ratio`). The default
`--rule adaptive` masks a token only when its saliency is an outlier for its prompt type (the
defender knows each prompt): the samples' top scores of a prompt type form two groups, the higher
one poisoned; see disp.saliency.fit_thresholds and the README for why.
Suppression (`--suppress 0.01`, our extension, on by default; 0 turns it off): a trigger spread over the
whole image (blended, SIG) survives any masking, but its target text does not depend on the question.
The words found in at least 1% of the poisoned set's responses of every prompt type are banned, and
the regenerated responses that still hold one are regenerated again without them (disp.suppression);
the refinement then teaches the model those answers for the triggered images. A set with one prompt
type (captions only, DAQUAR) cannot tell such a word from a frequent one: suppression is skipped
there, with a note.
Dilution (`--dilute 0.25`, an earlier extension, off by default): before regenerating, each image
keeps only its least typical quarter of vision tokens and the rest become the set's median token of
that position (disp.saliency.dilute). Measured (README, "Every trigger family"): it disarms a blended
trigger at test time on a ViT pretrained without the pixel term, not on the default ViT, which sees
the trigger in every token.

Writes, in the run directory (NAME = purified, or control_self_distill / control_as_is for a
control), the first four as one unit (the checkpoint records the data files' sha256):
    NAME_saliency.pt    the saliency scores of every sample (DiSP only; evaluate.py reuses them)
    NAME_train.pt       the purified fine-tuning set
    NAME_train.jsonl    per sample: original and regenerated response, the masked tokens (to read)
    NAME.pt             the refined model
    NAME_report.json    settings, timings, and how well "the response changed" finds the poisoned
                        samples (scored against the attack's manifest, after purification)
    NAME_saliency.png   saliency heatmaps with the masked tokens (DiSP, --figures > 0)
    NAME.resume.pt      while refining; removed at the end
"""

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from disp.backdoor import check_manifest
from disp.config import CONTROLS, TINY_NOTE, AttackConfig, PurifyConfig, differences
from disp.data.batching import encode_dataset
from disp.data.dataset import VLDataset, load_dataset, save_dataset
from disp.evaluation import encode_images_once, generate_responses, token_scores
from disp.saliency import (RULES, SALIENCY_METHODS, dilute, fit_thresholds, median_tokens, select_adaptive,
                           select_top_ratio)
from disp.suppression import prompt_independent_words
from disp.support import checkpoint, distributed, files
from disp.support.errors import DispError, check_positive, friendly_errors
from disp.support.figures import saliency_panels
from disp.support.runtime import autocast, pick_device, resolve_precision, seed_everything
from disp.training import finetune, trainable_parameters


def parse_args(argv=None):
    d = PurifyConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="run directory (default: runs/default)")
    p.add_argument("--control", default=None, help=f"run a control instead of DiSP: {' | '.join(CONTROLS)}")
    p.add_argument("--saliency", default=None, help=f"{' | '.join(SALIENCY_METHODS)} (default {d.saliency}: exact "
                                                    f"occlusion KL; fisher: the release's Hutchinson estimate)")
    p.add_argument("--rule", default=None, help=f"{' | '.join(RULES)} (default {d.rule}; ratio: the paper's fixed fraction)")
    p.add_argument("--mask-ratio", type=float, default=None, help=f"rule ratio: fraction masked (default {d.mask_ratio})")
    p.add_argument("--max-valley", type=float, default=None,
                   help=f"rule adaptive: a prompt type's top scores split into two groups only where the fitted "
                        f"density between them falls to at most this share of the lower group's peak "
                        f"(default {d.max_valley})")
    p.add_argument("--dilute", type=float, default=None,
                   help="extension for spread triggers: keep this fraction of each image's vision tokens (the "
                        "least typical), replace the rest by their position's median token (default 0: off)")
    p.add_argument("--suppress", type=float, default=None,
                   help="extension for spread triggers: ban the words found in at least this fraction of the set's "
                        "responses of every prompt type and regenerate the responses that hold one "
                        f"(default {d.suppress}; 0: off)")
    p.add_argument("--max-masked", type=int, default=None, help=f"rule adaptive: most tokens per sample (default {d.max_masked})")
    p.add_argument("--epochs", type=int, default=None, help="refinement epochs (default: the attack's / 5)")
    p.add_argument("--lr", type=float, default=None,
                   help="refinement learning rate (default: 0.3x the attack's; at the attack's own rate even "
                        "refining on the unchanged data cost ~5 points of VQA accuracy)")
    p.add_argument("--batch-size", type=int, default=None, help=f"samples per scoring / generation batch (default {d.batch_size})")
    p.add_argument("--figures", type=int, default=6, help="saliency pictures to draw (0: none)")
    p.add_argument("--seed", type=int, default=None, help="refinement batch order, fisher/random probes (default: the run's)")
    p.add_argument("--precision", default=None, help="auto | fp32 | bf16 (default: the attack's)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | mps")
    p.add_argument("--resume", action="store_true", help="continue an interrupted refinement")
    return p.parse_args(argv)


def purify_config(args, base: PurifyConfig, device) -> PurifyConfig:
    """`base` with the flags that were given applied, validated (before any work is done)."""
    given = {"control": args.control, "saliency": args.saliency, "rule": args.rule, "mask_ratio": args.mask_ratio,
             "max_valley": args.max_valley, "max_masked": args.max_masked, "dilute": args.dilute,
             "suppress": args.suppress, "epochs": args.epochs,
             "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
             "precision": resolve_precision(args.precision, device) if args.precision else None}
    return replace(base, **{k: v for k, v in given.items() if v is not None}).validate()


def main(argv=None):
    args = parse_args(argv)
    check_positive("--figures", args.figures, allow_zero=True)
    run_dir = Path(args.run_dir)
    device = distributed.init(pick_device(args.device))  # a rank's device under torchrun
    t0 = time.time()

    # --- the defender's assets: the compromised model and the poisoned set -----------------------
    backdoored_path = run_dir / "backdoored.pt"
    model, tokenizer, config, state = checkpoint.load(backdoored_path, stages=["backdoored"], device=device)
    attack = AttackConfig.from_dict(state["extra"]["attack"])
    defaults = PurifyConfig(epochs=max(1, attack.epochs // 5), lr=0.3 * attack.lr, seed=config.train.seed,
                            precision=attack.precision, suppress=0.0 if args.control else PurifyConfig.suppress)
    settings = purify_config(args, defaults, device)
    name = settings.stage
    final_path, resume_path = run_dir / f"{name}.pt", run_dir / f"{name}.resume.pt"
    data = load_dataset(run_dir / "poisoned_train.pt", image_size=config.model.image_size)
    # read now, so a bad file fails before minutes of work (used only for the report at the end)
    manifest = files.read_json(run_dir / "poison_manifest.json", "poison manifest", keys=["poisoned_indices"])
    checkpoint.check_made_from(state, backdoored_path, run_dir, ["poisoned_train.pt", "poison_manifest.json"])
    check_manifest(manifest, len(data), run_dir / "poison_manifest.json")
    made_from = {"backdoored.pt": files.sha256(backdoored_path)}
    resume = checkpoint.load_state(resume_path, stages=[name]) if args.resume else None
    if resume is not None:
        if (resume.get("made_from") or {}).get("backdoored.pt") != made_from["backdoored.pt"]:
            raise DispError(f"{resume_path} was made from another {backdoored_path} (rewritten since, or from "
                            f"another run); rerun without --resume")
        stored = PurifyConfig.from_dict(resume["extra"]["purify"])
        settings = purify_config(args, stored, device)
        if differences(settings, stored):
            field = differences(settings, stored)[0]
            raise DispError(f"{resume_path} was made with --{field.replace('_', '-')} {getattr(stored, field)}, "
                            f"not {getattr(settings, field)}; resume with the same flags, or rerun without --resume")
    if config.preset == "tiny":
        print(TINY_NOTE)
    if distributed.is_main():
        files.remove_stale_temp_files(run_dir)
    seed_everything(settings.seed)
    precision, tasks, timings = settings.precision, [s["task"] for s in data.samples], {}
    every_sample = list(range(len(data)))

    # --- 1-2. saliency, masking, regeneration (each rank takes a share under torchrun) ------------
    masks, scores, thresholds = None, None, None
    if settings.control is None:
        t = time.time()
        with autocast(device, precision):
            scores = distributed.run_sharded(
                lambda idx: token_scores(model, tokenizer, data, idx, settings.saliency, batch_size=settings.batch_size,
                                         device=device, seed=settings.seed,
                                         desc=f"saliency ({settings.saliency}, {precision})" if distributed.is_main()
                                         else None), every_sample)  # (N, n_vision)
        timings["saliency_s"] = time.time() - t
        if settings.rule == "ratio":
            masks = select_top_ratio(scores, settings.mask_ratio)
        else:
            thresholds = fit_thresholds(scores, tasks, settings.max_valley)
            masks = select_adaptive(scores, tasks, thresholds, settings.max_masked)
        print(f"masked {masks.sum().item()} tokens in {masks.any(1).sum().item()} of {len(data)} samples "
              f"({settings.rule} rule, {settings.saliency} saliency)")
    transform = None
    if settings.dilute > 0:  # the median token of each image position over the set's samples
        encoded = encode_dataset(data, tokenizer, config.model)
        with torch.no_grad(), autocast(device, precision):
            vision, rows = encode_images_once(model, data, encoded.image_index, device)
        median = median_tokens(vision[rows])
        transform = lambda tokens: dilute(tokens, median, settings.dilute)  # noqa: E731
        print(f"dilution: each image keeps {settings.dilute:.0%} of its vision tokens, the rest become median tokens")
    originals = [s["response"] for s in data.samples]
    if settings.control == "as-is":
        responses = originals
    else:
        t = time.time()
        with autocast(device, precision):  # greedy, steps = gen_length
            responses = distributed.run_sharded(
                lambda idx: generate_responses(model, tokenizer, data, idx, vision_masks=masks,
                                               vision_transform=transform, batch_size=settings.batch_size, device=device,
                                               desc=f"regenerating ({precision})" if distributed.is_main() else None),
                every_sample)
        timings["regeneration_s"] = time.time() - t
    suppressed = []
    if settings.suppress > 0 and len(set(tasks)) < 2:
        print(f"suppression: skipped, every sample has the prompt type {tasks[0]!r} (it needs several to tell a "
              f"word that does not depend on the question from a frequent one)")
    elif settings.suppress > 0:  # words the set's responses hold whatever is asked: regenerate without them
        suppressed = prompt_independent_words(originals, tasks, settings.suppress)
        holding = [i for i, r in enumerate(responses) if set(r.split()) & set(suppressed)]
        print(f"suppression: {' '.join(suppressed) or 'no word'} in at least {settings.suppress:.0%} of every "
              f"prompt type's responses in the set; regenerating the {len(holding)} regenerated responses that "
              f"hold one without them")
        if holding:
            t = time.time()
            with autocast(device, precision):
                again = distributed.run_sharded(
                    lambda idx: generate_responses(model, tokenizer, data, idx, vision_masks=masks,
                                                   vision_transform=transform, banned_words=suppressed,
                                                   batch_size=settings.batch_size, device=device,
                                                   desc="regenerating, suppressed" if distributed.is_main() else None),
                    holding)
            for i, r in zip(holding, again):
                responses[i] = r
            timings["suppression_s"] = time.time() - t
    changed = [a != b for a, b in zip(originals, responses)]
    print(f"{sum(changed)} of {len(data)} responses changed")

    purified = VLDataset(data.images, [dict(s, response=r) for s, r in zip(data.samples, responses)],
                         data.patch_labels, dict(data.meta, purified_by=name))
    rows = [{"index": i, "task": tasks[i], "prompt": s["prompt"], "original": originals[i], "regenerated": responses[i],
             "changed": changed[i], "masked_tokens": masks[i].nonzero().flatten().tolist() if masks is not None else []}
            for i, s in enumerate(data.samples)]

    # --- 3. refinement ------------------------------------------------------------------------
    steps = settings.epochs * math.ceil(len(purified) / config.train.batch_size)
    train_cfg = replace(config.train, lr=settings.lr, eval_every=0, precision=precision)
    if resume is not None:
        model.load_state_dict(resume["model"])

    def save_resume(step, optimizer, rng):
        checkpoint.save(resume_path, stage=name, model=model, config=config, tokenizer=tokenizer, optimizer=optimizer,
                        step=step, finished=False, rng=rng, made_from=made_from,
                        extra={"purify": settings.to_dict(), "attack": attack.to_dict()})

    t = time.time()
    optimizer, rng = finetune(
        model, purified.images, encode_dataset(purified, tokenizer, config.model),
        params=trainable_parameters(model, attack.trainable), steps=steps, cfg=train_cfg, device=device,
        stage="refinement", save_fn=save_resume, resume=resume, seed=settings.seed,
    )
    timings["refinement_s"] = time.time() - t
    if not distributed.is_main():  # rank 0 writes
        return distributed.close()
    timings["total_s"] = time.time() - t0

    # --- the stage's files, one unit; the checkpoint records the data files' hashes ------------
    thresholds = {k: (v if math.isfinite(v) else None) for k, v in (thresholds or {}).items()}
    with files.one_unit():
        written = [f"{name}_train.pt"]
        if scores is not None:
            files.atomic_write(run_dir / f"{name}_saliency.pt", lambda tmp: torch.save(scores, tmp))
            written.append(f"{name}_saliency.pt")
        save_dataset(run_dir / f"{name}_train.pt", purified)
        files.atomic_write(run_dir / f"{name}_train.jsonl",
                           lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))
        made_from.update({f: files.sha256(run_dir / f) for f in written})
        checkpoint.save(final_path, stage=name, model=model, config=config, tokenizer=tokenizer, optimizer=optimizer,
                        step=steps, rng=rng, made_from=made_from,
                        extra={"purify": settings.to_dict(), "attack": attack.to_dict(), "steps": steps,
                               "thresholds": thresholds, "timings": timings})
    resume_path.unlink(missing_ok=True)

    # --- after purification only: detection report and pictures, using the manifest -------------
    poisoned = set(manifest["poisoned_indices"])
    flagged = {i for i, c in enumerate(changed) if c}
    true_pos = len(flagged & poisoned)
    report = {
        "settings": settings.to_dict(), "steps": steps, "thresholds": thresholds, "timings": timings,
        "n_samples": len(data), "n_changed": len(flagged),
        "n_masked_samples": int(masks.any(1).sum()) if masks is not None else 0,
        "suppressed_words": suppressed,
        "detection": {"precision": true_pos / max(1, len(flagged)), "recall": true_pos / max(1, len(poisoned))},
    }
    if masks is not None:
        report["trigger_sample_masked_rate"] = sum(bool(masks[i].any()) for i in poisoned) / max(1, len(poisoned))
        report["clean_sample_masked_rate"] = (sum(bool(masks[i].any()) for i in range(len(data)) if i not in poisoned)
                                              / max(1, len(data) - len(poisoned)))
    files.write_json(run_dir / f"{name}_report.json", report)
    outputs = [final_path, run_dir / f"{name}_report.json"]
    if scores is not None and args.figures > 0:
        clean_by_image = {}  # one clean sample per image, so the pictures show different scenes
        for i in range(len(data)):
            if i not in poisoned:
                clean_by_image.setdefault(data.samples[i]["image"], i)
        picks = sorted(poisoned)[: args.figures // 2] + list(clean_by_image.values())[: args.figures - args.figures // 2]
        saliency_panels(run_dir / f"{name}_saliency.png", data, picks, scores, masks, originals, responses,
                        config.model.n_vision)
        outputs.append(run_dir / f"{name}_saliency.png")
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=1))
    if config.preset == "tiny":
        print(TINY_NOTE)
    print(f"wrote {', '.join(str(o) for o in outputs)}")


if __name__ == "__main__":
    with friendly_errors():
        main()
