"""Stage 1: train the clean multimodal masked diffusion LM.

    python train.py                       # CPU preset on the embedded scenes -> runs/default/clean.pt
    python train.py --preset tiny --out-dir runs/tiny
    python train.py --resume              # continue an interrupted run
    torchrun --nproc_per_node=2 train.py  # data-parallel (DDP; gloo on CPU, nccl on GPUs)

Phase 1 pretrains the ViT on what each patch shows (a stand-in for a pretrained vision tower);
phase 2 freezes it and trains projector + text transformer with the masked-diffusion SFT loss.
Writes clean.pt (checkpoint with config and tokenizer) and clean_metrics.json (held-out metrics).
"""

import argparse
import json
import time
from pathlib import Path

import torch

from disp.support import checkpoint, distributed, files
from disp.data.batching import encode_dataset
from disp.config import Config, get_preset
from disp.support.errors import friendly_errors
from disp.evaluation import clean_metrics, generate_responses, split_indices
from disp.data.splits import load_splits
from disp.data.tokenizer import Tokenizer
from disp.training import finetune, pretrain_vision
from disp.support.runtime import autocast, pick_device, resolve_precision, seed_everything


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", help="cpu (default) | gpu | tiny")
    p.add_argument("--out-dir", default="runs/default", help="run directory (default: runs/default)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and batch order")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | mps")
    p.add_argument("--precision", default="auto",
                   help="generation/saliency precision: auto (bf16 on fast-bf16 hardware) | fp32 | bf16")
    p.add_argument("--data", default="scenes", help="scenes (embedded, default) | coco | karpathy | flickr | vqav2")
    p.add_argument("--data-root", default="", help="folder of the public dataset (for --data other than scenes)")
    p.add_argument("--sft-steps", type=int, default=None, help="override the preset's SFT steps")
    p.add_argument("--vision-steps", type=int, default=None, help="override the preset's ViT pretraining steps")
    p.add_argument("--train-precision", default=None,
                   help="training precision: auto (bf16 autocast on fast-bf16 hardware, else fp32) | fp32 | bf16; "
                        "default: the preset's (auto; tiny: fp32). Stored in the run's config: attack.py and "
                        "purify.py train the same way")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's resume point")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    resume_path, final_path = out_dir / "clean.resume.pt", out_dir / "clean.pt"
    device = distributed.init(pick_device(args.device))  # a rank's device under torchrun
    precision = resolve_precision(args.precision, device)

    # --- config: from the resume point, or the preset plus flags --------------------------------
    resume = checkpoint.load_state(resume_path, stages=["clean"]) if args.resume else None
    if resume is not None:
        config = Config.from_dict(resume["config"])
    else:
        config = get_preset(args.preset)
        config.data.source, config.data.data_root = args.data, args.data_root
        config.data.seed = config.train.seed = args.seed
        if args.sft_steps is not None:
            config.train.sft_steps = args.sft_steps
        if args.vision_steps is not None:
            config.train.vision_steps = args.vision_steps
        config.train.precision = resolve_precision(args.train_precision or config.train.precision, device,
                                                    "--train-precision")
    seed_everything(config.train.seed)

    # --- data and tokenizer --------------------------------------------------------------------
    t0 = time.time()
    train, val, test = load_splits(config.data, config.model.image_size)
    if resume is not None:
        tokenizer = Tokenizer.from_dict(resume["tokenizer"])
    else:
        tokenizer = Tokenizer.build([s["prompt"] + " " + s["response"] for s in train.samples])
        config.model.patch_classes = train.meta.get("patch_classes") or [len(tokenizer)]
    print(f"data: {len(train)} train / {len(val)} val / {len(test)} test samples "
          f"({len(train.images)} train images), vocab {len(tokenizer)}, {time.time() - t0:.1f}s")

    model = checkpoint.build_model(config, tokenizer).to(device)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
          f"({config.model.n_vision} vision tokens), device {device}")

    def save_resume(step, optimizer, rng, phase="sft"):
        checkpoint.save(resume_path, stage="clean", model=model, config=config, tokenizer=tokenizer,
                        optimizer=optimizer, step=step, finished=False, rng=rng, extra={"phase": phase})

    # --- phase 1: vision-encoder pretraining ---------------------------------------------------
    if resume is None:
        bow = None
        if train.patch_labels is None:  # public data: bag of words of each image's texts
            bow = torch.zeros(len(train.images), len(tokenizer))
            for s in train.samples:
                bow[s["image"], tokenizer.encode(s["response"])] = 1.0
        loss = pretrain_vision(model, train.images, train.patch_labels, bow, config.train, device, config.train.seed)
        print(f"vision pretraining done: loss {loss:.4f}")
        if distributed.is_main():
            save_resume(0, None, None)
    else:
        model.load_state_dict(resume["model"])
        if resume["optimizer"] is None:  # resume point right after phase 1
            resume = None
        print(f"resuming SFT at step {resume['step'] if resume else 0}")

    # --- phase 2: masked-diffusion SFT, ViT frozen ---------------------------------------------
    caption_idx, vqa_idx = split_indices(val, config.train.eval_samples)

    def validate(step):
        with autocast(device, precision):
            m = clean_metrics(model, tokenizer, val, limit=config.train.eval_samples, device=device)
        print(f"\nstep {step}: val CIDEr-D {m.get('cider', 0):.3f}  caption EM {m.get('caption_exact_match', 0):.3f}"
              f"  VQA {m.get('vqa_accuracy', 0):.3f}")

    optimizer, rng = finetune(
        model, train.images, encode_dataset(train, tokenizer, config.model),
        params=model.text_parameters(), steps=config.train.sft_steps, cfg=config.train, device=device,
        stage="clean SFT", save_fn=save_resume, eval_fn=validate, resume=resume,
        vision_mask_max=config.train.vision_mask_max, seed=config.train.seed,
    )
    if not distributed.is_main():  # rank 0 measures and writes
        return distributed.close()

    # --- held-out metrics, checkpoint, examples ------------------------------------------------
    with autocast(device, precision):
        metrics = clean_metrics(model, tokenizer, test, device=device, desc=f"test set ({precision})")
        examples = caption_idx[:3] + vqa_idx[:3]
        example_outputs = generate_responses(model, tokenizer, val, examples, device=device)
    metrics["minutes"], metrics["eval_precision"] = (time.time() - t0) / 60, precision
    checkpoint.save(final_path, stage="clean", model=model, config=config, tokenizer=tokenizer,
                    optimizer=optimizer, step=config.train.sft_steps, rng=rng, extra={"metrics": metrics})
    files.write_json(out_dir / "clean_metrics.json", {"metrics": metrics, "config": config.to_dict()})
    resume_path.unlink(missing_ok=True)

    for i, pred in zip(examples, example_outputs):
        print(f"  {val.samples[i]['prompt']!r:60} -> {pred!r}  (ref: {val.samples[i]['response']!r})")
    print(json.dumps({k: v for k, v in metrics.items() if k != "vqa_by_task"}, indent=None))
    print(f"wrote {final_path} and {out_dir / 'clean_metrics.json'}")


if __name__ == "__main__":
    with friendly_errors():
        main()
