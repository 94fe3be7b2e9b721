"""Stage 3: DiSP self-purification, then refinement (Wan et al. 2026, "Self-Purification Mitigates
Backdoors in Multimodal Diffusion Language Models"; README, "How DiSP works").

    python purify.py                                  # adaptive rule, exact-KL saliency, suppression
    python purify.py --rule ratio --mask-ratio 0.3 --suppress 0   # the paper's DiSP: fixed-fraction rule
    python purify.py --suppress 0 --groups 0          # masking alone (no suppression, no groups)
    python purify.py --control self-distill           # control: the same, with no token masked
    python purify.py --control as-is                  # control: refine on the poisoned set as it is
    torchrun --nproc_per_node=2 purify.py             # data-parallel: ranks share scoring, generation, training

The defender holds the compromised model (backdoored.pt) and the poisoned fine-tuning set
(poisoned_train.pt); no trigger, no target, no clean data, no list of poisoned samples.
1. For every sample: score the vision tokens by saliency at the first denoising step, and pick
   the tokens to mask. The paper masks a fixed fraction of every image (`--rule ratio`); the default
   `--rule adaptive` masks a token only where the samples' top scores of its prompt type form two
   groups and it is in the higher one (disp.saliency.fit_thresholds).
2. Mask them ([MASK] embedding at those image positions, chosen once per sample; their image patches
   are painted flat before the ViT too, `--masking token` masks the tokens alone) and let the
   compromised model regenerate the response (its own sampler, steps = gen_length). Step 1's saliency masks
   the same way. `--regenerate masked` regenerates only the samples with a masked position (or
   flagged by `--spectral`).
   With `--spectral K` (our extension for spread triggers, off by default), also test the top K
   directions of the set's vision tokens for a minority group of images, and take the directions
   that have one out of every image's vision tokens (disp.spectral). With `--blur S` (also ours,
   off by default), every response is written from the image blurred by a Gaussian of S pixels,
   which a spread grating does not survive (disp.lowpass).
3. Suppression (our extension, on by default; `--suppress 0` turns it off): the words found in at
   least 1% of the set's responses of every prompt type are banned, and the regenerations that
   still hold one are regenerated without them (disp.suppression). Where every sample has one task
   (DAQUAR) a question's first two words ("how many") are its prompt type. A set with one prompt
   (captions only) cannot tell such a word from a frequent one: there the banned words are those that
   half the masked samples' responses hold and their masked regenerations dropped (the masking's
   evidence, where 100+ samples were masked) and the captions' text that goes with any photo: a
   sentence that 100+ captions are word for word (a refusal), a word that the rest of its caption
   does not predict (an inserted marker).
4. Groups (our extension, on by default; `--groups 0` turns it off): along each of the top 8
   directions of the set's pooled vision tokens a minority group of images is split off and
   sharpened; where its responses hold a word that a probe fitted on the other images does not
   predict (a blended trigger's "red" -> "green", which depends on the question, so suppression
   keeps it), its regenerations that hold the word are made again without it (disp.groups).
5. Fine-tune the compromised model on the regenerated responses (a fifth of the attack's epochs,
   at 0.3x its learning rate).
Each control differs from DiSP in one thing: self-distill masks no token (it suppresses and bans a
group's word too), as-is regenerates nothing.

Writes, in the run directory (NAME = purified, or control_self_distill / control_as_is), the first
four as one unit (the checkpoint records the data files' sha256):
    NAME_saliency.pt    the saliency scores of every sample (DiSP only; evaluate.py reuses them)
    NAME_train.pt       the purified fine-tuning set
    NAME_train.jsonl    per sample: original and regenerated response, the masked tokens (to read)
    NAME.pt             the refined model
    NAME_report.json    settings, timings, what was masked, changed and banned (evaluate.py scores
                        it against the attack's manifest)
    NAME.resume.pt      while refining; removed at the end
"""

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

from disp import purification
from disp.config import CONTROLS, REGENERATE, TINY_NOTE, AttackConfig, PurifyConfig
from disp.data.dataset import load_dataset, save_dataset
from disp.saliency import MASKINGS, RULES, SALIENCY_METHODS
from disp.support import checkpoint, distributed, files, stage
from disp.support.errors import friendly_errors
from disp.support.runtime import pick_device, resolve_precision, seed_everything


