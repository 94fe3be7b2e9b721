"""Defences at inference only: the backdoored model, some of its vision tokens masked at test time,
no refinement. They show what masking alone does before DiSP trains anything.

    defences    saliency masking (kl, fisher) with a fixed ratio and with purify.py's adaptive rule,
                random masking, and CleanSight-style attention pruning (arXiv 2603.12989: the tokens
                that draw the most attention from the response)
    ratio_sweep ASR and clean quality against the fraction of vision tokens masked, kl vs random

The adaptive rule's thresholds are fitted, as purify.py fits them, on the poisoned training set
(purify.py's own scores where the method matches, else the first 1,000 training samples, enough
for the 50 per prompt type the rule needs).
"""

from disp.backdoor import asr_eligible
from disp.saliency import SALIENCY_METHODS, fit_thresholds, select_adaptive, select_top_ratio

# the methods a fixed-ratio selection is tried with (attention: CleanSight pruning)
METHODS = (*SALIENCY_METHODS, "attention")


def defences(held_out, backdoored, settings, poisoned_train, purify_scores, mask_ratio: float, ratios: list,
             samples: int):
    """-> ({row label: backdoor metrics}, {method: sweep curve}) on the first `samples` test samples.

    held_out: a disp.evaluation.HeldOutSet; settings: purify.py's PurifyConfig; purify_scores: its
    saliency scores of poisoned_train, or None."""
    test, triggered = held_out.test, held_out.triggered
    subset = list(range(len(test.samples)))[:samples]
    eligible = [i for i in asr_eligible(test.samples, held_out.backdoor) if i < len(subset)]
    tasks = [s["task"] for s in test.samples]
    rows, sweep = {}, {}
    for method in METHODS:
        s_clean = held_out.scores(backdoored, test, subset, method, desc=f"scores {method}")
        s_trig = held_out.scores(backdoored, triggered, eligible, method)
        rules = {"ratio": lambda s: select_top_ratio(s, mask_ratio)}
        if method in ("kl", "fisher"):
            thresholds = training_thresholds(held_out, backdoored, method, settings, poisoned_train, purify_scores)
            rules["adaptive"] = lambda s: select_adaptive(s, tasks, thresholds, settings.max_masked)
        for rule, select in rules.items():
            label = f"test-time {method} masking ({rule})" if method != "attention" else "test-time CleanSight pruning (ratio)"
            rows[label] = held_out.measure(backdoored, len(subset), clean_masks=select(s_clean),
                                           triggered_masks=select(s_trig))[0]
        if method in ("kl", "random"):  # the sweep reuses these scores: only the selection changes
            sweep[method] = ratio_sweep(held_out, backdoored, s_clean, s_trig, ratios, len(subset))
    return rows, sweep


def training_thresholds(held_out, backdoored, method, settings, poisoned_train, purify_scores) -> dict:
    """The adaptive rule's per-prompt-type thresholds, fitted on the poisoned training set's scores."""
    if method == settings.saliency and purify_scores is not None:
        fit_idx, train_scores = list(range(len(purify_scores))), purify_scores
    else:
        fit_idx = list(range(min(len(poisoned_train.samples), 1000)))
        train_scores = held_out.scores(backdoored, poisoned_train, fit_idx, method)
    return fit_thresholds(train_scores[fit_idx], [poisoned_train.samples[i]["task"] for i in fit_idx],
                          settings.max_valley)


def ratio_sweep(held_out, backdoored, s_clean, s_trig, ratios: list, limit: int) -> dict:
    """{"ratio", "asr", and "vqa_accuracy" / "cider" where the data has questions / captions: one value
    per ratio}: the top `ratio` of each sample's tokens by the given scores masked."""
    curve = {"ratio": list(ratios), "asr": []}
    for r in ratios:
        m = held_out.measure(backdoored, limit, clean_masks=select_top_ratio(s_clean, r),
                             triggered_masks=select_top_ratio(s_trig, r))[0]
        for k in ("asr", "vqa_accuracy", "cider"):
            if k in m:
                curve.setdefault(k, []).append(m[k])
    return curve
