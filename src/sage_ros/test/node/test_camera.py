"""The camera node over real rclpy (discovery off): files played through camera/play, a file
source, a device that does not exist, and garbage."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Iterator, List

import numpy as np
import pytest
import rclpy
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sage_interfaces.msg import VisualObservation
from sage_interfaces.srv import PlayMedia
from sensor_msgs.msg import Image

from media_support import astronaut_jpeg, moving_square_video
from node_harness import wait_for
from sage_ros import names
from sage_ros.core.perception.image import decode_image
from sage_ros.nodes.camera import CameraNode

# The probe keeps every observation of a burst (the node publishes as fast as it processes).
PROBE_QOS = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
FACE = (219, 46, 119, 119)


class Rig:
    """A camera node and a probe node on one executor, in a context of their own."""

    def __init__(self, params: dict) -> None:
        self.context = Context()
        rclpy.init(args=['sage', '--ros-args', '-r', '__ns:=/camera_test'],
                   context=self.context)
        self.node = CameraNode(context=self.context, parameter_overrides=[
            Parameter(k, value=v) for k, v in params.items()])
        self.probe = Node('probe', context=self.context)
        self.observations: List[VisualObservation] = []
        self.images: List[Image] = []
        self.probe.create_subscription(VisualObservation, names.OBSERVATIONS_VISION,
                                       self.observations.append, PROBE_QOS)
        self.probe.create_subscription(Image, names.CAMERA_IMAGE, self.images.append,
                                       qos_profile_sensor_data)
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        for n in (self.node, self.probe):
            self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.client = self.probe.create_client(PlayMedia, names.CAMERA_PLAY)
        assert self.client.wait_for_service(timeout_sec=10.0)

    def play(self, **fields: Any) -> Any:
        future = self.client.call_async(PlayMedia.Request(**fields))
        wait_for(future.done, 60.0, 'camera/play answer')
        return future.result()

    def of(self, source: str) -> List[VisualObservation]:
        return [o for o in list(self.observations) if o.source == source]

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5.0)
        self.thread.join(timeout=5.0)
        self.node.destroy_node()
        self.probe.destroy_node()
        rclpy.try_shutdown(context=self.context)


@pytest.fixture
def camera() -> Iterator[Callable[..., Rig]]:
    made: List[Rig] = []

    def make(**params: Any) -> Rig:
        rig = Rig(params)
        made.append(rig)
        return rig
    yield make
    for r in made:
        r.close()


def unit(v: Any) -> float:
    return float(np.linalg.norm(np.asarray(v, dtype=np.float64)))


def test_played_video_has_motion_only_after_the_square_moves(
        camera: Callable[..., Rig], tmp_path: Path) -> None:
    clip = moving_square_video(tmp_path / 'clip.avi', frames=60, start_moving=30)
    rig = camera(keyframe_period_s=0.0)
    res = rig.play(path=str(clip), realtime=False)
    assert res.accepted, res.message
    assert res.duration_s == pytest.approx(4.0)
    wait_for(lambda: len(rig.of('file:clip.avi')) == 60, 30.0, 'an observation per frame')
    obs = sorted(rig.of('file:clip.avi'), key=lambda o: o.frame)
    assert [o.frame for o in obs] == list(range(60))
    assert all(o.motion < 0.001 for o in obs[:30])
    assert all(o.motion > 0.01 for o in obs[30:])
    keyframes = [(o.frame, o.reason) for o in obs if o.keyframe]
    assert keyframes == [(0, 'first frame'), (30, 'motion onset')]
    assert list(res.observation_ids) == [o.observation_id for o in obs if o.keyframe]
    assert len({o.observation_id for o in obs}) == 60
    for o in obs:
        assert (o.width, o.height) == (640, 480) and len(o.features) == 32
        assert unit(o.features) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 < o.brightness < 1.0 and o.process_s > 0.0 and o.dropped == 0
        assert (o.image_format == 'jpeg') == o.keyframe == bool(o.image_data)
    frame = decode_image('jpeg', 0, 0, obs[30].image_data)
    assert frame.shape == (480, 640, 3)
    # camera/image is best effort: some frames may be lost, those that arrive are whole.
    wait_for(lambda: rig.images, 10.0, 'a camera/image frame')
    img = rig.images[-1]
    assert (img.encoding, img.width, img.height, img.step) == ('rgb8', 640, 480, 1920)
    assert len(img.data) == 640 * 480 * 3


def test_realtime_play_accounts_for_every_frame(camera: Callable[..., Rig],
                                                tmp_path: Path) -> None:
    clip = moving_square_video(tmp_path / 'short.avi', frames=12, start_moving=6, fps=30.0)
    rig = camera(publish_image=False)
    res = rig.play(path=str(clip), realtime=True, source='hall')
    assert res.accepted, res.message
    assert res.duration_s == pytest.approx(0.4)
    # Paced at the clip's 30 fps: a frame the node fell behind on is dropped and counted,
    # never queued; processed and dropped frames add up to the clip.
    wait_for(lambda: len(rig.of('hall')) + rig.node.dropped == 12, 10.0, 'every frame')
    assert rig.of('hall')[0].reason == 'first frame'


def test_played_photo_is_one_keyframe_with_a_jpeg(camera: Callable[..., Rig],
                                                  tmp_path: Path) -> None:
    photo = astronaut_jpeg(tmp_path / 'astronaut.jpg')
    rig = camera(publish_image=False)
    res = rig.play(path=str(photo))
    assert res.accepted, res.message
    assert len(res.observation_ids) == 1 and res.duration_s == 0.0
    res2 = rig.play(data=list(photo.read_bytes()), source='door')
    assert res2.accepted and res2.observation_ids[0].startswith('door/')
    wait_for(lambda: len(rig.observations) == 2, 10.0, 'both keyframes')
    first, second = sorted(rig.observations, key=lambda o: o.source != 'file:astronaut.jpg')
    assert first.observation_id == res.observation_ids[0]
    assert second.observation_id == res2.observation_ids[0] != first.observation_id
    for o in (first, second):
        assert o.keyframe and o.reason == 'played' and o.frame == 0
        assert o.image_format == 'jpeg'
        assert decode_image('jpeg', 0, 0, o.image_data).shape == (480, 640, 3)
    assert rig.images == []   # publish_image false


def test_garbage_is_rejected_and_the_node_keeps_serving(
        camera: Callable[..., Rig], tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    photo = astronaut_jpeg(tmp_path / 'astronaut.jpg')
    text = tmp_path / 'notes.txt'
    text.write_text('this is a text file, not a video\n' * 50)
    empty = tmp_path / 'empty.png'
    empty.write_bytes(b'')
    cut = tmp_path / 'cut.jpg'
    cut.write_bytes(photo.read_bytes()[:4000])
    rig = camera()
    for request, words in (({'path': str(text)}, 'not an image or a video'),
                           ({'path': str(empty)}, 'empty file'),
                           ({'path': str(cut)}, 'truncated JPEG'),
                           ({'data': list(cut.read_bytes())}, 'truncated JPEG'),
                           ({'data': list(b'\x00garbage' * 64)}, 'not an image or a video'),
                           ({'path': str(tmp_path / 'missing.mp4')}, 'no such file'),
                           ({}, 'nothing to play')):
        res = rig.play(**request)
        assert not res.accepted and words in res.message, (request.keys(), res.message)
        assert list(res.observation_ids) == []
    assert rig.observations == []
    err = capfd.readouterr().err
    warnings = [ln for ln in err.splitlines() if 'camera/play rejected' in ln]
    assert len(warnings) == 7 and 'Traceback' not in err, err   # one line per rejection
    res = rig.play(path=str(photo))
    assert res.accepted
    wait_for(lambda: len(rig.observations) == 1, 10.0, 'the good photo after the garbage')


def test_image_file_source_is_published_once(camera: Callable[..., Rig],
                                             tmp_path: Path) -> None:
    photo = astronaut_jpeg(tmp_path / 'astronaut.jpg')
    rig = camera(source='file', file_path=str(photo), loop=False, publish_image=False)
    wait_for(lambda: rig.observations, 10.0, 'the photo')
    o = rig.observations[0]
    assert (o.source, o.frame, o.keyframe, o.reason) == ('file:astronaut.jpg', 0, True,
                                                          'first frame')
    # still serves camera/play (the source is done)
    assert rig.play(path=str(photo)).accepted
    wait_for(lambda: len(rig.observations) == 2, 10.0, 'the played photo')
    assert len(rig.of('file:astronaut.jpg')) == 2


def test_a_video_source_faster_than_rate_hz_drops_and_counts(camera: Callable[..., Rig],
                                                             tmp_path: Path) -> None:
    clip = moving_square_video(tmp_path / 'clip.avi', frames=45, start_moving=10, fps=30.0)
    rig = camera(source='file', file_path=str(clip), loop=True, rate_hz=5.0,
                 publish_image=False, source_id='door')
    wait_for(lambda: len(rig.of('door')) >= 4, 30.0, 'four processed frames')
    obs = rig.of('door')
    assert [o.frame for o in obs] == list(range(len(obs)))
    assert obs[-1].dropped > 0
    assert [o.dropped for o in obs] == sorted(o.dropped for o in obs)   # cumulative
    assert obs[0].keyframe and obs[0].reason == 'first frame'
    assert rig.node.dropped >= obs[-1].dropped


@pytest.mark.parametrize('source', ['device', 'file'])
def test_a_source_that_does_not_open_is_one_error_and_the_node_stays_up(
        camera: Callable[..., Rig], tmp_path: Path, capfd: pytest.CaptureFixture[str],
        source: str) -> None:
    text = tmp_path / 'notes.txt'
    text.write_text('not a video\n' * 100)   # FFmpeg would render this as a "video"
    params = ({'device': '/dev/video-sage-test-none'} if source == 'device' else
              {'file_path': str(text)})
    rig = camera(source=source, **params)
    photo = astronaut_jpeg(tmp_path / 'astronaut.jpg')
    assert rig.play(path=str(photo)).accepted
    wait_for(lambda: rig.observations, 10.0, 'the played photo')
    assert all(o.source == 'file:astronaut.jpg' for o in rig.observations)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if 'camera source unavailable' in ln]
    assert len(lines) == 1 and ('video-sage-test-none' if source == 'device' else
                                'notes.txt: not an image or a video') in lines[0], err
    assert 'Traceback' not in err and 'WARN' not in err, err
