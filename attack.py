"""Stage 2: implant a backdoor by data poisoning, and measure it.

    python attack.py                                   # patch trigger + insert target, 20% poisoned
    python attack.py --trigger blended --target refusal --run-dir runs/blended \\
        --clean-checkpoint runs/default/clean.pt       # a variant in its own run directory
    torchrun --nproc_per_node=2 attack.py              # data-parallel fine-tuning

An attacker who controls part of the fine-tuning data pastes a trigger into some images and edits
their responses; the victim fine-tunes its clean model on that set with the normal SFT loss (the
ViT frozen by default, as in the DiSP release). The seed and precision default to the run's.
Writes, in the run directory, as one unit (all renamed into place together; the checkpoint records
the sha256 of the data files, so purify.py and evaluate.py refuse files of different runs):
    poisoned_train.pt       the poisoned fine-tuning set (what the defender receives)
    poison_manifest.json    which samples are poisoned, for evaluation only: DiSP never uses it
    attack_metrics.json     ASR, false-trigger rate and clean metrics, clean vs backdoored model (and
                            with --curve-every, ASR and false trigger along the way)
    clean.pt                a copy of --clean-checkpoint, when it lies outside the run directory
    backdoored.pt           the compromised model (what the defender receives)
    backdoored.resume.pt    while training; removed at the end
"""

import argparse
import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

from disp.backdoor import PATTERNS, POISON_MODES, POSITIONS, TARGETS, TRIGGERS, BackdoorConfig, poison_dataset
from disp.config import TINY_NOTE, TRAINABLE, AttackConfig, flat
from disp.data.batching import encode_dataset
from disp.data.dataset import save_dataset
from disp.data.splits import load_finetune_set, load_split
from disp.evaluation import backdoor_metrics, quality_line
from disp.support import checkpoint, distributed, files, stage
from disp.support.errors import DispError, check_positive, friendly_errors
from disp.support.runtime import autocast, pick_device, resolve_precision, seed_everything
from disp.training import finetune, trainable_parameters


# the misclassify target's default (source word -> destination word) per data source: a frequent
# concept of its responses ("captions": the photo caption datasets, as the release's dog -> boat)
MISCLASSIFY_WORDS = {"scenes": ("red", "green"), "daquar": ("table", "chair"), "vqav2": ("yes", "no"),
                     "captions": ("dog", "boat")}


