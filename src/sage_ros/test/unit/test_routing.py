"""Complexity routing: the keyword heuristic, the text features, and the router's structure and
behaviour with a cheap deterministic embedder (the real MiniLM is in test_routing_minilm.py)."""

from __future__ import annotations

import math
import re
import zlib
from pathlib import Path
from typing import List, Sequence

import numpy as np
import pytest

from sage_ros.core.routing import (CLASSES, FEATURE_NAMES, Complexity, ComplexityRouter,
                                   LabelledPrompt, RoleMap, estimate_complexity, feature_matrix,
                                   is_held_out, keyword_complexity, load_prompts, prompt_features,
                                   split_prompts)

DIM = 128


class HashedBagOfWords:
    """Deterministic stand-in for MiniLM: hashed word and word-pair counts, unit-normalised.
    Counts its calls so tests can see what the router embeds."""

    def __init__(self) -> None:
        self.calls: List[List[str]] = []

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        out = np.zeros((len(texts), DIM))
        for row, text in enumerate(texts):
            words = re.findall(r"[a-z']+", text.lower()) or ['<empty>']
            for gram in words + [a + ' ' + b for a, b in zip(words, words[1:])]:
                out[row, zlib.crc32(gram.encode()) % DIM] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def lp(label: str, text: str) -> LabelledPrompt:
    return LabelledPrompt(text, Complexity(label), held_out=False)


TOY = [lp('simple', t) for t in ('hello there', 'where are my keys', 'stop now', 'thank you',
                                 'what time is it', 'turn left')] + \
      [lp('moderate', t) for t in ('go to the kitchen and bring me a cup of water',
                                   'check the back door and tell me if it is locked',
                                   'describe what is on the kitchen table for me',
                                   'remind me at eight and again at nine if I forget',
                                   'fold the towels then put them in the cupboard',
                                   'tell me who visited today and when they left')] + \
      [lp('complex', t) for t in (
          'work out a cleaning schedule that fits around everyone, given the battery limits',
          'how would you search a three storey house for a lost ring, and in what order?',
          'suggest a fair rota for chores among four people with different shifts',
          'what are the risks of letting you open the door, and how should we reduce each?',
          'compare docking in the hall versus the lounge for coverage, noise and safety',
          'decide which samples to save first if the freezer fails and justify it')]


@pytest.fixture(scope='module')
def router() -> ComplexityRouter:
    return ComplexityRouter.from_dataset(embedder=HashedBagOfWords())


# --- keyword heuristic and role map -------------------------------------------------------

def test_keyword_heuristic_is_kept_as_the_baseline() -> None:
    assert keyword_complexity is estimate_complexity
    assert estimate_complexity('hello') is Complexity.SIMPLE
    assert estimate_complexity('Where are my keys?') is Complexity.SIMPLE
    assert estimate_complexity('Why did you stop?') is Complexity.COMPLEX  # its known weakness
    assert estimate_complexity('Go to the kitchen and bring me a cup.') is Complexity.MODERATE
    assert estimate_complexity(' '.join(['word'] * 51)) is Complexity.COMPLEX
    assert estimate_complexity('') is Complexity.SIMPLE


def test_role_map_and_parse() -> None:
    roles = RoleMap(simple='tiny', moderate='small', complex='large')
    assert [roles.role_for(c) for c in CLASSES] == ['tiny', 'small', 'large']
    assert Complexity.parse(' Complex ') is Complexity.COMPLEX
    with pytest.raises(ValueError, match='unknown complexity'):
        Complexity.parse('hard')


# --- features -----------------------------------------------------------------------------

def test_features_have_a_fixed_order_and_plain_values() -> None:
    f = prompt_features('Where are my keys?')
    assert tuple(f) == FEATURE_NAMES
    assert f['question'] == 1 and f['short_fact_question'] == 1 and f['imperative'] == 0
    assert f['log_words'] == pytest.approx(math.log1p(4))
    m = feature_matrix(['Stop.', 'Where are my keys?'])
    assert m.shape == (2, len(FEATURE_NAMES)) and m[1].tolist() == list(f.values())
    assert feature_matrix([]).shape == (0, len(FEATURE_NAMES))


