"""Microphone node: what the robot hears, as utterances on `observations/audio`.

A source (a capture device through PortAudio, a WAV file, or none) feeds a worker thread that
runs voice activity detection and cuts the audio into utterances (`core.perception.vad`); each
one goes out as an AudioObservation (reliable), and the level as AudioLevel every
`level_period_s` (sensor-data QoS). `microphone/play` (PlayMedia) runs a WAV file or its bytes
through the same pipeline (a fresh one, same settings) as if the device had heard it, and
answers with the observation ids; a file it cannot use is refused with the reason. A device that
cannot be opened is one error line at start: the node stays up, without a source, and still
plays files.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import List, Optional, Protocol, Tuple, Union

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sage_interfaces.msg import AudioLevel, AudioObservation
from sage_interfaces.srv import PlayMedia

from .. import names
from ..core.inference import MediaError
from ..core.perception.audio import (AudioSourceError, SoundDeviceSource, WavFileSource,
                                     audio_features, level_dbfs, peak_dbfs, read_wav, resample,
                                     to_pcm16)
from ..core.perception.vad import (VAD_KINDS, EnergyVad, UtteranceSegmenter, Utterance, Vad,
                                   VoicePipeline, make_vad)
from .common import ConfigError, declare, run_node
from .liveness import HeartbeatPublisher

SOURCES = ('device', 'file', 'none')
OBSERVATION_QOS = 10          # reliable, depth 10 (a reader that falls behind loses no utterance)
PLAY_PAD_S = 0.5              # [s] silence after a played file, so its last utterance closes
READ_TIMEOUT_S = 0.2          # [s] the worker's longest wait for a block (it notices stop)
DROPPED_NOTICE_S = 10.0       # [s] at most one warning this often about dropped device blocks
SUBSCRIBER_WAIT_S = 10.0      # [s] a file source waits this long for a listener before playing


class AudioSource(Protocol):
    name: str
    ended: bool

    def open(self) -> None: ...

    def read(self, timeout: float = READ_TIMEOUT_S) -> Optional[np.ndarray]: ...

    def close(self) -> None: ...


class MicrophoneNode(Node):
    """One audio source (parameter `source`) through VAD into `observations/audio`."""

    def __init__(self, node_name: str = names.MICROPHONE, **kwargs: object) -> None:
        super().__init__(node_name, **kwargs)  # type: ignore[arg-type]
        self.source_kind: str = declare(
            self, 'source', 'none', f'Where audio comes from: {", ".join(SOURCES)} (none: only '
            'what microphone/play is given)', read_only=True)
        self.device: str = declare(self, 'device', '', "Capture device, name or index ('' = the "
                                   'default input; source=device)', read_only=True)
        self.capture_rate: int = declare(self, 'capture_rate', 0, 'Capture rate of the device '
                                         '[Hz] (0 = the device default; resampled to '
                                         'sample_rate)', read_only=True, min_value=0,
                                         max_value=384000)
        self.channels: int = declare(self, 'channels', 1, 'Channels captured from the device '
                                     '(mixed down to mono)', read_only=True, min_value=1,
                                     max_value=32)
        self.file_path: str = declare(self, 'file_path', '', 'WAV file to play (source=file)',
                                      read_only=True)
        self.loop: bool = declare(self, 'loop', False, 'Play file_path again from the start at '
                                  'its end (source=file)', read_only=True)
        self.realtime: bool = declare(self, 'realtime', True, 'Pace file_path as a device would '
                                      '(false: as fast as it is processed)', read_only=True)
        self.sample_rate: int = declare(self, 'sample_rate', 16000, 'Rate of the published '
                                        'audio and of the VAD [Hz] (Silero: 8000 or 16000)',
                                        read_only=True, min_value=8000, max_value=48000)
        self.block_s: float = declare(self, 'block_s', 0.032, 'Capture block [s]',
                                      read_only=True, min_value=0.005, max_value=1.0)
        vad_kind: str = declare(self, 'vad', 'silero', 'Voice activity detector: silero (the '
                                'ONNX model in faster-whisper) or energy (level over the noise '
                                'floor)', read_only=True)
        self.vad_threshold: float = declare(self, 'vad_threshold', 0.5, 'Speech probability a '
                                            'frame needs to count as speech', read_only=True,
                                            min_value=0.01, max_value=1.0)
        pre_roll_s: float = declare(self, 'pre_roll_s', 0.2, 'Audio kept before speech starts '
                                    '[s]', read_only=True, min_value=0.0, max_value=5.0)
        min_silence_s: float = declare(self, 'min_silence_s', 0.3, 'Silence that ends an '
                                       'utterance (kept as hangover) [s]', read_only=True,
                                       min_value=0.0, max_value=10.0)
        min_speech_s: float = declare(self, 'min_speech_s', 0.25, 'Shorter speech is dropped '
                                      '(clicks, coughs) [s]', read_only=True, min_value=0.0,
                                      max_value=10.0)
        max_utterance_s: float = declare(self, 'max_utterance_s', 30.0, 'An utterance is cut at '
                                         'this length [s]', read_only=True, min_value=0.5,
                                         max_value=600.0)
        self.level_period_s: float = declare(self, 'level_period_s', 0.1, 'Period of '
                                             'audio/level [s]', read_only=True, min_value=0.01,
                                             max_value=60.0)
        source_id: str = declare(self, 'source_id', '', "Source id of the observations ('' = "
                                 "'microphone' for the device, 'file:<name>' for a file)",
                                 read_only=True)
        if self.source_kind not in SOURCES:
            raise ConfigError(f'parameter source={self.source_kind!r}: expected one of '
                              f'{", ".join(SOURCES)}')
        if vad_kind not in VAD_KINDS:
            raise ConfigError(f'parameter vad={vad_kind!r}: expected one of {", ".join(VAD_KINDS)}')
        try:
            segmenter = UtteranceSegmenter(self.sample_rate, 1, self.vad_threshold, pre_roll_s,
                                           min_silence_s, min_speech_s, max_utterance_s)
        except MediaError as exc:
            raise ConfigError(f'VAD parameters: {exc}') from exc
        self._pipeline = self._build_pipeline(vad_kind, segmenter)

        self._heartbeat = HeartbeatPublisher(self)
        self._obs_pub = self.create_publisher(AudioObservation, names.OBSERVATIONS_AUDIO,
                                              OBSERVATION_QOS)
        self._level_pub = self.create_publisher(AudioLevel, names.AUDIO_LEVEL,
                                                qos_profile_sensor_data)
        self.create_service(PlayMedia, names.MICROPHONE_PLAY, self._on_play,
                            callback_group=MutuallyExclusiveCallbackGroup())
        self._lock = threading.Lock()           # the counter and the publishers' callers
        self._count = 0
        self.published: List[str] = []          # observation ids, in order (tests, logs)
        self._stop = threading.Event()
        self._paused = threading.Event()        # a play is running: the source's audio waits
        self._last_level = 0.0
        self._dropped_said = 0                  # device blocks dropped, as last reported
        self._dropped_at = -DROPPED_NOTICE_S
        self.source_error = ''                  # why the configured source is not running
        self.source: Optional[AudioSource] = None
        self.source_id = source_id
        self._worker: Optional[threading.Thread] = None
        out = self.resolve_topic_name(names.OBSERVATIONS_AUDIO)
        vad_desc = f'VAD {self._pipeline.vad.name} (threshold {self.vad_threshold:g})'
        if self.source_kind == 'none':
            self.get_logger().info(f'no audio source; {vad_desc}; play files with '
                                   f'{self.resolve_service_name(names.MICROPHONE_PLAY)} -> {out}')
            return
        self.source = self._open_source(source_id)
        if self.source is None:
            return
        self.get_logger().info(f'listening to {self._describe_source()} at {self.sample_rate} '
                               f'Hz; {vad_desc} -> {out}')
        self._worker = threading.Thread(target=self._run, daemon=True, name='microphone-worker')
        self._worker.start()

    # --- set-up ----------------------------------------------------------------------------

    def _build_pipeline(self, kind: str, segmenter: UtteranceSegmenter) -> VoicePipeline:
        vad: Vad
        try:
            vad = make_vad(kind, self.sample_rate)
        except MediaError as exc:
            if kind != 'silero':
                raise ConfigError(f'parameter vad={kind!r}: {exc}') from exc
            self.get_logger().warning(f'Silero VAD unavailable ({exc}); using the energy VAD')
            vad = EnergyVad(self.sample_rate)
        seg = UtteranceSegmenter(self.sample_rate, vad.frame_samples, segmenter.threshold,
                                 segmenter.pre_roll / self.sample_rate,
                                 segmenter.min_silence / self.sample_rate,
                                 segmenter.min_speech / self.sample_rate,
                                 segmenter.max_len / self.sample_rate)
        return VoicePipeline(vad, seg)

    def _open_source(self, source_id: str) -> Optional[AudioSource]:
        if self.source_kind == 'file':
            if not self.file_path:
                raise ConfigError('parameter file_path is empty (source=file needs a WAV file)')
            try:
                src = WavFileSource(self.file_path, self.sample_rate, self.block_s,
                                    self.realtime, self.loop)
            except MediaError as exc:
                raise ConfigError(f'parameter file_path={self.file_path!r}: {exc}') from exc
            self.source_id = source_id or f'file:{src.name}'
            return src
        device = SoundDeviceSource(self.device, self.capture_rate, self.channels, self.block_s,
                                   self.sample_rate)
        self.source_id = source_id or names.MICROPHONE
        try:
            device.open()
        except AudioSourceError as exc:
            self.source_error = str(exc)
            self.get_logger().error(f'{exc}; running without a source (microphone/play still '
                                    'works)')
            return None
        return device

    def _describe_source(self) -> str:
        src = self.source
        if isinstance(src, WavFileSource):
            pace = 'real time' if src.realtime else 'unpaced'
            return (f'file {self.file_path} ({src.duration_s:.1f} s at {src.file_rate} Hz, '
                    f'{pace}{", looped" if src.loop else ""})')
        if isinstance(src, SoundDeviceSource):
            return (f'device {src.name!r} ({src.capture_rate} Hz, {src.channels} channel(s))')
        return 'nothing'

    # --- the source's worker -----------------------------------------------------------------

    def _run(self) -> None:
        src = self.source
        assert src is not None
        try:
            if isinstance(src, WavFileSource):
                # A file is heard once: wait (a little) for a listener so it is not lost to
                # discovery. A device is live; what nobody hears then is gone anyway.
                deadline = time.monotonic() + SUBSCRIBER_WAIT_S
                while self._obs_pub.get_subscription_count() == 0 and \
                        time.monotonic() < deadline:
                    if self._stop.wait(0.05):
                        return
            while not self._stop.is_set():
                if self._paused.is_set():
                    if isinstance(src, SoundDeviceSource):
                        src.read(READ_TIMEOUT_S)   # keep the device's queue drained
                    else:
                        self._stop.wait(0.05)
                    continue
                block = src.read(READ_TIMEOUT_S)
                if block is None:
                    if src.ended:
                        break
                    continue
                fed_at = time.monotonic()
                self._report_dropped(src, fed_at)
                utterances = self._pipeline.feed(block)
                self._maybe_publish_level(block, self._pipeline)
                for utt in utterances:
                    self._publish(utt, self._pipeline, self.source_id, fed_at)
            if not self._stop.is_set():
                fed_at = time.monotonic()
                for utt in self._pipeline.finish(PLAY_PAD_S):
                    self._publish(utt, self._pipeline, self.source_id, fed_at)
                self.get_logger().info(f'end of {self._describe_source()}: '
                                       f'{len(self.published)} utterance(s) published')
        except MediaError as exc:
            self.get_logger().error(f'audio from {self._describe_source()} unusable: {exc}; '
                                    'source stopped (microphone/play still works)')
        except Exception as exc:  # noqa: BLE001 - the node is being destroyed under the worker
            if not self._stop.is_set():
                self.get_logger().error(f'reading {self._describe_source()} failed: {exc}')

    def _report_dropped(self, src: AudioSource, now: float) -> None:
        dropped = getattr(src, 'dropped', 0)
        if dropped > self._dropped_said and now - self._dropped_at >= DROPPED_NOTICE_S:
            self.get_logger().warning(
                f'{dropped - self._dropped_said} audio block(s) dropped: processing is slower '
                f'than {src.name!r} captures ({dropped} in all)')
            self._dropped_said, self._dropped_at = dropped, now

    # --- publishing ------------------------------------------------------------------------

    def _maybe_publish_level(self, block: np.ndarray, pipeline: VoicePipeline,
                             source_id: Optional[str] = None) -> None:
        now = time.monotonic()
        if now - self._last_level < self.level_period_s:
            return
        self._last_level = now
        msg = AudioLevel(source=source_id or self.source_id, level_dbfs=level_dbfs(block),
                         peak_dbfs=peak_dbfs(block),
                         voice_probability=float(pipeline.segmenter.last_probability),
                         speaking=pipeline.segmenter.speaking)
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self._frame_id()
        self._level_pub.publish(msg)

    def _frame_id(self) -> str:
        return self.source.name if self.source is not None else names.MICROPHONE

    def _publish(self, utt: Utterance, pipeline: VoicePipeline, source_id: str,
                 fed_at: float) -> str:
        rate = utt.sample_rate
        speech = utt.samples[utt.speech_start - utt.start:utt.speech_end - utt.start]
        with self._lock:
            self._count += 1
            oid = f'{source_id}/{self._heartbeat.instance_id}/{self._count}'
            now = self.get_clock().now()
            behind = (pipeline.segmenter.samples_fed - utt.speech_start) / rate
            msg = AudioObservation(
                observation_id=oid, source=source_id, sample_rate=rate, encoding='pcm_s16le',
                data=to_pcm16(utt.samples), duration_s=utt.duration_s,
                vad_s=utt.hangover_s + (time.monotonic() - fed_at),
                level_dbfs=level_dbfs(speech), peak_dbfs=peak_dbfs(speech),
                voice_probability=utt.voice_probability, vad=pipeline.vad.name, wake_word='',
                features=[float(f) for f in audio_features(utt.samples, rate)])
            msg.header.stamp = now.to_msg()
            msg.header.frame_id = self._frame_id()
            msg.speech_start = (now - Duration(nanoseconds=int(behind * 1e9))).to_msg()
            self._obs_pub.publish(msg)
            self.published.append(oid)
        self.get_logger().info(
            f'utterance {oid}: {utt.duration_s:.2f} s (speech {utt.speech_s:.2f} s'
            f'{", cut at max_utterance_s" if utt.forced else ""}), '
            f'{msg.level_dbfs:.0f} dBFS, voice {utt.voice_probability:.2f}')
        return oid

    # --- microphone/play -------------------------------------------------------------------

    def _on_play(self, request: PlayMedia.Request, response: PlayMedia.Response
                 ) -> PlayMedia.Response:
        what = request.path or f'{len(request.data)} bytes'
        try:
            if request.path and len(request.data):
                raise MediaError('give a path or data, not both')
            if not request.path and not len(request.data):
                raise MediaError('nothing to play: give a path or data')
            src: Union[str, bytes] = request.path if request.path else bytes(request.data)
            samples, rate = read_wav(src)
            x = resample(samples, rate, self.sample_rate)
        except MediaError as exc:
            self.get_logger().warning(f'microphone/play refused {what}: {exc}')
            response.accepted = False
            response.message = str(exc)
            return response
        name = Path(request.path).name if request.path else 'data'
        source_id = request.source or f'file:{name}'
        ids, duration = self.play(x, source_id, request.realtime)
        response.accepted = True
        response.observation_ids = ids
        response.duration_s = samples.size / rate
        response.message = (f'played {name} ({response.duration_s:.2f} s at {rate} Hz): '
                            f'{len(ids)} utterance(s)')
        self.get_logger().info(f'microphone/play: {response.message}')
        return response

    def play(self, x: np.ndarray, source_id: str, realtime: bool) -> Tuple[List[str], float]:
        """Run samples at `sample_rate` through a fresh pipeline and publish their utterances;
        the source's own audio waits meanwhile. Returns (observation ids, seconds)."""
        pipeline = self._pipeline.fresh()
        block = max(1, int(round(self.block_s * self.sample_rate)))
        ids: List[str] = []
        self._paused.set()
        try:
            t0 = time.monotonic()
            for i in range(0, x.size, block):
                if self._stop.is_set():
                    break
                chunk = x[i:i + block]
                fed_at = time.monotonic()
                for utt in pipeline.feed(chunk):
                    ids.append(self._publish(utt, pipeline, source_id, fed_at))
                self._maybe_publish_level(chunk, pipeline, source_id)
                if realtime:
                    due = t0 + (i + chunk.size) / self.sample_rate
                    if due > time.monotonic() and self._stop.wait(due - time.monotonic()):
                        break
            fed_at = time.monotonic()
            for utt in pipeline.finish(PLAY_PAD_S):
                ids.append(self._publish(utt, pipeline, source_id, fed_at))
        finally:
            self._paused.clear()
        return ids, x.size / self.sample_rate

    def destroy_node(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=2.0)
        if self.source is not None:
            self.source.close()
        super().destroy_node()


def main(args: Optional[List[str]] = None) -> int:
    return run_node(MicrophoneNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
