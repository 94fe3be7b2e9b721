"""DiSP's self-purification, step by step (Wan et al. 2026, "Self-Purification Mitigates Backdoors in
Multimodal Diffusion Language Models"), as purify.py runs it on the defender's assets: the
compromised model and the poisoned fine-tuning set, nothing else.

    select_tokens  score every vision token of every sample by saliency at the first denoising step,
                   and let the rule pick the tokens to mask (`select`, disp.saliency)
    find_shift     our extension for spread triggers (--spectral K): the directions of the set's vision
                   tokens along which a minority of its images forms a group, to be taken out (disp.spectral)
    find_groups    our extension for spread triggers with a content target (--groups K): minority groups
                   of images whose responses hold a word that their content does not explain (disp.groups)
    regenerate     the compromised model rewrites each response with those tokens masked, their
                   patches painted flat before the ViT unless --masking token (and those
                   directions taken out; from the images low-passed by --blur S, our other
                   extension, disp.lowpass) with its own sampler, steps = gen_length; the image,
                   trigger included, is kept for refinement
    suppress       our extension for spread triggers: the words that the set's responses hold whatever
                   the prompt type (on a one-prompt set: the words the masking took away, and on captions
                   the text that goes with any photo) are banned,
                   and the regenerations that hold one are made again without them (disp.suppression);
                   a group's unexplained words likewise, in the group's regenerations
    refine         fine-tune the compromised model on the purified set, as the attack trained it

The controls call the same functions: self-distillation regenerates with no token masked, as-is
refines on the set unchanged. Under torchrun each rank scores and regenerates a share of the samples.
"""

import math
from collections import Counter
from dataclasses import replace

import torch

from disp.config import AttackConfig, PurifyConfig
from disp.data.batching import encode_dataset
from disp.data.dataset import VLDataset
from disp.evaluation import encode_images_once, generate_responses, token_scores
from disp.groups import unexplained_groups
from disp.lowpass import blurred
from disp.saliency import fit_thresholds, select_adaptive, select_top_ratio
from disp.spectral import find_directions, project_out
from disp.suppression import (MAX_LEFT, MIN_GROUP, MIN_HELD, context_free_words, masked_away_words,
                              prompt_independent_words, prompt_types, shared_sentence_words)
from disp.support import distributed
from disp.support.runtime import autocast
from disp.training import finetune, trainable_parameters


def _progress(text):  # rank 0 alone draws progress bars
    return text if distributed.is_main() else None


def select_tokens(model, tokenizer, data, settings: PurifyConfig, device):
    """-> (scores (N, n_vision), masks (N, n_vision) bool, thresholds {prompt type: score} or None)."""
    with autocast(device, settings.precision):
        scores = distributed.run_sharded(
            lambda idx: token_scores(model, tokenizer, data, idx, settings.saliency, paint=settings.masking == "patch",
                                     batch_size=settings.batch_size,
                                     device=device, seed=settings.seed,
                                     desc=_progress(f"saliency ({settings.saliency}, {settings.precision})")),
            list(range(len(data))))
    tasks = [s["task"] for s in data.samples]
    thresholds = fit_thresholds(scores, tasks, settings.max_valley) if settings.rule == "adaptive" else None
    return scores, select(scores, tasks, settings, thresholds), thresholds


def select(scores, tasks: list, settings: PurifyConfig, thresholds=None):
    """(N, n_vision) bool: the tokens settings.rule masks, given scores (N, n_vision), each sample's
    prompt type and, for the adaptive rule, the thresholds fitted on the purified set."""
    if settings.rule == "ratio":
        return select_top_ratio(scores, settings.mask_ratio)
    return select_adaptive(scores, tasks, thresholds, settings.max_masked)


def find_shift(model, tokenizer, data, settings: PurifyConfig, device):
    """-> (the directions of the set's vision tokens that split its images into two groups
    (disp.spectral.Direction, possibly none), the function that takes them out of vision tokens (None
    when there are none), and per sample whether its image is in a direction's smaller group)."""
    image_index = encode_dataset(data, tokenizer, model.cfg).image_index
    with autocast(device, settings.precision):
        tokens, row = encode_images_once(model, data, image_index, device)  # each image once
    tokens = tokens.float().cpu()
    directions = find_directions(tokens, settings.spectral, settings.max_valley, settings.seed)
    flagged = torch.zeros(len(tokens), dtype=torch.bool)
    for d in directions:
        flagged |= d.flagged
    flagged = flagged[row.cpu()].tolist()
    print(f"spectral: {len(directions)} of the top {settings.spectral} directions split the images"
          + "".join(f"; #{d.rank}: {int(d.flagged.sum())} images above (valley {d.valley:.2f})" for d in directions)
          + f"; {sum(flagged)} samples flagged" + (", their directions taken out" if directions else ""))
    if not directions:
        return directions, None, flagged
    return directions, lambda vision: project_out(vision, directions), flagged


