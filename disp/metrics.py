"""Evaluation metrics for captions and visual question answering, written from scratch.

Four scores, each written to give the same numbers as the public tool people report with:

- `bleu`: corpus-level BLEU-1..4, as in pycocoevalcap's `bleu_scorer.py` (the COCO caption
  toolkit, tylin/coco-caption; also vendored by Maluuba/nlg-eval), with the "closest" reference
  length and its 1e-15 / 1e-9 smoothing constants.
- `cider`: CIDEr-D (Vedantam et al., 2015, arXiv:1411.5726), as in pycocoevalcap's
  `cider_scorer.py`: n-grams up to 4, idf from the references being evaluated, clipped tf-idf,
  a Gaussian length penalty (sigma 6), times 10, averaged over images.
- `vqa_accuracy`: the VQA accuracy of the official evaluation (GT-Vision-Lab/VQA,
  `PythonEvaluationTools/vqaEvaluation/vqaEval.py`), which includes its answer normalisation.
- `exact_match`: the prediction equals one of the references once whitespace is collapsed.

Caption inputs use the COCO toolkit's layout: `refs = {key: [reference, ...]}` and
`cands = {key: candidate}`. The text must already be lower-cased and tokenised: a sentence is its
whitespace-separated words. Only the standard library is used here.
"""

import math
import re
from collections import Counter

from disp.support.errors import DispError

BLEU_MAX_N = 4
CIDER_MAX_N = 4
CIDER_SIGMA = 6.0

# pycocoevalcap adds TINY to each matched count and SMALL to each candidate n-gram count.
# Zero matches then give a tiny number instead of 0, so log and ** never fail. A candidate with
# no n-grams of some order (a 3-word caption has no 4-grams) gets the ratio TINY / SMALL = 1e-6
# for that order.
BLEU_TINY = 1e-15
BLEU_SMALL = 1e-9


class MetricInputError(DispError, ValueError):
    """Bad metric input. It is a ValueError for callers and a DispError for the scripts."""


# --------------------------------------------------------------------------- input checks


def _check_caption_inputs(refs, cands):
    """Check the two dicts and return their keys (in refs' order) and the candidate strings."""
    if not refs or not cands:
        raise MetricInputError(
            f"refs and cands must be non-empty dicts (got {len(refs or {})} refs, {len(cands or {})} cands)"
        )
    if set(refs) != set(cands):
        only_refs = [k for k in refs if k not in cands][:5]
        only_cands = [k for k in cands if k not in refs][:5]
        raise MetricInputError(
            "refs and cands must have the same keys: "
            f"only in refs {only_refs}, only in cands {only_cands} (at most 5 of each shown)"
        )
    keys = list(refs)
    cand_text = {}
    for key in keys:
        ref_list = refs[key]
        if isinstance(ref_list, str) or not ref_list or not all(isinstance(r, str) for r in ref_list):
            raise MetricInputError(f"refs[{key!r}] must be a non-empty list of reference strings")
        cand = cands[key]
        # The COCO toolkit keeps candidates as one-element lists; accept that layout too.
        if isinstance(cand, (list, tuple)) and len(cand) == 1:
            cand = cand[0]
        if not isinstance(cand, str):
            raise MetricInputError(f"cands[{key!r}] must be a string, got {type(cand).__name__}")
        cand_text[key] = cand
    return keys, cand_text


def _ngram_counts(words, max_n):
    """Counts of every n-gram (as a tuple of words) for n = 1..max_n."""
    counts = Counter()
    for n in range(1, max_n + 1):
        for start in range(len(words) - n + 1):
            counts[tuple(words[start:start + n])] += 1
    return counts


# --------------------------------------------------------------------------- BLEU


