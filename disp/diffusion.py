"""Masked diffusion: the LLaDA forward process, its SFT loss, and the sampler (Nie et al. 2025, LLaDA).

Forward process: per sequence t ~ U(0, 1), p = (1 - eps) t + eps; every *response* token becomes
[MASK] independently with probability p. Image and prompt positions are never masked.

Loss: cross-entropy at the masked positions, each weighted 1/p (that makes it an upper bound on
the negative log-likelihood, LLaDA eq. 3), summed and divided by the response length. Responses
are padded with [EOS] and those pads are in the loss: the model learns where an answer stops.
[UNK] targets (words below the vocabulary's count cut-off) are left out of it.

Sampler: LLaDA's `generate` semantics and names (gen_length, steps, block_length, temperature,
remasking) plus Fast-dLLM's confidence `threshold`.
"""

import torch
import torch.nn.functional as F

EPS = 1e-3


def forward_noise(response_ids, mask_id: int, generator=None, eps: float = EPS):
    """-> (noisy response ids, bool mask of masked positions, p as (B, 1))."""
    B, L = response_ids.shape
    t = torch.rand(B, 1, generator=generator, device=response_ids.device)
    p = (1 - eps) * t + eps
    masked = torch.rand(B, L, generator=generator, device=response_ids.device) < p
    return torch.where(masked, mask_id, response_ids), masked, p


def sft_loss(model, vision_tokens, prompt_ids, response_ids, generator=None, vision_mask=None, noise=None):
    """LLaDA SFT loss on a batch; only response tokens are noised.

    noise: optional forward_noise(response_ids) output drawn by the caller (data-parallel training
    draws it for the global batch, then each rank takes its rows).
    """
    noisy, masked, p = noise if noise is not None else forward_noise(response_ids, model.mask_id, generator)
    logits = model(vision_tokens, prompt_ids, noisy, vision_mask)  # (B, L, V)
    ce = F.cross_entropy(logits.transpose(1, 2).float(), response_ids, reduction="none")  # (B, L)
    if model.unk_id is not None:  # a word outside the vocabulary is not something to learn to say
        masked = masked & (response_ids != model.unk_id)
    per_sample = (ce * masked / p).sum(dim=1) / response_ids.shape[1]
    return per_sample.mean()


def add_gumbel_noise(logits, temperature: float, generator=None):
    """Gumbel-max sampling as in LLaDA, whose argmax is that of exp(logits) / (-log u)^T, computed
    as its logarithm, logits - T log(-log u): the same argmax without an exp and a power per
    vocabulary entry (and no overflow). float64 because low-precision Gumbel noise degrades the
    quality of the samples (LLaDA's note).
    """
    if temperature == 0:
        return logits
    u = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device=logits.device)
    return logits.double() - temperature * torch.log(-torch.log(u))


def num_transfer_tokens(block_mask, steps: int):
    """(B, steps) tokens to commit at each step: the masked count split evenly, remainder first."""
    count = block_mask.sum(dim=1, keepdim=True)  # (B, 1)
    base, remainder = count // steps, count % steps
    schedule = base.expand(-1, steps).clone()
    schedule += (torch.arange(steps, device=count.device)[None, :] < remainder).long()
    return schedule


