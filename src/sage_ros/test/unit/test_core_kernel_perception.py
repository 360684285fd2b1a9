"""The kernel's hearing and seeing without ROS: audio and image features scored per source
(not queued), a transcript continuing its turn, heard sources counted as people, perception
ATP, wake words, the visual context given to language goals, the vision-turn rate limit and
samples that wait for the perception block."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from sage_ros.core.blocks import BlockDescriptor, BlockRegistry, BlockType
from sage_ros.core.kernel import (ACTION_LANGUAGE, HearingParams, Kernel, KernelConfig,
                                  VisionParams, WorkResult, config_params, config_with)
from sage_ros.core.metabolism import MetabolicState
from sage_ros.core.percepts import (VISION_TURN_CONTEXT, VisionTurnGate, VisualContext,
                                    WaitingSamples, vision_turn_text, wake_word)
from sage_ros.core.salience import Observation, SnarcSalience, ngram_embedder
from test_core_kernel_dream import dreaming


def kernel(**changes: Any) -> Kernel:
    reg = BlockRegistry()
    reg.update(BlockDescriptor('language', BlockType.MONOLITHIC, ('conversation',), ('text',),
                               '/sage/blocks/language', ACTION_LANGUAGE, True))
    base = {'metabolism.circadian_period_s': 0.0, 'metabolism.min_dwell_s': 0.0, **changes}
    return Kernel(SnarcSalience(ngram_embedder()), config_with(KernelConfig(), base), reg)


def audio(t: float, level: float = 0.3) -> Observation:
    return Observation(features=(level, level + 0.1, 0.4, 0.2, 0.5, 0.8), t=t, modality='audio')


def frame(t: float, motion: float) -> Observation:
    f = np.full(8, 1 / np.sqrt(8))
    return Observation(features=tuple(f) + (motion,), t=t, modality='image', motion=motion)


# ---- scoring ---------------------------------------------------------------------------------
def test_audio_and_image_features_are_scored_per_source_and_not_queued() -> None:
    k = kernel()
    a = k.observe('microphone', audio(0.0), 0.0, 'microphone/1')
    v = k.observe('camera', frame(0.0, 0.0), 0.0, 'camera/1')
    v2 = k.observe('camera', frame(0.1, 0.0), 0.1, 'camera/2')
    for obs in (a, v, v2):
        assert obs.score is not None and obs.rejection is None and obs.text == ''
    assert a.score is not None and v.score is not None and v2.score is not None
    assert a.score.novelty == 1.0 and v.score.novelty == 1.0     # each source's first
    assert v2.score.novelty < 0.1                                # the camera has seen it
    assert (a.observation_id, v.observation_id) == ('microphone/1', 'camera/1')
    assert k.pending == {} and k.cycle(0.2).dispatches == ()
    assert k.snapshot(0.2).observations_total == 3


def test_a_moving_frame_is_more_salient_than_a_still_one() -> None:
    k = kernel()
    for i in range(10):
        k.observe('camera', frame(float(i), 0.0), float(i))
    still = k.observe('camera', frame(10.0, 0.0), 10.0).score
    moving = k.observe('camera', frame(11.0, 0.4), 11.0).score
    assert still is not None and moving is not None
    assert moving.total > still.total and moving.surprise > still.surprise


def test_a_transcript_continues_its_turn_and_is_dispatched_as_text() -> None:
    k = kernel()
    heard = k.observe('microphone', audio(0.0), 0.0, 'microphone/7')
    words = k.observe('microphone', 'hello robot', 0.5, 'microphone/7', turn_id=heard.turn_id)
    assert words.turn_id == heard.turn_id and words.observation_id == 'microphone/7'
    (d,) = k.cycle(0.5).dispatches
    assert (d.turn_id, d.text, d.sensor_id) == (heard.turn_id, 'hello robot', 'microphone')
    assert k.snapshot(0.5).observations_total == 1           # one utterance, one observation
    assert k.observe('text', 'next', 1.0).turn_id == heard.turn_id + 1


def test_heard_sources_are_people_as_hearing_people_says() -> None:
    k = kernel(**{'hearing.people': ['microphone']})
    assert not k.is_person('microphone')            # not heard yet: a text source
    k.observe('microphone', audio(0.0), 0.0)
    k.observe('file:x.wav', audio(0.0), 0.0)
    assert k.is_person('microphone') and not k.is_person('file:x.wav')
    assert k.is_person('console')                   # `people` still counts
    everyone = kernel()                             # hearing.people ['*']
    everyone.observe('file:x.wav', audio(0.0), 0.0)
    assert everyone.is_person('file:x.wav') and not everyone.is_person('camera')


@pytest.mark.parametrize('people, answered', [(['*'], True), (['none'], False)])
def test_a_heard_person_is_answered_in_dream(people: Any, answered: bool) -> None:
    k = dreaming(**{'hearing.people': people})
    k.scorer.table[''] = 0.2       # type: ignore[attr-defined]  # the utterance's sound
    heard = k.observe('microphone', audio(12.0), 12.0)
    k.observe('microphone', 'hi', 12.0, turn_id=heard.turn_id)
    out = k.cycle(12.0)
    assert k.state is MetabolicState.DREAM
    if answered:
        (d,) = out.dispatches
        assert d.turn_id == heard.turn_id and 'a person, answered in DREAM' in d.reason
    else:
        assert out.dispatches == () and 'DREAM defers' in dict(out.deferred)[heard.turn_id]


def test_perception_reserves_one_run_and_charges_it_only_when_run() -> None:
    k = kernel(**{'atp.per_run': 2.0, 'atp.min_grant': 3.0})
    level = k.ledger.level
    grant = k.reserve_perception(0.0)
    assert grant is not None
    assert grant == pytest.approx(2.0) and k.ledger.reserved == pytest.approx(2.0)
    assert k.settle_perception(grant, True, 0.0) == pytest.approx(2.0)
    assert k.ledger.level == pytest.approx(level - 2.0) and k.ledger.reserved == 0.0
    grant = k.reserve_perception(0.0)
    assert grant is not None and k.settle_perception(grant, False, 0.0) == 0.0
    assert k.ledger.level == pytest.approx(level - 2.0)


def test_perception_waits_when_atp_cannot_pay_a_run() -> None:
    k = kernel()
    k.observe('text', 'drain', 0.0)
    (d,) = k.cycle(0.0).dispatches
    k.complete(d.turn_id, WorkResult(True, completion_tokens=1_000_000), 0.0)   # overran
    assert k.ledger.available < k.config.atp.per_run
    assert k.reserve_perception(0.0) is None


def test_hearing_and_vision_are_documented_parameters() -> None:
    names = {n for n, _ in config_params(KernelConfig())}
    assert {'hearing.people', 'hearing.wake_words', 'vision.perceive_salience',
            'vision.turn_salience', 'vision.min_turn_period_s', 'vision.context_s',
            'salience.motion_min', 'salience.motion_sd_floor'} <= names
    c = config_with(KernelConfig(), {'hearing.wake_words': ['none'],
                                     'hearing.people': ['none']})
    assert c.hearing == HearingParams(people=(), wake_words=())
    assert config_with(KernelConfig(), {'hearing.wake_words': ['Sage', ' ']}
                       ).hearing.wake_words == ('Sage',)
    with pytest.raises(ValueError, match='turn_salience'):
        VisionParams(turn_salience=1.5)


# ---- wake words, context, the vision-turn gate, waiting samples --------------------------------
@pytest.mark.parametrize('transcript, words, found', [
    ('Sage, what time is it?', ('sage',), 'sage'),
    ('hey robot come here', ('sage', 'hey robot'), 'hey robot'),
    ('the message was sent', ('sage',), ''),          # whole words only
    ('SAGE!', ('Sage',), 'Sage'),
    ('hello', (), ''),
])
def test_wake_words_match_whole_words_case_insensitively(transcript: str, words: Any,
                                                         found: str) -> None:
    assert wake_word(transcript, words) == found


def test_the_visual_context_keeps_each_cameras_latest_for_context_s() -> None:
    ctx = VisualContext()
    ctx.add('camera', 'The scene is dark.', 0.0)
    ctx.add('camera', 'One face is in view, left of centre.', 10.0)
    ctx.add('door_cam', 'Something is moving.', 12.0)
    ctx.add('door_cam', '  ', 13.0)                     # nothing said: the last one stays
    assert ctx.context(15.0, 30.0) == (
        'The camera (camera) reported 5 s ago: One face is in view, left of centre.\n'
        'The camera (door_cam) reported 3 s ago: Something is moving.')
    assert ctx.context(41.0, 30.0) == ('The camera (door_cam) reported 29 s ago: Something is '
                                       'moving.')
    assert ctx.context(100.0, 30.0) == '' and ctx.context(15.0, 0.0) == ''


def test_a_vision_turn_needs_salience_a_finding_and_respects_the_rate_limit() -> None:
    gate = VisionTurnGate()
    assert gate.decide('camera', 0.9, False, 0.0, 0.5, 30.0) == (False, 'nothing found in it')
    assert gate.decide('camera', 0.4, True, 0.0, 0.5, 30.0) == (False, 'salience 0.40 < 0.50')
    assert gate.decide('camera', 0.6, True, 0.0, 0.5, 30.0) == (True, '')
    started, why = gate.decide('camera', 0.9, True, 10.0, 0.5, 30.0)
    assert not started and 'at most one every 30 s' in why
    assert gate.decide('door_cam', 0.9, True, 10.0, 0.5, 30.0) == (True, '')   # per camera
    assert gate.decide('camera', 0.9, True, 30.0, 0.5, 30.0) == (True, '')
    # A refused event does not restart the period.
    assert not gate.decide('camera', 0.9, True, 40.0, 0.5, 30.0)[0]
    assert gate.decide('camera', 0.9, True, 60.0, 0.5, 30.0)[0]


def test_vision_turn_words() -> None:
    assert vision_turn_text('camera', ' One face is in view. ') == '[camera] One face is in view.'
    assert 'camera' in VISION_TURN_CONTEXT.format(source='camera')


def test_waiting_samples_expire_in_arrival_order_after_their_ttl() -> None:
    w: WaitingSamples[str] = WaitingSamples()
    w.add('first', 0.0)
    w.add('second', 5.0)
    assert [x.item for x in w.expire(9.9, 10.0)] == []
    assert [x.item for x in w.expire(10.0, 10.0)] == ['first']
    assert [x.item for x in w] == ['second'] and len(w) == 1