def bleu(refs, cands):
    """Corpus-level [BLEU-1, BLEU-2, BLEU-3, BLEU-4], as pycocoevalcap's Bleu(4) computes it.

    The counts are summed over the whole corpus before any division, so this is not a mean of
    per-sentence scores. BLEU-k is the geometric mean of the clipped precisions p_1..p_k, times
    the brevity penalty exp(1 - r/c) when the corpus candidate length c is shorter than r. Here r
    is the sum over sentences of the reference length closest to that candidate's length.
    """
    keys, cand_text = _check_caption_inputs(refs, cands)

    matched = [0] * BLEU_MAX_N  # clipped n-gram matches, per order
    proposed = [0] * BLEU_MAX_N  # candidate n-grams, per order
    total_cand_len = 0
    total_ref_len = 0
    for key in keys:
        cand_words = cand_text[key].split()
        cand_len = len(cand_words)

        ref_lens = []
        max_ref_counts = Counter()  # clip each n-gram at its highest count in any one reference
        for ref in refs[key]:
            ref_words = ref.split()
            ref_lens.append(len(ref_words))
            for gram, count in _ngram_counts(ref_words, BLEU_MAX_N).items():
                max_ref_counts[gram] = max(max_ref_counts[gram], count)

        # "closest": the reference length nearest the candidate's. On a tie the shorter one wins,
        # because the toolkit takes the min of (distance, length) pairs.
        total_ref_len += min(ref_lens, key=lambda length: (abs(length - cand_len), length))
        total_cand_len += cand_len

        for order in range(BLEU_MAX_N):
            proposed[order] += max(0, cand_len - order)
        for gram, count in _ngram_counts(cand_words, BLEU_MAX_N).items():
            matched[len(gram) - 1] += min(count, max_ref_counts.get(gram, 0))

    scores = []
    precision_product = 1.0
    for order in range(BLEU_MAX_N):
        precision_product *= (matched[order] + BLEU_TINY) / (proposed[order] + BLEU_SMALL)
        scores.append(precision_product ** (1.0 / (order + 1)))

    # The same constants keep this ratio finite when everything is empty. Then exp(1 - 1/ratio)
    # underflows to 0.0, which is the score we want.
    length_ratio = (total_cand_len + BLEU_TINY) / (total_ref_len + BLEU_SMALL)
    if length_ratio < 1:
        brevity_penalty = math.exp(1 - 1 / length_ratio)
        scores = [score * brevity_penalty for score in scores]
    return scores


# --------------------------------------------------------------------------- CIDEr-D


def cider(refs, cands):
    """CIDEr-D, as pycocoevalcap's Cider computes it (n = 4, sigma = 6).

    Each sentence becomes one tf-idf vector per n-gram order. The idf of an n-gram is
    log(#images) - log(max(1, #images whose references contain it)), counted over the refs given
    here. For each reference, the score of an order is the cosine between candidate and reference
    vectors, with each candidate weight clipped at the reference weight, times
    exp(-delta^2 / (2 sigma^2)) for the length difference delta. An image scores 10 times the mean
    over orders of that score, averaged over its references. The result is the mean over images.
    """
    keys, cand_text = _check_caption_inputs(refs, cands)

    ref_counts = {key: [_ngram_counts(ref.split(), CIDER_MAX_N) for ref in refs[key]] for key in keys}
    cand_counts = {key: _ngram_counts(cand_text[key].split(), CIDER_MAX_N) for key in keys}

    # Document frequency: how many images have the n-gram in at least one of their references.
    doc_freq = Counter()
    for key in keys:
        doc_freq.update(set().union(*ref_counts[key]))
    log_num_images = math.log(len(keys))

    def tfidf(counts):
        vectors = [{} for _ in range(CIDER_MAX_N)]
        for gram, term_freq in counts.items():
            # An n-gram that is in no reference counts as df 1, so it gets the largest idf.
            # The weight still raises the candidate's norm.
            idf = log_num_images - math.log(max(1.0, doc_freq.get(gram, 0)))
            vectors[len(gram) - 1][gram] = term_freq * idf
        norms = [math.sqrt(sum(w * w for w in vec.values())) for vec in vectors]
        # The toolkit measures length by counting bigrams (its `n == 1` index), not words. Between
        # two non-empty sentences that gives the same difference. It differs only when one side is
        # empty, and then the cosine is already 0, so the score is the same. We count bigrams too.
        length = sum(counts[gram] for gram in vectors[1])
        return vectors, norms, length

    def similarity(cand_vec, ref_vec):
        (cand_weights, cand_norms, cand_len), (ref_weights, ref_norms, ref_len) = cand_vec, ref_vec
        length_penalty = math.exp(-((cand_len - ref_len) ** 2) / (2 * CIDER_SIGMA ** 2))
        per_order = []
        for order in range(CIDER_MAX_N):
            dot = 0.0
            for gram, weight in cand_weights[order].items():
                ref_weight = ref_weights[order].get(gram, 0.0)
                # The "-D" clipping: repeating a word cannot push its weight above the reference's.
                dot += min(weight, ref_weight) * ref_weight
            if cand_norms[order] != 0 and ref_norms[order] != 0:
                dot /= cand_norms[order] * ref_norms[order]
            per_order.append(dot * length_penalty)
        return per_order

    image_scores = []
    for key in keys:
        cand_vec = tfidf(cand_counts[key])
        summed = [0.0] * CIDER_MAX_N
        for counts in ref_counts[key]:
            for order, value in enumerate(similarity(cand_vec, tfidf(counts))):
                summed[order] += value
        mean_over_orders = sum(summed) / CIDER_MAX_N
        image_scores.append(mean_over_orders / len(ref_counts[key]) * 10.0)
    return sum(image_scores) / len(image_scores)


# --------------------------------------------------------------------------- VQA accuracy

# Number words the official evaluation turns into digits ("none" counts as 0, as there).
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}

