"""Answer options of multiple-choice prompts and their similarity (input of the scorer's embedding head)."""

from __future__ import annotations

import numpy as np
import pytest

from policies.difficulty import similarities_from
from policies.prompt_choices import MAX_OPTION_CHARS, choice_overlap, choice_similarity, split_choices

MMLU = "Which organ filters blood?\nA. Heart\nB. Kidney\nC. Lung\nD. Stomach\nAnswer:"


def test_an_mmlu_prompt_splits_into_stem_and_its_four_options() -> None:
    assert split_choices(MMLU) == ("Which organ filters blood?", ("Heart", "Kidney", "Lung", "Stomach"))


def test_options_may_span_lines_and_the_answer_cue_is_optional() -> None:
    text = "Read the passage.\nIt says A. nothing.\nQ?\nA. first line\nstill the first\nB. second"
    stem = "Read the passage.\nIt says A. nothing.\nQ?"
    assert split_choices(text) == (stem, ("first line\nstill the first", "second"))


@pytest.mark.parametrize("text", [
    "Write me a poem about GPUs.",  # a chat request: no options
    "Pick one\nA. yes\nAnswer:",  # a single option
    "Pick one\nA. yes\nC. no\nAnswer:",  # a gap in the letters
])
def test_prompts_without_a_lettered_option_list_have_none(text: str) -> None:
    assert split_choices(text) is None


def test_similarity_is_max_mean_min_over_pairs_of_options() -> None:
    e = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # two identical options, one orthogonal
    assert choice_similarity(e) == pytest.approx((1.0, 1 / 3, 0.0))
    with pytest.raises(ValueError):
        choice_similarity(e[:1])


def test_similarity_rows_follow_the_prompts_and_are_nan_without_options() -> None:
    options = [split_choices(MMLU), None, split_choices("Q\nA. x\nB. y")]
    vectors = np.array([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0], [0.6, 0.8], [0.6, 0.8]])
    rows = similarities_from(options, vectors)
    assert rows[0] == pytest.approx((1.0, 1 / 3, 0.0))
    assert np.isnan(rows[1]).all()
    assert rows[2] == pytest.approx((1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        similarities_from(options, vectors[:5])


def test_overlap_is_jaccard_of_character_trigrams_and_reads_a_bounded_prefix_of_each_option() -> None:
    assert choice_overlap(("abc", "abc")) == (1.0, 1.0, 1.0)
    assert choice_overlap(("abc", "xyz"))[1] == 0.0
    assert choice_overlap(("The  Cat", "the cat")) == (1.0, 1.0, 1.0)  # case and spacing folded
    head = "mitochondria " * 80
    long_tail = (head + "x" * 100_000, head + "y" * 100_000)
    assert choice_overlap(long_tail) == choice_overlap(tuple(o[:MAX_OPTION_CHARS] for o in long_tail))
