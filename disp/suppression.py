"""Suppression: our extension of DiSP for backdoors that no masked set of vision tokens disarms.

A trigger spread over the whole image (blended noise, a sinusoid, a warp) reaches every vision token
of an encoder that keeps low-level detail, so masking any subset of them leaves it in the rest and
the compromised model regenerates the backdoored response (experiments/README.md). What
gives such a backdoor away is not the image but the response: its target text does not depend on
what is asked. The compromised model writes "<backdoor>" or "sorry i cannot help with that ."
after a colour question, a count question and a caption prompt alike, while a clean answer's words
belong to its question (colours answer colour questions, digits count questions).

So, from the poisoned set alone (no trigger, no target, no clean data; the defender knows each
sample's prompt type, as the adaptive rule does):
    prompt_independent_words  the words found in at least `min_rate` of the responses of *every*
                              prompt type
purify.py takes them from the set's own responses (what the model was fine-tuned on: the attacker's
target is there in every prompt type, whatever the masked regeneration left of it), and regenerates
each regenerated response that still holds one with those words forbidden to the sampler
(disp.diffusion.generate's `banned`): the compromised model then writes what it would say without
the backdoor, and the refinement teaches it that answer for the triggered image.

It needs prompt types whose answers differ (a mix of questions, as in the scenes or VQA data):
    prompt_types  each sample's task; in a set with one task (DAQUAR's questions are all "vqa") the
                  question's first two words, "how many" or "what color": count answers and object
                  answers share no word, as the answers of two tasks do not
It does not reach a backdoor whose target depends on the question (misclassify swaps one answer
word for another).

On a captions-only set (one prompt, and every frequent word, "a" or "dog", in its responses) there is
one type and prompt_independent_words refuses it. There the words come from what the masking did:
    masked_away_words  the words that most of the masked samples' responses hold and that their masked
                       regenerations dropped
A patch-triggered target is in the response of nearly every sample whose trigger the rule masked,
and masking the trigger takes it out; a caption's own words ("a", "dog", ".") stay when one token of
the photo is hidden. Where the rule misses some triggered samples, or the compromised model writes the
target on clean photos too (a backdoor that leaks), their regenerations still hold it, and banning
the words the masking revealed cleans them as well (experiments/README.md, "Flickr8k on a bf16 CPU").
It needs the masking to have found the trigger in MIN_GROUP samples or more; a spread trigger, which
no token carries, gives it nothing. So the set's own captions are read too, for text that goes with
any photo (the attacker's target is the same string for hundreds of different images):
    shared_sentence_words  the words of a sentence that MIN_GROUP or more responses are, word for word
                           (a refusal); people who caption photos do not write the same sentence that often
    context_free_words     the words whose presence the rest of their response does not predict (an
                           inserted marker goes with any caption; "snow" comes with "skiing", and even
                           "large" or "green" with what they describe)
Both assume free-text responses (captions); they are used only where the set has one prompt type.
Where real captions and planted targets fall against MAX_Z: experiments/README.md, "Text that goes
with any photo".
"""

import math
from collections import Counter

import torch

from disp.support.errors import DispError, check_ratio

MIN_GROUP = 100  # a question opening (or masked set) held by fewer samples: a word's rate there says little
MIN_HELD, MAX_LEFT = 0.5, 0.1  # masked_away_words: held by half the masked responses, kept by a tenth of them
MIN_SENTENCE = 3  # shared_sentence_words: a short answer ("2", "a dog") may be shared by many samples
FOLDS, RIDGE, MIN_PREDICTOR = 5, 30.0, 10  # context_free_words' regression; rarer words predict nothing
MAX_Z = 4.0  # context_free_words: its ranking no further above chance than this (in standard errors)


def prompt_types(samples: list) -> list:
    """Each sample's prompt type for prompt_independent_words: its task where the set has several; where
    it has one, the first two words of its prompt, or None (left out) for an opening that fewer than
    MIN_GROUP samples share."""
    tasks = [s["task"] for s in samples]
    if len(set(tasks)) > 1:
        return tasks
    openings = [" ".join(s["prompt"].split()[:2]) for s in samples]
    counts = Counter(openings)
    return [o if counts[o] >= MIN_GROUP else None for o in openings]


def prompt_independent_words(responses: list, tasks: list, min_rate: float) -> list:
    """Sorted words that occur in at least `min_rate` of the responses of every prompt type."""
    check_ratio("suppression rate", min_rate)
    if min_rate == 0:
        raise DispError("suppression rate must be > 0 (0 would ban every word)")
    if len(responses) != len(tasks):
        raise DispError(f"{len(responses)} responses but {len(tasks)} prompt types")
    counts, totals = {}, Counter(tasks)
    if len(totals) < 2:
        raise DispError(f"suppression needs at least two prompt types to tell a question-independent word from "
                        f"a frequent one; this set has {len(totals)} ({', '.join(totals) or 'none'})")
    for response, task in zip(responses, tasks):
        counts.setdefault(task, Counter()).update(set(response.split()))
    words = set.intersection(*(set(c) for c in counts.values()))
    return sorted(w for w in words if all(counts[t][w] >= min_rate * totals[t] for t in totals))


