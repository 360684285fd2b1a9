"""Fact extraction (a table of statements and non-statements) and the merge/update decisions:
values decide where the cosine cannot, and the real MiniLM cosine for paraphrases (slow)."""

from __future__ import annotations

from typing import List, Tuple

import pytest

from sage_ros.core.memory.facts import (Candidate, Fact, FactThresholds, change_cue,
                                        changed_fact, clarity, decide, extract,
                                        normalise_numbers, parse, same_fact, topics,
                                        value_tokens)

# text -> (category, subject, value, person) of the first fact
EXTRACTED: List[Tuple[str, Tuple[str, str, str, str]]] = [
    ('my sister Anna lives in Lyon', ('person', 'anna home', 'lyon', 'Anna')),
    ('The charger is in room 4.', ('object', 'charger location', 'room 4', '')),
    ("You'll find the charger in room four.", ('object', 'charger location', 'room 4', '')),
    ('Room 4 is where the charger is kept.', ('object', 'charger location', 'room 4', '')),
    ('I moved the charger to room 7.', ('object', 'charger location', 'room 7', '')),
    ('I take my pills at 8 am', ('routine', 'medicine time', '08:00', '')),
    ('My pills are at eight in the morning.', ('routine', 'medicine time', '08:00', '')),
    ('Every evening at 7 I walk the dog.', ('routine', 'walk dog time', 'evening 19:00', '')),
    ('call me Sam', ('person', 'user name', 'sam', 'Sam')),
    ('My name is Sam.', ('person', 'user name', 'sam', 'Sam')),
    ('Tom is my brother', ('person', 'brother name', 'tom', 'Tom')),
    ('remember that the spare keys are under the blue mat',
     ('object', 'spare key location', 'blue mat', '')),
    ('The kitchen is on the second floor.', ('place', 'kitchen location', 'floor 2', '')),
    ('My favourite colour is green.', ('person', 'favorite color', 'green', '')),
    ("The wifi password is 'tulip42'.", ('other', 'wifi password', 'tulip42', '')),
    ('Anna moved to Paris.', ('person', 'anna home', 'paris', 'Anna')),
    ('Actually, the charger is now in room 7', ('object', 'charger location', 'room 7', '')),
    ("Anna's birthday is in June", ('person', 'anna birthday', 'june', 'Anna')),
    ('May 3 is my birthday.', ('person', 'birthday', 'may 3', '')),
]

NOT_FACTS = ['Where is the charger?', 'hello, how are you?', 'Thanks, that was great!',
             'What time do I take my pills', 'Can you help me tidy the desk?',
             'The weather is nice today.', 'ok', 'Tell me a joke.', 'Do you remember Anna?']


@pytest.mark.parametrize('text,expected', EXTRACTED)
def test_extracts_category_subject_value_person(text: str,
                                                expected: Tuple[str, str, str, str]) -> None:
    found = extract(text)
    assert found, text
    f = found[0]
    assert (f.category, f.subject, f.value, f.person) == expected
    assert f.text.endswith('.') and f.text[0].isupper()
    assert not f.text.lower().startswith(('remember', 'actually'))


@pytest.mark.parametrize('text', NOT_FACTS)
def test_questions_and_chit_chat_are_not_facts(text: str) -> None:
    assert extract(text) == []


def test_several_sentences_give_several_facts_and_are_deterministic() -> None:
    text = 'Hi! My sister Anna lives in Lyon. Where are you? The charger is in room 4.'
    first = extract(text)
    assert [f.subject for f in first] == ['anna home', 'charger location']
    assert extract(text) == first


def test_values_are_typed_and_normalised() -> None:
    assert normalise_numbers('room four, the second floor') == 'room 4, the floor 2'
    assert value_tokens('at 8 pm') == {'t:20:00'}
    assert value_tokens('at eight in the evening') == {'t:20:00', 'd:evening'}
    assert value_tokens('The door code is 4521') == {'n:4521'}
    assert value_tokens('My aunt Rose') == {'p:rose', 'r:aunt'}
    assert 'd:tuesday' in value_tokens('every Tuesday')


