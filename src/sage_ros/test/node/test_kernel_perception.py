"""The kernel hears and sees, over real rclpy: utterances and keyframes go to a perception block
(a real Perception action server in the probe node, as the language block is in
test_kernel_node), percepts are published, transcripts become speech turns, visual descriptions
become context of the next language goal (or a turn of their own), and "all clear" heard while
the camera's motion spikes raises conflict. The audio is a real tone and the image a real JPEG;
the fake perception block answers what each test says it heard or saw."""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
import pytest
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import ReentrantCallbackGroup
from sage_interfaces.action import Language, Perception
from sage_interfaces.msg import (AudioObservation, BlockDescription, Detection, Heartbeat,
                                 KernelState, Percept, Response, Salience, VisualObservation)

from node_harness import Harness, wait_for
from sage_ros import names
from sage_ros.nodes.common import LATCHED, RELIABLE
from sage_ros.nodes.liveness import HEARTBEAT_QOS
from test_kernel_node import ALL_STATES, FakeBlock, kernel_harness, tell  # noqa: F401

RATE = 16000


class FakePerception:
    """A perception block in the probe node: answers each goal with what the test set
    (`transcript`, `description`, `detections`), or fails it (`error`)."""

    def __init__(self, h: Harness, name: str = 'perception') -> None:
        self.name = name
        self.requests: List[Any] = []
        self.transcript = 'hello robot'
        self.description = 'One face is in view, left of centre.'
        self.detections: List[Detection] = []
        self.error = ''
        self.hold = False          # keep goals running (until cancelled)
        self.beating = True
        self.finished = 0          # goals answered (or cancelled)
        self.instance = uuid.uuid4().hex[:12]
        self.server = ActionServer(
            h.probe, Perception, names.BLOCK_PERCEPTION, execute_callback=self._execute,
            goal_callback=lambda g: GoalResponse.ACCEPT,
            cancel_callback=lambda g: CancelResponse.ACCEPT,
            callback_group=ReentrantCallbackGroup())
        self.pub = h.probe.create_publisher(BlockDescription, names.BLOCKS_DESCRIPTION, LATCHED)
        self.pub.publish(BlockDescription(
            name=name, block_type='modular',
            capabilities=['speech_to_text', 'face_detection', 'scene_description'],
            modalities=['audio', 'image'],
            action_name=h.probe.resolve_topic_name(names.BLOCK_PERCEPTION),
            action_type='sage_interfaces/action/Perception', loaded=True, concurrency=1))
        self._beats = h.probe.create_publisher(Heartbeat, names.HEARTBEAT, HEARTBEAT_QOS)
        h.probe.create_timer(0.1, self._beat, callback_group=ReentrantCallbackGroup())

    def _beat(self) -> None:
        if self.beating:
            self._beats.publish(Heartbeat(node=f'/sage/fake_{self.name}', instance_id=self.instance,
                                          block=self.name, ready=True, period_s=0.1))

    def _execute(self, gh: ServerGoalHandle) -> Any:
        try:
            return self._answer(gh)
        finally:
            self.finished += 1

    def _answer(self, gh: ServerGoalHandle) -> Any:
        goal = gh.request
        self.requests.append(goal)
        while self.hold and not gh.is_cancel_requested:
            time.sleep(0.01)
        if gh.is_cancel_requested:
            gh.canceled()
            return Perception.Result(error_code=Perception.Result.CANCELLED)
        if self.error:
            gh.abort()
            return Perception.Result(error_code=Perception.Result.FAILED, error_msg=self.error)
        gh.succeed()
        audio = bool(len(goal.audio))
        return Perception.Result(
            path='modular', model='fake-whisper' if audio else 'fake-haar',
            transcript=self.transcript if audio else '', language='en' if audio else '',
            description='' if audio else self.description,
            detections=[] if audio else self.detections,
            labels=[] if audio else [d.label for d in self.detections],
            audio_duration_s=len(goal.audio) / 2 / max(1, goal.sample_rate),
            asr_s=0.05 if audio else 0.0, detection_s=0.0 if audio else 0.01, total_s=0.06)