def parse_args(argv=None):
    d = PurifyConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="run directory (default: runs/default)")
    p.add_argument("--control", default=None, help=f"run a control instead of DiSP: {' | '.join(CONTROLS)}")
    p.add_argument("--suppress", type=float, default=None,
                   help="ban the words found in at least this fraction of the set's responses of every prompt type "
                        f"and regenerate the responses that hold one (default {d.suppress}; 0: off; as-is: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | mps")
    p.add_argument("--resume", action="store_true", help="continue an interrupted refinement")
    x = p.add_argument_group("experiment options")
    x.add_argument("--saliency", default=None, help=f"{' | '.join(SALIENCY_METHODS)} (default {d.saliency}: exact "
                                                    f"occlusion KL; fisher: the release's Hutchinson estimate)")
    x.add_argument("--rule", default=None, help=f"{' | '.join(RULES)} (default {d.rule}; ratio: the paper's fixed fraction)")
    x.add_argument("--mask-ratio", type=float, default=None, help=f"rule ratio: fraction masked (default {d.mask_ratio})")
    x.add_argument("--max-valley", type=float, default=None,
                   help="rule adaptive: a prompt type's top scores split into two groups only where the fitted density "
                        "between them falls to at most this share of the smaller of its densities at the two groups' "
                        f"means (default {d.max_valley})")
    x.add_argument("--max-masked", type=int, default=None, help=f"rule adaptive: most tokens per sample (default {d.max_masked})")
    x.add_argument("--masking", default=None,
                   help=f"{' | '.join(MASKINGS)} (default {d.masking}: also paint a masked position's patch flat before "
                        "the ViT, whose attention otherwise carries it into every token; token: the paper's)")
    x.add_argument("--regenerate", default=None,
                   help=f"{' | '.join(REGENERATE)} (default {d.regenerate}: every response, as the paper; masked: only the "
                        "samples with a masked position, the others keep theirs)")
    x.add_argument("--spectral", type=int, default=None,
                   help="test the top K directions of the set's vision tokens for a minority group of images and take "
                        f"those that have one out before regeneration (default {d.spectral}: off)")
    x.add_argument("--groups", type=int, default=None,
                   help="look along the top K directions of the set's pooled vision tokens for a minority group of "
                        "images whose responses hold a word their content does not explain, and regenerate them "
                        f"without it (default {d.groups}; 0: off)")
    x.add_argument("--blur", type=float, default=None,
                   help="regenerate from the images blurred by a Gaussian of this many pixels (default "
                        f"{d.blur:g}: off)")
    x.add_argument("--epochs", type=int, default=None, help="refinement epochs (default: the attack's / 5)")
    x.add_argument("--lr", type=float, default=None, help="refinement learning rate (default: 0.3x the attack's)")
    x.add_argument("--batch-size", type=int, default=None, help=f"samples per scoring / generation batch (default {d.batch_size})")
    x.add_argument("--seed", type=int, default=None, help="refinement batch order, fisher/random probes (default: the run's)")
    x.add_argument("--precision", default=None, help="auto | fp32 | bf16 (default: the attack's)")
    return p.parse_args(argv)


def purify_config(args, base: PurifyConfig, device) -> PurifyConfig:
    """`base` with the flags that were given applied, validated (before any work is done)."""
    given = {"control": args.control, "saliency": args.saliency, "rule": args.rule, "mask_ratio": args.mask_ratio,
             "max_valley": args.max_valley, "max_masked": args.max_masked, "suppress": args.suppress,
             "masking": args.masking, "regenerate": args.regenerate, "spectral": args.spectral, "groups": args.groups,
             "blur": args.blur,
             "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
             "precision": resolve_precision(args.precision, device) if args.precision else None}
    return replace(base, **{k: v for k, v in given.items() if v is not None}).validate()