def _f(text: str) -> Fact:
    return extract(text)[0]


def test_same_subject_and_value_merge_even_at_low_cosine() -> None:
    a, b = _f('The charger is in room 4.'), _f('Room 4 is where the charger is kept.')
    assert same_fact(a, b, 0.5) and not changed_fact(a, b, 0.5)


def test_other_value_is_an_update_never_a_merge_however_close() -> None:
    a, b = _f('The charger is in room 4.'), _f('The charger is now in room 7.')
    assert not same_fact(a, b, 0.99)
    assert changed_fact(a, b, 0.99)
    a, b = _f('I take my pills at 8 am.'), _f('I take my pills at 9 am now.')
    assert changed_fact(a, b, 0.95) and not same_fact(a, b, 0.95)


def test_other_person_or_attribute_is_neither() -> None:
    pairs = [('My grandmother Rose lives in Dublin.', 'My aunt Rose lives in Dublin.'),
             ('My son Leo lives in Berlin.', 'My son Leo works in Berlin.'),
             ('My sister Anna lives in Lyon.', 'My brother Tom lives in Lyon.'),
             ('The door code is 4521.', 'The alarm code is 4521.')]
    for x, y in pairs:
        a, b = _f(x), _f(y)
        assert not same_fact(a, b, 0.85), (x, y)
        assert not changed_fact(a, b, 0.85), (x, y)


def test_unrecognised_facts_use_the_cosine_and_the_values() -> None:
    a = parse('We met Tom at the station in Leeds.')
    b = parse('We met Tom at the station in York.')
    assert a.subject == '' and b.subject == ''
    assert not same_fact(a, b, 0.95)
    assert changed_fact(a, b, 0.95)
    assert same_fact(a, parse('We met Tom at the Leeds station.'), 0.9)
    assert not same_fact(a, parse('We met Tom at the Leeds station.'), 0.5)


def test_thresholds_are_checked_and_nan_never_merges() -> None:
    with pytest.raises(ValueError):
        FactThresholds(merge_similarity=2.0)
    a = _f('The charger is in room 4.')
    assert not same_fact(a, a, float('nan')) and not changed_fact(a, a, float('nan'))


def test_decide_prefers_a_paraphrase_then_a_change_then_adds() -> None:
    new = _f('You will find the charger in room 4.')
    old_value = Candidate(1, _f('The charger is in room 7.'), 0.97)
    same = Candidate(2, _f('The charger is in room 4.'), 0.9)
    other = Candidate(3, _f('The kitchen is on the second floor.'), 0.3)
    assert decide(new, [old_value, same, other]).action == 'merge'
    assert decide(new, [old_value, same]).target == 2
    update = decide(new, [old_value, other])
    assert (update.action, update.target) == ('update', 1)
    assert decide(new, [other]).action == 'add'
    assert decide(new, []).action == 'add'


def test_clarity_prefers_values_without_hedges() -> None:
    assert clarity('The charger is in room 4.') > clarity('I think maybe the charger is '
                                                          'kind of somewhere around there.')


@pytest.mark.slow
def test_real_minilm_merges_paraphrases_and_keeps_near_misses_apart() -> None:
    from sage_ros.core.embeddings import SentenceEmbedder
    emb = SentenceEmbedder()

    def decision(x: str, y: str) -> Tuple[bool, bool]:
        a, b = _f(x), _f(y)
        v = emb.embed([a.text, b.text])
        sim = float(v[0] @ v[1])
        return same_fact(a, b, sim), changed_fact(a, b, sim)

    assert decision('My sister Anna lives in Lyon.', 'Anna, my sister, lives in Lyon.') == \
        (True, False)
    assert decision('I walk the dog every day at 7 pm.', 'Every evening at 7 I walk the dog.') \
        == (True, False)
    assert decision('The TV remote is on the bookshelf.',
                    'The remote control is on the bookshelf.')[0]
    assert decision('I drink coffee at 7 am.', 'I drink tea at 7 am.') == (False, False)
    assert decision('The charger is in room 4.', 'The charger is now in room 7.') == \
        (False, True)