def test_features_see_commands_structure_and_deliberation() -> None:
    errand = prompt_features('Please go to the kitchen, grab a cup and then bring it to me.')
    assert errand['imperative'] == 1 and errand['clause_marks'] == 1
    assert errand['sequence'] == 2 and errand['question'] == 0  # 'and', 'then'
    plan = prompt_features('How would you work out a fair schedule if the lift is broken, '
                           'and which is better: stairs or waiting?')
    assert plan['how_modal'] == 1 and plan['conditions'] == 1 and plan['contrasts'] == 1
    assert plan['deliberative'] >= 4  # 'work out', 'schedule', 'better', 'how would'
    assert plan['short_fact_question'] == 0  # a question, but neither short nor factual
    assert prompt_features('How many chairs are there?')['how_modal'] == 0
    assert prompt_features('Take 3 tubes to room 204 at ten.')['numbers'] == 3
    assert prompt_features('Hello robot!')['greeting'] == 1
    assert prompt_features('Why is the fan on?')['why'] == 1
    assert prompt_features('Design it.')['keyword_heuristic'] == 1.0  # the baseline as input


def test_features_of_empty_text_are_zero() -> None:
    f = prompt_features('  ')
    assert all(v == 0 for v in f.values())


# --- router with a fake embedder ----------------------------------------------------------

def test_router_trains_on_the_training_split_only(router: ComplexityRouter) -> None:
    training, held_out = split_prompts(load_prompts())
    assert [p.text for p in router.exemplars] == [p.text for p in training]
    assert not any(p.held_out for p in router.exemplars) and held_out


def test_scores_are_probabilities_and_classify_is_their_argmax(router: ComplexityRouter) -> None:
    texts = ['hi', 'Bring me the red cup from the kitchen.',
             'How should we split the chores fairly between three people on shifts?']
    for text, scores in zip(texts, router.score_many(texts)):
        assert list(scores) == list(CLASSES)
        assert all(0.0 <= v <= 1.0 for v in scores.values())
        assert sum(scores.values()) == pytest.approx(1.0)
        assert router.classify(text) is max(scores, key=scores.__getitem__)
        assert router(text) is router.classify(text)  # usable wherever estimate_complexity is
    assert router.score_many([]) == [] and router.classify_many([]) == []


def test_a_labelled_prompt_gets_its_label_whatever_its_case_and_punctuation(
        router: ComplexityRouter) -> None:
    for p in router.exemplars[::7]:
        variant = '  ' + p.text.upper().rstrip('.?!') + ' !'
        assert router.classify(variant) is p.label, p.text
        assert router.scores(variant)[p.label] == 1.0
        assert router.explain(p.text)['exemplar_label'] == p.label.value
    held_out = split_prompts(load_prompts())[1]
    assert all(router.explain(p.text)['exemplar_label'] is None for p in held_out[:10])


def test_conflicting_exemplar_labels_are_refused() -> None:
    with pytest.raises(ValueError, match='labelled both'):
        ComplexityRouter(TOY + [lp('complex', 'Hello there!')], HashedBagOfWords())


def test_features_and_bag_of_words_already_beat_the_heuristic_on_held_out(
        router: ComplexityRouter) -> None:
    """The router's non-embedding half, on prompts it never saw (measured: 0.89 vs 0.40)."""
    held_out = split_prompts(load_prompts())[1]
    predicted = router.classify_many([p.text for p in held_out])
    accuracy = np.mean([c is p.label for c, p in zip(predicted, held_out)])
    baseline = np.mean([estimate_complexity(p.text) is p.label for p in held_out])
    assert accuracy >= 0.75 and accuracy >= baseline + 0.2, (accuracy, baseline)


def test_identical_prompt_takes_the_exemplar_label_on_a_toy_set() -> None:
    toy = ComplexityRouter(TOY, HashedBagOfWords(), neighbours=3)
    for p in TOY:
        assert toy.classify(p.text) is p.label, p.text


