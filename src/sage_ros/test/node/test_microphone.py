"""The microphone node over real rclpy (discovery off): espeak-ng speech played through
`microphone/play` and a file source, garbage refused with the node still answering, a missing
device, and the real sounddevice path through the ALSA `file` plugin (in a subprocess, since
ALSA reads its configuration when PortAudio starts)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import numpy as np
import pytest
import soundfile as sf
from sage_interfaces.msg import AudioLevel, AudioObservation
from sage_interfaces.srv import PlayMedia
from rclpy.qos import qos_profile_sensor_data

from media_support import speak
from node_harness import Harness, call, wait_for
from sage_ros import graph, names
from sage_ros.core.perception.audio import FEATURE_NAMES, from_pcm16
from sage_ros.nodes.microphone import MicrophoneNode

PHRASE = 'Please turn left and go to the kitchen.'


@pytest.fixture
def microphone(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: List[Harness] = []

    def make(**params: Any) -> Harness:
        h = Harness({f'/**/{names.MICROPHONE}': {'ros__parameters': params}}, tmp_path,
                    (graph.MICROPHONE,))
        made.append(h)
        return h
    yield make
    for h in made:
        h.close()


def _play(h: Harness, **fields: Any) -> Any:
    return call(h, PlayMedia, names.MICROPHONE_PLAY, PlayMedia.Request(**fields), timeout=60.0)


def _check_observation(msg: AudioObservation, oid: str, source: str) -> None:
    assert msg.observation_id == oid and msg.source == source
    assert msg.sample_rate == 16000 and msg.encoding == 'pcm_s16le'
    samples = from_pcm16(bytes(msg.data))
    assert samples.size == round(msg.duration_s * 16000)
    assert 1.5 < msg.duration_s < 5.0       # the phrase, pre-roll and hangover
    assert msg.vad == 'silero' and 0.5 <= msg.voice_probability <= 1.0
    assert -60.0 < msg.level_dbfs <= msg.peak_dbfs <= 0.0
    assert len(msg.features) == len(FEATURE_NAMES)
    assert all(0.0 <= f <= 1.0 for f in msg.features)
    assert msg.vad_s >= 0.25                 # at least the hangover (min_silence_s 0.3)
    start = msg.speech_start.sec + msg.speech_start.nanosec * 1e-9
    stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
    assert start < stamp


def test_play_speech_file_publishes_one_utterance(microphone: Callable[..., Harness],
                                                  tmp_path: Path) -> None:
    h = microphone()
    got = h.collect(AudioObservation, names.OBSERVATIONS_AUDIO)
    wav = speak(PHRASE, tmp_path / 'kitchen.wav')
    res = _play(h, path=str(wav), realtime=False)
    assert res.accepted, res.message
    assert len(res.observation_ids) == 1 and res.duration_s == pytest.approx(
        sf.info(str(wav)).duration, abs=1e-3)
    wait_for(lambda: len(got) == 1, what='the utterance')
    _check_observation(got[0], res.observation_ids[0], 'file:kitchen.wav')

    # The same speech as bytes, at another rate, under a source id of the caller's.
    x, rate = sf.read(str(wav), dtype='float32')
    other = tmp_path / 'k22.wav'
    sf.write(str(other), np.interp(np.arange(0, x.size, 16000 / 22050), np.arange(x.size), x),
             22050, subtype='PCM_16')
    res = _play(h, data=other.read_bytes(), source='test_mic', realtime=False)
    assert res.accepted and len(res.observation_ids) == 1
    wait_for(lambda: len(got) == 2, what='the second utterance')
    _check_observation(got[1], res.observation_ids[0], 'test_mic')
    assert got[0].observation_id != got[1].observation_id


def _garbage(tmp_path: Path) -> Dict[str, Dict[str, Any]]:
    good = speak('Hello robot.', tmp_path / 'good.wav', pad_s=0.2).read_bytes()
    rate0 = bytearray(good)
    fmt = rate0.find(b'fmt ')
    rate0[fmt + 12:fmt + 16] = struct.pack('<I', 0)
    nan = np.zeros(8000, np.float32)
    nan[10] = np.nan
    sf.write(str(tmp_path / 'nan.wav'), nan, 16000, subtype='FLOAT')
    (tmp_path / 'zero.wav').write_bytes(b'')
    return {
        'truncated WAV': {'data': good[:len(good) // 2]},
        'empty file': {'path': str(tmp_path / 'zero.wav')},
        'NaN or infinite': {'path': str(tmp_path / 'nan.wav')},
        'sample rate of 0': {'data': bytes(rate0)},
        'nothing to play': {},
        'no such file': {'path': str(tmp_path / 'missing.wav')},
        'cannot decode audio': {'data': b'RIFX garbage, not a wave at all' * 20},
    }


def test_garbage_is_refused_and_the_node_keeps_answering(
        microphone: Callable[..., Harness], tmp_path: Path) -> None:
    h = microphone(vad='energy')
    got = h.collect(AudioObservation, names.OBSERVATIONS_AUDIO)
    for reason, fields in _garbage(tmp_path).items():
        res = _play(h, realtime=False, **fields)
        assert not res.accepted, reason
        assert reason in res.message, (reason, res.message)
        assert list(res.observation_ids) == []
    res = _play(h, path=str(speak(PHRASE, tmp_path / 'ok.wav')), realtime=False)
    assert res.accepted and len(res.observation_ids) == 1
    wait_for(lambda: len(got) == 1, what='the good utterance')
    assert got[0].vad == 'energy' and got[0].observation_id == res.observation_ids[0]


def test_file_source_publishes_utterances_and_levels(microphone: Callable[..., Harness],
                                                     tmp_path: Path) -> None:
    wav = speak(PHRASE, tmp_path / 'src.wav', pad_s=0.6)
    # The node starts reading as it is made: the probe subscribes to a file that loops.
    h = microphone(source='file', file_path=str(wav), realtime=True, loop=True,
                   level_period_s=0.05)
    got = h.collect(AudioObservation, names.OBSERVATIONS_AUDIO)
    levels = h.collect(AudioLevel, names.AUDIO_LEVEL, qos_profile_sensor_data)
    wait_for(lambda: len(got) >= 1, timeout=60.0, what='an utterance from the file')
    wait_for(lambda: any(m.speaking for m in levels), timeout=60.0, what='a speaking level')
    node = h.node(MicrophoneNode)
    assert isinstance(node, MicrophoneNode)
    assert got[0].source == 'file:src.wav' and got[0].observation_id in node.published
    assert 1.0 < got[0].duration_s < 5.0
    assert all(m.source == 'file:src.wav' and -100.0 <= m.level_dbfs <= 0.0 for m in levels)


def test_missing_device_is_one_error_and_play_still_works(
        microphone: Callable[..., Harness], tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    h = microphone(source='device', device='sage-test-no-such-mic', vad='energy')
    node = h.node(MicrophoneNode)
    assert isinstance(node, MicrophoneNode)
    assert 'sage-test-no-such-mic' in node.source_error and node.source is None
    res = _play(h, path=str(speak(PHRASE, tmp_path / 'ok.wav')), realtime=False)
    assert res.accepted and len(res.observation_ids) == 1
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if 'sage-test-no-such-mic' in ln]
    assert len(lines) == 1 and 'ERROR' in lines[0], err
    assert 'Traceback' not in err


SOUNDDEVICE_READER = textwrap.dedent('''
    import json, sys
    import numpy as np
    from sage_ros.core.perception.audio import SoundDeviceSource, from_pcm16
    raw = open(sys.argv[1], 'rb').read()
    blocks = int(sys.argv[2])
    src = SoundDeviceSource('', capture_rate=16000, channels=1, block_s=0.032,
                            sample_rate=16000, queue_s=60.0)
    src.open()
    got = []
    while len(got) < blocks:        # exactly N blocks: past the file the plugin gives garbage
        b = src.read(timeout=10.0)
        if b is None:
            break
        got.append(b)
    src.close()
    ref = from_pcm16(raw)[:blocks * 512]
    x = np.concatenate(got) if got else np.zeros(0, np.float32)
    print(json.dumps({"name": src.name, "blocks": len(got), "sizes": sorted({b.size for b in got}),
                      "equal": bool(x.size == ref.size and np.array_equal(x, ref)),
                      "dropped": src.dropped}))
''')


def test_sounddevice_source_reads_the_alsa_file_plugin_bit_exactly(tmp_path: Path) -> None:
    pytest.importorskip('sounddevice', reason='PortAudio (libportaudio2) is not installed')
    x, _ = sf.read(str(speak(PHRASE, tmp_path / 'utt.wav')), dtype='int16')
    raw = tmp_path / 'utt.raw'
    raw.write_bytes(x.astype('<i2').tobytes())
    alsa = tmp_path / 'xdg' / 'alsa'
    alsa.mkdir(parents=True)
    (alsa / 'asoundrc').write_text(
        'pcm.!default { type asym; playback.pcm "nullout"; capture.pcm "wavin" }\n'
        'pcm.nullout { type null }\n'
        f'pcm.wavin {{ type file; slave.pcm "null"; file "/dev/null"; infile "{raw}"; '
        'format "raw" }\n')
    blocks = x.size // 512
    env = {**os.environ, 'XDG_CONFIG_HOME': str(tmp_path / 'xdg')}
    out = subprocess.run([sys.executable, '-c', SOUNDDEVICE_READER, str(raw), str(blocks)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result['blocks'] == blocks and result['sizes'] == [512]
    assert result['equal'] and result['dropped'] == 0, result
