"""Suppression's selection: the words every prompt type's responses hold, on hand-made responses."""

import pytest

from disp.suppression import prompt_independent_words
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
