"""Stage 1: train the clean multimodal masked diffusion LM.

    python train.py                                # cpu preset on the embedded scenes -> runs/default/
    python train.py --preset tiny --run-dir runs/tiny
    python train.py --resume                       # continue an interrupted run
    torchrun --nproc_per_node=2 train.py           # data-parallel (gloo on CPU, nccl on GPUs)

Phase 1 pretrains the ViT on what each patch shows (a stand-in for a pretrained vision tower), or
takes it from another run's clean.pt (--vision-from: DAQUAR's 397 training photos are too few; it
starts from the Flickr8k run's ViT); phase 2 freezes it and trains projector + text transformer with the
masked-diffusion SFT loss. The run's settings (preset, seed, data, precision) are stored in
clean.pt; the later stages read them from there. Writes, in the run directory:
    clean.pt            the clean model with its config and tokenizer
    clean_metrics.json  held-out metrics on the test split
    clean.resume.pt     while training (every checkpoint_every steps); removed at the end
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from disp.config import TINY_NOTE, VISION_OBJECTIVES, Config, data_summary, fit_to_data, get_preset
from disp.data.batching import encode_dataset
from disp.data.splits import SOURCES, load_splits
from disp.data.tokenizer import Tokenizer
from disp.evaluation import clean_metrics, generate_responses, majority_answer, quality_line, split_indices
from disp.support import checkpoint, distributed, files, stage
from disp.support.errors import DispError, check_choice, check_positive, friendly_errors
from disp.support.runtime import autocast, pick_device, resolve_precision, seed_everything
from disp.training import finetune, vision_phase


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="run directory (default: runs/default)")
    p.add_argument("--preset", default="auto",
                   help="auto (default: cpu on the scenes, daquar on DAQUAR, photo on other public --data) | cpu | "
                        "small | photo | daquar | gpu | gpu-photo | tiny")
    p.add_argument("--seed", type=int, default=None, help="seed of the data, initialisation and batch order (default 0)")
    p.add_argument("--data", default=None, help=f"{' | '.join(SOURCES)} (default: scenes, embedded)")
    p.add_argument("--data-root", default=None, help="folder of the public dataset (for --data other than scenes)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | mps")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's resume point")
    x = p.add_argument_group("experiment options")
    x.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default: the preset's)")
    x.add_argument("--vision-steps", type=int, default=None, help="ViT pretraining steps (default: the preset's)")
    x.add_argument("--vision-objective", default=None,
                   help=f"public data: the ViT's pretraining objective, {' | '.join(VISION_OBJECTIVES)} (default: the "
                        f"preset's; words: predict the image's words, contrastive: tell them from other images')")
    x.add_argument("--vision-crop", type=float, default=None,
                   help="public data: pretrain on random square crops of at least this share of the side (default: "
                        "the preset's; 1: none)")
    x.add_argument("--vision-from", default=None,
                   help="start from the ViT of this clean.pt (a run of the same preset, e.g. Flickr8k's for DAQUAR's "
                        "few photos) instead of pretraining one; with --vision-steps N, pretrain it N more steps here")
    x.add_argument("--conv-stem", type=int, default=None, help="1: a convolutional stem instead of the linear patch "
                                                               "embedding, 0: none (default: the preset's)")
    x.add_argument("--block-length", type=int, default=None,
                   help="the sampler's block: write responses this many tokens at a time, left to right (default: the "
                        "preset's; 0: the whole response in one block). Stored in clean.pt; the later stages use it")
    x.add_argument("--guidance", type=float, default=None,
                   help="the sampler's guidance on the image (0: none; default: the preset's). Stored in clean.pt; "
                        "the later stages use it")
    x.add_argument("--temperature", type=float, default=None,
                   help="the sampler's temperature (0: greedy; default: the preset's). Stored in clean.pt; the later "
                        "stages use it")
    x.add_argument("--sft-vit-lr", type=float, default=None,
                   help="fine-tune the ViT during SFT at this peak learning rate (default: the preset's; 0: frozen)")
    x.add_argument("--image-free", type=float, default=None,
                   help="share of SFT samples trained with no image (every image position [MASK]), for guidance "
                        "on the image (default: the preset's)")
    x.add_argument("--precision", default=None,
                   help="the run's precision for training and generation: auto (bf16 autocast on hardware with "
                        "fast bf16 units, else fp32) | fp32 | bf16 (default: the preset's: auto; tiny: fp32). "
                        "Stored resolved in clean.pt; the later stages inherit it")
    return p.parse_args(argv)


def new_config(args, device) -> Config:
    """The preset with the flags applied, validated, precision resolved for this machine."""
    public = args.data not in (None, "scenes")
    auto = "daquar" if args.data == "daquar" else "photo" if public else "cpu"
    config = get_preset(args.preset if args.preset != "auto" else auto)
    data, train = config.data, config.train
    seed = args.seed if args.seed is not None else train.seed
    data = replace(data, seed=seed, source=args.data or data.source,
                   data_root=str(Path(args.data_root).resolve()) if args.data_root else data.data_root)
    check_choice("--data", data.source, SOURCES)
    given = {"sft_steps": args.sft_steps, "vision_steps": args.vision_steps, "precision": args.precision,
             "vision_objective": args.vision_objective, "vision_crop": args.vision_crop, "sft_vit_lr": args.sft_vit_lr,
             "image_free": args.image_free,
             "vision_from": str(Path(args.vision_from).resolve()) if args.vision_from else None}
    train = replace(train, seed=seed, **{k: v for k, v in given.items() if v is not None}).validate()
    if train.vision_from and args.vision_steps is None:  # the copied ViT is not pretrained again unless asked
        train = replace(train, vision_steps=0)
    train = replace(train, precision=resolve_precision(train.precision, device))
    model = config.model
    if args.conv_stem is not None:
        if args.conv_stem not in (0, 1):
            raise DispError(f"--conv-stem must be 0 or 1, got {args.conv_stem}")
        model = replace(model, conv_stem=bool(args.conv_stem))
    if args.block_length is not None:
        check_positive("--block-length", args.block_length, allow_zero=True)
        model = replace(model, block_length=args.block_length)
    if args.guidance is not None:
        check_positive("--guidance", args.guidance, allow_zero=True)
        model = replace(model, guidance=args.guidance)
    if args.temperature is not None:
        check_positive("--temperature", args.temperature, allow_zero=True)
        model = replace(model, temperature=args.temperature)
    return replace(config, data=data, model=model, train=train)


def resumed_config(args, resume: dict, path: Path) -> Config:
    """The interrupted run's config; a flag that contradicts it is an error, not silently ignored."""
    config = Config.from_dict(resume["config"])
    stored = {"preset": config.preset, "seed": config.train.seed, "data": config.data.source,
              "data_root": config.data.data_root, "sft_steps": config.train.sft_steps,
              "vision_steps": config.train.vision_steps, "vision_objective": config.train.vision_objective,
              "vision_crop": config.train.vision_crop, "conv_stem": int(config.model.conv_stem),
              "sft_vit_lr": config.train.sft_vit_lr, "block_length": config.model.block_length,
              "guidance": config.model.guidance, "temperature": config.model.temperature,
              "vision_from": config.train.vision_from, "image_free": config.train.image_free}
    given = {"preset": args.preset if args.preset != "auto" else None, "seed": args.seed, "data": args.data,
             "data_root": str(Path(args.data_root).resolve()) if args.data_root else None,
             "sft_steps": args.sft_steps, "vision_steps": args.vision_steps, "vision_objective": args.vision_objective,
             "vision_crop": args.vision_crop, "conv_stem": args.conv_stem, "sft_vit_lr": args.sft_vit_lr,
             "block_length": args.block_length, "image_free": args.image_free, "guidance": args.guidance,
             "temperature": args.temperature,
             "vision_from": str(Path(args.vision_from).resolve()) if args.vision_from else None}
    stage.check_same_flags(path, stored, given)
    return config


