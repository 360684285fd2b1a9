"""Audio samples without ROS: WAV decoding that rejects garbage, resampling, 16-bit PCM, levels
and the compact acoustic features the kernel scores for salience.

Samples are mono float32 in [-1, 1] everywhere; a decoded file with several channels is mixed
down. Every way an input can be unusable raises `MediaError` with a message for one log line.
"""

from __future__ import annotations

import io
import math
import queue
import struct
import time
from math import gcd
from pathlib import Path
from typing import Any, Callable, Optional, Tuple, Union

import numpy as np

from ..inference import MediaError, read_media_file

SILENCE_DBFS = -100.0          # [dBFS] what an all-zero signal measures (instead of -inf)
FEATURE_FRAME_S = 0.03         # [s] frames of the voiced-fraction feature
VOICED_DBFS = -40.0            # [dBFS] a feature frame this loud counts as voiced
MAX_FEATURE_DURATION_S = 30.0  # [s] duration feature saturates here (log scale)
FEATURE_NAMES = ('level', 'peak', 'duration', 'zero_crossing_rate', 'spectral_centroid',
                 'spectral_rolloff', 'voiced_fraction')

WavInput = Union[str, Path, bytes, bytearray, memoryview]


def _riff_check(data: bytes) -> None:
    """A RIFF/WAVE file whose data chunk declares more bytes than the file holds is truncated;
    libsndfile reads what is there without a word, so look at the header ourselves."""
    if len(data) < 12 or data[:4] not in (b'RIFF', b'RIFX') or data[8:12] != b'WAVE':
        return
    order = '<' if data[:4] == b'RIFF' else '>'
    pos = 12
    while pos + 8 <= len(data):
        cid = data[pos:pos + 4]
        (size,) = struct.unpack(order + 'I', data[pos + 4:pos + 8])
        body = pos + 8
        if cid == b'data':
            # 0 and 0xFFFFFFFF: a streamed file whose writer never filled in the size.
            if size not in (0, 0xFFFFFFFF) and body + size > len(data):
                raise MediaError(f'truncated WAV: the data chunk declares {size} bytes but the '
                                 f'file holds {len(data) - body}')
            return
        pos = body + size + (size & 1)
    raise MediaError('WAV file has no data chunk (truncated or not audio)')


def _fmt_rate(data: bytes) -> Optional[int]:
    """The sample rate a RIFF/WAVE `fmt ` chunk declares (None if not a readable WAV header)."""
    if len(data) < 12 or data[:4] != b'RIFF' or data[8:12] != b'WAVE':
        return None
    pos = 12
    while pos + 8 <= len(data):
        cid = data[pos:pos + 4]
        (size,) = struct.unpack('<I', data[pos + 4:pos + 8])
        if cid == b'fmt ' and size >= 8 and pos + 16 <= len(data):
            return int(struct.unpack('<I', data[pos + 12:pos + 16])[0])
        pos += 8 + size + (size & 1)
    return None


def read_wav(src: WavInput) -> Tuple[np.ndarray, int]:
    """Decode a WAV (or any file libsndfile reads) from a path or its bytes into (mono float32
    samples, sample rate). MediaError for a missing, empty, truncated or corrupt file, a sample
    rate of 0, no samples, or NaN/inf samples."""
    import soundfile as sf

    if isinstance(src, (str, Path)):
        data = read_media_file(src)
        what = Path(src).name
    else:
        data = bytes(src)
        what = f'{len(data)} bytes'
    if not data:
        raise MediaError(f'empty audio ({what})')
    declared = _fmt_rate(data)
    if declared == 0:
        raise MediaError(f'audio ({what}) declares a sample rate of 0 Hz')
    _riff_check(data)
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype='float32', always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, EOFError) as exc:
        reason = getattr(exc, 'error_string', '') or str(exc)
        raise MediaError(f'cannot decode audio ({what}): {reason}') from exc
    if rate <= 0:
        raise MediaError(f'audio ({what}) declares a sample rate of {rate} Hz')
    if samples.size == 0:
        raise MediaError(f'audio ({what}) holds no samples')
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    check_samples(mono, what)
    return np.ascontiguousarray(mono, dtype=np.float32), int(rate)


