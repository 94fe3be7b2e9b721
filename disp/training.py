"""The training loops shared by train.py, attack.py and purify.py.

- `pretrain_vision`: phase 1 of train.py. The ViT learns what each patch shows (per-patch colour
  and shape classes of the scene), standing in for the SigLIP-style pretraining that real MDLM-VLMs
  start from. On public data, where no per-patch labels exist, it predicts the bag of words of the
  image's texts from the mean-pooled patches instead (weak image-text supervision).
- `finetune`: masked-diffusion SFT (disp.diffusion.sft_loss) of chosen parameter groups, with a
  seeded, resumable batch order, AdamW, linear warmup then cosine decay, periodic validation and
  checkpoints, and a stop on a non-finite loss.

All randomness in a loop comes from one torch.Generator whose state is checkpointed, so a resumed
run ends bit-identical to an uninterrupted one on the same machine. Under torchrun both loops are
data-parallel (disp.support.distributed): every rank draws the same global batch and noise, trains on its
rows, and DistributedDataParallel averages the gradients; only rank 0 validates and saves.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from disp.data.batching import BatchOrder, EncodedData
from disp.diffusion import forward_noise, sft_loss
from disp.support import distributed
from disp.support.errors import DispError
from disp.support.runtime import autocast

TRAINABLE = ("projector", "projector+lm", "all")


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def check_finite(loss, step: int, stage: str):
    """Stop on a NaN/inf loss (averaged over ranks, so every rank stops together)."""
    loss = distributed.sum_across(loss.detach().clone()) / distributed.world()
    if not torch.isfinite(loss):
        raise DispError(f"{stage}: loss became {loss.item()} at step {step}; no checkpoint was written "
                        f"for it (lower the learning rate or check the data)")


def trainable_parameters(model, trainable: str):
    """The parameter groups an SFT stage updates; the rest is frozen."""
    if trainable not in TRAINABLE:
        raise DispError(f"unknown --trainable '{trainable}'; choose one of: {', '.join(TRAINABLE)}")
    if trainable == "projector":
        return list(model.projector.parameters())
    if trainable == "projector+lm":
        return model.text_parameters()
    return [p for n, p in model.named_parameters() if not n.startswith("vit.patch_heads.")]  # heads: phase 1 only


def random_vision_mask(batch: int, n_vision: int, max_fraction: float, generator, device):
    """(B, n_vision) bool: each sample hides a U(0, max_fraction) share of its image positions.

    Makes [MASK] at an image position in-distribution, so DiSP's masked inference is not a shock
    to the text model (see the purify issue's measurements).
    """
    fraction = torch.rand(batch, 1, generator=generator) * max_fraction
    return (torch.rand(batch, n_vision, generator=generator) < fraction).to(device)


class VisionPretrainLoss(nn.Module):
    """Phase 1's loss as one module (what DistributedDataParallel wraps): per-patch attribute
    cross-entropy, or on public data the bag of words of the image's texts from mean-pooled patches."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, images, patch_labels=None, texts_bow=None):
        vit = self.vit
        feats = vit(images)  # (B, n_vision, vit_dim)
        if patch_labels is not None:
            return sum(F.cross_entropy(head(feats).flatten(0, 1), patch_labels[..., a].flatten())
                       for a, head in enumerate(vit.patch_heads))
        logits = vit.patch_heads[0](feats.mean(dim=1))  # (B, vocab)
        return F.binary_cross_entropy_with_logits(logits, texts_bow)


def pretrain_vision(model, images, patch_labels, texts_bow, cfg, device, seed):
    """Phase 1: train the ViT (and its pretraining heads) alone; returns the last loss."""
    params = list(model.vit.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    step_loss = distributed.wrap(VisionPretrainLoss(model.vit), device)
    order = BatchOrder(len(images), cfg.batch_size, seed + 1)
    bar = tqdm(range(cfg.vision_steps), desc="vision pretraining", dynamic_ncols=True,
               disable=not distributed.is_main())
    loss = torch.tensor(0.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.vision_steps, cfg.vision_lr, cfg.warmup_steps)
        idx = order.indices(step)[distributed.shard(cfg.batch_size)]  # this rank's rows of the global batch
        with autocast(device, cfg.precision):
            if patch_labels is not None:
                loss = step_loss(model.to_float(images[idx].to(device)), patch_labels=patch_labels[idx].to(device))
            else:
                loss = step_loss(model.to_float(images[idx].to(device)), texts_bow=texts_bow[idx].to(device))
        check_finite(loss, step, "vision pretraining")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


class SFTLoss(nn.Module):
    """Projector + text model + masked-diffusion loss as one module (what DistributedDataParallel
    wraps). Takes cached ViT features when the ViT is frozen, else images."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, vit_features, images, prompt_ids, response_ids, noise, vision_mask):
        model = self.model
        vision_tokens = model.projector(vit_features) if vit_features is not None else model.encode_images(images)
        return sft_loss(model, vision_tokens, prompt_ids, response_ids, vision_mask=vision_mask, noise=noise)


def finetune(model, images, data: EncodedData, *, params, steps, cfg, device, stage,
             save_fn=None, eval_fn=None, resume=None, vision_mask_max=0.0, seed=0):
    """Masked-diffusion SFT of `params` (others frozen).

    save_fn(step, optimizer, rng_state) writes a resume checkpoint; eval_fn(step) validates.
    resume: a checkpoint dict with step / optimizer / rng to continue from.
    """
    params = list(params)
    trained = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    vit_frozen = not any(p.requires_grad for p in model.vit.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    start = 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        generator.set_state(resume["rng"])
        start = resume["step"]

    # A frozen ViT gives the same features every epoch: compute them once for all images.
    vit_features = None
    if vit_frozen:
        model.eval()
        with torch.no_grad():
            vit_features = torch.cat([model.vit(model.to_float(images[i:i + 256].to(device)))
                                      for i in range(0, len(images), 256)])

    # at most 5% of the run warms up, so a short run (the refinement: ~100 steps) mostly anneals
    warmup = max(1, min(cfg.warmup_steps, steps // 20))
    order = BatchOrder(len(data), cfg.batch_size, seed)
    step_loss = distributed.wrap(SFTLoss(model), device)
    mine = distributed.shard(cfg.batch_size)  # this rank's rows of every global batch
    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, dynamic_ncols=True,
               disable=not distributed.is_main())
    for step in bar:
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg.lr, warmup)
        # the global batch and all its random draws (same on every rank), then this rank's rows
        idx = order.indices(step)
        vision_mask = None
        if vision_mask_max > 0:
            vision_mask = random_vision_mask(len(idx), model.cfg.n_vision, vision_mask_max, generator, device)[mine]
        noise = [t[mine].to(device) for t in forward_noise(data.response_ids[idx], model.mask_id, generator)]
        idx, image_idx = idx[mine], data.image_index[idx[mine]]
        with autocast(device, cfg.precision):  # fp32 unless the run's config asks for bf16
            loss = step_loss(
                vit_features[image_idx.to(device)] if vit_features is not None else None,
                images[image_idx].to(device) if vit_features is None else None,
                data.prompt_ids[idx].to(device), data.response_ids[idx].to(device), noise, vision_mask,
            )
        check_finite(loss, step, stage)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # under torchrun, DDP averages the gradients over ranks here
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if not distributed.is_main():
            continue
        if eval_fn is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < steps:
            model.eval()
            eval_fn(done)
        if save_fn is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < steps:
            save_fn(done, opt, generator.get_state())
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return opt, generator.get_state()

