"""The training loops shared by train.py, attack.py and purify.py.

- `pretrain_vision`: phase 1 of train.py. The ViT learns what each patch shows (per-patch colour
  and shape classes of the scene), standing in for the SigLIP-style pretraining that real MDLM-VLMs
  start from. On public data, where no per-patch labels exist, it learns from the image's texts
  instead (`vision_objective`): it predicts their bag of words from the mean-pooled patches, or
  tells the image's own bag of words from the other images' of the batch (`contrastive_loss`, as
  CLIP does with a text tower; ours is a linear map of the bag of words, thrown away afterwards),
  or both; on photos, optionally from random crops (`vision_crop`). Optionally (`pixel_loss` > 0)
  a linear decoder, thrown away afterwards, also reconstructs every patch's pixels from its
  feature, so the features keep the image's low-level content as a real vision tower's do, not
  only what the labels name.
- `Finetuner` / `finetune`: masked-diffusion SFT (disp.diffusion.sft_loss) of chosen parameters, with
  a seeded, resumable batch order, AdamW, linear warmup then cosine decay, periodic validation and
  checkpoints, and a stop on a non-finite loss.

All randomness in a loop comes from one torch.Generator whose state is checkpointed, so a resumed
run ends bit-identical to an uninterrupted one on the same machine. Under torchrun the loops are
data-parallel with three calls into disp.support.distributed, which do nothing in one process:
every process draws the same global batch and noise and keeps its rows (`my_rows`), and the
gradients are averaged over processes after backward (`average_gradients`).
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

from disp.config import TRAINABLE
from disp.data.batching import BatchOrder, EncodedData
from disp.diffusion import forward_noise, sft_loss
from disp.support import distributed
from disp.support.errors import DispError, check_choice
from disp.support.runtime import autocast


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def check_finite(loss, step: int, stage: str):
    """Stop on a NaN/inf loss (averaged over processes, so every process stops together)."""
    loss = distributed.mean_across(loss.detach().clone())
    if not torch.isfinite(loss):
        raise DispError(f"{stage}: loss became {loss.item()} at step {step}; no checkpoint was written "
                        f"for it (lower the learning rate or check the data)")


def trainable_parameters(model, trainable: str):
    """The parameter groups an SFT stage updates; the rest is frozen."""
    check_choice("--trainable", trainable, TRAINABLE)
    if trainable == "projector":
        return list(model.projector.parameters())
    if trainable == "projector+lm":
        return model.text_parameters()
    return [p for n, p in model.named_parameters() if not n.startswith("vit.patch_heads.")]  # heads: phase 1 only


def random_vision_mask(batch: int, n_vision: int, max_fraction: float, generator, device, image_free: float = 0.0):
    """(B, n_vision) bool: each sample hides a U(0, max_fraction) share of its image positions, and
    an `image_free` share of the samples hides all of them.

    Makes [MASK] at an image position in-distribution, so DiSP's masked inference is not a shock
    to the text model (README, "How DiSP works": mask-robust training).
    """
    fraction = torch.rand(batch, 1, generator=generator) * max_fraction
    if image_free > 0:
        fraction = torch.where(torch.rand(batch, 1, generator=generator) < image_free, 1.0, fraction)
    return (torch.rand(batch, n_vision, generator=generator) < fraction).to(device)


def patch_pixels(images, patch_size: int):
    """(B, 3, H, W) in [0, 1] -> (B, n_patches, 3 * p * p) in [-1, 1], the ViT's own input layout. Not
    normalised per patch (MAE's choice): colour and brightness are content a trigger can change."""
    x = rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)
    return (x - 0.5) / 0.5


