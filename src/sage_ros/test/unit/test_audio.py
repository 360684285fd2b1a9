"""Audio decoding and measures (core.perception.audio) on real files written here: espeak-ng
speech, and every kind of garbage a WAV can be."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from media_support import speak
from sage_ros.core.inference import MediaError
from sage_ros.core.perception.audio import (FEATURE_NAMES, SILENCE_DBFS, StreamResampler,
                                            WavFileSource, audio_features, from_pcm16,
                                            level_dbfs, peak_dbfs, read_wav, resample, to_pcm16)


def _tone(rate: int = 16000, seconds: float = 1.0, freq: float = 440.0, amp: float = 0.5
          ) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_speech_wav_decodes_mono_float32(tmp_path: Path) -> None:
    path = speak('Please turn left and go to the kitchen.', tmp_path / 'utt.wav', pad_s=0.5)
    x, rate = read_wav(path)
    assert rate == 16000 and x.dtype == np.float32 and x.ndim == 1
    assert 1.5 < x.size / rate < 6.0
    assert np.abs(x).max() <= 1.0 and np.abs(x).max() > 0.05
    same, _ = read_wav(path.read_bytes())   # bytes decode to the same samples
    assert np.array_equal(same, x)


def test_stereo_is_mixed_down(tmp_path: Path) -> None:
    left, right = _tone(amp=0.4), np.zeros(16000, np.float32)
    sf.write(str(tmp_path / 's.wav'), np.stack([left, right], axis=1), 16000, subtype='FLOAT')
    x, _ = read_wav(tmp_path / 's.wav')
    assert np.allclose(x, left / 2, atol=1e-6)


def _garbage(tmp_path: Path) -> dict[str, Path]:
    good = speak('Hello robot.', tmp_path / 'good.wav', pad_s=0.2).read_bytes()
    files = {
        'empty': b'',
        'truncated': good[:len(good) // 2],
        'header only': good[:44],
        'not audio': b'this is not a wav file at all' * 40,
    }
    rate0 = bytearray(good)
    fmt = rate0.find(b'fmt ')
    rate0[fmt + 12:fmt + 16] = struct.pack('<I', 0)
    files['rate 0'] = bytes(rate0)
    out = {k: tmp_path / f'{k.replace(" ", "_")}.wav' for k in files}
    for k, data in files.items():
        out[k].write_bytes(data)
    nan = _tone()
    nan[100] = np.nan
    out['nan'] = tmp_path / 'nan.wav'
    sf.write(str(out['nan']), nan, 16000, subtype='FLOAT')
    inf = _tone()
    inf[5] = np.inf
    out['inf'] = tmp_path / 'inf.wav'
    sf.write(str(out['inf']), inf, 16000, subtype='FLOAT')
    out['missing'] = tmp_path / 'nope.wav'
    return out


@pytest.mark.parametrize('kind, message', [
    ('empty', 'empty (file|audio)'), ('truncated', 'truncated WAV'),
    ('header only', 'truncated WAV'),
    ('not audio', 'cannot decode audio'), ('rate 0', 'sample rate of 0'),
    ('nan', 'NaN or infinite'), ('inf', 'NaN or infinite'), ('missing', 'no such file')])
def test_garbage_raises_media_error_with_reason(tmp_path: Path, kind: str, message: str) -> None:
    path = _garbage(tmp_path)[kind]
    with pytest.raises(MediaError, match=message):
        read_wav(path)
    if path.exists():
        with pytest.raises(MediaError, match=message):
            read_wav(path.read_bytes())


def test_pcm16_round_trip_and_odd_length() -> None:
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 0.25, 2.0, -3.0], np.float32)
    data = to_pcm16(x)
    assert len(data) == 2 * x.size
    back = from_pcm16(data)
    assert np.allclose(back, np.clip(x, -1, 1), atol=1 / 32767)
    assert to_pcm16(back) == data   # stable after one round
    with pytest.raises(MediaError, match='odd length'):
        from_pcm16(data[:-1])


def test_levels() -> None:
    assert level_dbfs(np.zeros(100, np.float32)) == SILENCE_DBFS
    assert peak_dbfs(np.zeros(0, np.float32)) == SILENCE_DBFS
    sine = _tone(amp=1.0)
    assert level_dbfs(sine) == pytest.approx(-3.01, abs=0.05)
    assert peak_dbfs(sine) == pytest.approx(0.0, abs=0.01)
    assert level_dbfs(sine * 0.1) == pytest.approx(-23.01, abs=0.05)


@pytest.mark.parametrize('src, dst', [(22050, 16000), (48000, 16000), (8000, 16000)])
def test_resample_keeps_length_and_tone(src: int, dst: int) -> None:
    x = _tone(src, 1.0, 440.0, 0.5)
    y = resample(x, src, dst)
    assert y.size == dst and y.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(y))
    assert np.argmax(spectrum) == pytest.approx(440, abs=1)   # 1 Hz bins over 1 s
    assert level_dbfs(y) == pytest.approx(level_dbfs(x), abs=0.1)
    with pytest.raises(MediaError):
        resample(x, 0, dst)


def test_stream_resampler_is_block_size_independent() -> None:
    x = _tone(48000, 1.0, 440.0, 0.5)
    whole = StreamResampler(48000, 16000).process(x)
    r = StreamResampler(48000, 16000)
    rng = np.random.default_rng(3)
    parts, i = [], 0
    while i < x.size:
        n = int(rng.integers(1, 3000))
        parts.append(r.process(x[i:i + n]))
        i += n
    blocks = np.concatenate(parts)
    assert blocks.size == whole.size == 16000
    assert np.allclose(blocks, whole, atol=1e-6)
    mid = whole[4000:12000]
    assert np.abs(mid).max() == pytest.approx(0.5, abs=0.01)


def test_features_are_bounded_and_tell_speech_from_silence(tmp_path: Path) -> None:
    x, rate = read_wav(speak('What do you see in front of you?', tmp_path / 'q.wav', pad_s=0.3))
    speech = audio_features(x, rate)
    quiet = audio_features(np.zeros(rate, np.float32), rate)
    assert len(speech) == len(quiet) == len(FEATURE_NAMES)
    assert all(0.0 <= v <= 1.0 for v in speech + quiet)
    named = dict(zip(FEATURE_NAMES, speech))
    assert named['level'] > dict(zip(FEATURE_NAMES, quiet))['level']
    assert named['voiced_fraction'] > 0.3
    assert audio_features(np.zeros(0, np.float32), rate) == (0.0,) * len(FEATURE_NAMES)
    bad = x.copy()
    bad[3] = np.nan
    with pytest.raises(MediaError):
        audio_features(bad, rate)
    with pytest.raises(MediaError):
        audio_features(x, 0)


def test_wav_file_source_unpaced_and_looped(tmp_path: Path) -> None:
    path = tmp_path / 't.wav'
    sf.write(str(path), _tone(22050, 0.5), 22050, subtype='PCM_16')
    src = WavFileSource(path, 16000, 0.032, realtime=False)
    blocks = []
    while (b := src.read()) is not None:
        blocks.append(b)
    assert src.ended and sum(b.size for b in blocks) == 8000
    assert all(b.size == 512 for b in blocks[:-1])
    slept: list[float] = []
    looped = WavFileSource(path, 16000, 0.1, realtime=True, loop=True, sleep=slept.append)
    sizes = [looped.read() for _ in range(12)]
    got = sum(b.size for b in sizes if b is not None)
    assert got == 12 * 1600 and not looped.ended      # past the end: from the start again
    assert slept, 'real-time pacing sleeps until each block is due'