def find_groups(model, tokenizer, data, settings: PurifyConfig, device):
    """-> (the groups of images along the top settings.groups directions of the set's pooled vision
    tokens whose responses hold a word that a probe fitted on the other images does not predict
    (disp.groups.Group, possibly none), and per sample whether its image is in one)."""
    image_index = encode_dataset(data, tokenizer, model.cfg).image_index
    with autocast(device, settings.precision):
        tokens, row = encode_images_once(model, data, image_index, device)  # each image once
    row = row.cpu()
    groups = unexplained_groups(tokens.float().cpu().mean(1), row, [s["response"] for s in data.samples],
                                [s["task"] for s in data.samples], settings.groups, settings.seed)
    in_group = torch.zeros(len(data), dtype=torch.bool)
    for g in groups:
        in_group[g.samples] = True
    print(f"groups: {len(groups)} of the top {settings.groups} directions split off images whose responses hold a "
          f"word their content does not explain" + "".join(
              f"; #{g.rank}: {int(g.images.sum())} images, " + ", ".join(
                  f"{w!r} in {held:.0%} (predicted {pred:.0%})" for w, (held, pred) in g.words.items())
              for g in groups))
    return groups, in_group.tolist()


def regenerate(model, tokenizer, data, masks, settings: PurifyConfig, device, indices=None, banned_words=(),
               vision_transform=None):
    """The compromised model's responses of data.samples[indices] (all by default), the vision tokens
    of `masks` masked (None: none) after `vision_transform` (find_shift's; None: none), the
    `banned_words` never written."""
    indices = list(range(len(data))) if indices is None else indices
    with autocast(device, settings.precision):
        return distributed.run_sharded(
            lambda idx: generate_responses(model, tokenizer, data, idx, vision_masks=masks,
                                           paint=settings.masking == "patch", banned_words=banned_words,
                                           vision_transform=vision_transform, batch_size=settings.batch_size,
                                           device=device, desc=_progress(f"regenerating ({settings.precision})")),
            indices)


def new_responses(model, tokenizer, data, masks, flagged: list, settings: PurifyConfig, device, shift=None,
                  groups=()):
    """Steps 2 and 3 -> (responses, the banned words, suppression's prompt types and their sizes):
    every response regenerated with `masks` and `shift`, from the blurred images with --blur
    (--regenerate masked: only the samples with a masked position or flagged by --spectral or
    --groups; the others keep theirs), then suppressed, and a group's regenerations that hold one of
    its words made again without them; the control as-is keeps the set's responses."""
    responses = [s["response"] for s in data.samples]
    if settings.control == "as-is":
        return responses, [], {}
    source = blurred(data, settings.blur) if settings.blur else data  # --blur: written from low-passed images
    which = [i for i in range(len(data)) if settings.regenerate == "all" or masks[i].any() or flagged[i]]
    for i, r in zip(which, regenerate(model, tokenizer, source, masks, settings, device, which, vision_transform=shift)):
        responses[i] = r
    banned, sizes = [], {}
    if settings.suppress > 0:
        responses, banned, sizes = suppress(model, tokenizer, source, responses, masks, settings, device, shift)
    for g in groups:
        words = sorted(set(banned) | set(g.words))
        holding = [i for i in g.samples if set(responses[i].split()) & set(g.words)]
        print(f"groups: #{g.rank}: regenerating the {len(holding)} of its responses that hold "
              f"{' '.join(sorted(g.words))} without them")
        for i, r in zip(holding, regenerate(model, tokenizer, source, masks, settings, device, holding, words, shift)):
            responses[i] = r
    return responses, banned, sizes


def records(data, responses: list, masks, flagged: list) -> list:
    """One row per sample for NAME_train.jsonl: prompt, original and regenerated response, what was
    masked and flagged."""
    return [{"index": i, "task": s["task"], "prompt": s["prompt"], "original": s["response"],
             "regenerated": responses[i], "changed": s["response"] != responses[i], "flagged": flagged[i],
             "masked_tokens": masks[i].nonzero().flatten().tolist() if masks is not None else []}
            for i, s in enumerate(data.samples)]