def tone(seconds: float = 0.8, hz: float = 220.0) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype('<i2').tobytes()


def jpeg(value: int = 128) -> bytes:
    img = np.full((48, 64, 3), value, np.uint8)
    cv2.rectangle(img, (10, 10), (30, 30), (255, 255, 255), -1)
    ok, buf = cv2.imencode('.jpg', img)
    assert ok
    return bytes(buf.tobytes())


class Sensors:
    """The microphone and camera as the kernel sees them: typed observations from the probe."""

    def __init__(self, h: Harness) -> None:
        self.audio = h.probe.create_publisher(AudioObservation, names.OBSERVATIONS_AUDIO,
                                              RELIABLE)
        self.vision = h.probe.create_publisher(VisualObservation, names.OBSERVATIONS_VISION,
                                               RELIABLE)
        self.frames = 0
        wait_for(lambda: self.audio.get_subscription_count() > 0
                 and self.vision.get_subscription_count() > 0, 10, 'kernel subscribed')

    def utterance(self, source: str = 'microphone', data: Optional[bytes] = None,
                  encoding: str = 'pcm_s16le', features: Tuple[float, ...] = (
                      0.4, 0.5, 0.3, 0.2, 0.4, 0.9)) -> Tuple[str, AudioObservation]:
        data = tone() if data is None else data
        msg = AudioObservation(observation_id=f'{source}/{uuid.uuid4().hex[:6]}', source=source,
                               sample_rate=RATE, encoding=encoding, data=data,
                               duration_s=len(data) / 2 / RATE, vad='energy',
                               level_dbfs=-20.0, peak_dbfs=-10.0, features=list(features))
        self.audio.publish(msg)
        return msg.observation_id, msg

    def frame(self, motion: float, keyframe: bool = False, reason: str = '',
              source: str = 'camera') -> str:
        self.frames += 1
        oid = f'{source}/{self.frames}'
        f = np.full(8, 1 / np.sqrt(8))
        self.vision.publish(VisualObservation(
            observation_id=oid, source=source, frame=self.frames, width=64, height=48,
            motion=motion, brightness=0.5, features=list(f), keyframe=keyframe, reason=reason,
            image_format='jpeg' if keyframe else '', image_data=jpeg() if keyframe else b''))
        return oid


def setup(kernel_harness: Callable[..., Harness], params: Optional[Dict[str, Any]] = None,
          perception: bool = True) -> Tuple[Harness, FakeBlock, Optional[FakePerception],
                                            Sensors, Dict[str, List[Any]]]:
    h = kernel_harness(**(params or {}))
    language = FakeBlock(h, Language, 'language', 'conversation')
    seen = FakePerception(h) if perception else None
    got: Dict[str, List[Any]] = {
        'responses': h.collect(Response, names.RESPONSE),
        'percepts': h.collect(Percept, names.PERCEPTS),
        'salience': h.collect(Salience, names.SALIENCE),
        'states': h.collect(KernelState, names.STATE, ALL_STATES)}
    want = {'language', 'perception'} if perception else {'language'}
    wait_for(lambda: bool(got['states']) and want <= set(got['states'][-1].blocks), 10,
             'kernel knows the blocks')
    return h, language, seen, Sensors(h), got


