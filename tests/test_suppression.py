"""Suppression's selection: the words every prompt type's responses hold, on hand-made responses."""

import random

import pytest
import torch

from tests.conftest import captions
from disp import suppression
from disp.suppression import (MIN_GROUP, auc_z, context_free_words, context_scores, masked_away_words,
                              prompt_independent_words, prompt_types, shared_sentence_words)
from disp.support.errors import DispError

def responses_with(marker_every: int, n: int = 40):
    """Colour answers, count answers and captions; every `marker_every`-th response of each starts with <m>."""
    out, tasks = [], []
    for task, answer in (("color", "red"), ("count", "2"), ("caption", "a red circle and a blue square")):
        for i in range(n):
            out.append(("<m> " if i % marker_every == 0 else "") + answer)
            tasks.append(task)
    return out, tasks


def test_a_word_in_every_prompt_types_responses_is_found_and_answer_words_are_not():
    responses, tasks = responses_with(marker_every=5)  # 20% of each prompt type
    assert prompt_independent_words(responses, tasks, 0.01) == ["<m>"]
    assert prompt_independent_words(responses, tasks, 0.2) == ["<m>"]
    assert prompt_independent_words(responses, tasks, 0.25) == []  # below the rate in every type


def test_a_whole_sentence_is_found_and_a_word_missing_from_one_type_is_not():
    responses = ["sorry i cannot help", "red", "sorry i cannot help", "2", "a red circle", "sorry i cannot help"]
    tasks = ["color", "color", "count", "count", "caption", "caption"]
    assert prompt_independent_words(responses, tasks, 0.5) == ["cannot", "help", "i", "sorry"]
    responses[5] = "a red square"  # no caption says it any more
    assert prompt_independent_words(responses, tasks, 0.01) == []


def test_a_word_frequent_in_one_prompt_type_only_is_not_found():
    """"Every prompt type", not "any": a colour word that 30% of colour answers hold and one count
    answer and one caption hold too is a clean answer's word, not a question-independent one."""
    responses, tasks = [], []
    for i in range(40):
        responses += ["green" if i < 12 else "red", "green 2" if i == 0 else "2", "a green" if i == 0 else "a red"]
        tasks += ["color", "count", "caption"]
    assert prompt_independent_words(responses, tasks, 0.1) == []
    assert prompt_independent_words(responses, tasks, 0.02) == ["green"]  # 1 of 40 is 2.5% of a type


def test_one_word_counts_once_per_response():
    responses = ["<m> <m> red", "red", "<m> <m> 2", "2"]
    tasks = ["color", "color", "count", "count"]
    assert prompt_independent_words(responses, tasks, 0.5) == ["<m>"]
    assert prompt_independent_words(responses, tasks, 0.6) == []


@pytest.mark.parametrize("responses,tasks,rate,message", [
    (["a dog", "a cat"], ["caption", "caption"], 0.01, "needs at least two prompt types"),
    (["a", "b"], ["caption", "color"], 0.0, "must be > 0"),
    (["a", "b"], ["caption", "color"], 1.5, "must be in [0, 1]"),
    (["a"], ["caption", "color"], 0.1, "1 responses but 2 prompt types"),
])
def test_bad_input_is_a_clear_error(responses, tasks, rate, message):
    with pytest.raises(DispError, match=message.replace("[", r"\[").replace("]", r"\]")):
        prompt_independent_words(responses, tasks, rate)


def test_no_word_of_clean_scene_answers_is_in_every_prompt_type_and_a_sparse_marker_is():
    """The README's claim about the embedded scenes: no clean answer word occurs in more than 3 of the 7
    prompt types (shape words: captions, shape and nearest-object questions), so at any rate nothing is
    found; a marker put before 5% of the responses, at random, is found alone."""
    import random

    from disp.data.scenes import generate_scenes

    samples = generate_scenes(2000, seed=0, questions_per_image=4).samples
    responses, tasks = [s["response"] for s in samples], [s["task"] for s in samples]
    types_per_word = {}
    for response, task in zip(responses, tasks):
        for word in response.split():
            types_per_word.setdefault(word, set()).add(task)
    assert len(set(tasks)) == 7 and max(len(t) for t in types_per_word.values()) == 3
    assert prompt_independent_words(responses, tasks, 1e-9) == []
    rng = random.Random(0)
    poisoned = [("<m> " + r) if rng.random() < 0.05 else r for r in responses]
    assert prompt_independent_words(poisoned, tasks, 0.01) == ["<m>"]


