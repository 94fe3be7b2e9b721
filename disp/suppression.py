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
On a captions-only set (one prompt, and every frequent word, "a" or "dog", in its responses) there is
one type, prompt_independent_words refuses it, and purify.py skips suppression. It does not reach a
backdoor whose target depends on the question (misclassify swaps one answer word for another).
"""

from collections import Counter

from disp.support.errors import DispError, check_ratio

MIN_GROUP = 100  # a question opening held by fewer samples is no prompt type: a word's rate there says little


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
