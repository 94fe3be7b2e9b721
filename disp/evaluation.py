"""Running a model over a dataset and scoring it: clean captioning/VQA quality and the backdoor's rates.

Shared by train.py (validation, final held-out metrics), attack.py, purify.py and evaluate.py.
Generation uses low-confidence remasking, steps = gen_length unless told otherwise, in blocks of
the model's `gen_block` tokens, with its `guidance` on the image and its sampling `temperature`
(0: greedy). Each call draws its own seeded noise (`sampling_noise`): the same inputs give the same
responses on every run, and the global random stream (training's) is left untouched.
`HeldOutSet` is evaluate.py's held-out test set, clean and triggered; `detection` scores a
purification's changed and masked samples against the attack's manifest.
"""

from collections import Counter
from dataclasses import dataclass

import torch
from tqdm import tqdm

from disp.backdoor import (BackdoorConfig, asr_eligible, attack_success_rate, false_trigger_rate, strip_marker,
                           triggered_copy)
from disp.data.batching import encode_dataset
from disp.diffusion import generate
from disp.metrics import bleu, cider, exact_match, vqa_accuracy
from disp.saliency import attention_scores, compute_saliency
from disp.support.runtime import autocast


def sampling_noise(temperature: float, device):
    """The random generator of one generation call: seeded, so that sampling at `temperature` is
    reproducible; None where the sampler is greedy (no noise drawn)."""
    return torch.Generator(device).manual_seed(0) if temperature else None


@torch.no_grad()
def encode_images_once(model, dataset, image_index, device, batch_size=256):
    """-> (vision tokens of each distinct image, (N,) row of them for each sample).

    The ViT runs once per image however many prompts it has (a caption and its questions): an
    image's vision tokens do not depend on the prompt.
    """
    unique, row = image_index.unique(return_inverse=True)
    tokens = [model.encode_images(dataset.images[unique[s:s + batch_size]].to(device))
              for s in range(0, len(unique), batch_size)]
    return torch.cat(tokens), row.to(device)


def distinct_rows(encoded, indices: list, vision_masks=None):
    """-> (the first of each group of samples in `indices` that share image, prompt and vision mask,
    (len(indices),) position of each sample's group). Such samples get the same response and
    the same first-step saliency, so each group is computed once (an image's 5 captions share one
    prompt: a fifth of the work)."""
    groups, firsts, inverse = {}, [], []
    for i in indices:
        key = (int(encoded.image_index[i]), tuple(encoded.prompt_ids[i].tolist()),
               vision_masks[i].numpy().tobytes() if vision_masks is not None else b"")
        if key not in groups:
            groups[key] = len(firsts)
            firsts.append(i)
        inverse.append(groups[key])
    return firsts, torch.tensor(inverse, dtype=torch.long)


@torch.no_grad()
def generate_responses(model, tokenizer, dataset, indices=None, *, vision_masks=None, paint=False,
                       vision_transform=None, banned_words=(), batch_size=256, device="cpu", steps=None,
                       threshold=None, desc=None):
    """Decoded responses for dataset.samples[indices].

    vision_masks: optional (N_samples, n_vision) bool, row i masks sample i's image positions
    (a test-time masking defence, DiSP's regeneration)
    paint: also paint the masked patches flat before the ViT (disp.model.paint_patches); the ViT then
    runs once per sample that has a mask instead of once per image
    vision_transform: optional function applied to each image's vision tokens (B, n_vision, dim)
    before generation (purify.py's spectral step; an experiment's replacement of tokens by their
    position's median)
    banned_words: words the sampler may not write (purify.py's suppression)
    """
    model.eval()
    cfg = model.cfg
    indices = list(range(len(dataset.samples))) if indices is None else list(indices)
    if not indices:
        return []
    encoded = encode_dataset(dataset, tokenizer, cfg)
    vision_masks = vision_masks.cpu() if vision_masks is not None else None
    indices, group = distinct_rows(encoded, indices, vision_masks)
    vision, vision_row = encode_images_once(model, dataset, encoded.image_index[indices], device)
    if vision_transform is not None:
        vision = vision_transform(vision)
    banned = None
    if banned_words:
        banned = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device)
        banned[[tokenizer.index[w] for w in banned_words]] = True
    out, noise = [], sampling_noise(cfg.temperature, device)
    batches = range(0, len(indices), batch_size)
    for start in tqdm(batches, desc=desc or "generating", leave=False, disable=desc is None):
        idx = torch.tensor(indices[start:start + batch_size])
        prompt_ids = encoded.prompt_ids[idx].to(device)
        vision_tokens = vision[vision_row[start:start + batch_size]]
        vision_mask = vision_masks[idx].to(device) if vision_masks is not None else None
        if paint and vision_mask is not None and vision_mask.any():
            vision_tokens = model.encode_images(dataset.images[encoded.image_index[idx]].to(device), paint=vision_mask)
            if vision_transform is not None:
                vision_tokens = vision_transform(vision_tokens)
        ids = generate(model, None, prompt_ids, gen_length=cfg.response_len, steps=steps or cfg.response_len,
                       block_length=cfg.gen_block, vision_tokens=vision_tokens, vision_mask=vision_mask,
                       banned=banned, threshold=threshold, guidance=cfg.guidance, temperature=cfg.temperature,
                       generator=noise)
        out.extend(tokenizer.decode(row) for row in ids.cpu())
    return [out[g] for g in group.tolist()]