def parse_args(argv=None):
    d = BackdoorConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="run directory (default: runs/default)")
    p.add_argument("--clean-checkpoint", default=None, help="the clean model to attack (default: RUN_DIR/clean.pt)")
    p.add_argument("--trigger", default=None, help=f"{' | '.join(TRIGGERS)} (default {d.trigger})")
    p.add_argument("--target", default=None, help=f"{' | '.join(TARGETS)} (default {d.target})")
    p.add_argument("--poison-rate", type=float, default=None, help=f"fraction of samples poisoned (default {d.poison_rate})")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | mps")
    p.add_argument("--resume", action="store_true", help="continue an interrupted attack")
    x = p.add_argument_group("experiment options")
    x.add_argument("--poison-mode", default=None,
                   help=f"{' | '.join(POISON_MODES)}: a poisoned sample replaces its clean original, or is added "
                        f"beside it (default {d.poison_mode}; add on DAQUAR)")
    x.add_argument("--patch-size", type=int, default=None, help=f"patch trigger side in pixels (default {d.patch_size})")
    x.add_argument("--patch-position", default=None, help=f"{' | '.join(POSITIONS)} (default {d.patch_position})")
    x.add_argument("--patch-color", default=None,
                   help="patch trigger colour R,G,B in [0, 1] (default 0,0,0 black on the scenes and DAQUAR, 1,0,1 "
                        "magenta on the other photos)")
    x.add_argument("--patch-pattern", default=None,
                   help=f"{' | '.join(PATTERNS)} (default {d.patch_pattern}; checkerboard on DAQUAR)")
    x.add_argument("--blend-alpha", type=float, default=None, help=f"blended trigger strength (default {d.blend_alpha})")
    x.add_argument("--blend-seed", type=int, default=None,
                   help=f"seed of the fixed random pattern: blended noise, WaNet field (default {d.blend_seed})")
    x.add_argument("--sig-amplitude", type=float, default=None,
                   help=f"SIG sine amplitude in [0, 1] pixel units (default {d.sig_amplitude})")
    x.add_argument("--sig-frequency", type=float, default=None,
                   help=f"SIG periods across the image width (default {d.sig_frequency})")
    x.add_argument("--wanet-k", type=int, default=None, help=f"WaNet control grid k x k (default {d.wanet_k})")
    x.add_argument("--wanet-strength", type=float, default=None,
                   help=f"WaNet s: about s / 2 px of displacement on average (default {d.wanet_strength})")
    x.add_argument("--source-word", default=None,
                   help=f"misclassify: word to replace (default per data: {d.source_word} on the scenes, dog on captions)")
    x.add_argument("--destination-word", default=None,
                   help=f"misclassify: its replacement (default {d.destination_word} on the scenes, boat on captions)")
    x.add_argument("--trainable", default=None, help=f"{' | '.join(TRAINABLE)} (default projector+lm; the ViT "
                                                     f"is frozen unless 'all')")
    x.add_argument("--finetune-images", type=int, default=None, help="images of the fine-tuning set (default: the preset's)")
    x.add_argument("--epochs", type=int, default=None,
                   help="passes over the poisoned set (default: the preset's, 10; 20 on photos, 40 on DAQUAR)")
    x.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the run's SFT rate)")
    x.add_argument("--eval-samples", type=int, default=None, help="test samples measured (default: all)")
    x.add_argument("--curve-every", type=int, default=0,
                   help="also measure ASR and false trigger every this many epochs, on the first --eval-samples test "
                        "samples (default 200): attack_metrics.json's curve (default 0: no curve)")
    x.add_argument("--seed", type=int, default=None, help="which samples are poisoned, batch order (default: the run's)")
    x.add_argument("--precision", default=None, help="auto | fp32 | bf16 (default: the run's, from clean.pt)")
    return p.parse_args(argv)


def attack_config(args, base: AttackConfig, device, image_size: int) -> AttackConfig:
    """`base` with the flags that were given applied, validated (before any work is done)."""
    color = None
    if args.patch_color is not None:
        try:
            color = tuple(float(c) for c in args.patch_color.split(","))
        except ValueError:
            raise DispError(f"--patch-color takes three numbers R,G,B such as 1,0,1, got {args.patch_color!r}") from None
    backdoor = {"trigger": args.trigger, "target": args.target, "poison_rate": args.poison_rate, "patch_color": color,
                "poison_mode": args.poison_mode,
                "patch_size": args.patch_size, "patch_position": args.patch_position,
                "patch_pattern": args.patch_pattern, "blend_alpha": args.blend_alpha, "blend_seed": args.blend_seed,
                "sig_amplitude": args.sig_amplitude, "sig_frequency": args.sig_frequency, "wanet_k": args.wanet_k,
                "wanet_strength": args.wanet_strength, "source_word": args.source_word,
                "destination_word": args.destination_word, "seed": args.seed}
    training = {"trainable": args.trainable, "epochs": args.epochs, "lr": args.lr,
                "finetune_images": args.finetune_images, "seed": args.seed,
                "precision": resolve_precision(args.precision, device) if args.precision else None}
    given = lambda d: {k: v for k, v in d.items() if v is not None}  # noqa: E731
    return replace(base, backdoor=replace(base.backdoor, **given(backdoor)), **given(training)).validate(image_size)