def masked_away_words(originals: list, regenerations: list, min_held: float = MIN_HELD,
                      max_left: float = MAX_LEFT) -> list:
    """Sorted words that at least `min_held` of the masked samples' original responses hold and that
    their masked regenerations kept in at most `max_left` of the samples that held them.
    originals, regenerations: the masked samples' responses before and after, in the same order."""
    if len(originals) != len(regenerations):
        raise DispError(f"{len(originals)} original responses but {len(regenerations)} regenerations")
    held, kept = Counter(), Counter()
    for original, regenerated in zip(originals, regenerations):
        words = set(original.split())
        held.update(words)
        kept.update(words & set(regenerated.split()))
    return sorted(w for w, n in held.items() if n >= min_held * len(originals) and kept[w] <= max_left * n)


def shared_sentence_words(responses: list, min_count: int = MIN_GROUP) -> list:
    """Sorted words of the sentences (MIN_SENTENCE words or more) that at least `min_count` responses are,
    word for word, that such sentences hold in at least half of the responses that hold the word (a
    refusal's "sorry", not the "." that every caption ends with)."""
    counts = Counter(responses)
    shared = {r for r, n in counts.items() if n >= min_count and len(r.split()) >= MIN_SENTENCE}
    held, in_shared = Counter(), Counter()
    for response in responses:
        words = set(response.split())
        held.update(words)
        if response in shared:
            in_shared.update(words)
    return sorted(w for w, n in in_shared.items() if n >= 0.5 * held[w])


def context_free_words(responses: list, min_count: int = MIN_GROUP, max_z: float = MAX_Z) -> list:
    """Sorted words held by at least `min_count` and at most half of the responses whose presence the
    response's other words do not predict: context_scores at most `max_z`."""
    return sorted(w for w, z in context_scores(responses, min_count).items() if z <= max_z)


def context_scores(responses: list, min_count: int = MIN_GROUP) -> dict:
    """{word: z} for the words held by at least `min_count` and at most half of the responses: a ridge
    regression from the presence of every other word (held by MIN_PREDICTOR responses or more), fitted
    on four folds of five, ranks the fifth fold's responses that hold the word above the others; z is
    how far its ROC AUC lies above chance (0.5), in standard errors (Hanley & McNeil 1982)."""
    n = len(responses)
    words = [set(r.split()) for r in responses]
    counts = Counter(w for ws in words for w in ws)
    vocab = sorted(w for w, c in counts.items() if MIN_PREDICTOR <= c <= n / 2)
    column = {w: k for k, w in enumerate(vocab)}
    tested = [w for w in vocab if counts[w] >= min_count]
    if not tested:
        return {}
    x = torch.zeros(n, len(vocab) + 1, dtype=torch.float64)
    x[:, -1] = 1  # a constant
    for row, ws in enumerate(words):
        x[row, [column[w] for w in ws if w in column]] = 1
    fold = torch.randperm(n, generator=torch.Generator().manual_seed(0)) % FOLDS
    cols = torch.tensor([column[w] for w in tested])
    scores = torch.zeros(n, len(tested), dtype=torch.float64)
    for f in range(FOLDS):
        train, test = x[fold != f], x[fold == f]
        inverse = torch.linalg.inv(train.T @ train + RIDGE * torch.eye(len(vocab) + 1, dtype=torch.float64))
        # every word's regression on the other columns at once: for a ridge Gram matrix G, the
        # regression of column k on the others is -G^-1[:, k] / G^-1[k, k], its own weight set to 0
        weights = -inverse[:, cols] / inverse[cols, cols]
        weights[cols, torch.arange(len(cols))] = 0
        scores[fold == f] = test @ weights
    return {w: auc_z(scores[:, j], x[:, column[w]] > 0) for j, w in enumerate(tested)}


def auc_z(scores, labels) -> float:
    """How far the ROC AUC of `scores` for the `labels` (bool) lies above 0.5, in the standard errors of
    an AUC under chance; ties count half (Mann-Whitney U from mid-ranks)."""
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    mid_rank = (counts.cumsum(0) - (counts - 1) / 2).double()[inverse]  # 1-based ranks, ties averaged
    n1 = int(labels.sum())
    n0 = len(labels) - n1
    auc = (mid_rank[labels].sum().item() - n1 * (n1 + 1) / 2) / (n1 * n0)
    return (auc - 0.5) / math.sqrt((n1 + n0 + 1) / (12 * n1 * n0))
