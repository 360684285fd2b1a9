"""Shortened answers: cut back to the last sentence end, never mid-sentence."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sage_ros.core.answers import cut_to_sentence, length_hint


@pytest.mark.parametrize('text,expected', [
    # the case: a numbered list cut in its fifth item
    ('Steps:\n1. Clear the desk.\n2. Sort the pens.\n5. **Test the Routine',
     'Steps:\n1. Clear the desk.\n2. Sort the pens.'),
    ('Hello there. How are', 'Hello there.'),
    ('It costs 2.5 dollars. And then', 'It costs 2.5 dollars.'),
    ('He said "yes." Then the', 'He said "yes."'),
    ('Really?! I did not', 'Really?!'),
    ('**Done.** Next we', '**Done.**'),
    ('First line without a stop\nsecond line cut mid', 'First line without a stop'),
    ('好的。我们', '好的。'),
])
def test_cut_back_to_the_last_sentence_end(text: str, expected: str) -> None:
    assert cut_to_sentence(text) == (expected, True)


@pytest.mark.parametrize('text', ['no sentence end at all', '1. Clear', 'Done!', 'Done.  ',
                                  'See 2.5 and', ''])
def test_nothing_to_cut_back_to_keeps_the_text(text: str) -> None:
    cut, shortened = cut_to_sentence(text)
    assert cut == text.rstrip() and not shortened


@given(st.text(alphabet=st.sampled_from(list('ab .!?\n1"')), max_size=60))
def test_the_cut_is_a_prefix_of_what_streamed(text: str) -> None:
    cut, shortened = cut_to_sentence(text)
    assert text.startswith(cut)
    assert shortened == (len(cut) < len(text.rstrip()))


def test_the_length_hint_names_a_word_budget() -> None:
    assert '70 words' in length_hint(100) and 'complete sentence' in length_hint(100)
    assert '5 words' in length_hint(1)