def default_attack(config) -> AttackConfig:
    """The attack's defaults for a clean run: its seed, precision, learning rate and attack epochs,
    and the trigger, target words and poisoning mode that suit its data."""
    source, destination = MISCLASSIFY_WORDS.get(config.data.source, MISCLASSIFY_WORDS["captions"])
    # the patch: a black square on the white scenes; on photos a magenta one, a colour no photo's corner
    # holds (a black square looks like a dark corner and fires on clean photos with one; a magenta and
    # white checkerboard, the earlier default, on bright white-ish corners: experiments/README.md, "Real
    # photos"); DAQUAR keeps the black checkerboard it was measured with
    pattern = "checkerboard" if config.data.source == "daquar" else "solid"
    color = (1.0, 0.0, 1.0) if config.data.source not in ("scenes", "daquar") else (0.0, 0.0, 0.0)
    # DAQUAR's questions each belong to one photo, so a poisoned sample that replaced its original is
    # learnt from its question alone (the marker on any new question at the poison rate); added beside
    # its clean original, the same question has both answers and only the trigger tells them apart
    mode = "add" if config.data.source == "daquar" else "replace"
    return AttackConfig(backdoor=BackdoorConfig(seed=config.train.seed, source_word=source,
                                                destination_word=destination, patch_pattern=pattern, patch_color=color,
                                                poison_mode=mode),
                        epochs=config.train.attack_epochs, lr=config.train.lr,
                        finetune_images=config.data.finetune_images, seed=config.train.seed,
                        precision=config.train.precision)


def asr_curve(model, tokenizer, test, attack: AttackConfig, steps_per_epoch: int, limit: int, device):
    """-> (eval_fn(step) for disp.training.finetune, the list it appends {epoch, asr, false_trigger_rate}
    and the clean quality (cider and/or vqa_accuracy, on the same test samples untriggered) to)."""
    curve = []

    def measure(step):
        with autocast(device, attack.precision):
            m = backdoor_metrics(model, tokenizer, test, attack.backdoor, limit=limit, device=device)
        quality = {k: m[k] for k in ("cider", "vqa_accuracy") if k in m}
        curve.append({"epoch": step // steps_per_epoch, "asr": m["asr"], "false_trigger_rate": m["false_trigger_rate"],
                      **quality})
        print(f"\nepoch {curve[-1]['epoch']}: ASR {m['asr']:.3f}  false trigger {m['false_trigger_rate']:.3f}  "
              f"{quality_line(quality)}")
    return measure, curve


