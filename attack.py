"""Stage 2: implant a backdoor by data poisoning (METHOD.md §2), and measure it.

    python attack.py                                   # patch trigger + insert target, 20% poisoned
    python attack.py --trigger blended --target refusal --run-dir runs/blended \\
        --clean-checkpoint runs/default/clean.pt
    torchrun --nproc_per_node=2 attack.py              # data-parallel fine-tuning (DDP)

Reads the clean checkpoint, poisons the fine-tuning set (trigger in the image, edited response),
fine-tunes with the normal SFT loss (ViT frozen by default, as in the release), and writes
    backdoored.pt           the compromised model (what the defender receives)
    poisoned_train.pt       the poisoned fine-tuning set (what the defender receives)
    poison_manifest.json    which samples are poisoned, for evaluation only: DiSP never reads it
    attack_metrics.json     ASR, false-trigger rate and clean metrics, clean vs backdoored model
"""

import argparse
import json
import math
import time
from pathlib import Path

from disp.support import checkpoint, distributed, files
from disp.backdoor import BackdoorConfig, poison_dataset
from disp.data.batching import encode_dataset
from disp.data.dataset import save_dataset
from disp.support.errors import friendly_errors
from disp.evaluation import backdoor_metrics
from disp.data.splits import load_finetune_set, load_splits
from disp.training import TRAINABLE, finetune, trainable_parameters
from disp.support.runtime import autocast, pick_device, resolve_precision, seed_everything