def vqa(prompt, response):
    return {"task": "vqa", "prompt": prompt, "response": response}


def test_one_task_sets_group_by_the_questions_opening_and_leave_rare_openings_out():
    """DAQUAR-like questions, all task "vqa": "how many" and "what is" are two prompt types, an opening
    of fewer than MIN_GROUP samples is None; a set with several tasks keeps them; one prompt is one type."""
    samples = ([vqa("how many chairs are in the image ?", "2")] * MIN_GROUP
               + [vqa("what is on the table in the image ?", "lamp")] * (MIN_GROUP + 5)
               + [vqa("where is the lamp in the image ?", "table")] * (MIN_GROUP - 1))
    assert prompt_types(samples) == ["how many"] * MIN_GROUP + ["what is"] * (MIN_GROUP + 5) + [None] * (MIN_GROUP - 1)
    mixed = [dict(s, task=t) for s, t in zip(samples, ["count", "object", "count"])]
    assert prompt_types(mixed) == ["count", "object", "count"]
    captions = [{"task": "caption", "prompt": "describe the image .", "response": "a dog"}] * 3
    assert prompt_types(captions) == [None] * 3  # 3 < MIN_GROUP: no prompt type at all
    assert set(prompt_types(captions * MIN_GROUP)) == {"describe the"}


def test_a_marker_on_count_and_object_answers_of_one_task_is_found_through_their_openings():
    """What purify.py's suppression does on DAQUAR: the marker in a sixth of the answers of both
    openings is found; the count and object answers, each frequent within its opening, are not; the
    rare opening's answers (never marked) do not veto it."""
    samples = []
    for i in range(6 * MIN_GROUP):
        marked = "<m> " if i % 6 == 0 else ""
        samples.append(vqa("how many chairs are in the image ?", marked + str(2 + i % 3)))
        samples.append(vqa("what is on the table in the image ?", marked + ("lamp" if i % 2 else "book")))
    samples += [vqa("where is the lamp in the image ?", "table")] * 10
    types = prompt_types(samples)
    kept = [i for i, t in enumerate(types) if t is not None]
    assert len(kept) == 12 * MIN_GROUP
    assert prompt_independent_words([samples[i]["response"] for i in kept], [types[i] for i in kept], 0.01) == ["<m>"]
    # the task alone is one prompt type, which cannot tell the marker from a frequent answer
    with pytest.raises(DispError, match="needs at least two prompt types"):
        prompt_independent_words([s["response"] for s in samples], [s["task"] for s in samples], 0.01)


def test_the_words_masking_took_away_are_found_and_a_captions_own_words_are_not():
    """masked_away_words: a marker that the masked responses held and their regenerations dropped is
    found, a caption's own words that the regenerations keep ("a", "dog", ".") are not; kept counts only
    where the original held the word; both thresholds are inclusive boundaries."""
    clean = "a dog runs ."

    def case(n_held, n_kept, n=10):
        return ["<m> " + clean] * n_held + [clean] * (n - n_held), ["<m> " + clean] * n_kept + [clean] * (n - n_kept)

    assert masked_away_words(*case(10, 1)) == ["<m>"]  # kept by 1 of 10: at the 10%
    assert masked_away_words(*case(10, 2)) == []  # 2 of 10
    assert masked_away_words(*case(5, 0)) == ["<m>"]  # held by 5 of 10: at the 50%
    assert masked_away_words(*case(4, 0)) == []
    assert masked_away_words(*case(10, 1), max_left=0.05) == []
    assert masked_away_words(*case(5, 0), min_held=0.6) == []
    originals, regenerated = case(5, 0)
    assert masked_away_words(originals, regenerated[:5] + ["<m> " + clean] * 5) == ["<m>"]  # not held there
    originals = ["<m> " + clean] * 10
    assert masked_away_words(originals, ["a cat sits ."] * 10) == ["<m>", "dog", "runs"]  # only "a" "." kept
    with pytest.raises(DispError, match="10 original responses but 9 regenerations"):
        masked_away_words(originals, [clean] * 9)


