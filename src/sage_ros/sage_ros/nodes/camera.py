"""Camera node: frames from a device, a video or image file, or files played on request, as
images and as per-frame visual observations for the kernel.

Per processed frame it publishes `camera/image` (sensor_msgs/Image rgb8, sensor-data QoS),
optionally `camera/image/compressed` (JPEG), and a VisualObservation on `observations/vision`
(motion, brightness, appearance features; on keyframes the JPEG and why: first frame, motion
onset, periodic, played). The analysis is `core.perception.image.FrameAnalyzer`.

A capture thread reads the source at its own pace (a device as it delivers, a file at its
frame rate) into a one-frame slot; a processing thread takes the newest frame at most
`rate_hz` times a second. Frames replaced in the slot before they were taken are dropped and
counted (VisualObservation.dropped). `camera/play` (PlayMedia) plays an image or a video
through the same analysis while the node's own source pauses.

Observation ids are "<source>/<run>-<n>/<frame>": <run> is this node process's id, <n> counts
the sources it opened (its own, then each play), <frame> the frame since that source opened.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

from builtin_interfaces.msg import Time
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, HistoryPolicy, qos_profile_sensor_data
from sage_interfaces.msg import VisualObservation
from sage_interfaces.srv import PlayMedia
from sensor_msgs.msg import (
    CompressedImage, Image)

from .. import names
from ..core.inference import MediaError
from ..core.perception.image import (REASON_PLAYED, FrameAnalyzer, FrameSlot, FrameSummary,
                                     Media, VideoReader, encode_jpeg, load_media)
from .common import ConfigError, declare, run_node
from .liveness import HeartbeatPublisher

SOURCES = ('device', 'file', 'none')
# Every observation matters to the kernel; the depth covers a burst of a played clip.
OBSERVATION_QOS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST,
                             reliability=ReliabilityPolicy.RELIABLE)
READ_FAILURES = 30   # consecutive failed device reads before the device counts as gone


SUBSCRIBER_WAIT_S = 10.0   # [s] a file source waits this long for a listener, then plays

class CameraNode(Node):
    """One camera source (the `source` parameter) and `camera/play`."""

    def __init__(self, node_name: str = names.CAMERA, **kwargs: object) -> None:
        super().__init__(node_name, **kwargs)  # type: ignore[arg-type]
        self.source: str = declare(self, 'source', 'none',
                                   f'Where frames come from: {", ".join(SOURCES)} (none: only '
                                   'files played through camera/play)', read_only=True)
        # An index given on the command line (`-p device:=2`) arrives as an integer: take both.
        self.device: str = str(self.declare_parameter('device', '0', ParameterDescriptor(
            description="Capture device (source=device): an index ('0' or 0) or a device path "
                        "('/dev/video2')", read_only=True, dynamic_typing=True)).value)
        self.file_path: str = declare(self, 'file_path', '',
                                      'Video or image file (source=file)', read_only=True)
        self.loop: bool = declare(self, 'loop', True,
                                  'Start the file again at its end (an image: repeat it at '
                                  'rate_hz; false: publish it once)', read_only=True)
        self.rate_hz: float = declare(self, 'rate_hz', 15.0,
                                      'Most frames processed per second; faster sources drop '
                                      'frames [Hz]', read_only=True, min_value=0.1,
                                      max_value=240.0)
        self.width: int = declare(self, 'width', 640,
                                  'Width frames are resized to (0: as delivered) [px]',
                                  read_only=True, min_value=0, max_value=8192)
        self.height: int = declare(self, 'height', 480,
                                   'Height frames are resized to (0: as delivered) [px]',
                                   read_only=True, min_value=0, max_value=8192)
        self.publish_image: bool = declare(self, 'publish_image', True,
                                           f'Publish every processed frame on '
                                           f'{names.CAMERA_IMAGE} (rgb8)', read_only=True)
        self.publish_compressed: bool = declare(self, 'publish_compressed', False,
                                                'Also publish it JPEG-encoded on '
                                                f'{names.CAMERA_IMAGE_COMPRESSED}',
                                                read_only=True)
        self.jpeg_quality: int = declare(self, 'jpeg_quality', 80,
                                         'JPEG quality of keyframes and compressed images',
                                         read_only=True, min_value=1, max_value=100)
        self.motion_threshold: int = declare(self, 'motion_threshold', 25,
                                             'Grey-level change (0..255, after a 5x5 blur) '
                                             'that counts a pixel as moved', read_only=True,
                                             min_value=0, max_value=255)
        self.motion_onset: float = declare(self, 'motion_onset', 0.02,
                                           'Fraction of moved pixels whose upward crossing '
                                           'makes a "motion onset" keyframe', read_only=True,
                                           min_value=0.0001, max_value=1.0)
        self.keyframe_period_s: float = declare(self, 'keyframe_period_s', 5.0,
                                                'A "periodic" keyframe this long after the last '
                                                'keyframe (0: none) [s]', read_only=True,
                                                min_value=0.0, max_value=3600.0)
        source_id: str = declare(self, 'source_id', '',
                                 "Source id of the observations; '' = 'camera' for a device, "
                                 "'file:<name>' for a file", read_only=True)
        self.frame_id: str = declare(self, 'frame_id', 'camera',
                                     'frame_id of the published images', read_only=True)
        if self.source not in SOURCES:
            raise ConfigError(f'parameter source={self.source!r}: expected one of '
                              f'{", ".join(SOURCES)}')
        if self.source == 'file' and not self.file_path:
            raise ConfigError('parameter file_path is empty: source=file needs a file')
        if (self.width == 0) != (self.height == 0):
            raise ConfigError(f'parameters width={self.width}, height={self.height}: set both '
                              'or neither to 0')
        self.source_id = source_id or (
            f'file:{Path(self.file_path).name}' if self.source == 'file' else names.CAMERA)

        self._heartbeat = HeartbeatPublisher(self)
        self._run_id = self._heartbeat.instance_id[:6]
        self._sessions = 0
        self._image_pub = self.create_publisher(Image, names.CAMERA_IMAGE,
                                                qos_profile_sensor_data)
        self._compressed_pub = (self.create_publisher(CompressedImage,
                                                      names.CAMERA_IMAGE_COMPRESSED,
                                                      qos_profile_sensor_data)
                                if self.publish_compressed else None)
        self._obs_pub = self.create_publisher(VisualObservation, names.OBSERVATIONS_VISION,
                                              OBSERVATION_QOS)
        self._stop = threading.Event()
        self._playing = threading.Event()
        self._slot = FrameSlot()
        self._play_dropped = 0
        self._live = self._analyzer()
        self._live_session = self._new_session()
        self.published = 0   # observations published (all sources)
        self._threads: List[threading.Thread] = []
        self.create_service(PlayMedia, names.CAMERA_PLAY, self._on_play,
                            callback_group=MutuallyExclusiveCallbackGroup())
        self._start_source()

    # -- set-up --------------------------------------------------------------------------

    def _analyzer(self) -> FrameAnalyzer:
        return FrameAnalyzer(self.width, self.height, self.motion_threshold, self.motion_onset,
                             self.keyframe_period_s, self.jpeg_quality)

    def _new_session(self) -> str:
        self._sessions += 1
        return f'{self._run_id}-{self._sessions}'

    @property
    def dropped(self) -> int:
        """Frames dropped since start because processing fell behind its source."""
        return self._slot.dropped + self._play_dropped

    def _start_source(self) -> None:
        play = self.resolve_service_name(names.CAMERA_PLAY)
        if self.source == 'none':
            self.get_logger().info(f'no camera source; serving {play}')
            return
        try:
            reader, image = self._open_source()
        except MediaError as exc:
            self.get_logger().error(f'camera source unavailable: {exc}; no frames until it '
                                    f'is fixed (restart the node); still serving {play}')
            return
        what = f'{self.source_id} ({reader.what if reader and reader.live else self.file_path})'
        self._spawn(self._capture, (reader, image), 'camera-capture')
        self._spawn(self._process_live, (), 'camera-process')
        out = self.resolve_topic_name(names.OBSERVATIONS_VISION)
        self.get_logger().info(f'camera {what} -> {out} at most {self.rate_hz:g} Hz, '
                               f'{self.width}x{self.height}; serving {play}')

    def _open_source(self) -> Tuple[Optional[VideoReader], Optional[Any]]:
        if self.source == 'device':
            return VideoReader.open_device(self.device, self.width, self.height), None
        media = load_media(self.file_path)
        if media.image is not None:
            return None, media.image
        assert media.video_path is not None
        return VideoReader.open_file(media.video_path), None

    def _spawn(self, target: Any, args: Tuple[Any, ...], name: str) -> None:
        t = threading.Thread(target=target, args=args, daemon=True, name=name)
        self._threads.append(t)
        t.start()

    # -- the node's own source -----------------------------------------------------------

    def _capture(self, reader: Optional[VideoReader], image: Optional[Any]) -> None:
        """Capture thread: frames into the slot at the source's pace; paused while playing."""
        try:
            if reader is None or not reader.live:
                # A file is seen once: wait (a little) for a listener, so that its first
                # frames are not lost to discovery. A device is live: what nobody sees is gone.
                deadline = time.monotonic() + SUBSCRIBER_WAIT_S
                while self._obs_pub.get_subscription_count() == 0 and \
                        time.monotonic() < deadline:
                    if self._stop.wait(0.05):
                        return
            if reader is None:
                self._capture_image(image)
            else:
                self._capture_video(reader)
        except Exception as exc:  # the node is being destroyed under the thread
            if not self._stop.is_set():
                self.get_logger().error(f'camera capture stopped: {exc}')
        finally:
            if reader is not None:
                reader.release()

    def _capture_image(self, image: Any) -> None:
        period = 1.0 / self.rate_hz
        while not self._stop.is_set():
            if not self._playing.is_set():
                self._slot.put(image, self._now())
                if not self.loop:
                    return
            if self._stop.wait(period):
                return

    def _capture_video(self, reader: VideoReader) -> None:
        period = 1.0 / reader.fps if (reader.fps and not reader.live) else 0.0
        next_t = time.monotonic()
        failures = 0
        while not self._stop.is_set():
            if self._playing.is_set() and not reader.live:
                self._stop.wait(0.05)   # a file waits where it is; a device keeps draining
                next_t = time.monotonic()
                continue
            frame = reader.read()
            if frame is None:
                if reader.live:
                    failures += 1
                    if failures >= READ_FAILURES:
                        self.get_logger().error(f'camera {reader.what} stopped delivering '
                                                'frames; no more frames from it')
                        return
                    self._stop.wait(0.05)
                    continue
                if self.loop and reader.rewind():
                    continue
                self.get_logger().info(f'end of {reader.what}')
                return
            failures = 0
            if not self._playing.is_set():
                self._slot.put(frame, self._now())
            if period:
                next_t += period
                delay = next_t - time.monotonic()
                if delay > 0:
                    if self._stop.wait(delay):
                        return
                else:
                    next_t = time.monotonic()   # behind: do not try to catch up

    def _process_live(self) -> None:
        """Processing thread: the newest frame, at most rate_hz times a second."""
        period = 1.0 / self.rate_hz
        resumed = False
        while not self._stop.is_set():
            got = self._slot.take(timeout=0.5)
            if got is None:
                continue
            if self._playing.is_set():
                resumed = True
                continue   # paused: the played file has the camera
            if resumed:
                self._live.forget_previous()   # no motion measured across the pause
                resumed = False
            t0 = time.monotonic()
            try:
                self._publish_frame(self._live, got[0], got[1], self.source_id,
                                    self._live_session)
            except MediaError as exc:
                self.get_logger().warning(f'frame from {self.source_id} skipped: {exc}')
            except Exception as exc:  # the node is being destroyed under the thread
                if not self._stop.is_set():
                    self.get_logger().error(f'camera processing stopped: {exc}')
                return
            if self._stop.wait(max(0.0, t0 + period - time.monotonic())):
                return

    # -- publishing ----------------------------------------------------------------------

    def _now(self) -> Time:
        return self.get_clock().now().to_msg()

    def _publish_frame(self, analyzer: FrameAnalyzer, rgb: Any, stamp: Optional[Time],
                       source: str, session: str, force: str = '') -> FrameSummary:
        t0 = time.perf_counter()
        s = analyzer.process(rgb, force)
        stamp = stamp if stamp is not None else self._now()
        if self.publish_image:
            img = Image(height=s.height, width=s.width, encoding='rgb8', is_bigendian=0,
                        step=s.width * 3)
            img.header.stamp = stamp
            img.header.frame_id = self.frame_id
            img.data = s.rgb.tobytes()
            self._image_pub.publish(img)
        if self._compressed_pub is not None:
            comp = CompressedImage(format='jpeg',
                                   data=s.jpeg or encode_jpeg(s.rgb, self.jpeg_quality))
            comp.header.stamp = stamp
            comp.header.frame_id = self.frame_id
            self._compressed_pub.publish(comp)
        obs = VisualObservation(
            observation_id=f'{source}/{session}/{s.frame}', source=source, frame=s.frame,
            width=s.width, height=s.height, motion=float(s.motion.fraction),
            brightness=float(s.brightness), features=list(s.features), keyframe=s.keyframe,
            reason=s.reason, image_format='jpeg' if s.keyframe else '',
            dropped=self.dropped)
        obs.header.stamp = stamp
        obs.header.frame_id = self.frame_id
        if s.keyframe:
            obs.image_data = s.jpeg
        obs.process_s = float(time.perf_counter() - t0)
        self._obs_pub.publish(obs)
        self.published += 1
        return s

    # -- camera/play ---------------------------------------------------------------------

    def _on_play(self, request: PlayMedia.Request, response: PlayMedia.Response
                 ) -> PlayMedia.Response:
        what = request.path or f'{len(request.data)} bytes'
        try:
            media = load_media(request.path, request.data if not request.path else None)
        except MediaError as exc:
            self.get_logger().warning(f'camera/play rejected ({what}): {exc}')
            response.accepted = False
            response.message = str(exc)
            return response
        source = request.source or f'file:{media.name}'
        self._playing.set()
        try:
            if media.image is not None:
                ids, duration, message = self._play_image(media, source)
            else:
                ids, duration, message = self._play_video(media, source, request.realtime)
        except MediaError as exc:
            self.get_logger().warning(f'camera/play rejected ({what}): {exc}')
            response.accepted = False
            response.message = str(exc)
            return response
        finally:
            self._playing.clear()
            media.discard()
        self.get_logger().info(f'camera/play: {message}')
        response.accepted = True
        response.message = message
        response.observation_ids = ids
        response.duration_s = float(duration)
        return response

    def _play_image(self, media: Media, source: str) -> Tuple[List[str], float, str]:
        assert media.image is not None
        session = self._new_session()
        s = self._publish_frame(self._analyzer(), media.image, None, source, session,
                                REASON_PLAYED)
        height, width = media.image.shape[:2]
        return ([f'{source}/{session}/{s.frame}'], 0.0,
                f'image {media.name} ({width}x{height}) as one keyframe from {source!r}')

    def _play_video(self, media: Media, source: str, realtime: bool
                    ) -> Tuple[List[str], float, str]:
        assert media.video_path is not None
        reader = VideoReader.open_file(media.video_path)
        analyzer = self._analyzer()
        session = self._new_session()
        fps = reader.fps or self.rate_hz
        ids: List[str] = []
        reasons: List[str] = []
        frames = skipped = 0
        t_start = time.monotonic()
        try:
            while not self._stop.is_set():
                rgb = reader.read()
                if rgb is None:
                    break
                index = frames
                frames += 1
                if realtime:
                    due = t_start + index / fps
                    late = time.monotonic() - due
                    if late > 1.0 / fps and index > 0:
                        skipped += 1   # behind the clip's clock: drop, as a camera would
                        self._play_dropped += 1   # counted now: the next frame says so
                        continue
                    if late < 0 and self._stop.wait(-late):
                        break
                s = self._publish_frame(analyzer, rgb, None, source, session)
                if s.keyframe:
                    ids.append(f'{source}/{session}/{s.frame}')
                    reasons.append(s.reason)
        finally:
            reader.release()
        if frames == 0:
            raise MediaError(f'{media.name}: a video with no frames OpenCV can decode')
        duration = frames / fps
        counts = ', '.join(f'{reasons.count(r)} {r}' for r in dict.fromkeys(reasons))
        return ids, duration, (f'video {media.name} ({frames} frames, {duration:.1f} s'
                               f'{", " + str(skipped) + " dropped" if skipped else ""}) from '
                               f'{source!r}: {len(ids)} keyframe(s) ({counts})')

    def destroy_node(self) -> None:
        self._stop.set()
        self._slot.close()
        for t in self._threads:
            t.join(timeout=2.0)
        super().destroy_node()


def main(args: Optional[List[str]] = None) -> int:
    return run_node(CameraNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