def test_an_utterance_is_perceived_and_answered_as_speech(
        kernel_harness: Callable[..., Harness]) -> None:
    h, language, seen, mic, got = setup(kernel_harness)
    assert seen is not None
    data = tone()
    oid, sent = mic.utterance(data=data)
    wait_for(lambda: len(got['responses']) == 1, 20, 'the answer')
    (goal,) = seen.requests
    assert bytes(goal.audio) == data and goal.sample_rate == RATE and goal.source == 'microphone'
    assert goal.image_format == '' and goal.atp_budget > 0
    (percept,) = got['percepts']
    assert (percept.observation_id, percept.source, percept.modality) == (oid, 'microphone',
                                                                          'audio')
    assert percept.transcript == 'hello robot' and percept.error == '' and percept.path == 'modular'
    assert percept.turn_id == goal.turn_id and percept.perception_s > 0
    (lgoal,) = language.requests
    assert lgoal.text == 'hello robot' and lgoal.turn_id == goal.turn_id
    r = got['responses'][0]
    assert r.status == Response.STATUS_OK and r.modality == 'speech'
    assert (r.observation_id, r.source, r.turn_id) == (oid, 'microphone', goal.turn_id)
    assert r.input_text == 'hello robot' and r.text == 'ok'
    assert r.audio_duration_s == pytest.approx(sent.duration_s)
    assert r.perception_s == percept.perception_s
    # Scored twice under one turn: its sound on arrival, its words when heard.
    mine = [s for s in got['salience'] if s.observation_id == oid]
    assert len(mine) == 2 and {s.turn_id for s in mine} == {goal.turn_id}
    assert all(s.sensor_id == 'microphone' for s in mine)
    wait_for(lambda: got['states'][-1].active_dispatches == 0, 10, 'settled')
    (typed,) = tell(h, 'console', 'and you?')
    wait_for(lambda: len(got['responses']) == 2, 20, 'a typed turn')
    assert got['responses'][1].modality == 'text' and got['responses'][1].perception_s == 0.0


def test_an_empty_transcript_is_answered_no_speech_recognised(
        kernel_harness: Callable[..., Harness]) -> None:
    h, language, seen, mic, got = setup(kernel_harness)
    assert seen is not None
    seen.transcript = '  '
    oid, _ = mic.utterance()
    wait_for(lambda: len(got['responses']) == 1, 20, 'the answer')
    r = got['responses'][0]
    assert r.status == Response.STATUS_REJECTED and r.error == 'no speech recognised'
    assert (r.observation_id, r.modality) == (oid, 'speech') and r.perception_s > 0
    assert len(got['percepts']) == 1 and language.requests == []


def test_with_wake_words_only_an_utterance_that_says_one_is_answered(
        kernel_harness: Callable[..., Harness]) -> None:
    h, language, seen, mic, got = setup(kernel_harness,
                                        {'kernel:hearing.wake_words': ['sage']})
    assert seen is not None
    seen.transcript = 'what time is it'
    first, _ = mic.utterance()
    wait_for(lambda: len(got['responses']) == 1, 20, 'the first answer')
    r = got['responses'][0]
    assert (r.observation_id, r.status, r.error) == (first, Response.STATUS_REJECTED,
                                                     'no wake word')
    assert r.input_text == 'what time is it'
    seen.transcript = 'Sage, what time is it?'
    second, _ = mic.utterance()
    wait_for(lambda: len(got['responses']) == 2, 20, 'the second answer')
    assert got['responses'][1].observation_id == second
    assert got['responses'][1].status == Response.STATUS_OK
    assert [g.text for g in language.requests] == ['Sage, what time is it?']
    assert len(got['percepts']) == 2              # published either way


def test_an_utterance_waits_for_a_perception_block_and_garbage_is_rejected(
        kernel_harness: Callable[..., Harness]) -> None:
    h, language, _, mic, got = setup(kernel_harness, perception=False)
    (odd, _) = mic.utterance(data=b'\x01\x02\x03')
    (mp3, _) = mic.utterance(encoding='mp3', features=())
    wait_for(lambda: len(got['responses']) == 2, 20, 'the rejections')
    r = {x.observation_id: x for x in got['responses']}
    assert all(x.status == Response.STATUS_REJECTED and x.modality == 'speech'
               for x in r.values())
    assert r[odd].error == '3 bytes is not a whole number of 16-bit samples'
    assert r[mp3].error == "unsupported encoding 'mp3' (expected pcm_s16le)"
    assert {s.observation_id for s in got['salience']} == {odd, mp3}   # scored all the same
    oid, _ = mic.utterance()
    wait_for(lambda: any(s.observation_id == oid for s in got['salience']), 10, 'scored')
    time.sleep(0.5)
    assert len(got['responses']) == 2           # it waits: no perception block yet
    seen = FakePerception(h)
    wait_for(lambda: len(got['responses']) == 3, 20, 'answered once a block serves')
    assert len(seen.requests) == 1 and got['responses'][2].observation_id == oid
    assert got['responses'][2].status == Response.STATUS_OK