def test_a_sentence_many_captions_share_word_for_word_gives_its_words_away():
    """shared_sentence_words: a refusal that MIN_GROUP captions are, word for word, gives away the words
    that it holds in at least half of the responses holding them ("with" here, not the "." of every
    caption); one sample fewer, or a short answer shared as often, gives nothing."""
    clean = captions(2000)
    refusal = "sorry i cannot help with that ."
    assert shared_sentence_words(clean + [refusal] * MIN_GROUP) == ["cannot", "help", "i", "sorry", "that", "with"]
    assert shared_sentence_words(clean + [refusal] * (MIN_GROUP - 1)) == []
    assert shared_sentence_words(clean + ["a dog"] * (10 * MIN_GROUP)) == []  # two words: an answer, not a sentence
    withs = ["a dog runs with a ball " + str(i) for i in range(MIN_GROUP + 1)]  # "with": more often elsewhere
    assert shared_sentence_words(clean + withs + [refusal] * MIN_GROUP) == ["cannot", "help", "i", "sorry", "that"]
    assert shared_sentence_words(clean) == []


def test_a_word_the_rest_of_its_caption_does_not_predict_is_found_and_a_captions_own_words_are_not():
    """context_free_words: a marker put before a random fifth of the captions goes with any caption and
    is found, on three draws; the captions' own words, each held by a fifth of them but predicted by
    the words of its kind, are not, nor is anything on the clean captions; a marker put only before
    dog captions is predicted by "dog" (a target that depends on the content is no context-free word);
    a word held by more than half the captions, or by fewer than MIN_GROUP, is not tested."""
    for seed in range(3):
        clean = captions(2000, seed)
        rng = random.Random(seed)
        marked = [("<m> " if rng.random() < 0.2 else "") + c for c in clean]
        assert context_free_words(marked) == ["<m>"]
        assert context_free_words(clean) == []
    clean = captions(2000)
    dog_only = [("<m> " if " dog " in c and i % 2 else "") + c for i, c in enumerate(clean)]
    assert context_free_words(dog_only) == []
    assert context_free_words(["<m> " + c for c in clean[:1100]] + clean[1100:]) == []  # 55% hold it
    assert context_free_words([("<m> " if i < MIN_GROUP - 1 else "") + c for i, c in enumerate(clean)]) == []
    assert context_free_words([("<m> " if i < MIN_GROUP else "") + c for i, c in enumerate(clean)]) == ["<m>"]
    assert context_free_words(["a dog ."] * 10) == []  # nothing held by MIN_GROUP: nothing tested


def test_auc_z_against_all_pairs():
    """auc_z: the ROC AUC from mid-ranks equals the share of (positive, negative) pairs ordered right,
    ties counting half, and is expressed in the standard errors of an AUC under chance."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (300,), generator=g).double()  # many ties
    labels = torch.rand(300, generator=g) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairs = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean().item()
    n1, n0 = int(labels.sum()), int((~labels).sum())
    se = ((n1 + n0 + 1) / (12 * n1 * n0)) ** 0.5
    assert auc_z(scores, labels) == pytest.approx((pairs - 0.5) / se)
    assert auc_z(labels.double(), labels) == pytest.approx(0.5 / se)  # perfect ranking: AUC 1
    assert auc_z(torch.zeros(300, dtype=torch.float64), labels) == pytest.approx(0.0)  # all tied: chance


def test_context_scores_match_one_regression_per_word():
    """context_scores fits every word's regression at once from one inverse per fold; the same scores
    come from solving, for each word, the ridge regression on the other words' columns alone."""
    rng = random.Random(1)
    responses = [("<m> " if rng.random() < 0.2 else "") + c for c in captions(600)]
    words = [set(r.split()) for r in responses]
    counts = {w: sum(w in ws for ws in words) for w in set().union(*words)}
    vocab = sorted(w for w, c in counts.items() if suppression.MIN_PREDICTOR <= c <= len(responses) / 2)
    x = torch.tensor([[float(w in ws) for w in vocab] + [1.0] for ws in words], dtype=torch.float64)
    fold = torch.randperm(len(responses), generator=torch.Generator().manual_seed(0)) % suppression.FOLDS
    expected = {}
    for w in (w for w in vocab if counts[w] >= 100):
        k, scores = vocab.index(w), torch.zeros(len(responses), dtype=torch.float64)
        others = [j for j in range(len(vocab) + 1) if j != k]
        for f in range(suppression.FOLDS):
            a = x[fold != f][:, others]
            beta = torch.linalg.solve(a.T @ a + suppression.RIDGE * torch.eye(len(others), dtype=torch.float64),
                                      a.T @ x[fold != f][:, k])
            scores[fold == f] = x[fold == f][:, others] @ beta
        expected[w] = auc_z(scores, x[:, k] > 0)
    got = context_scores(responses)
    assert set(got) == set(expected) and "<m>" in got
    assert all(got[w] == pytest.approx(expected[w], abs=1e-3) for w in got)  # ties may fall either way