def main(argv=None):
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    resume_path, final_path = run_dir / "clean.resume.pt", run_dir / "clean.pt"
    device = distributed.init(pick_device(args.device))  # a rank's device under torchrun

    # --- config: from the resume point, or the preset plus flags --------------------------------
    resume = stage.resume_point(resume_path, "clean") if args.resume else None
    config = resumed_config(args, resume, resume_path) if resume is not None else new_config(args, device)
    precision = config.train.precision
    # --vision-from: the ViT to start from, read before anything is written
    vision_source = checkpoint.load(config.train.vision_from, stages=("clean",))[0] \
        if resume is None and config.train.vision_from else None
    stage.begin(run_dir, config.preset)
    seed_everything(config.train.seed)

    # --- data and tokenizer --------------------------------------------------------------------
    t0 = time.time()
    train, val, test = load_splits(config.data, config.model.image_size)
    if resume is not None:
        tokenizer = Tokenizer.from_dict(resume["tokenizer"])
    else:
        config, tokenizer = fit_to_data(config, train)
    print(f"{data_summary(config, tokenizer, train, val, test)}, {time.time() - t0:.1f}s")

    model = checkpoint.build_model(config, tokenizer).to(device)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
          f"({config.model.n_vision} vision tokens), device {device}, precision {precision}")

    def save_resume(step, optimizer, rng, phase="sft"):
        checkpoint.save(resume_path, stage="clean", model=model, config=config, tokenizer=tokenizer,
                        optimizer=optimizer, step=step, finished=False, rng=rng, extra={"phase": phase})

    # --- phase 1: the vision encoder, pretrained here or copied (--vision-from) ------------------
    if resume is None:
        if config.data.source == "daquar" and vision_source is None:
            print(f"note: DAQUAR's {len(train.images)} training photos are few for a ViT of its own, and the text "
                  f"model learns them by heart; the measured recipe starts from a Flickr8k run's "
                  f"(--vision-from RUN/clean.pt, run.sh's VISION_FROM)")
        print(vision_phase(model, train, tokenizer, config.train, device, vision_source))
        if distributed.is_main():
            save_resume(0, None, None)
    else:
        model.load_state_dict(resume["model"])
        if resume["optimizer"] is None:  # resume point right after phase 1
            resume = None
        print(f"resuming SFT at step {resume['step'] if resume else 0}")

    # --- phase 2: masked-diffusion SFT (ViT frozen unless sft_vit_lr > 0) -----------------------
    caption_idx, vqa_idx = split_indices(val, config.train.eval_samples)

    def validate(step):
        with autocast(device, precision):
            m = clean_metrics(model, tokenizer, val, limit=config.train.eval_samples, device=device)
        print(f"\nstep {step}: val {quality_line(m)}")

    optimizer, rng = finetune(
        model, train.images, encode_dataset(train, tokenizer, config.model),
        params=model.text_parameters(), steps=config.train.sft_steps, cfg=config.train, device=device,
        stage="clean SFT", save_fn=save_resume, eval_fn=validate, resume=resume,
        vision_mask_max=config.train.vision_mask_max, seed=config.train.seed, vit_lr=config.train.sft_vit_lr,
        image_free=config.train.image_free,
    )
    if not distributed.leave():  # rank 0 measures and writes, alone
        return

    # --- held-out metrics, checkpoint, examples ------------------------------------------------
    with autocast(device, precision):
        metrics = clean_metrics(model, tokenizer, test, device=device, desc=f"test set ({precision})")
        examples = caption_idx[:3] + vqa_idx[:3]
        example_outputs = generate_responses(model, tokenizer, val, examples, device=device)
    metrics["minutes"] = (time.time() - t0) / 60
    stage.write_outputs(
        run_dir, {"clean_metrics.json": lambda path: files.write_json(path, {"metrics": metrics,
                                                                             "config": config.to_dict()})},
        lambda made_from: checkpoint.save(final_path, stage="clean", model=model, config=config, tokenizer=tokenizer,
                                          optimizer=optimizer, step=config.train.sft_steps, rng=rng,
                                          extra={"metrics": metrics, "majority_answer": majority_answer(train)}),
        made_from={}, resume_path=resume_path)

    for i, pred in zip(examples, example_outputs):
        print(f"  {val.samples[i]['prompt']!r:60} -> {pred!r}  (ref: {val.samples[i]['response']!r})")
    print(json.dumps({k: v for k, v in metrics.items() if k != "vqa_by_task"}, indent=None))
    if config.preset == "tiny":
        print(TINY_NOTE)
    print(f"wrote {final_path} and {run_dir / 'clean_metrics.json'}")


if __name__ == "__main__":
    with friendly_errors():
        main()
