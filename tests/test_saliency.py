"""Saliency scores and selection rules against plain references written here."""

import math

import pytest
import torch
import torch.nn.functional as F

from disp.support.errors import DispError
from disp.saliency import (attention_scores, fit_thresholds, saliency_fisher, saliency_kl, select_adaptive,
                           select_top_ratio, two_groups, valley_split)
from tests.conftest import MASK, inputs, small_model


def test_kl_saliency_matches_a_per_token_loop():
    """s_i = sum over positions of KL(P || P_i), P with every vision token, P_i with token i masked. The
    model's outputs are sharpened (lm_head x 40) so that KL(P || P_i) and the reverse KL(P_i || P)
    differ: on a random model's near-uniform outputs they agree to within any tolerance."""
    model = small_model(6)
    with torch.no_grad():
        model.lm_head.weight *= 40
    images, prompts = inputs(batch=2)
    vision_tokens = model.encode_images(images)
    ours = saliency_kl(model, vision_tokens, prompts, chunk=7)  # a chunk size that splits samples
    response = torch.full((2, 6), MASK)
    forward, reverse = torch.zeros(2, 36), torch.zeros(2, 36)
    for b in range(2):
        p = F.softmax(model(vision_tokens[b:b + 1], prompts[b:b + 1], response[b:b + 1]).double(), -1)
        for i in range(36):
            mask = torch.zeros(1, 36, dtype=torch.bool)
            mask[0, i] = True
            q = F.softmax(model(vision_tokens[b:b + 1], prompts[b:b + 1], response[b:b + 1], mask).double(), -1)
            forward[b, i] = (p * (p.log() - q.log())).sum()
            reverse[b, i] = (q * (q.log() - p.log())).sum()
    assert torch.allclose(ours, forward, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(forward, reverse, rtol=0.05)  # the case tells the two directions apart


def test_paint_patches_fills_each_masked_patch_with_its_images_mean_colour():
    from disp.model import paint_patches
    images = torch.rand(2, 3, 48, 48)
    mask = torch.zeros(2, 36, dtype=torch.bool)
    mask[0, [0, 7]] = True  # row 0 col 0, row 1 col 1 of the 6 x 6 grid of 8-px patches
    mask[1, 35] = True
    got = paint_patches(images, mask, 8)
    expected = images.clone()
    for b, i in mask.nonzero().tolist():
        r, c = divmod(i, 6)
        expected[b, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = images[b].mean(dim=(1, 2))[:, None, None]
    torch.testing.assert_close(got, expected)
    assert torch.equal(paint_patches(images, torch.zeros_like(mask), 8), images)


def test_painted_kl_saliency_matches_a_loop_that_paints_and_masks_one_patch_at_a_time():
    """With the images, copy i also paints patch i flat before the ViT: every vision token changes (the
    ViT's attention mixes them), not only token i."""
    from disp.model import paint_patches
    model = small_model(6)
    images, prompts = inputs(batch=2)
    vision_tokens = model.encode_images(images)
    ours = saliency_kl(model, vision_tokens, prompts, images=images, chunk=7)
    response = torch.full((2, 6), MASK)
    expected = torch.zeros(2, 36)
    for b in range(2):
        p = F.softmax(model(vision_tokens[b:b + 1], prompts[b:b + 1], response[b:b + 1]).double(), -1)
        for i in range(36):
            mask = torch.zeros(1, 36, dtype=torch.bool)
            mask[0, i] = True
            painted = model.encode_images(paint_patches(images[b:b + 1].float() / 255, mask, 8))
            assert not torch.allclose(painted[0, i - 1], vision_tokens[b, i - 1])  # a neighbour moved too
            q = F.softmax(model(painted, prompts[b:b + 1], response[b:b + 1], mask).double(), -1)
            expected[b, i] = (p * (p.log() - q.log())).sum()
    assert torch.allclose(ours, expected, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(ours, saliency_kl(model, vision_tokens, prompts), rtol=0.05)


def test_fisher_estimator_converges_to_the_exact_quadratic_form():
    model = small_model(4)
    images, prompts = inputs(batch=1)
    vision_tokens = model.encode_images(images).detach()
    response = torch.full((1, 4), MASK)
    top = model(vision_tokens, prompts, response).topk(5, dim=-1).indices

    def top_logits(v):
        return model(v, prompts, response).gather(-1, top)  # (1, L, K)

    J = torch.autograd.functional.jacobian(top_logits, vision_tokens)  # (1, L, K, 1, N, D)
    J = J[0, :, :, 0]  # (L, K, N, D)
    p = F.softmax(top_logits(vision_tokens)[0], -1)  # (L, K)
    delta = model.tok_embed.weight[MASK] - vision_tokens[0]  # (N, D)
    Jd = torch.einsum("lknd,nd->lkn", J, delta)  # (L, K, N): change of the top logits when token n is masked
    fisher = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (L, K, K)
    exact = 0.5 * torch.einsum("lkn,lkj,ljn->n", Jd, fisher, Jd)
    estimate = saliency_fisher(model, vision_tokens, prompts, probes=3000,
                               generator=torch.Generator().manual_seed(0))[0]
    assert torch.allclose(estimate, exact, rtol=0.15, atol=1e-3 * exact.max().item())


def test_top_ratio_selects_exactly_floor_ratio_n_tokens():
    scores = torch.rand(5, 36)
    for ratio, k in [(0.0, 0), (0.05, 1), (0.3, 10), (1.0, 36)]:
        mask = select_top_ratio(scores, ratio)
        assert (mask.sum(1) == k).all()
        if k:  # the chosen ones are the top-k
            assert (scores[mask].view(5, k).min(1).values >= scores.masked_fill(mask, -1).max(1).values).all()
    with pytest.raises(DispError, match="must be in"):
        select_top_ratio(scores, 1.5)


def test_attention_pruning_prunes_exactly_k_tokens_and_scores_are_a_distribution_share():
    model = small_model(6)
    images, prompts = inputs(batch=3)
    scores = attention_scores(model, model.encode_images(images), prompts)
    assert scores.shape == (3, 36) and (scores >= 0).all() and (scores.sum(1) <= 1.0 + 1e-5).all()
    assert (select_top_ratio(scores, 0.1).sum(1) == 3).all()


def test_adaptive_rule_splits_top_scores_into_two_groups_per_prompt_type():
    torch.manual_seed(0)
    clean = torch.rand(40, 36) * 0.3  # top scores between ~0.25 and 0.3
    poisoned = clean[:10].clone()
    poisoned[:, 0] = torch.linspace(20.0, 30.0, 10)  # a trigger token, orders of magnitude above
    captions = torch.rand(20, 36) * 50  # a prompt type with larger scores and no second group
    scores = torch.cat([clean, poisoned, captions])
    tasks = ["color"] * 50 + ["caption"] * 20
    thresholds = fit_thresholds(scores, tasks)
    assert 0.3 < thresholds["color"] < 20 and thresholds["caption"] == float("inf")
    mask = select_adaptive(scores, tasks, thresholds, max_tokens=2)
    assert mask[:40].sum() == 0 and mask[50:].sum() == 0
    assert mask[40:50].sum(1).tolist() == [1] * 10 and mask[40:50, 0].all()
    # at most max_tokens per sample, the highest-scoring ones
    many = scores.clone()
    many[40, 1:4] = torch.tensor([21.0, 22.0, 23.0])
    capped = select_adaptive(many, tasks, thresholds, max_tokens=2)
    assert capped[40].nonzero().flatten().tolist() == [2, 3]
    assert select_adaptive(many, tasks, thresholds)[40].sum() == 4  # no cap: every outlier
    # one group only, or too few samples, or a "high group" holding most samples -> nothing is masked
    assert fit_thresholds(clean, ["color"] * 40) == {"color": float("inf")}
    assert fit_thresholds(scores[1:50], ["color"] * 49) == {"color": float("inf")}  # 9 poisoned of 49: too few
    majority = torch.cat([clean[:20], poisoned.repeat(3, 1)])  # 30 of 50 in the high group
    assert fit_thresholds(majority, ["color"] * 50) == {"color": float("inf")}
    with pytest.raises(DispError, match="max valley"):
        fit_thresholds(clean, ["color"] * 40, max_valley=1.5)


def test_adaptive_rule_finds_a_trigger_group_whose_tail_meets_the_clean_tail():
    """Photos: clean top scores spread over two orders of magnitude and their tail reaches the trigger
    group's, so no empty gap separates them (the earlier rule found none); the two groups still show."""
    g = torch.Generator().manual_seed(0)
    clean_top = torch.exp(torch.randn(4000, generator=g) * 1.2 - 1.0)  # median 0.37 nats, 99th pct ~6
    trigger_top = torch.exp(torch.randn(1000, generator=g) * 0.3 + 2.7)  # median 15 nats, 1st pct ~7
    tops = torch.cat([clean_top, trigger_top])
    scores = torch.cat([tops[:, None], torch.full((5000, 63), 1e-3)], dim=1)  # token 0 is each sample's top
    sorted_log = tops.log().sort().values
    assert (sorted_log[1:] - sorted_log[:-1]).max() < math.log(4)  # no 4x gap anywhere
    thresholds = fit_thresholds(scores, ["caption"] * 5000)
    masked = select_adaptive(scores, ["caption"] * 5000, thresholds, 2).any(1)
    assert masked[4000:].float().mean() > 0.97 and masked[:4000].float().mean() < 0.02
    # a single skewed group (the same clean scores with a heavier upper tail) is not split
    skewed = torch.cat([clean_top, torch.exp(torch.rand(1000, generator=g) * 4 - 1.0)])
    assert fit_thresholds(torch.cat([skewed[:, None], torch.full((5000, 63), 1e-3)], 1), ["caption"] * 5000) == \
        {"caption": float("inf")}


def test_two_groups_recovers_a_known_mixture():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(3000, generator=g) * 0.8 - 1.0, torch.randn(1000, generator=g) * 0.3 + 3.0])
    weights, means, stds = two_groups(x)
    assert torch.allclose(weights, torch.tensor([0.75, 0.25], dtype=torch.double), atol=0.02)
    assert torch.allclose(means, torch.tensor([-1.0, 3.0], dtype=torch.double), atol=0.06)
    assert torch.allclose(stds, torch.tensor([0.8, 0.3], dtype=torch.double), atol=0.05)
    valley, threshold = valley_split(x)
    assert valley < 0.01 and 0.5 < threshold < 2.5


def test_the_valley_is_judged_against_the_smaller_groups_density():
    """A large clean group and a small, broad upper group that overlaps it: the fitted density between
    them falls far below the clean group's peak, but not below the upper group's own density, so it
    is one skewed spread, not two groups. Measured against the larger peak it would split."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4500, generator=g) * 0.5, torch.randn(500, generator=g) * 0.8 + 2.2]).double()
    weights, means, stds = two_groups(x)
    grid = torch.linspace(means[0].item(), means[1].item(), 401, dtype=torch.double)
    density = (weights / stds * torch.exp(-0.5 * ((grid[:, None] - means) / stds) ** 2)).sum(1)
    assert density.min() / density[0] < 0.25 < density.min() / density[-1]  # the two readings disagree here
    valley, _ = valley_split(x)
    assert valley == pytest.approx((density.min() / density[-1]).item())
    assert fit_thresholds(torch.cat([x.exp()[:, None], torch.zeros(5000, 3)], 1).float(), ["caption"] * 5000) == \
        {"caption": float("inf")}