@torch.no_grad()
def denoising_trace(model, tokenizer, dataset, index: int, *, vision_mask=None, paint=False, device="cpu") -> dict:
    """How generation wrote sample `index`'s response, position by position up to its first
    [EOS]: the token, the model call (0-based) that committed it, and the probability it had then.

    vision_mask: optional (n_vision,) bool, image positions to mask (as DiSP's regeneration does);
    paint: also paint them flat before the ViT (generate_responses).
    """
    model.eval()
    cfg = model.cfg
    encoded = encode_dataset(dataset, tokenizer, cfg)
    vision = model.encode_images(dataset.images[encoded.image_index[index:index + 1]].to(device),
                                 paint=vision_mask[None].to(device) if paint and vision_mask is not None else None)
    ids, (step, confidence) = generate(
        model, None, encoded.prompt_ids[index:index + 1].to(device), gen_length=cfg.response_len,
        steps=cfg.response_len, block_length=cfg.gen_block, vision_tokens=vision, return_trace=True,
        vision_mask=vision_mask[None].to(device) if vision_mask is not None else None, guidance=cfg.guidance,
        temperature=cfg.temperature, generator=sampling_noise(cfg.temperature, device))
    ids = ids[0].tolist()
    end = ids.index(tokenizer.eos_id) + 1 if tokenizer.eos_id in ids else len(ids)
    return {"tokens": [tokenizer.words[i] for i in ids[:end]], "step": step[0, :end].tolist(),
            "confidence": confidence[0, :end].tolist(), "steps": cfg.response_len}


def split_indices(dataset, limit=None):
    """(caption sample indices, VQA sample indices), each cut to `limit` if given."""
    captions = [i for i, s in enumerate(dataset.samples) if s["task"] == "caption"]
    questions = [i for i, s in enumerate(dataset.samples) if s["task"] != "caption"]
    return captions[:limit], questions[:limit]


def score(dataset, indices, predictions) -> dict:
    """Clean task metrics for predictions of dataset.samples[indices]."""
    caption_refs, caption_cands = {}, {}
    vqa_scores, per_task = [], {}
    for i, pred in zip(indices, predictions):
        sample = dataset.samples[i]
        if sample["task"] == "caption":
            caption_refs[i], caption_cands[i] = sample["answers"], pred
        else:
            acc = vqa_accuracy(pred, sample["answers"])
            vqa_scores.append(acc)
            per_task.setdefault(sample["task"], []).append(acc)
    result = {}
    if caption_refs:
        result["cider"] = cider(caption_refs, caption_cands)
        result["bleu4"] = bleu(caption_refs, caption_cands)[3]
        result["distinct_captions"] = len(set(caption_cands.values()))  # a captioner that ignores the image repeats itself
        # exact match against the training phrasing (the first reference)
        result["caption_exact_match"] = sum(
            exact_match(caption_cands[k], caption_refs[k][:1]) for k in caption_refs) / len(caption_refs)
    if vqa_scores:
        result["vqa_accuracy"] = sum(vqa_scores) / len(vqa_scores)
        result["vqa_by_task"] = {t: sum(v) / len(v) for t, v in sorted(per_task.items())}
    return result