def check_samples(x: np.ndarray, what: str = 'audio') -> None:
    """MediaError unless `x` is a 1-D array of finite numbers."""
    if x.ndim != 1:
        raise MediaError(f'{what}: expected mono samples, got shape {x.shape}')
    if not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise MediaError(f'{what}: {bad} sample(s) are NaN or infinite')


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """A whole signal at `dst_rate` (band-limited, by the FFT: the output has
    round(len * dst / src) samples and no delay). For a stream of blocks use `StreamResampler`."""
    if src_rate <= 0 or dst_rate <= 0:
        raise MediaError(f'cannot resample from {src_rate} Hz to {dst_rate} Hz')
    x = np.asarray(x, dtype=np.float32)
    if src_rate == dst_rate or x.size == 0:
        return x.copy()
    n_out = int(round(x.size * dst_rate / src_rate))
    if n_out == 0:
        return np.zeros(0, dtype=np.float32)
    spectrum = np.fft.rfft(x.astype(np.float64))
    bins = n_out // 2 + 1
    out_spec = np.zeros(bins, dtype=np.complex128)
    keep = min(bins, spectrum.size)
    out_spec[:keep] = spectrum[:keep]
    y = np.fft.irfft(out_spec, n_out) * (n_out / x.size)
    return y.astype(np.float32)


class StreamResampler:
    """Rational-ratio resampling of a stream of blocks (a capture device's rate to the node's):
    a windowed-sinc polyphase low-pass with the history carried from block to block, so block
    edges leave no clicks. Delays the signal by about `taps / 2` input samples."""

    def __init__(self, src_rate: int, dst_rate: int, taps: int = 16) -> None:
        if src_rate <= 0 or dst_rate <= 0:
            raise MediaError(f'cannot resample from {src_rate} Hz to {dst_rate} Hz')
        g = gcd(src_rate, dst_rate)
        self.up, self.down = dst_rate // g, src_rate // g
        self.taps = taps
        n = taps * self.up
        cutoff = 1.0 / max(self.up, self.down)          # of the upsampled Nyquist
        t = np.arange(n) - (n - 1) / 2.0
        h = cutoff * np.sinc(cutoff * t) * np.hanning(n) * self.up
        self._h = h.astype(np.float64)
        self._hist = np.zeros(taps - 1, dtype=np.float64)
        self._pos = (taps - 1) * self.up    # next output's position, upsampled, in the buffer

    def process(self, x: np.ndarray) -> np.ndarray:
        if self.up == self.down:
            return np.asarray(x, dtype=np.float32).copy()
        buf = np.concatenate([self._hist, np.asarray(x, dtype=np.float64)])
        last = (buf.size - 1) * self.up        # the last position with its newest input known
        count = 0 if self._pos > last else (last - self._pos) // self.down + 1
        pos = self._pos + self.down * np.arange(count)
        newest, phase = pos // self.up, pos % self.up
        j = np.arange(self.taps)
        idx = newest[:, None] - j[None, :]
        y = (buf[idx] * self._h[phase[:, None] + j[None, :] * self.up]).sum(axis=1)
        next_pos = self._pos + self.down * count
        drop = max(0, min(buf.size - (self.taps - 1), next_pos // self.up - (self.taps - 1)))
        self._hist = buf[drop:]
        self._pos = next_pos - drop * self.up
        return y.astype(np.float32)


def to_pcm16(x: np.ndarray) -> bytes:
    """Signed 16-bit little-endian bytes of float samples (clipped to [-1, 1)); the scale is
    32768, as libsndfile's and `from_pcm16`'s, so bytes -> floats -> bytes is exact."""
    scaled = np.round(np.asarray(x, dtype=np.float64) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype('<i2').tobytes()


def from_pcm16(data: Union[bytes, bytearray, memoryview]) -> np.ndarray:
    """Float32 samples of signed 16-bit little-endian bytes; MediaError on an odd length."""
    raw = bytes(data)
    if len(raw) % 2:
        raise MediaError(f'pcm_s16le data has an odd length ({len(raw)} bytes)')
    return np.frombuffer(raw, dtype='<i2').astype(np.float32) / 32768.0


def _dbfs(value: float) -> float:
    return SILENCE_DBFS if value <= 10 ** (SILENCE_DBFS / 20) else max(SILENCE_DBFS,
                                                                       20 * math.log10(value))


def level_dbfs(x: np.ndarray) -> float:
    """RMS level [dBFS] (full-scale sine = -3 dBFS), SILENCE_DBFS for silence or no samples."""
    if x.size == 0:
        return SILENCE_DBFS
    return _dbfs(float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))))