def contrastive_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE (CLIP, Radford et al. 2021): in a batch of (image, text) pairs, each image's
    own text is the right answer among the batch's texts, and each text's own image among its images.
    image_emb, text_emb: (B, D), compared by cosine similarity times exp(logit_scale) (at most 100)."""
    image_emb, text_emb = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T  # (B images, B texts)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def random_crops(images, min_side: float, generator):
    """(B, 3, S, S) -> the same, each image cropped to a random square of side U(min_side, 1) x S at a
    random place inside it and resized back to S x S: one bilinear resampling of the whole batch."""
    if min_side >= 1:
        return images
    B = images.shape[0]
    side = min_side + (1 - min_side) * torch.rand(B, generator=generator)  # (B,) share of the image's side
    centre = (1 - side)[:, None] * (2 * torch.rand(B, 2, generator=generator) - 1)  # (B, 2) in [-1, 1] units
    theta = torch.zeros(B, 2, 3)  # output [-1, 1] -> input: scale by the side, shift to the centre
    theta[:, 0, 0] = theta[:, 1, 1] = side
    theta[:, :, 2] = centre
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def vision_pretraining_loss(vit, images, patch_labels=None, texts_bow=None, pixel_decoder=None, pixel_loss=0.0,
                            objective="words", text_tower=None, logit_scale=None):
    """Per-patch attribute cross-entropy, or (public data) from the bag of words of the image's
    texts: "words" predicts it from the mean-pooled patches, "contrastive" matches the pooled patches
    to text_tower(bag of words) against the batch's other images, "both" adds the two; plus
    pixel_loss x the patch-pixel reconstruction error."""
    feats = vit(images)  # (B, n_vision, vit_dim)
    if patch_labels is not None:
        loss = sum(F.cross_entropy(head(feats).flatten(0, 1), patch_labels[..., a].flatten())
                   for a, head in enumerate(vit.patch_heads))
    else:
        loss = 0.0
        if objective in ("words", "both"):
            # the image's words as a distribution over the vocabulary: cross-entropy against it (a
            # per-word sigmoid drowned in the thousands of absent words and learned only the word prior)
            log_probs = F.log_softmax(vit.patch_heads[0](feats.mean(dim=1)).float(), dim=-1)  # (B, vocab)
            loss = -(texts_bow * log_probs).sum(-1).div(texts_bow.sum(-1).clamp_min(1)).mean()
        if objective in ("contrastive", "both"):
            words = texts_bow / texts_bow.sum(-1, keepdim=True).clamp_min(1)  # each word of the image's texts alike
            loss = loss + contrastive_loss(feats.mean(dim=1), text_tower(words), logit_scale)
    if pixel_loss > 0:
        target = patch_pixels(images, vit.cfg.patch_size)
        loss = loss + pixel_loss * F.mse_loss(pixel_decoder(feats).float(), target)
    return loss


def pretrain_vision(model, images, patch_labels, texts_bow, cfg, device, seed):
    """Phase 1: train the ViT (and its pretraining heads) alone; returns the last loss."""
    vit_dim, patch_dim = model.cfg.vit_dim, 3 * model.cfg.patch_size ** 2
    # the reconstruction decoder and the text tower exist only during this phase (MAE also throws
    # its decoder away)
    decoder = torch.nn.Linear(vit_dim, patch_dim).to(device) if cfg.pixel_loss > 0 else None
    contrastive = patch_labels is None and cfg.vision_objective in ("contrastive", "both")
    text_tower = torch.nn.Linear(texts_bow.shape[1], vit_dim, bias=False).to(device) if contrastive else None
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device)) if contrastive else None
    params = list(model.vit.parameters()) + [p for m in (decoder, text_tower) if m is not None for p in m.parameters()]
    params += [logit_scale] if contrastive else []
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)
    order = BatchOrder(len(images), cfg.batch_size, seed + 1)
    generator = torch.Generator().manual_seed(seed + 2)
    bar = tqdm(range(cfg.vision_steps), desc="vision pretraining", dynamic_ncols=True,
               disable=not distributed.is_main())
    loss = torch.tensor(0.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.vision_steps, cfg.vision_lr, cfg.warmup_steps)
        idx = order.indices(step)
        flip = torch.rand(len(idx), generator=generator) < 0.5  # drawn for the global batch
        rows = distributed.my_rows(len(idx))  # this process's rows of the global batch
        idx, flip = idx[rows], flip[rows].to(device)
        labels = patch_labels[idx].to(device) if patch_labels is not None else None
        bow = texts_bow[idx].to(device) if patch_labels is None else None
        x = model.to_float(images[idx].to(device))
        if patch_labels is None:  # public photos: a mirrored photo has the same words (per-patch labels would not)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            if cfg.vision_crop < 1:  # and, mostly, so has a crop of it
                x = random_crops(x, cfg.vision_crop, generator)
        with autocast(device, cfg.precision):
            loss = vision_pretraining_loss(model.vit, x, labels, bow, decoder, cfg.pixel_loss, cfg.vision_objective,
                                           text_tower, logit_scale)
        check_finite(loss, step, "vision pretraining")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(params)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


VIT_SHAPE = ("image_size", "patch_size", "vit_dim", "vit_depth", "vit_heads", "mlp_ratio", "conv_stem")


@torch.no_grad()
def copy_vision(model, source, name):
    """The ViT of `source` (another run's model, e.g. one pretrained on more photos) copied into
    `model`, all but its pretraining heads (they name the other run's vocabulary)."""
    differ = [f"{k} {getattr(source.cfg, k)} vs {getattr(model.cfg, k)}" for k in VIT_SHAPE
              if getattr(source.cfg, k) != getattr(model.cfg, k)]
    if differ:
        raise DispError(f"{name}: its ViT does not fit this model ({', '.join(differ)}); take the ViT from a run "
                        f"of the same preset")
    weights = {k: v for k, v in source.vit.state_dict().items() if not k.startswith("patch_heads.")}
    missing = model.vit.load_state_dict(weights, strict=False).missing_keys
    assert all(k.startswith("patch_heads.") for k in missing), missing  # VIT_SHAPE equal -> the same parameters


def images_bag_of_words(dataset, tokenizer):
    """(N_images, vocab) 0/1: the words of each image's texts, phase 1's target on public data."""
    bow = torch.zeros(len(dataset.images), len(tokenizer))
    for s in dataset.samples:
        bow[s["image"], tokenizer.encode(s["response"])] = 1.0
    return bow


def vision_phase(model, train, tokenizer, cfg, device, source=None) -> str:
    """Phase 1: the ViT copied from `source` (the model of cfg.vision_from) if given, then pretrained
    cfg.vision_steps on train's images (per-patch labels of the scenes, else the images' words);
    returns a line saying what was done."""
    done = []
    if source is not None:
        copy_vision(model, source, cfg.vision_from)
        done.append(f"vision encoder copied from {cfg.vision_from}")
    if cfg.vision_steps:
        bow = images_bag_of_words(train, tokenizer) if train.patch_labels is None else None
        loss = pretrain_vision(model, train.images, train.patch_labels, bow, cfg, device, cfg.seed)
        done.append(f"vision pretraining done: loss {loss:.4f}")
    return "; ".join(done) or "vision encoder left as initialised (--vision-steps 0)"


@torch.no_grad()
def frozen_vit_features(model, images, device, batch_size=256):
    """(N_images, n_vision, vit_dim): a frozen ViT gives the same features every epoch, so they are
    computed once per stage instead of once per step."""
    model.eval()
    return torch.cat([model.vit(model.to_float(images[i:i + batch_size].to(device)))
                      for i in range(0, len(images), batch_size)])


class Finetuner:
    """Masked-diffusion SFT of `params` (the rest frozen): the model, data, optimizer and random
    state of one stage; `step(s)` makes update s. bench/mfu.py times exactly this step.

    resume: a checkpoint dict with step / optimizer / rng to continue from.
    """

    def __init__(self, model, images, data: EncodedData, *, params, steps, cfg, device, vision_mask_max=0.0,
                 seed=0, resume=None, vit_lr=0.0, image_free=0.0):
        self.model, self.images, self.data, self.cfg, self.device = model, images, data, cfg, device
        self.steps, self.vision_mask_max, self.image_free = steps, vision_mask_max, image_free
        groups = [{"params": list(params), "peak": cfg.lr}]
        if vit_lr > 0:  # the ViT trains too, at its own (lower) peak rate; its pretraining heads do not
            groups.append({"params": [p for n, p in model.vit.named_parameters() if not n.startswith("patch_heads.")],
                           "peak": vit_lr})
        self.params = [p for g in groups for p in g["params"]]
        trained = {id(p) for p in self.params}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(seed)
        self.start = 0
        if resume is not None:
            self.optimizer.load_state_dict(resume["optimizer"])
            self.generator.set_state(resume["rng"])
            self.start = resume["step"]
        vit_frozen = not any(p.requires_grad for p in model.vit.parameters())
        self.vit_features = frozen_vit_features(model, images, device) if vit_frozen else None
        # at most 5% of the run warms up, so a short run (the refinement: ~100 steps) mostly anneals
        self.warmup = max(1, min(cfg.warmup_steps, steps // 20))
        self.order = BatchOrder(len(data), cfg.batch_size, seed)

    def step(self, step: int, stage: str = "fine-tuning"):
        """One update on batch `step` of the seeded order; returns the loss."""
        model, data, cfg, device = self.model, self.data, self.cfg, self.device
        model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.steps, group["peak"], self.warmup)
        idx = self.order.indices(step)  # the global batch and all its random draws: the same on every process
        vision_mask = None
        if self.vision_mask_max > 0 or self.image_free > 0:
            vision_mask = random_vision_mask(len(idx), model.cfg.n_vision, self.vision_mask_max, self.generator, device,
                                             self.image_free)
        noise = forward_noise(data.response_ids[idx], model.mask_id, self.generator)
        rows = distributed.my_rows(len(idx))  # all rows in one process
        idx, image_idx = idx[rows], data.image_index[idx[rows]]
        noise = [t[rows].to(device) for t in noise]
        with autocast(device, cfg.precision):  # the run's precision: fp32, or bf16 autocast
            if self.vit_features is not None:
                vision_tokens = model.projector(self.vit_features[image_idx.to(device)])
            else:
                vision_tokens = model.encode_images(self.images[image_idx].to(device))
            loss = sft_loss(model, vision_tokens, data.prompt_ids[idx].to(device), data.response_ids[idx].to(device),
                            vision_mask=vision_mask[rows] if vision_mask is not None else None, noise=noise)
        check_finite(loss, step, stage)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(self.params)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return loss


def finetune(model, images, data: EncodedData, *, params, steps, cfg, device, stage,
             save_fn=None, eval_fn=None, resume=None, vision_mask_max=0.0, seed=0, vit_lr=0.0, image_free=0.0):
    """Run a Finetuner to `steps`; returns (optimizer, rng state) for the final checkpoint.

    save_fn(step, optimizer, rng_state) writes a resume checkpoint; eval_fn(step) validates.
    """
    trainer = Finetuner(model, images, data, params=params, steps=steps, cfg=cfg, device=device,
                        vision_mask_max=vision_mask_max, seed=seed, resume=resume, vit_lr=vit_lr, image_free=image_free)
    bar = tqdm(range(trainer.start, steps), desc=stage, initial=trainer.start, total=steps, dynamic_ncols=True,
               disable=not distributed.is_main())
    for step in bar:
        loss = trainer.step(step, stage)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if not distributed.is_main():
            continue
        if eval_fn is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < steps:
            model.eval()
            eval_fn(done)
        if save_fn is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < steps:
            save_fn(done, trainer.optimizer, trainer.generator.get_state())
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return trainer.optimizer, trainer.generator.get_state()