def main(argv=None):
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    device = distributed.init(pick_device(args.device))  # a rank's device under torchrun
    t0, timings = time.time(), {}

    # --- the defender's assets: the compromised model and the poisoned set ----------------------
    backdoored_path = run_dir / "backdoored.pt"
    model, tokenizer, config, state = stage.load_parent(backdoored_path, "backdoored", run_dir, device=device)
    data = load_dataset(run_dir / "poisoned_train.pt", image_size=config.model.image_size)  # its own errors first
    checkpoint.check_made_from(state, backdoored_path, run_dir, ["poisoned_train.pt"])
    attack = AttackConfig.from_dict(state["extra"]["attack"])
    as_is = args.control == "as-is"  # regenerates nothing: no suppression, no group's word to ban
    defaults = PurifyConfig(epochs=max(1, attack.epochs // 5), lr=0.3 * attack.lr, seed=config.train.seed,
                            precision=attack.precision, suppress=0.0 if as_is else PurifyConfig.suppress,
                            groups=0 if as_is else PurifyConfig.groups)
    settings = purify_config(args, defaults, device)
    name, made_from = settings.stage, {"backdoored.pt": files.sha256(backdoored_path)}
    final_path, resume_path = run_dir / f"{name}.pt", run_dir / f"{name}.resume.pt"
    resume = None
    if args.resume:
        resume = stage.resume_point(resume_path, name, parent=("backdoored.pt", backdoored_path))
        stored = PurifyConfig.from_dict(resume["extra"]["purify"])
        stage.check_same_flags(resume_path, stored.to_dict(), purify_config(args, stored, device).to_dict())
        settings = stored
    stage.begin(run_dir, config.preset)
    seed_everything(settings.seed)

    # --- 1. saliency and selection (DiSP only) ----------------------------------------------------
    scores = masks = thresholds = shift = None
    directions, groups = [], []  # the spectral step's (--spectral K, off by default), the groups step's
    flagged = [False] * len(data)  # the samples either step flags
    if settings.control is None:
        t = time.time()
        scores, masks, thresholds = purification.select_tokens(model, tokenizer, data, settings, device)
        timings["saliency_s"] = time.time() - t
        print(f"masked {masks.sum().item()} tokens in {masks.any(1).sum().item()} of {len(data)} samples "
              f"({settings.rule} rule, {settings.saliency} saliency, {settings.masking} masking)")
    if settings.spectral:
        directions, shift, flagged = purification.find_shift(model, tokenizer, data, settings, device)
    if settings.groups:
        groups, in_group = purification.find_groups(model, tokenizer, data, settings, device)
        flagged = [a or b for a, b in zip(flagged, in_group)]

    # --- 2. masked regeneration, 3. suppression, 4. the groups' words (not for as-is) ------------
    t = time.time()
    responses, banned, prompt_types = purification.new_responses(model, tokenizer, data, masks, flagged, settings,
                                                                  device, shift, groups)
    if settings.control != "as-is":
        timings["regeneration_s"] = time.time() - t
    rows = purification.records(data, responses, masks, flagged)
    n_changed = sum(r["changed"] for r in rows)
    print(f"{n_changed} of {len(data)} responses changed")
    purified = purification.with_responses(data, responses, name)

    # --- 5. refinement --------------------------------------------------------------------------
    def save_resume(step, optimizer, rng):
        checkpoint.save(resume_path, stage=name, model=model, config=config, tokenizer=tokenizer,
                        optimizer=optimizer, step=step, finished=False, rng=rng, made_from=made_from,
                        extra={"purify": settings.to_dict(), "attack": attack.to_dict()})

    t = time.time()
    optimizer, rng, steps = purification.refine(model, tokenizer, config, purified, settings, attack, device,
                                                save_fn=save_resume, resume=resume)
    timings["refinement_s"] = time.time() - t
    if not distributed.leave():  # rank 0 writes, alone
        return
    timings["total_s"] = time.time() - t0

    # --- the stage's files, one unit; the checkpoint records the data files' hashes --------------
    thresholds = {k: (v if math.isfinite(v) else None) for k, v in (thresholds or {}).items()}
    outputs = {f"{name}_train.pt": lambda path: save_dataset(path, purified),
               f"{name}_train.jsonl": lambda path: files.save_text(path, "".join(json.dumps(r) + "\n" for r in rows))}
    if scores is not None:
        outputs[f"{name}_saliency.pt"] = lambda path: files.save_tensors(path, scores)
    stage.write_outputs(run_dir, outputs, lambda recorded: checkpoint.save(
        final_path, stage=name, model=model, config=config, tokenizer=tokenizer, optimizer=optimizer, step=steps,
        rng=rng, made_from=recorded, extra={"purify": settings.to_dict(), "attack": attack.to_dict(), "steps": steps,
                                            "thresholds": thresholds, "timings": timings}),
        made_from, recorded=list(outputs), resume_path=resume_path)
    report = {"settings": settings.to_dict(), "steps": steps, "thresholds": thresholds, "timings": timings,
              "n_samples": len(data), "n_changed": n_changed, "suppressed_words": banned,
              "suppression_prompt_types": prompt_types,
              "n_masked_samples": int(masks.any(1).sum()) if masks is not None else 0,
              "spectral": [{"rank": d.rank, "valley": d.valley, "n_images": int(d.flagged.sum())} for d in directions],
              "groups": [{"rank": g.rank, "valley": g.valley, "n_images": int(g.images.sum()),
                          "n_samples": len(g.samples),
                          "words": {w: {"held": h, "predicted": p} for w, (h, p) in g.words.items()}} for g in groups],
              "n_flagged_samples": sum(flagged)}
    files.write_json(run_dir / f"{name}_report.json", report)
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=1))
    if config.preset == "tiny":
        print(TINY_NOTE)
    print(f"wrote {final_path}, {run_dir / f'{name}_report.json'} and the purified set {run_dir / f'{name}_train.pt'}")


if __name__ == "__main__":
    with friendly_errors():
        main()