def peak_dbfs(x: np.ndarray) -> float:
    """Peak level [dBFS], SILENCE_DBFS for silence or no samples."""
    if x.size == 0:
        return SILENCE_DBFS
    return _dbfs(float(np.max(np.abs(x))))


def _unit(db: float) -> float:
    return min(1.0, max(0.0, (db - SILENCE_DBFS) / -SILENCE_DBFS))


def audio_features(x: np.ndarray, rate: int) -> Tuple[float, ...]:
    """Compact acoustic features of a clip, each in [0, 1], in FEATURE_NAMES order:
    level and peak (dBFS mapped from [-100, 0]), duration (log scale, 1 at 30 s), zero-crossing
    rate, spectral centroid and 85 % rolloff (fractions of the Nyquist frequency), and the
    fraction of 30 ms frames louder than -40 dBFS."""
    if rate <= 0:
        raise MediaError(f'audio features need a positive sample rate, got {rate}')
    x = np.asarray(x, dtype=np.float32)
    check_samples(x)
    if x.size == 0:
        return (0.0,) * len(FEATURE_NAMES)
    duration = x.size / rate
    dur = min(1.0, math.log1p(duration) / math.log1p(MAX_FEATURE_DURATION_S))
    signs = np.signbit(x)
    zcr = float(np.count_nonzero(signs[1:] != signs[:-1])) / max(1, x.size - 1)
    power = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    total = float(power.sum())
    if total > 0.0:
        freqs = np.linspace(0.0, 1.0, power.size)
        centroid = float((freqs * power).sum() / total)
        rolloff = float(freqs[min(power.size - 1,
                                  int(np.searchsorted(np.cumsum(power), 0.85 * total)))])
    else:
        centroid = rolloff = 0.0
    frame = max(1, int(FEATURE_FRAME_S * rate))
    n = x.size // frame
    if n:
        rms = np.sqrt(np.mean(np.square(x[:n * frame].reshape(n, frame), dtype=np.float64),
                              axis=1))
        voiced = float(np.mean(rms > 10 ** (VOICED_DBFS / 20)))
    else:
        voiced = float(level_dbfs(x) > VOICED_DBFS)
    values = (_unit(level_dbfs(x)), _unit(peak_dbfs(x)), dur, zcr, centroid, rolloff, voiced)
    return tuple(min(1.0, max(0.0, float(v))) for v in values)


# --- Sources: where the microphone node's samples come from (no ROS here either) -------------

class AudioSourceError(RuntimeError):
    """A capture source that cannot start; the message names the device and the fix."""


class WavFileSource:
    """A decoded file played as a stream of `block_s` blocks at `sample_rate`: paced like a
    device when `realtime` (sleeps until each block's time), else as fast as it is read; from
    the start again at the end when `loop`."""

    def __init__(self, src: WavInput, sample_rate: int = 16000, block_s: float = 0.032,
                 realtime: bool = True, loop: bool = False,
                 sleep: Optional[Callable[[float], object]] = None) -> None:
        samples, rate = read_wav(src)
        self.file_rate = rate
        self.sample_rate = sample_rate
        self.samples = resample(samples, rate, sample_rate)
        self.duration_s = samples.size / rate
        self.block = max(1, int(round(block_s * sample_rate)))
        self.realtime = realtime
        self.loop = loop
        self.ended = False
        self.name = Path(src).name if isinstance(src, (str, Path)) else 'data'
        self._sleep = sleep if sleep is not None else time.sleep
        self._pos = 0
        self._played = 0          # samples handed out, over every loop
        self._t0: Optional[float] = None

    def open(self) -> None:
        self._t0 = None

    def read(self, timeout: float = 0.2) -> Optional[np.ndarray]:
        """The next block; None at the end (then `ended` is True)."""
        if self.ended:
            return None
        if self._pos >= self.samples.size:
            if not self.loop or self.samples.size == 0:
                self.ended = True
                return None
            self._pos = 0
        block = self.samples[self._pos:self._pos + self.block]
        self._pos += block.size
        self._played += block.size
        if self.realtime:
            now = time.monotonic()
            if self._t0 is None:
                self._t0 = now
            due = self._t0 + self._played / self.sample_rate
            if due > now:
                self._sleep(due - now)
        return block

    def close(self) -> None:
        self.ended = True