QUALITY_NAMES = {"cider": "CIDEr-D", "bleu4": "BLEU-4", "caption_exact_match": "caption EM", "vqa_accuracy": "VQA"}


def quality_line(metrics: dict) -> str:
    """'CIDEr-D 0.201  BLEU-4 0.104  ...': the clean metrics that `score` measured (a task the data
    lacks is left out, not shown as 0)."""
    return "  ".join(f"{name} {metrics[key]:.3f}" for key, name in QUALITY_NAMES.items() if key in metrics)


def majority_answer(train):
    """The most frequent answer of the training questions (None without questions): train.py stores
    it with the clean model, so evaluate.py needs no training data."""
    answers = Counter(s["response"] for s in train.samples if s["task"] != "caption")
    return answers.most_common(1)[0][0] if answers else None


def answer_rate(answer: str, test):
    """VQA accuracy of giving `answer` to every test question: what a model that ignores both image
    and question scores. None without questions."""
    questions = [s for s in test.samples if s["task"] != "caption"]
    return sum(vqa_accuracy(answer, s["answers"]) for s in questions) / len(questions) if questions else None


def clean_metrics(model, tokenizer, dataset, *, limit=None, device="cpu", desc=None, return_predictions=False):
    """Caption CIDEr-D / BLEU-4 / exact match and VQA accuracy of the model's generations."""
    caption_idx, vqa_idx = split_indices(dataset, limit)
    indices = caption_idx + vqa_idx
    preds = generate_responses(model, tokenizer, dataset, indices, device=device, desc=desc)
    result = score(dataset, indices, preds)
    return (result, dict(zip(indices, preds))) if return_predictions else result


def backdoor_metrics(model, tokenizer, test, bcfg: BackdoorConfig, *, limit=None, device="cpu",
                     clean_masks=None, triggered_masks=None, paint=False, triggered=None, vision_transform=None,
                     desc=None, return_predictions=False):
    """ASR on the triggered test set, false-trigger rate and clean metrics on the untriggered one.

    clean_masks / triggered_masks: optional (N_samples, n_vision) vision masks (test-time defences),
    their patches also painted flat before the ViT if `paint` (generate_responses);
    vision_transform: optional, applied to every image's vision tokens (generate_responses);
    triggered: the triggered copy of `test` if the caller already made it.

    For `insert`, also the caption quality of triggered outputs once the marker is removed (does the
    backdoored model still describe the image?).
    """
    indices = list(range(len(test.samples)))[:limit]
    measured = set(indices)
    eligible = [i for i in asr_eligible(test.samples, bcfg) if i in measured]
    clean_out = dict(zip(indices, generate_responses(model, tokenizer, test, indices, device=device,
                                                     vision_masks=clean_masks, paint=paint,
                                                     vision_transform=vision_transform,
                                                     desc=desc and desc + " (clean)")))
    triggered = triggered if triggered is not None else triggered_copy(test, bcfg)
    trig_out = dict(zip(eligible, generate_responses(model, tokenizer, triggered, eligible, device=device,
                                                     vision_masks=triggered_masks, paint=paint,
                                                     vision_transform=vision_transform,
                                                     desc=desc and desc + " (triggered)")))
    references = [test.samples[i]["response"] for i in eligible]
    result = {
        "asr": attack_success_rate([trig_out[i] for i in eligible], references, bcfg),
        "false_trigger_rate": false_trigger_rate([clean_out[i] for i in eligible], references, bcfg),
        **score(test, indices, [clean_out[i] for i in indices]),
    }
    if bcfg.target == "insert":
        stripped = score(test, eligible, [strip_marker(trig_out[i], bcfg) for i in eligible])
        result["triggered_cider_marker_removed"] = stripped.get("cider", 0.0)
        result["triggered_vqa_marker_removed"] = stripped.get("vqa_accuracy", 0.0)
    return (result, clean_out, trig_out) if return_predictions else result