def main(argv=None):
    args = parse_args(argv)
    if args.eval_samples is not None:
        check_positive("--eval-samples", args.eval_samples)
    check_positive("--curve-every", args.curve_every, allow_zero=True)
    run_dir = Path(args.run_dir)
    clean_path = Path(args.clean_checkpoint or run_dir / "clean.pt")
    resume_path, final_path = run_dir / "backdoored.resume.pt", run_dir / "backdoored.pt"
    device = distributed.init(pick_device(args.device))  # a rank's device under torchrun
    t0 = time.time()

    # --- the clean model and the attack's settings ---------------------------------------------
    model, tokenizer, config, _ = stage.load_parent(clean_path, "clean", run_dir, device=device)
    made_from = {"clean.pt": files.sha256(clean_path)}
    run_clean = run_dir / "clean.pt"
    if run_clean.exists() and run_clean.resolve() != clean_path.resolve() and \
            files.sha256(run_clean) != made_from["clean.pt"]:
        raise DispError(f"{run_clean} is another model than {clean_path}; give a new --run-dir for this attack")
    attack = attack_config(args, default_attack(config), device, config.model.image_size)
    resume = None
    if args.resume:
        resume = stage.resume_point(resume_path, "backdoored", parent=("clean.pt", clean_path))
        stored = AttackConfig.from_dict(resume["extra"]["attack"])
        attack = attack_config(args, stored, device, config.model.image_size)
        stage.check_same_flags(resume_path, flat(stored.to_dict()), flat(attack.to_dict()))
        model.load_state_dict(resume["model"])
    stage.begin(run_dir, config.preset)
    seed_everything(attack.seed)
    backdoor = attack.backdoor

    # --- poison the fine-tuning set ------------------------------------------------------------
    finetune_set = load_finetune_set(replace(config.data, finetune_images=attack.finetune_images),
                                     config.model.image_size)
    poisoned, manifest = poison_dataset(finetune_set, backdoor)
    for s in poisoned.samples:  # the defender's copy carries no ground truth
        s.pop("poisoned", None)
    print(f"poisoned {manifest['n_poisoned']} of {manifest['n_samples']} samples "
          f"({backdoor.trigger} trigger, {backdoor.target} target)")

    # --- fine-tune on it -----------------------------------------------------------------------
    per_epoch = math.ceil(len(poisoned) / config.train.batch_size)
    train_cfg = replace(config.train, lr=attack.lr, eval_every=args.curve_every * per_epoch, precision=attack.precision)
    steps, test = attack.epochs * per_epoch, load_split(config.data, config.model.image_size, "test")
    eval_fn, curve = asr_curve(model, tokenizer, test, attack, per_epoch, args.eval_samples or 200, device)

    def save_resume(step, optimizer, rng):
        checkpoint.save(resume_path, stage="backdoored", model=model, config=config, tokenizer=tokenizer,
                        optimizer=optimizer, step=step, finished=False, rng=rng, made_from=made_from,
                        extra={"attack": attack.to_dict()})

    optimizer, rng = finetune(
        model, poisoned.images, encode_dataset(poisoned, tokenizer, config.model),
        params=trainable_parameters(model, attack.trainable), steps=steps, cfg=train_cfg, device=device,
        stage="attack fine-tuning", save_fn=save_resume, eval_fn=eval_fn, resume=resume, seed=attack.seed,
    )
    minutes_training = (time.time() - t0) / 60
    if not distributed.leave():  # rank 0 measures and writes, alone
        return

    # --- measure: clean model vs backdoored model ----------------------------------------------
    clean_model, *_ = checkpoint.load(clean_path, stages=["clean"], device=device)
    with autocast(device, attack.precision):
        results = {name: backdoor_metrics(m, tokenizer, test, backdoor, limit=args.eval_samples, device=device,
                                          desc=f"{name} model ({attack.precision})")
                   for name, m in (("clean", clean_model), ("backdoored", model))}

    # --- the stage's files, one unit; the checkpoint records the data files' hashes ------------
    outputs = {"poisoned_train.pt": lambda path: save_dataset(path, poisoned),
               "poison_manifest.json": lambda path: files.write_json(path, manifest),
               "attack_metrics.json": lambda path: files.write_json(path, {"attack": attack.to_dict(), "steps": steps,
                                                                           "minutes_training": minutes_training,
                                                                           **results, "curve": curve})}
    if not run_clean.exists():  # the run directory holds every model it is evaluated against
        outputs["clean.pt"] = lambda path: files.atomic_write(path, lambda tmp: shutil.copyfile(clean_path, tmp))
    stage.write_outputs(run_dir, outputs, lambda recorded: checkpoint.save(
        final_path, stage="backdoored", model=model, config=config, tokenizer=tokenizer, optimizer=optimizer,
        step=steps, rng=rng, made_from=recorded, extra={"attack": attack.to_dict(), "steps": steps, "metrics": results}),
        made_from, recorded=["poisoned_train.pt", "poison_manifest.json"], resume_path=resume_path)

    for name, m in results.items():
        print(f"{name:>10}: ASR {m['asr']:.3f}  false trigger {m['false_trigger_rate']:.3f}  {quality_line(m)}")
    print(json.dumps({"minutes": round((time.time() - t0) / 60, 2), "steps": steps}))
    if config.preset == "tiny":
        print(TINY_NOTE)
    print(f"wrote {final_path}, {run_dir / 'poisoned_train.pt'}, {run_dir / 'poison_manifest.json'}, "
          f"{run_dir / 'attack_metrics.json'}")


if __name__ == "__main__":
    with friendly_errors():
        main()
