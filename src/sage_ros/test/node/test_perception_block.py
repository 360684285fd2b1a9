"""Perception block node over real rclpy and a real model manager with the real models
(faster-whisper base from `sage models prepare`, OpenCV's Haar cascade): the modular path on an
utterance, on a photo and on both; the omni path without an omni entry answers on the modular
path and says why; the omni path with the tiny random omni model, and its failover when its
entry cannot load; garbage goals get INVALID_INPUT (a role that is not configured:
UNSUPPORTED_MODALITY) and the block keeps serving; a cancelled goal cancels its Infer call; the
block's description follows its path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
from rclpy.action import ActionClient
from sage_interfaces.action import Perception
from sage_interfaces.msg import BlockDescription

from sage_ros import graph, names
from sage_ros.nodes.common import LATCHED
from sage_ros.nodes.perception_block import PerceptionBlockNode
from node_harness import Harness, send_goal, wait_for

pytestmark = pytest.mark.slow
GRAPH = (graph.PERCEPTION_BLOCK, graph.MODEL_MANAGER)


def descriptions(h: Harness) -> List[Any]:
    got: List[Any] = []

    def on_description(m: Any) -> None:
        if m.name == 'perception':
            got.append(m)
    h.probe.create_subscription(BlockDescription, names.BLOCKS_DESCRIPTION, on_description,
                                LATCHED)
    return got


def started(make: Callable[..., Harness], **overrides: object
            ) -> Tuple[Harness, PerceptionBlockNode, ActionClient, List[Any]]:
    h = make(GRAPH, **overrides)
    block = h.node(PerceptionBlockNode)
    assert isinstance(block, PerceptionBlockNode)
    described = descriptions(h)
    wait_for(lambda: described and described[-1].loaded, 60.0, 'perception block loaded')
    client = ActionClient(h.probe, Perception, names.BLOCK_PERCEPTION)
    assert client.wait_for_server(timeout_sec=10.0)
    return h, block, client, described


def utterance(tmp: Path, text: str = 'please bring me the red cup') -> bytes:
    from media_support import speak
    from sage_ros.core.perception.audio import read_wav, to_pcm16
    samples, rate = read_wav(speak(text, tmp / 'said.wav'))
    assert rate == 16000
    return to_pcm16(samples)


def photo(tmp: Path) -> bytes:
    from media_support import astronaut_jpeg
    return astronaut_jpeg(tmp / 'astronaut.jpg').read_bytes()


def perceive(client: ActionClient, **fields: Any) -> Any:
    ok, result, feedback = send_goal(client, Perception.Goal(**fields), 180.0)
    assert ok, 'perception goal refused'
    return result, feedback


def test_the_modular_path_hears_an_utterance_sees_a_face_and_does_both(
        harness: Callable[..., Harness], tmp_path: Path) -> None:
    h, block, client, described = started(harness)
    d = described[-1]
    assert d.block_type == 'modular' and list(d.modalities) == ['audio', 'image']
    assert list(d.capabilities) == ['speech_to_text', 'face_detection', 'scene_description']
    assert d.action_name == f'/{names.DEFAULT_NAMESPACE.strip("/")}/{names.BLOCK_PERCEPTION}'
    assert d.action_type == 'sage_interfaces/action/Perception' and d.concurrency == 1

    audio = utterance(tmp_path)
    heard, feedback = perceive(client, turn_id=1, source='microphone', audio=audio,
                               sample_rate=16000)
    assert heard.error_code == Perception.Result.NONE, heard.error_msg
    assert heard.path == 'modular' and heard.fallback == ''
    assert heard.model == 'faster-whisper-base'
    assert heard.transcript and heard.language == 'en' and heard.transcript in heard.description
    assert heard.audio_duration_s == pytest.approx(len(audio) / 2 / 16000, rel=1e-3)
    assert 0 < heard.asr_s <= heard.total_s and heard.detection_s == 0.0
    assert list(heard.detections) == [] and heard.answer == ''
    assert 'transcribing' in [f.stage for f in feedback]

    image = photo(tmp_path)
    seen, _ = perceive(client, turn_id=2, source='camera', image_format='jpeg',
                       image_data=image)
    assert seen.error_code == Perception.Result.NONE, seen.error_msg
    assert seen.path == 'modular' and seen.model == 'opencv-haar-frontalface'
    assert list(seen.labels) == ['face'] and len(seen.scores) == 1 and 0 <= seen.scores[0] <= 1
    assert [d.label for d in seen.detections] == ['face'] and seen.description
    assert seen.transcript == '' and seen.asr_s == 0.0 and 0 < seen.detection_s <= seen.total_s

    both, _ = perceive(client, turn_id=3, source='sage', audio=audio, sample_rate=16000,
                       image_format='jpeg', image_data=image)
    assert both.error_code == Perception.Result.NONE, both.error_msg
    assert both.model == 'faster-whisper-base,opencv-haar-frontalface'
    assert both.transcript and list(both.labels) == ['face']
    assert both.asr_s > 0 and both.detection_s > 0
    assert both.total_s >= both.asr_s + both.detection_s and both.atp_spent > 0


def test_the_omni_path_without_an_omni_entry_answers_on_the_modular_path_and_says_why(
        harness: Callable[..., Harness], tmp_path: Path, capfd: pytest.CaptureFixture[str]
        ) -> None:
    h, block, client, described = started(harness, **{'perception_block:path': 'omni'})
    d = described[-1]
    assert d.block_type == 'hybrid' and 'audio_vision_qa' in d.capabilities
    assert 'text' in d.modalities
    audio = utterance(tmp_path, 'is anybody there')
    for turn in (1, 2):
        result, _ = perceive(client, turn_id=turn, audio=audio, sample_rate=16000)
        assert result.error_code == Perception.Result.NONE, result.error_msg
        assert result.path == 'modular' and result.transcript
        assert "omni role 'omni' is not configured" in result.fallback
    assert capfd.readouterr().err.count("omni role 'omni' is not configured") == 1, \
        'the cause is logged once'
    # A goal may ask for a path itself.
    result, _ = perceive(client, turn_id=3, audio=audio, sample_rate=16000, path='modular')
    assert result.path == 'modular' and result.fallback == ''


def test_garbage_goals_get_invalid_input_and_the_block_keeps_serving(
        harness: Callable[..., Harness], tmp_path: Path) -> None:
    h, block, client, described = started(harness)
    image = photo(tmp_path)
    cases: List[Tuple[Dict[str, Any], str]] = [
        (dict(), 'no audio and no image'),
        (dict(audio=b'\0\0' * 100, sample_rate=0), 'sample_rate 0'),
        (dict(audio=b'\0\0\0', sample_rate=16000), 'odd length'),
        (dict(image_data=image), 'without image_format'),
        (dict(image_format='jpeg', image_data=image, path='sideways'), 'unknown path'),
        (dict(image_format='jpeg', image_data=image[:len(image) // 4]), ''),
        (dict(image_format='rgb8', width=8, height=8, image_data=b'\1' * 10), ''),
    ]
    for fields, words in cases:
        result, _ = perceive(client, turn_id=9, **fields)
        assert result.error_code == Perception.Result.INVALID_INPUT, (list(fields), result)
        assert result.error_msg and words in result.error_msg, result.error_msg
    result, _ = perceive(client, turn_id=10, image_format='jpeg', image_data=image)
    assert result.error_code == Perception.Result.NONE and list(result.labels) == ['face']
    assert described[-1].loaded
    assert set_param(h, 'vision_role', 'nobody')
    result, _ = perceive(client, turn_id=11, image_format='jpeg', image_data=image)
    assert result.error_code == Perception.Result.UNSUPPORTED_MODALITY
    assert 'nobody' in result.error_msg
    assert not set_param(h, 'path', 'sideways'), 'a bad path is refused'


def test_the_omni_path_with_the_tiny_omni_model_and_its_failover(
        harness: Callable[..., Harness], tmp_path: Path) -> None:
    omni_support = pytest.importorskip('omni_support')
    tiny = omni_support.build_tiny_omni(tmp_path / 'tiny-omni')
    roles = ['small', 'large', 'speech', 'vision', 'embedder', 'omni', 'broken']
    entry = {'kind': 'omni', 'model_id': 'tiny-omni', 'path': str(tiny), 'device': 'cpu',
             'dtype': 'float32', 'max_new_tokens': 8, 'fallback': ['none']}
    h, block, client, described = started(harness, **{
        'perception_block:path': 'omni', 'model_manager:roles': roles,
        'model_manager:models.omni': entry,
        'model_manager:models.broken': {**entry, 'fallback': ['none'],   # no YAML alias
                                        'path': str(tmp_path / 'nowhere')}})
    audio, image = utterance(tmp_path, 'what do you see'), photo(tmp_path)
    both, feedback = perceive(client, turn_id=1, audio=audio, sample_rate=16000,
                              image_format='jpeg', image_data=image)
    assert both.error_code == Perception.Result.NONE, both.error_msg
    assert both.path == 'omni' and both.fallback == '' and both.model == 'tiny-omni'
    assert both.total_s > 0 and 'omni' in [f.stage for f in feedback]
    answered, _ = perceive(client, turn_id=2, image_format='jpeg', image_data=image,
                           prompt='Who is there?', respond=True)
    assert answered.error_code == Perception.Result.NONE and answered.path == 'omni'
    assert answered.answer == answered.description, 'respond: the answer is its text'
    heard, _ = perceive(client, turn_id=3, audio=audio, sample_rate=16000)
    assert heard.error_code == Perception.Result.NONE and heard.path == 'omni'
    assert heard.asr_s > 0 and heard.audio_duration_s > 0

    assert set_param(h, 'omni_role', 'broken')
    for turn in (4, 5):
        result, _ = perceive(client, turn_id=turn, image_format='jpeg', image_data=image)
        assert result.error_code == Perception.Result.NONE, result.error_msg
        assert result.path == 'modular' and list(result.labels) == ['face']
        assert result.fallback.startswith('omni path unavailable') and 'modular' in \
            result.fallback
        assert result.model == 'opencv-haar-frontalface'


def set_param(h: Harness, name: str, value: str) -> bool:
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter
    from node_harness import call
    req = SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()])
    return bool(call(h, SetParameters, f'{names.PERCEPTION_BLOCK}/set_parameters',
                     req).results[0].successful)


def test_a_cancelled_goal_cancels_its_infer_call(harness: Callable[..., Harness],
                                                 tmp_path: Path) -> None:
    from action_msgs.msg import GoalStatus
    from sage_interfaces.action import SwapModel
    from node_harness import LoadGate
    from sage_ros.nodes.model_manager import ModelManagerNode
    h, block, client, described = started(harness, **{
        'model_manager:policy.substitute': False})
    mm = h.node(ModelManagerNode)
    assert isinstance(mm, ModelManagerNode)
    gate = LoadGate(mm, 'large')       # the model manager busy with a held swap
    swap = ActionClient(h.probe, SwapModel, names.MODEL_SWAP)
    assert swap.wait_for_server(timeout_sec=10.0)
    held = swap.send_goal_async(SwapModel.Goal(role='large', reason='held'))
    wait_for(gate.held.is_set, what='swap held')
    sent = client.send_goal_async(Perception.Goal(turn_id=1, image_format='jpeg',
                                                  image_data=photo(tmp_path)))
    wait_for(sent.done, what='perception goal accepted')
    # Its infer call runs on the infer queue and waits in the pool for the held load.
    wait_for(lambda: mm.infer_queue.counts() == (1, 0), what='its infer call waiting')
    answer = sent.result().get_result_async()
    sent.result().cancel_goal_async()
    wait_for(answer.done, 30.0, 'the cancelled goal answered')
    assert answer.result().status == GoalStatus.STATUS_CANCELED
    assert answer.result().result.error_code == Perception.Result.CANCELLED
    wait_for(lambda: mm.infer_queue.counts() == (0, 0), what='its infer call cancelled too')
    assert mm.queue.counts() == (1, 0)   # the swap still held
    gate.open()
    wait_for(held.done, what='swap accepted')
    result, _ = perceive(client, turn_id=2, image_format='jpeg', image_data=photo(tmp_path))
    assert result.error_code == Perception.Result.NONE, 'still serving'


def test_a_bad_path_at_start_is_one_clear_error() -> None:
    import rclpy
    from rclpy.context import Context
    from rclpy.parameter import Parameter
    from sage_ros.nodes.common import ConfigError
    context = Context()
    rclpy.init(context=context)
    try:
        with pytest.raises(ConfigError, match=r"parameter path='bogus': expected one of"):
            PerceptionBlockNode(context=context,
                                parameter_overrides=[Parameter('path', value='bogus')])
    finally:
        rclpy.shutdown(context=context)