def test_an_utterance_that_waits_too_long_expires_with_the_reason(
        kernel_harness: Callable[..., Harness]) -> None:
    h, language, _, mic, got = setup(kernel_harness, {'kernel:deferred_ttl_s': 1.0},
                                     perception=False)
    oid, _ = mic.utterance()
    wait_for(lambda: len(got['responses']) == 1, 20, 'expired')
    r = got['responses'][0]
    assert r.observation_id == oid and r.status == Response.STATUS_REJECTED
    assert r.modality == 'speech'
    assert r.error == ('expired after waiting 1 s: waiting for the graph: no perception block '
                       'serving audio is known')


def test_a_salient_keyframe_is_perceived_and_becomes_context_of_the_next_turn(
        kernel_harness: Callable[..., Harness]) -> None:
    h, language, seen, cam, got = setup(kernel_harness, {
        'kernel:vision.perceive_salience': 0.3, 'kernel:vision.turn_salience': 1.0})
    assert seen is not None
    for _ in range(5):
        cam.frame(0.0)                                  # still frames: scored only
    still = cam.frame(0.0, keyframe=True, reason='periodic')
    moving = cam.frame(0.4, keyframe=True, reason='motion onset')
    wait_for(lambda: len(got['percepts']) == 1, 20, 'a percept')
    sal = {s.observation_id: s for s in got['salience']}
    assert sal[moving].total >= 0.3 > sal[still].total
    (goal,) = seen.requests
    assert goal.image_format == 'jpeg' and bytes(goal.image_data) == jpeg()
    assert len(goal.audio) == 0
    p = got['percepts'][0]
    assert (p.observation_id, p.modality, p.source) == (moving, 'image', 'camera')
    assert p.description == seen.description and p.motion > 0.39
    (typed,) = tell(h, 'console', 'what do you see?')
    wait_for(lambda: len(got['responses']) == 1, 20, 'the answer')
    (lgoal,) = language.requests
    assert lgoal.text == 'what do you see?'
    assert lgoal.context.startswith('The camera (camera) reported ')
    assert lgoal.context.endswith(' s ago: One face is in view, left of centre.')


def test_a_salient_visual_event_starts_a_turn_of_its_own_at_most_once_a_period(
        kernel_harness: Callable[..., Harness]) -> None:
    h, language, seen, cam, got = setup(kernel_harness, {
        'kernel:vision.perceive_salience': 0.0, 'kernel:vision.turn_salience': 0.0,
        'kernel:vision.min_turn_period_s': 3600.0})
    assert seen is not None
    seen.detections = [Detection(label='face', score=0.9, x=10, y=10, width=20, height=20)]
    first = cam.frame(0.2, keyframe=True, reason='played')
    wait_for(lambda: len(got['responses']) == 1, 20, 'the vision turn')
    r = got['responses'][0]
    assert (r.observation_id, r.modality, r.status) == (first, 'vision', Response.STATUS_OK)
    assert r.input_text == '[camera] One face is in view, left of centre.'
    assert r.perception_s > 0
    (lgoal,) = language.requests
    assert lgoal.text == r.input_text and 'what your camera camera just saw' in lgoal.context
    cam.frame(0.2, keyframe=True, reason='played')      # within the period: context only
    wait_for(lambda: len(got['percepts']) == 2, 20, 'the second percept')
    (typed,) = tell(h, 'console', 'anything else?')
    wait_for(lambda: len(got['responses']) == 2, 20, 'the typed turn')
    assert [x.observation_id for x in got['responses']] == [first, typed]
    assert len(language.requests) == 2 and language.requests[1].text == 'anything else?'