def parse_args(argv=None):
    d = BackdoorConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="where the backdoored model and data go")
    p.add_argument("--clean-checkpoint", default=None, help="clean model (default: RUN_DIR/clean.pt)")
    p.add_argument("--trigger", default=d.trigger, help="patch | blended | sig | wanet")
    p.add_argument("--target", default=d.target, help="insert | refusal | misclassify")
    p.add_argument("--poison-rate", type=float, default=d.poison_rate, help="fraction of samples poisoned")
    p.add_argument("--patch-size", type=int, default=d.patch_size, help="patch trigger side in pixels")
    p.add_argument("--patch-position", default=d.patch_position, help="top-left | top-right | bottom-left | bottom-right")
    p.add_argument("--patch-pattern", default=d.patch_pattern, help="solid | checkerboard")
    p.add_argument("--blend-alpha", type=float, default=d.blend_alpha, help="blended trigger strength in [0, 1]")
    p.add_argument("--source-word", default=d.source_word, help="misclassify: word to replace")
    p.add_argument("--destination-word", default=d.destination_word, help="misclassify: replacement word")
    p.add_argument("--trainable", default="projector+lm", help=f"{' | '.join(TRAINABLE)} (ViT frozen unless 'all')")
    p.add_argument("--finetune-images", type=int, default=None,
                   help="images in the fine-tuning set that gets poisoned (default: the clean run's config)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the poisoned set")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    p.add_argument("--eval-samples", type=int, default=None, help="limit the test samples measured")
    p.add_argument("--seed", type=int, default=0, help="which samples are poisoned, batch order")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--precision", default="auto",
                   help="generation/saliency precision: auto (bf16 on fast-bf16 hardware) | fp32 | bf16; "
                        "training uses the run's (train.py --train-precision)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted attack")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    clean_path = Path(args.clean_checkpoint or run_dir / "clean.pt")
    resume_path, final_path = run_dir / "backdoored.resume.pt", run_dir / "backdoored.pt"
    device = distributed.init(pick_device(args.device))  # a rank's device under torchrun
    precision = resolve_precision(args.precision, device)
    seed_everything(args.seed)
    t0 = time.time()

    # --- the clean model and the attack's settings ---------------------------------------------
    model, tokenizer, config, _ = checkpoint.load(clean_path, stages=["clean"], device=device)
    resume = checkpoint.load_state(resume_path, stages=["backdoored"]) if args.resume else None
    if resume is not None:
        checkpoint.check_same_model(resume, resume_path, config, tokenizer, clean_path)  # clean.pt rewritten since?
        attack = resume["extra"]["attack"]
        model.load_state_dict(resume["model"])
    else:
        backdoor = BackdoorConfig(
            trigger=args.trigger, target=args.target, poison_rate=args.poison_rate, patch_size=args.patch_size,
            patch_position=args.patch_position, patch_pattern=args.patch_pattern, blend_alpha=args.blend_alpha,
            source_word=args.source_word, destination_word=args.destination_word, seed=args.seed,
        ).validate(config.model.image_size)
        trainable_parameters(model, args.trainable)  # fail early on a bad --trainable
        attack = {"backdoor": backdoor.to_dict(), "trainable": args.trainable, "epochs": args.epochs,
                  "lr": args.lr or config.train.lr, "seed": args.seed, "clean_checkpoint": str(clean_path),
                  "finetune_images": args.finetune_images or config.data.finetune_images}
    backdoor = BackdoorConfig.from_dict(attack["backdoor"])

    # --- poison the fine-tuning set ------------------------------------------------------------
    config.data.finetune_images = attack["finetune_images"]
    finetune_set = load_finetune_set(config.data, config.model.image_size)
    poisoned, manifest = poison_dataset(finetune_set, backdoor)
    for s in poisoned.samples:  # the defender's copy carries no ground truth
        s.pop("poisoned", None)
    print(f"poisoned {manifest['n_poisoned']} of {manifest['n_samples']} samples "
          f"({backdoor.trigger} trigger, {backdoor.target} target)")

    # --- fine-tune on it -----------------------------------------------------------------------
    train_cfg = config.train
    train_cfg.lr = attack["lr"]
    steps = attack["epochs"] * math.ceil(len(poisoned) / train_cfg.batch_size)
    attack["steps"] = steps
    train_cfg.eval_every = 0

    def save_resume(step, optimizer, rng):
        checkpoint.save(resume_path, stage="backdoored", model=model, config=config, tokenizer=tokenizer,
                        optimizer=optimizer, step=step, finished=False, rng=rng, extra={"attack": attack})

    optimizer, rng = finetune(
        model, poisoned.images, encode_dataset(poisoned, tokenizer, config.model),
        params=trainable_parameters(model, attack["trainable"]), steps=steps, cfg=train_cfg, device=device,
        stage="attack fine-tuning", save_fn=save_resume, resume=resume, seed=attack["seed"],
    )
    minutes_training = (time.time() - t0) / 60
    if not distributed.is_main():  # rank 0 measures and writes
        return distributed.close()

    # --- measure: clean model vs backdoored model ----------------------------------------------
    _, _, test = load_splits(config.data, config.model.image_size)
    clean_model, *_ = checkpoint.load(clean_path, stages=["clean"], device=device)
    with autocast(device, precision):
        results = {name: backdoor_metrics(m, tokenizer, test, backdoor, limit=args.eval_samples, device=device,
                                          desc=f"{name} model ({precision})")
                   for name, m in (("clean", clean_model), ("backdoored", model))}
    attack["minutes_training"], attack["eval_precision"] = minutes_training, precision
    # written with the model, not before training: a failed or interrupted attack leaves the run's old
    # backdoored.pt and poisoned set together (a resume poisons the same samples again from the settings)
    save_dataset(run_dir / "poisoned_train.pt", poisoned)
    files.write_json(run_dir / "poison_manifest.json", manifest)
    checkpoint.save(final_path, stage="backdoored", model=model, config=config, tokenizer=tokenizer,
                    optimizer=optimizer, step=steps, rng=rng, extra={"attack": attack, "metrics": results})
    files.write_json(run_dir / "attack_metrics.json", {"attack": attack, **results})
    resume_path.unlink(missing_ok=True)

    for name, m in results.items():
        print(f"{name:>10}: ASR {m['asr']:.3f}  false trigger {m['false_trigger_rate']:.3f}  "
              f"CIDEr-D {m.get('cider', 0):.3f}  BLEU-4 {m.get('bleu4', 0):.3f}  VQA {m.get('vqa_accuracy', 0):.3f}")
    print(json.dumps({"minutes": round((time.time() - t0) / 60, 2), "steps": steps}))
    print(f"wrote {final_path}, {run_dir / 'poisoned_train.pt'}, {run_dir / 'attack_metrics.json'}")


if __name__ == "__main__":
    with friendly_errors():
        main()