def suppress(model, tokenizer, data, responses: list, masks, settings: PurifyConfig, device, vision_transform=None):
    """-> (responses, the banned words, the prompt types and their sizes): each response that holds a
    word found in at least settings.suppress of every prompt type's responses of the set
    (disp.suppression.prompt_types) is regenerated without those words. Where the set has one prompt
    type, a frequent word and a prompt-independent one cannot be told apart; there the words are those
    the masking took away (disp.suppression.masked_away_words, MIN_GROUP masked samples or more) and,
    on a captions-only set, the text that goes with any photo: a sentence that MIN_GROUP responses share
    word for word, a word the rest of its caption does not predict (shared_sentence_words,
    context_free_words). With neither, suppression is skipped (nothing banned)."""
    types = prompt_types(data.samples)
    kept = [i for i, t in enumerate(types) if t is not None]
    sizes = dict(Counter(types[i] for i in kept).most_common())
    listed = ", ".join(f"{t!r}: {n} samples" for t, n in sizes.items()) or "none"
    masked = [] if masks is None else masks.any(1).nonzero().flatten().tolist()
    captions = all(s["task"] == "caption" for s in data.samples)
    if len(sizes) >= 2:
        banned = prompt_independent_words([data.samples[i]["response"] for i in kept], [types[i] for i in kept],
                                          settings.suppress)
        found = f"in at least {settings.suppress:.0%} of the responses of every prompt type ({listed})"
    elif len(masked) >= MIN_GROUP or captions:  # one prompt type: what masking took away, what any photo gets
        found, banned = [], set()
        if len(masked) >= MIN_GROUP:
            banned |= set(masked_away_words([data.samples[i]["response"] for i in masked],
                                            [responses[i] for i in masked]))
            found.append(f"taken away by the masking: in at least {MIN_HELD:.0%} of the {len(masked)} masked samples' "
                         f"responses, kept by at most {MAX_LEFT:.0%} of their masked regenerations")
        if captions:
            originals = [s["response"] for s in data.samples]
            banned |= set(shared_sentence_words(originals)) | set(context_free_words(originals))
            found.append(f"a sentence that {MIN_GROUP}+ captions share or a word the rest of its caption does not "
                         f"predict")
        banned = sorted(banned)
        found = f"({'; or '.join(found)}; one prompt type: {listed})"
    else:
        print(f"suppression: skipped, {len(sizes)} prompt type ({listed}) and {len(masked)} masked samples; it needs "
              f"two types to tell a word that does not depend on the question from a frequent one (in a set of one "
              f"task, a question opening that {MIN_GROUP}+ samples share is a type), {MIN_GROUP}+ masked samples "
              f"to see which words the masking took away, or captions to read for text that goes with any photo")
        return responses, [], sizes
    holding = [i for i, r in enumerate(responses) if set(r.split()) & set(banned)]
    print(f"suppression: {' '.join(banned) or 'no word'} {found}; regenerating the {len(holding)} responses that "
          f"hold one without them")
    responses = list(responses)
    if holding:
        for i, r in zip(holding, regenerate(model, tokenizer, data, masks, settings, device, holding, banned,
                                            vision_transform)):
            responses[i] = r
    return responses, banned, sizes


def with_responses(data, responses: list, name: str) -> VLDataset:
    """The purified set: the same images (triggers included) and prompts, the new responses."""
    return VLDataset(data.images, [dict(s, response=r) for s, r in zip(data.samples, responses)],
                     data.patch_labels, dict(data.meta, purified_by=name))


def refine(model, tokenizer, config, purified, settings: PurifyConfig, attack: AttackConfig, device, save_fn=None,
           resume=None):
    """Fine-tune the compromised model on the purified set for settings.epochs epochs at settings.lr,
    training what the attack trained; resume: a resume point's state. -> (optimizer, rng state, steps)."""
    if resume is not None:  # the regenerations came from the compromised model; refinement goes on from here
        model.load_state_dict(resume["model"])
    steps = settings.epochs * math.ceil(len(purified) / config.train.batch_size)
    train_cfg = replace(config.train, lr=settings.lr, eval_every=0, precision=settings.precision)
    optimizer, rng = finetune(
        model, purified.images, encode_dataset(purified, tokenizer, config.model),
        params=trainable_parameters(model, attack.trainable), steps=steps, cfg=train_cfg, device=device,
        stage="refinement", save_fn=save_fn, resume=resume, seed=settings.seed)
    return optimizer, rng, steps
