"""SNARC salience: feature-vector channels; cross-sensor, outcome and content-vs-sensor
conflict; adaptive weights, confidence and stance. Uses the hashing embedder (the scenario
tests use MiniLM)."""

from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np
import pytest

from sage_ros.core.salience import (STANCE_CAUTIOUS, STANCE_CURIOUS, STANCE_FOCUSED,
                                    STANCE_ROUTINE, STANCE_SKEPTICAL, DIMENSIONS, Observation,
                                    SalienceParams, SalienceWeights, SnarcSalience, calm_assertion,
                                    ngram_embedder, project_weights)


def snarc(**params: float) -> SnarcSalience:
    return SnarcSalience(ngram_embedder(), SalienceParams(**params))  # type: ignore[arg-type]


def feat(*x: float, t: float = 0.0) -> Observation:
    return Observation(features=tuple(x), t=t, modality='image')


def test_the_embedder_is_injected_and_called_with_the_text() -> None:
    calls: List[Sequence[str]] = []
    embed = ngram_embedder()

    def counting(texts: Sequence[str]) -> np.ndarray:
        calls.append(list(texts))
        return embed(texts)
    s = SnarcSalience(counting)
    s.score('text', Observation('hello robot'))
    s.score('camera', feat(1.0, 2.0))
    assert calls == [['hello robot']]


def test_a_steady_feature_stream_is_unsurprising_and_a_jump_is_surprising() -> None:
    s = snarc()
    steady = [s.score('camera', feat(10.0 + 0.01 * (i % 3), 5.0, 1.0)) for i in range(30)]
    jump = s.score('camera', feat(-40.0, 90.0, 30.0))
    assert max(x.surprise for x in steady[10:]) < 0.2 < 0.9 < jump.surprise
    assert max(x.novelty for x in steady[10:]) < 0.05 and jump.novelty > 0.5
    assert jump.arousal > 0.9 > max(x.arousal for x in steady[10:])


def test_a_feature_vector_of_another_length_starts_a_new_memory() -> None:
    s = snarc()
    for _ in range(5):
        s.score('mic', feat(1.0, 1.0))
    other = s.score('mic', feat(1.0, 1.0, 1.0))
    assert other.novelty == 1.0 and other.surprise == 0.0


@pytest.mark.parametrize('obs', [
    Observation(), Observation(features=(math.nan, math.inf, -math.inf)),
    Observation(features=(1e300, -1e300)), Observation(text='x' * 10_000),
    Observation(text='hi', features=(math.nan,)), Observation(features=(0.0, 0.0)),
])
def test_any_observation_scores_in_the_unit_interval(obs: Observation) -> None:
    s = snarc()
    for _ in range(4):
        sc = s.score('s', obs)
        assert all(0.0 <= v <= 1.0 for v in (*sc.dims(), sc.total, sc.confidence))


def test_an_empty_observation_is_neutral() -> None:
    sc = snarc().score('s', Observation())
    assert sc.dims() == (0.0, 0.0, 0.0, 0.5, 0.0) and sc.confidence == 0.0


def test_sensors_that_usually_agree_conflict_when_one_jumps_alone() -> None:
    s = snarc(conflict_window_s=1.0)
    t = 0.0
    for i in range(20):
        t += 2.0
        a = s.score('camera', feat(1.0 + 0.01 * (i % 2), 1.0, t=t))
        b = s.score('lidar', feat(3.0, 1.0 + 0.01 * (i % 2), t=t + 0.1))
    assert max(a.conflict, b.conflict) < 0.2
    s.score('camera', feat(-50.0, 80.0, t=t + 2.0))
    calm_lidar = s.score('lidar', feat(3.0, 1.0, t=t + 2.1))
    assert calm_lidar.conflict > 0.5
    far = s.score('lidar', feat(3.0, 1.0, t=t + 50.0))   # nothing recent to disagree with
    assert far.conflict < 0.2


def test_one_sensor_alone_has_no_cross_sensor_conflict() -> None:
    s = snarc()
    for i in range(10):
        assert s.score('only', feat(float(i % 2) * 100, 1.0, t=float(i))).conflict == 0.0


def test_mixed_outcomes_for_the_same_input_are_conflict_and_make_the_kernel_skeptical() -> None:
    s = snarc()
    first = s.score('text', Observation('open the pod bay doors'))
    for value in (1.0, 0.0, 1.0, 0.0, 1.0, 0.0):
        s.record_outcome('text', first, value)
    again = s.score('text', Observation('open the pod bay doors'))
    assert again.conflict > 0.9 and again.stance == STANCE_SKEPTICAL
    s2 = snarc()
    first = s2.score('text', Observation('open the pod bay doors'))
    for _ in range(6):
        s2.record_outcome('text', first, 1.0)
    assert s2.score('text', Observation('open the pod bay doors')).conflict == 0.0


def test_weights_adapt_toward_dimensions_that_predicted_good_outcomes() -> None:
    s = snarc(weight_learning_rate=0.2)
    before = dict(zip(DIMENSIONS, s.weights))
    novel = s.score('text', Observation('a completely new topic'))   # novelty 1, surprise 0
    for _ in range(10):
        s.record_outcome('text', novel, 1.0)
    after = dict(zip(DIMENSIONS, s.weights))
    assert after['novelty'] > before['novelty'] and after['surprise'] < before['surprise']
    assert sum(s.weights) == pytest.approx(1.0)
    assert all(0.05 - 1e-9 <= w <= 0.5 + 1e-9 for w in s.weights)
    frozen = snarc(weight_learning_rate=0.0)
    w0 = frozen.weights
    frozen.record_outcome('text', frozen.score('text', Observation('x')), 1.0)
    assert frozen.weights == w0


