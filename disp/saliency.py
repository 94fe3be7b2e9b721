"""Vision-token saliency and the rules that pick which image positions to mask (DiSP, Wan et al. 2026).

Saliency of vision token i is measured at the first denoising step, when the whole response is
[MASK]: P are the model's predicted distributions at the response positions with every vision
token, P_i the same with token i replaced by the [MASK] embedding.

    saliency_kl      exact occlusion score  s_i = sum over response positions of KL(P || P_i);
                     one extra forward pass per vision token, all of them batched. Given the
                     images, P_i also has patch i painted flat before the ViT (DiSP's masking as
                     purify.py does it by default, disp.model.paint_patches)
    saliency_fisher  the release's estimator: s_i ~ 1/2 delta_i^T J^T F J delta_i with F the Fisher
                     of the top-K softmax, estimated by Hutchinson probes q ~ N(0, F):
                     one forward + m backward passes, whatever the number of vision tokens (a
                     gradient at the text model's input: it estimates masking the token alone)
    saliency_random  the control
    attention_scores the CleanSight-style baseline: attention paid to each vision token

Selection rules:
    select_top_ratio  the paper's rule: mask the floor(ratio * n_vision) most salient tokens
    fit_thresholds / select_adaptive  ours: mask only tokens whose score falls in a second, higher
                     group of their prompt type's top scores, judged against all samples of that
                     prompt type in the data being purified
"""

import math

import torch
import torch.nn.functional as F

from disp.support.errors import DispError, check_ratio

SALIENCY_METHODS = ("kl", "fisher", "random")
RULES = ("adaptive", "ratio")
MASKINGS = ("patch", "token")  # what masking an image position covers (PurifyConfig.masking)


def first_step_logits(model, vision_tokens, prompt_ids, vision_mask=None):
    """Logits with the response fully masked, (B, L, V)."""
    B = prompt_ids.shape[0]
    response = torch.full((B, model.cfg.response_len), model.mask_id, dtype=torch.long, device=prompt_ids.device)
    return model(vision_tokens, prompt_ids, response, vision_mask)


@torch.no_grad()
def saliency_kl(model, vision_tokens, prompt_ids, images=None, chunk: int = 128):
    """(B, n_vision) exact occlusion KL. Each sample is copied n_vision times, copy i with token i masked.

    images: optional (B, 3, H, W), the samples' images: copy i then also has patch i painted flat
    before the ViT, which runs once per copy. The copies run in chunks of `chunk` sequences, small
    enough for their activations to stay in cache (bench/saliency.py measures the cost).
    """
    B, N, _ = vision_tokens.shape
    log_p = F.log_softmax(first_step_logits(model, vision_tokens, prompt_ids).float(), dim=-1)  # (B, L, V)
    eye = torch.eye(N, dtype=torch.bool, device=vision_tokens.device)
    # flatten (sample, masked token) pairs and run them in chunks of `chunk` sequences
    pairs = torch.arange(B * N, device=vision_tokens.device)
    scores = torch.empty(B * N, device=vision_tokens.device)
    for start in range(0, B * N, chunk):
        idx = pairs[start:start + chunk]
        b, i = idx // N, idx % N
        copies = vision_tokens[b] if images is None else model.encode_images(images[b], paint=eye[i])
        log_q = F.log_softmax(first_step_logits(model, copies, prompt_ids[b], eye[i]).float(), dim=-1)
        scores[start:start + chunk] = (log_p[b].exp() * (log_p[b] - log_q)).sum(dim=(-1, -2))
    return scores.view(B, N)


def saliency_fisher(model, vision_tokens, prompt_ids, top_k: int = 5, probes: int = 6, generator=None):
    """(B, n_vision) Fisher-Jacobian Hutchinson estimate of the occlusion KL (the release's scorer)."""
    vision_tokens = vision_tokens.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = first_step_logits(model, vision_tokens, prompt_ids).float()  # (B, L, V)
        top = logits.topk(top_k, dim=-1).indices
        z = logits.gather(-1, top)  # (B, L, K): restrict each position to its top-K logits
        u = F.softmax(z.detach(), dim=-1).sqrt()
        delta = model.tok_embed.weight[model.mask_id].detach() - vision_tokens.detach()  # (B, N, D)
        total = torch.zeros(vision_tokens.shape[:2], device=vision_tokens.device)
        for probe in range(probes):
            y = torch.randn(z.shape, generator=generator, device=z.device)
            q = u * (y - (y * u).sum(-1, keepdim=True) * u)  # q ~ N(0, diag(p) - p p^T)
            (g,) = torch.autograd.grad((q * z).sum(), vision_tokens, retain_graph=probe < probes - 1)
            total += (g * delta).sum(-1) ** 2  # <J^T q, delta_i>^2
    return 0.5 * total / probes


def saliency_random(vision_tokens, generator=None):
    return torch.rand(vision_tokens.shape[:2], generator=generator).to(vision_tokens.device)


def compute_saliency(method: str, model, vision_tokens, prompt_ids, generator=None, images=None):
    """images: given, kl also paints each occluded patch (saliency_kl); fisher and random ignore them."""
    if method == "kl":
        return saliency_kl(model, vision_tokens, prompt_ids, images)
    if method == "fisher":
        return saliency_fisher(model, vision_tokens, prompt_ids, generator=generator)
    if method == "random":
        return saliency_random(vision_tokens, generator)
    raise DispError(f"unknown saliency {method!r}; choose one of: {', '.join(SALIENCY_METHODS)}")