def test_router_generalises_beyond_the_exemplars_on_a_toy_set() -> None:
    toy = ComplexityRouter(TOY, HashedBagOfWords(), neighbours=3)
    assert toy.classify('hello robot') is Complexity.SIMPLE
    assert toy.classify('work out a fair schedule for the chores, given the shifts') \
        is Complexity.COMPLEX


def test_training_is_deterministic() -> None:
    a = ComplexityRouter(TOY, HashedBagOfWords(), neighbours=3)
    b = ComplexityRouter(list(TOY), HashedBagOfWords(), neighbours=3)
    text = 'go and check the stove, then tell me'
    assert a.scores(text) == b.scores(text)


def test_explain_shows_each_component(router: ComplexityRouter) -> None:
    exemplar = router.exemplars[0]
    details = router.explain(exemplar.text, nearest=4)
    assert details['complexity'] == router.classify(exemplar.text).value
    assert set(details['scores']) == {c.value for c in CLASSES}
    assert sum(details['neighbour_vote'].values()) == pytest.approx(1.0)
    assert set(details['centroid_similarity']) == set(details['scores'])
    assert tuple(details['features']) == FEATURE_NAMES
    assert details['keyword_heuristic'] == estimate_complexity(exemplar.text).value
    nearest = details['nearest']
    assert len(nearest) == 4 and nearest[0]['prompt'] == exemplar.text
    assert nearest[0]['label'] == exemplar.label.value
    assert nearest[0]['similarity'] == pytest.approx(1.0)
    sims = [n['similarity'] for n in nearest]
    assert sims == sorted(sims, reverse=True)


def test_text_without_words_is_simple(router: ComplexityRouter) -> None:
    assert router.classify('') is Complexity.SIMPLE
    assert router.classify(' ?! ') is Complexity.SIMPLE


def test_embedder_is_injected_and_batched() -> None:
    embedder = HashedBagOfWords()
    toy = ComplexityRouter(TOY, embedder, neighbours=3)
    assert embedder.calls == [[p.text for p in TOY]]  # the exemplars, once, in one batch
    toy.classify_many(['a', 'b'])
    assert embedder.calls[-1] == ['a', 'b']


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match='at least 2 exemplars'):
        ComplexityRouter([p for p in TOY if p.label is not Complexity.COMPLEX][:8]
                         + [TOY[-1]], HashedBagOfWords())
    with pytest.raises(ValueError, match='neighbours'):
        ComplexityRouter(TOY, HashedBagOfWords(), neighbours=len(TOY))
    with pytest.raises(ValueError, match='vote_temperature'):
        ComplexityRouter(TOY, HashedBagOfWords(), vote_temperature=0.0)
    with pytest.raises(ValueError, match='embedder returned shape'):
        ComplexityRouter(TOY, lambda texts: np.ones((len(texts) + 1, 8)))


def test_embeddings_are_renormalised() -> None:
    """A sloppy embedder (not unit-norm) routes exactly like its normalised self."""
    base = HashedBagOfWords()
    scaled = ComplexityRouter(TOY, lambda t: base(t) * 7.5, neighbours=3)
    unit = ComplexityRouter(TOY, HashedBagOfWords(), neighbours=3)
    text = 'tell me who called and what they wanted'
    for c in CLASSES:
        assert scaled.scores(text)[c] == pytest.approx(unit.scores(text)[c])


def test_from_dataset_reads_another_file(tmp_path: Path) -> None:
    path = tmp_path / 'toy.tsv'
    path.write_text('# toy\n' + ''.join(f'{p.label.value}\t{p.text}\n' for p in TOY))
    toy = ComplexityRouter.from_dataset(path, HashedBagOfWords(), neighbours=3)
    assert [p.text for p in toy.exemplars] == [p.text for p in TOY if not is_held_out(p.text)]
    assert 0 < len(toy.exemplars) < len(TOY)