@torch.no_grad()
def generate(model, images, prompt_ids, *, gen_length, steps, block_length, temperature=0.0,
             remasking="low_confidence", threshold=None, vision_mask=None, vision_tokens=None,
             banned=None, guidance=0.0, generator=None, return_steps=False, return_trace=False):
    """Sample responses, (B, gen_length) ids.

    images: (B, 3, H, W); encoded once here, never inside the denoising loop (the image does not
    change between steps, so neither do its vision tokens). Pass `vision_tokens` to reuse them.
    The image+prompt prefix does not attend to the response (model.py), so its keys and values are
    computed once too and each step runs only the response rows.
    remasking: "low_confidence" commits the most confident predictions, "random" random ones.
    threshold: Fast-dLLM parallel decoding: commit every masked position of the current block
    whose confidence exceeds it (at least the most confident one); blocks may finish early.
    banned: optional (V,) bool, words the sampler may never write (their logits are -inf; purify.py's
    suppression).
    guidance: classifier-free guidance on the image (DDCap): the log-probabilities with the image plus
    `guidance` times their difference from those with every image position [MASK]. 0: none; each
    step then costs two response passes.
    return_steps: also return the number of denoising steps made (one response pass each; two with guidance).
    return_trace: also return (step, confidence), each (B, gen_length): the model call (0-based) at
    which each position was committed and the probability the model gave the committed token then.
    """
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}")
    if gen_length % block_length != 0:
        raise ValueError(f"gen_length {gen_length} must be a multiple of block_length {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks != 0:
        raise ValueError(f"steps {steps} must be a multiple of the number of blocks {num_blocks}")
    steps_per_block = steps // num_blocks

    if vision_tokens is None:
        vision_tokens = model.encode_images(images)
    cache = model.prefix(vision_tokens, prompt_ids, vision_mask)
    if guidance:
        no_image = torch.ones(vision_tokens.shape[:2], dtype=torch.bool, device=vision_tokens.device)
        blind_cache = model.prefix(vision_tokens, prompt_ids, no_image)
    B = prompt_ids.shape[0]
    x = torch.full((B, gen_length), model.mask_id, dtype=torch.long, device=prompt_ids.device)
    in_block = torch.arange(block_length, device=x.device)
    calls = 0
    committed_at = torch.full(x.shape, -1, dtype=torch.long, device=x.device)
    confidence_at = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for block in range(num_blocks):
        # Only the current block's positions can be committed, so only their logits are computed
        # (the vocabulary projection and softmax of the other positions would be thrown away).
        cols = slice(block * block_length, (block + 1) * block_length)
        schedule = num_transfer_tokens(x[:, cols] == model.mask_id, steps_per_block)
        step = 0
        while True:
            mask_index = x[:, cols] == model.mask_id  # (B, block_length)
            if threshold is None and step == steps_per_block:
                break
            if threshold is not None and not mask_index.any():
                break
            logits = model.decode(cache, x, rows=cols)  # (B, block_length, V)
            if guidance:
                with_image = F.log_softmax(logits.double(), -1)
                blind = F.log_softmax(model.decode(blind_cache, x, rows=cols).double(), -1)
                logits = with_image + guidance * (with_image - blind)
            if banned is not None:
                logits = logits.masked_fill(banned, float("-inf"))
            calls += 1
            x0 = add_gumbel_noise(logits, temperature, generator).argmax(dim=-1)  # (B, block_length)
            if remasking == "low_confidence":
                probs = F.softmax(logits.double(), dim=-1)
                confidence = probs.gather(-1, x0[..., None]).squeeze(-1)
            else:
                confidence = torch.rand(x0.shape, dtype=torch.float64, generator=generator, device=x0.device)
            confidence = torch.where(mask_index, confidence, -torch.inf)

            # Vectorised top-k with a different k per row: rank every position by confidence.
            order = confidence.argsort(dim=1, descending=True, stable=True)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, in_block.expand(B, -1))
            if threshold is None:
                commit = rank < schedule[:, step:step + 1]
            else:
                commit = ((confidence > threshold) | (rank == 0)) & (confidence > -torch.inf)
            x[:, cols] = torch.where(commit, x0, x[:, cols])
            committed_at[:, cols] = torch.where(commit, calls - 1, committed_at[:, cols])
            confidence_at[:, cols] = torch.where(commit, confidence, confidence_at[:, cols])
            step += 1
    extra = ((calls,) if return_steps else ()) + (((committed_at, confidence_at),) if return_trace else ())
    return (x, *extra) if extra else x