def select_top_ratio(scores, ratio: float):
    """(B, N) bool: the floor(ratio * N) highest-scoring tokens of each sample."""
    check_ratio("mask ratio", ratio)
    B, N = scores.shape
    k = math.floor(ratio * N)
    mask = torch.zeros(B, N, dtype=torch.bool, device=scores.device)
    if k > 0:
        mask.scatter_(1, scores.topk(k, dim=1).indices, True)
    return mask


def two_groups(x, iters: int = 200):
    """A mixture of two 1-D Gaussians fitted to x (N,) by EM, started from a large low group and a
    small high one. -> (weights (2,), means (2,), stds (2,)), the low group first; stds >= 0.05."""
    x = x.double()
    weights = torch.tensor([0.8, 0.2], dtype=torch.double)
    means = torch.stack([x.quantile(0.25), x.quantile(0.95)])
    stds = (x.std() / 2).clamp_min(0.05).repeat(2)
    for _ in range(iters):
        log_p = -0.5 * ((x[:, None] - means) / stds) ** 2 - stds.log() + weights.log()  # (N, 2), up to a constant
        resp = torch.softmax(log_p, dim=1)
        n = resp.sum(0) + 1e-12
        weights = n / n.sum()
        means = (resp * x[:, None]).sum(0) / n
        stds = ((resp * (x[:, None] - means) ** 2).sum(0) / n).sqrt().clamp_min(0.05)
    order = means.argsort()
    return weights[order], means[order], stds[order]


def fit_thresholds(scores, tasks, max_valley: float = 0.25):
    """Per prompt type, a saliency threshold in the valley between two groups of top token scores.

    A trigger token's occlusion KL stands far above a clean token's, so the samples' top scores
    (log scale) form two groups: the clean majority and the poisoned samples. We fit a mixture of
    two Gaussians and put the threshold where the fitted density between the two means is lowest,
    if that valley is at most `max_valley` of the smaller of the densities at the two means (a real
    second group, not a tail of one skewed group) and the high group holds at most half of the
    samples; otherwise nothing of that prompt type is an outlier and its threshold is +inf
    (experiments/README.md has the measured valleys behind the default 0.25). Per prompt type, because
    caption prompts have far larger per-token KL than one-word VQA answers: one global threshold
    would mix two scales. The defender knows each sample's prompt, nothing else.
    """
    check_ratio("max valley", max_valley)
    return {task: threshold if valley <= max_valley else math.inf
            for task, (valley, threshold) in prompt_type_valleys(scores, tasks).items()}


def prompt_type_valleys(scores, tasks) -> dict:
    """{prompt type: (valley, threshold)} of its samples' top scores (valley_split on the log scale)."""
    top = scores.max(dim=1).values.clamp_min(1e-12).log()  # (N,)
    splits = {task: valley_split(top[torch.tensor([t == task for t in tasks])]) for task in sorted(set(tasks))}
    return {task: (valley, math.exp(threshold)) for task, (valley, threshold) in splits.items()}


def valley_split(x):
    """(N,) values -> (valley, threshold): the fitted two-group density at its lowest point between
    the groups' means, over the smaller of its densities at the two means, and that point. (inf, inf)
    when there are fewer than 50 values (a fit to a handful can find a spurious valley) or the high
    group holds more than half of them."""
    if len(x) < 50:  # too few samples to see two groups
        return math.inf, math.inf
    weights, means, stds = two_groups(x)
    if weights[1] > 0.5:
        return math.inf, math.inf
    grid = torch.linspace(means[0].item(), means[1].item(), 401, dtype=torch.double)
    density = (weights / stds * torch.exp(-0.5 * ((grid[:, None] - means) / stds) ** 2)).sum(1)
    lowest = int(density.argmin())
    return (density[lowest] / min(density[0], density[-1])).item(), grid[lowest].item()


def select_adaptive(scores, tasks, thresholds: dict, max_tokens: int = None):
    """(B, N) bool: tokens scoring above their prompt type's threshold (at most max_tokens per sample)."""
    limit = torch.tensor([thresholds.get(t, math.inf) for t in tasks], device=scores.device)[:, None]
    mask = scores > limit
    if max_tokens is not None:
        mask &= select_top_ratio(scores, min(1.0, max_tokens / scores.shape[1]))
    return mask


@torch.no_grad()
def attention_scores(model, vision_tokens, prompt_ids):
    """(B, n_vision) attention that the response positions pay to each vision token at the first
    denoising step (last layer, mean over heads and response positions). CleanSight-style pruning
    (arXiv 2603.12989) removes the vision tokens that draw the most attention: this baseline is why
    the model can return its attention weights at all (DiffusionVLM.decode(need_weights=True))."""
    B = prompt_ids.shape[0]
    response = torch.full((B, model.cfg.response_len), model.mask_id, dtype=torch.long, device=prompt_ids.device)
    _, weights = model(vision_tokens, prompt_ids, response, need_weights=True)  # (B, h, L, T): response rows
    from_response = weights[..., : model.cfg.n_vision]  # (B, h, L, n_vision)
    return from_response.mean(dim=(1, 2))