# Changes told the way people tell them (from the 'natural' section of paraphrases.jsonl).
NATURAL_CHANGES = [
    ('The printer is in room 12.', "They moved the printer, it's in room 15 now."),
    ('My bike is a red Peugeot.', 'I got rid of the Peugeot and bought a black Trek.'),
    ('The gardener, Marco, comes on Mondays.', 'Marco switched to Wednesdays from now on.'),
    ('My dentist is called Dr Kim.', 'Dr Kim retired, my new dentist is Dr Laurent.'),
    ("Grandma's nap time is two o'clock.", 'Grandma naps at three now that she wakes up later.'),
    ('I walk the dog at 7 in the morning.',
     "The vet told me to move the dog's walk to 6 in the evening."),
    ('I drink my tea with milk.', "I've started drinking my tea with lemon."),
]
# Change words, but about something else: another owner, another object, a possessor only.
CHANGE_WORD_NEAR_MISSES = [
    ('My boss is Karen.', "My sister's new boss is Luis."),
    ("Leo's swimming lesson is at four o'clock.", "Mia's swimming lesson is at five now."),
    ('My car is a red Fiat.', 'My brother sold his car and bought a van.'),
    ('The printer is in room 12.', "They replaced the printer's toner cartridge."),
    ('The printer is in room 12.', "They moved the scanner, it's in room 15 now."),
    ('The spare blanket is in the hall closet.', 'I moved the ironing board to the hall closet.'),
]


@pytest.mark.parametrize('old,new', NATURAL_CHANGES)
def test_a_change_in_natural_speech_is_an_update(old: str, new: str) -> None:
    a, b = _f(old), _f(new)
    assert changed_fact(a, b, 0.6) and not same_fact(a, b, 0.6), (old, new)


def test_a_change_cue_needs_the_cosine_too() -> None:
    a, b = _f('The gardener, Marco, comes on Mondays.'), _f('Marco switched to Wednesdays.')
    assert changed_fact(a, b, 0.6) and not changed_fact(a, b, 0.3)


@pytest.mark.parametrize('old,new', CHANGE_WORD_NEAR_MISSES)
def test_change_words_about_something_else_are_neither(old: str, new: str) -> None:
    a, b = _f(old), _f(new)
    assert not changed_fact(a, b, 0.6) and not same_fact(a, b, 0.6), (old, new)


def test_rhetorical_frames_asides_and_clock_phrases() -> None:
    f = _f('Did I mention that my son Leo is based in Berlin?')
    assert (f.subject, f.value, f.text) == ('leo home', 'berlin', 'My son Leo is based in Berlin.')
    assert extract('Did you move the charger?') == []            # a real question
    assert _f('Everyone calls me Maggie, nobody says Margaret.').value == 'maggie'
    assert _f('The ironing board is kept in the utility room, just so you know.').text == \
        'The ironing board is kept in the utility room.'
    assert value_tokens('at half past seven') == {'t:07:30'}
    assert value_tokens('at quarter to eight in the evening') >= {'t:19:45'}


def test_topics_are_head_noun_phrases_with_their_owner() -> None:
    assert topics("My sister's new boss is Luis.") == [('*', frozenset({'sister'})),
                                                       ('sister', frozenset({'boss'}))]
    assert ('', frozenset({'printer'})) in topics("They moved the printer, it's in room 15.")
    assert ('brother', frozenset({'car'})) in topics('My brother sold his car.')
    assert topics('The charger is in the kitchen.') == [('', frozenset({'charger'}))]
    assert change_cue('We moved your dock.') and not change_cue('The dock is in the hall.')