def test_learned_weights_round_trip_through_export_and_restore() -> None:
    s = snarc(weight_learning_rate=0.3)
    sc = s.score('text', Observation('hello'))
    s.record_outcome('text', sc, 1.0)
    saved = s.export_state()
    fresh = snarc(weight_learning_rate=0.3)
    fresh.restore_state(saved)
    assert fresh.weights == pytest.approx(s.weights)
    fresh.restore_state({'weights': ['bad'] * 5})       # garbage is ignored
    assert fresh.weights == pytest.approx(s.weights)


def test_weight_projection_keeps_bounds_and_sum() -> None:
    w = project_weights([5.0, -3.0, 0.2, 0.2, math.nan], 0.05, 0.5)
    assert sum(w) == pytest.approx(1.0) and min(w) >= 0.05 - 1e-12 and max(w) <= 0.5 + 1e-12
    with pytest.raises(ValueError, match='weight_min'):
        SalienceParams(weight_min=0.3)


def test_confidence_grows_with_the_sensors_history() -> None:
    s = snarc(confidence_history=5)
    c = [s.score('text', Observation(f'reading {i}')).confidence for i in range(8)]
    assert c[0] == 0.0 and c[1] < c[4] and c[7] > 0.5


@pytest.mark.parametrize('dims, total, stance', [
    ((0.1, 0.1, 0.1, 0.5, 0.8), 0.3, STANCE_SKEPTICAL),
    ((0.1, 0.1, 0.9, 0.2, 0.0), 0.3, STANCE_CAUTIOUS),
    ((0.9, 0.9, 0.9, 0.5, 0.0), 0.7, STANCE_FOCUSED),
    ((0.1, 0.8, 0.1, 0.5, 0.0), 0.4, STANCE_CURIOUS),
    ((0.1, 0.1, 0.1, 0.5, 0.0), 0.2, STANCE_ROUTINE),
])
def test_stance_rules(dims: tuple, total: float, stance: str) -> None:
    assert snarc()._stance(dims, total) == stance


def test_setting_weights_replaces_the_learned_ones() -> None:
    s = snarc()
    s.set_weights(SalienceWeights(surprise=1.0, novelty=0.0, arousal=0.0, reward=0.0,
                                  conflict=0.0))
    assert s.weights[0] == pytest.approx(0.5) and sum(s.weights) == pytest.approx(1.0)


# ---- content against a sensor: "all clear" while the camera's motion spikes ------------------
def _camera(s: SnarcSalience, motion: float, t: float, source: str = 'camera') -> float:
    """One frame of a steady scene with `motion`; returns its conflict."""
    return s.score(source, Observation(features=(0.5, 0.5, 0.5, 0.5, motion), t=t,
                                       modality='image', motion=motion)).conflict


def _still_camera(s: SnarcSalience, frames: int = 10) -> None:
    for i in range(frames):
        _camera(s, 0.001 * (i % 2), float(i))


@pytest.mark.parametrize('text', ['all clear', 'All clear!', 'nothing here', 'no one is here',
                                  "There's nobody here.", 'the coast is clear',
                                  'Everything is fine', 'nothing is moving'])
def test_calm_assertions_are_recognised(text: str) -> None:
    assert calm_assertion(text) == 1.0


@pytest.mark.parametrize('text', ['hello robot', 'someone is at the door', 'it is not all clear',
                                  "it isn't all clear", 'clear the table', 'nothing', ''])
def test_other_words_and_negations_are_not_calm_assertions(text: str) -> None:
    assert calm_assertion(text) == 0.0


def test_all_clear_heard_while_the_camera_motion_spikes_is_a_conflict() -> None:
    s = snarc()
    _still_camera(s)
    _camera(s, 0.3, 10.0)                            # something moves
    heard = s.score('microphone', Observation('all clear, no one is here', t=11.0))
    assert heard.conflict >= 0.9 and heard.stance == STANCE_SKEPTICAL


def test_all_clear_with_a_still_camera_is_no_conflict() -> None:
    s = snarc()
    _still_camera(s)
    heard = s.score('microphone', Observation('all clear, no one is here', t=10.5))
    assert heard.conflict < 0.1


def test_other_words_during_motion_are_no_content_conflict() -> None:
    calm, other = snarc(), snarc()
    for s in (calm, other):
        _still_camera(s)
        _camera(s, 0.3, 10.0)
    c = calm.score('microphone', Observation('all clear', t=11.0)).conflict
    o = other.score('microphone', Observation('someone is at the door', t=11.0)).conflict
    assert c >= 0.9 and o < c - 0.3


def test_motion_after_the_words_is_the_conflict_of_the_frame() -> None:
    s = snarc()
    _still_camera(s)
    assert s.score('microphone', Observation('nothing here', t=10.0)).conflict < 0.1
    assert _camera(s, 0.3, 11.0) >= 0.9               # the frame that contradicts the words


def test_the_conflict_needs_both_within_the_window() -> None:
    s = snarc(conflict_window_s=2.0)
    _still_camera(s)
    _camera(s, 0.3, 10.0)
    assert s.score('microphone', Observation('all clear', t=20.0)).conflict < 0.1


def test_small_motion_never_contradicts_and_its_own_words_do_not_conflict() -> None:
    s = snarc(motion_min=0.05)
    _still_camera(s)
    _camera(s, 0.04, 10.0)             # far above the usual, but below the floor
    assert s.score('microphone', Observation('all clear', t=10.5)).conflict < 0.1
    both = snarc()
    _still_camera(both)
    # One sensor's own motion and words are not two sensors disagreeing.
    both.score('camera', Observation('all clear', features=(0.5, 0.5, 0.5, 0.5, 0.3), t=10.0,
                                     modality='image', motion=0.3))
    assert both.score('camera', Observation('all clear', t=10.5)).conflict < 0.5