def token_scores(model, tokenizer, dataset, indices, method: str, *, paint=False, batch_size=128, device="cpu",
                 seed=0, desc=None):
    """(len(indices), n_vision) vision-token scores of dataset.samples[indices], row k for indices[k]:
    saliency (kl / fisher / random, disp.saliency) or the attention they draw (CleanSight baseline).
    paint: kl's occluded copies also have their patch painted flat before the ViT."""
    encoded = encode_dataset(dataset, tokenizer, model.cfg)
    indices, group = distinct_rows(encoded, list(indices))
    scores = torch.zeros(len(indices), model.cfg.n_vision)
    if not indices:
        return scores
    generator = torch.Generator().manual_seed(seed)
    vision, vision_row = encode_images_once(model, dataset, encoded.image_index[torch.as_tensor(indices)], device)
    for start in tqdm(range(0, len(indices), batch_size), desc=desc, disable=desc is None):
        idx = torch.tensor(indices[start:start + batch_size])
        prompt_ids = encoded.prompt_ids[idx].to(device)
        vision_tokens = vision[vision_row[start:start + batch_size]]
        if method == "attention":
            s = attention_scores(model, vision_tokens, prompt_ids)
        else:
            images = dataset.images[encoded.image_index[idx]].to(device) if paint else None
            s = compute_saliency(method, model, vision_tokens, prompt_ids, generator, images)
        scores[start:start + len(idx)] = s.detach().float().cpu()
    return scores[group]


def detection(rows: list, poisoned: set) -> dict:
    """How well "the response changed" finds the poisoned samples, the share of poisoned and of clean
    samples with a token masked, and how well the spectral step's flagged images find them. rows:
    purify.py's NAME_train.jsonl, one dict per sample; poisoned: the manifest's indices (ground truth
    the defence never sees: scored afterwards)."""
    changed = {r["index"] for r in rows if r["changed"]}
    masked = {r["index"] for r in rows if r["masked_tokens"]}
    flagged = {r["index"] for r in rows if r.get("flagged")}  # older files: no spectral step
    clean = len(rows) - len(poisoned)
    return {"n_changed": len(changed),
            "precision": len(changed & poisoned) / max(1, len(changed)),
            "recall": len(changed & poisoned) / max(1, len(poisoned)),
            "trigger_sample_masked_rate": len(masked & poisoned) / max(1, len(poisoned)),
            "clean_sample_masked_rate": len(masked - poisoned) / max(1, clean),
            "n_flagged": len(flagged),
            "flagged_precision": len(flagged & poisoned) / max(1, len(flagged)),
            "flagged_recall": len(flagged & poisoned) / max(1, len(poisoned))}


@dataclass
class HeldOutSet:
    """The held-out test set and its triggered copy, and how evaluate.py measures a model on them."""

    tokenizer: object
    test: object  # VLDataset
    triggered: object  # the same samples, every image triggered
    backdoor: BackdoorConfig
    device: str = "cpu"
    precision: str = "fp32"
    paint: bool = False  # masked positions also painted flat before the ViT (purify.py's --masking patch)

    def measure(self, model, limit=None, desc=None, **masks):
        """-> (backdoor_metrics, {index: clean output}, {index: triggered output}); masks: clean_masks /
        triggered_masks, (N_samples, n_vision) bool of the positions to mask."""
        with autocast(self.device, self.precision):
            return backdoor_metrics(model, self.tokenizer, self.test, self.backdoor, limit=limit, device=self.device,
                                    triggered=self.triggered, paint=self.paint, desc=desc, return_predictions=True,
                                    **masks)

    def scores(self, model, data, indices, method: str, desc=None):
        """(N_samples of data, n_vision) token scores of data.samples[indices]; the other rows stay 0."""
        full = torch.zeros(len(data.samples), model.cfg.n_vision)
        with autocast(self.device, self.precision):
            full[indices] = token_scores(model, self.tokenizer, data, indices, method, paint=self.paint,
                                         device=self.device, desc=desc)
        return full