def test_all_clear_heard_while_the_camera_sees_motion_raises_conflict(
        kernel_harness: Callable[..., Harness]) -> None:
    h, language, seen, sensors, got = setup(kernel_harness)
    assert seen is not None
    seen.transcript = 'All clear, no one is here.'
    frames = [sensors.frame(0.001 * (i % 2)) for i in range(10)]
    spike = sensors.frame(0.35)
    wait_for(lambda: any(s.observation_id == spike for s in got['salience']), 10, 'scored')
    oid, _ = sensors.utterance()
    wait_for(lambda: len(got['responses']) == 1, 20, 'the answer')
    heard = [s for s in got['salience'] if s.observation_id == oid]
    assert len(heard) == 2
    words = heard[-1]                      # the transcript's score (the first: its sound)
    assert words.conflict >= 0.9 and words.stance == Salience.STANCE_SKEPTICAL
    sal = {s.observation_id: s for s in got['salience']}
    assert all(sal[f].conflict < 0.5 for f in frames[2:])
    # The frame that keeps moving after the words carries the conflict too.
    after = sensors.frame(0.35)
    wait_for(lambda: any(s.observation_id == after for s in got['salience']), 10, 'scored')
    assert {s.observation_id: s for s in got['salience']}[after].conflict > 0.3
    assert got['responses'][0].salience == words.total


def test_a_failed_perception_is_a_failed_answer(kernel_harness: Callable[..., Harness]) -> None:
    h, language, seen, mic, got = setup(kernel_harness)
    assert seen is not None
    seen.error = 'speech model unavailable'
    oid, _ = mic.utterance()
    wait_for(lambda: len(got['responses']) == 1, 20, 'the answer')
    r = got['responses'][0]
    assert (r.observation_id, r.status) == (oid, Response.STATUS_FAILED)
    assert r.error == 'perception failed: speech model unavailable'
    assert got['percepts'][0].error == 'speech model unavailable' and language.requests == []


def test_a_perception_block_that_goes_silent_fails_the_utterance(
        kernel_harness: Callable[..., Harness]) -> None:
    h, language, seen, mic, got = setup(kernel_harness)
    assert seen is not None
    seen.hold = True
    oid, _ = mic.utterance()
    wait_for(lambda: len(seen.requests) == 1, 10, 'the goal running')
    seen.beating = False                      # as a kill -9 looks from outside
    wait_for(lambda: len(got['responses']) == 1, 10, 'the answer')
    r = got['responses'][0]
    assert (r.observation_id, r.status, r.modality) == (oid, Response.STATUS_FAILED, 'speech')
    assert r.error == ('perception failed: the perception block stopped (no heartbeat for '
                       '2.0 s); ask again when it is back')
    assert got['percepts'][0].error.startswith('the perception block stopped')
    seen.hold = False
    wait_for(lambda: seen.finished == 1, 10, 'the fake block idle')


def test_garbage_frames_are_refused_and_the_kernel_stays_up(
        kernel_harness: Callable[..., Harness]) -> None:
    h, language, seen, cam, got = setup(kernel_harness,
                                        {'kernel:vision.perceive_salience': 0.0})
    assert seen is not None
    cam.vision.publish(VisualObservation(observation_id='camera/bad', source='camera',
                                         keyframe=True, reason='played', motion=float('nan'),
                                         features=[float('nan'), 1e300]))
    wait_for(lambda: any(s.observation_id == 'camera/bad' for s in got['salience']), 10,
             'scored anyway')
    good = cam.frame(0.0, keyframe=True, reason='played')
    wait_for(lambda: len(got['percepts']) == 1, 20, 'the good frame perceived')
    assert got['percepts'][0].observation_id == good and len(seen.requests) == 1
    bad = {s.observation_id: s for s in got['salience']}['camera/bad']
    assert all(0.0 <= x <= 1.0 for x in (bad.total, bad.arousal, bad.surprise))