class SoundDeviceSource:
    """A capture device through PortAudio (sounddevice), in callback mode: the callback puts
    each block, mixed to mono, into a bounded queue (blocks that find it full are counted in
    `dropped`), and `read` resamples them to `sample_rate`. sounddevice is imported in `open`,
    so a machine without PortAudio only fails when a device is asked for."""

    def __init__(self, device: str = '', capture_rate: int = 0, channels: int = 1,
                 block_s: float = 0.032, sample_rate: int = 16000, queue_s: float = 2.0) -> None:
        self.device = device
        self.capture_rate = capture_rate
        self.channels = channels
        self.block_s = block_s
        self.sample_rate = sample_rate
        self.queue_s = queue_s
        self.dropped = 0
        self.ended = False
        self.name = device or 'default'
        self._queue: 'queue.Queue[np.ndarray]' = queue.Queue(maxsize=1)
        self._stream: Any = None
        self._resampler: Optional[StreamResampler] = None
        self.status_flags = 0

    @staticmethod
    def _device_arg(device: str) -> Union[int, str, None]:
        if not device:
            return None
        return int(device) if device.strip().isdigit() else device

    def open(self) -> None:
        """Start capturing; AudioSourceError (naming the device and the fix) when it cannot."""
        try:
            import sounddevice as sd
        except OSError as exc:   # the wheel does not bundle PortAudio
            raise AudioSourceError(
                f'cannot open audio input {self.name!r}: {exc} (install it: apt-get install '
                'libportaudio2; or set source:=file / source:=none)') from exc
        device = self._device_arg(self.device)
        try:
            info = sd.query_devices(device, kind='input')
        except (ValueError, sd.PortAudioError) as exc:
            found = [d['name'] for d in sd.query_devices() if d.get('max_input_channels', 0) > 0]
            if found:
                fix = (f'input devices: {", ".join(repr(n) for n in found)}; set parameter '
                       'device to one of them (name or index)')
            else:
                fix = ('PortAudio sees no input device at all (no sound card, or no access to '
                       '/dev/snd)')
            raise AudioSourceError(
                f'no audio input device {self.name!r} ({exc}); {fix}; or use source:=file or '
                'source:=none') from exc
        self.name = str(info.get('name', self.name))
        rate = self.capture_rate or int(round(float(info.get('default_samplerate', 0)) or
                                              self.sample_rate))
        self.capture_rate = rate
        blocksize = max(1, int(round(self.block_s * rate)))
        self._queue = queue.Queue(maxsize=max(4, int(self.queue_s / max(self.block_s, 1e-3))))
        self._resampler = StreamResampler(rate, self.sample_rate)

        def on_block(indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
            if status:
                self.status_flags += 1
            # int16 from the device, converted here: the same scale as `from_pcm16`, and a
            # format every ALSA device (the `file` plugin of the tests included) takes as is.
            block = indata.astype(np.float32) / 32768.0
            block = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
            try:
                self._queue.put_nowait(np.ascontiguousarray(block, dtype=np.float32))
            except queue.Full:
                self.dropped += 1

        try:
            self._stream = sd.InputStream(samplerate=rate, blocksize=blocksize, device=device,
                                          channels=self.channels, dtype='int16',
                                          callback=on_block)
            self._stream.start()
        except (ValueError, sd.PortAudioError) as exc:
            self._stream = None
            raise AudioSourceError(
                f'cannot start audio input {self.name!r} at {rate} Hz, {self.channels} '
                f'channel(s): {exc} (check parameters capture_rate and channels)') from exc

    def read(self, timeout: float = 0.2) -> Optional[np.ndarray]:
        """The next captured block at `sample_rate`, or None when none came within `timeout`."""
        try:
            block = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        assert self._resampler is not None
        return self._resampler.process(block)

    def close(self) -> None:
        self.ended = True
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.stop()
                stream.close()
            except Exception:  # noqa: BLE001 - PortAudio errors on the way out change nothing
                pass