# Marks the official evaluation deletes or turns into a space. The apostrophe and the period are
# not here: apostrophes are left to the contraction map, and periods get their own rule below.
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period not followed by a digit is removed, so "2.5" keeps its period. The official regex tries
# to spare "digit." as well, but it has a typo: "(?!<=" is a lookahead, not a lookbehind. So it
# acts exactly like this simpler regex, and "2." becomes "2".
_PERIOD = re.compile(r"\.(?!\d)")

# Written-out contractions. The map goes from each spelling with one apostrophe missing
# ("dont", "couldnt've", "couldn'tve") to the full spelling, as the official map does.
# Left out on purpose, as the official map in effect does too:
# - forms whose apostrophe-less spelling is a common word (it's/its, we'd/wed, she'll/shell,
#   we're/were, i'll/ill, let's/lets, she's/shes);
# - "i'm", "i've", "i'd've": the official keys are capitalised ("Im") and the text is lower-cased
#   before lookup, so they never match there.
# One deliberate difference: the official map turns "somebody'd" into "somebodyd", a reversed
# entry. Here "somebodyd" maps to "somebody'd", like every other entry.
_CONTRACTIONS = [
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't",
    "don't", "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd",
    "how'll", "how's", "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've",
    "might've", "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at",
    "shan't", "she'd've", "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'd've",
    "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll", "someone's",
    "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've",
    "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas",
    "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's",
    "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll",
    "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll",
    "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
]


def _missing_one_apostrophe(word):
    positions = [i for i, char in enumerate(word) if char == "'"]
    return [word[:i] + word[i + 1:] for i in positions]


_CONTRACTION_MAP = {variant: full for full in _CONTRACTIONS for variant in _missing_one_apostrophe(full)}


def _strip_punctuation(text):
    """The official processPunctuation step."""
    # A mark next to a space ("yes !"), or any text with a digit,digit group ("1,000"), has the
    # mark deleted. Otherwise the mark becomes a space, so "t-shirt" becomes "t shirt". The test
    # looks at the original text, while the edits build up on the new one, as in the original.
    delete_marks = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if delete_marks or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The official call passes re.UNICODE where `count` goes, so it stops after 32 periods.
    # No real answer has that many, so we replace them all.
    return _PERIOD.sub("", out)


def _map_words(text):
    """The official processDigitArticle step: number words to digits, no articles, contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTION_MAP.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(answer):
    """Normalise one answer the way the official VQA evaluation does ("Two dogs." -> "2 dogs")."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _map_words(_strip_punctuation(answer))


def vqa_accuracy(prediction, answers):
    """Official VQA accuracy of one prediction against its human answers (usually 10).

    The prediction and every answer are normalised. Each answer is then left out in turn; the
    prediction gets min(#matches among the other answers / 3, 1) for that subset, and the result
    is the mean over the subsets. With 10 answers, 3 matches give 0.9 and 4 or more give 1.0.

    This differs from the official code in two places. It normalises the answers fully, where the
    official code only strips their punctuation (the official answers are already normalised, so
    "two" in raw answers would otherwise never match a normalised "2"). And with a single answer
    it returns plain exact match: with nothing left after leaving one out, the official formula
    would always give 0.
    """
    if isinstance(answers, str) or not answers:
        raise MetricInputError("answers must be a non-empty list of answer strings")
    predicted = normalize_vqa_answer(prediction)
    normalized = [normalize_vqa_answer(answer) for answer in answers]
    if len(normalized) == 1:
        return 1.0 if normalized[0] == predicted else 0.0
    total_matches = sum(answer == predicted for answer in normalized)
    subset_scores = []
    for held_out in normalized:
        matches_in_others = total_matches - (held_out == predicted)
        subset_scores.append(min(1.0, matches_in_others / 3))
    return sum(subset_scores) / len(subset_scores)


# --------------------------------------------------------------------------- exact match and summary


def exact_match(prediction, references):
    """1.0 if the prediction equals any reference after whitespace is collapsed, else 0.0.

    Case and punctuation count: normalise the text first if they should not.
    """
    if isinstance(references, str):
        references = [references]
    predicted = " ".join(prediction.split())
    return 1.0 if any(" ".join(ref.split()) == predicted for ref in references) else 0.0


def caption_scores(refs, cands):
    """BLEU-1..4, CIDEr-D and exact match (mean over keys) in one dict."""
    keys, cand_text = _check_caption_inputs(refs, cands)
    bleu1, bleu2, bleu3, bleu4 = bleu(refs, cands)
    return {
        "bleu1": bleu1,
        "bleu2": bleu2,
        "bleu3": bleu3,
        "bleu4": bleu4,
        "cider": cider(refs, cands),
        "exact_match": sum(exact_match(cand_text[key], refs[key]) for key in keys) / len(keys),
    }
