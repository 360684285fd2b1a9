"""Voice activity without ROS: a speech probability per frame, and frames cut into utterances.

- `EnergyVad`: deterministic, numpy only. A frame is speech when its RMS level is above
  max(`min_dbfs`, noise floor + `margin_db`), the floor being the 10th percentile of the recent
  frames' levels; the probability is a logistic of the distance to that threshold (0.5 on it).
- `SileroVad`: the Silero v6 ONNX model that faster-whisper ships in its package
  (faster_whisper/assets/silero_vad_v6.onnx), run with onnxruntime one 512-sample frame
  (32 ms at 16 kHz) at a time, its LSTM state and 64 samples of context carried over.
- `UtteranceSegmenter`: frames and their probabilities in, utterances out, with pre-roll,
  hangover (the silence that closed it), minimum speech and maximum length. No clock: the
  caller feeds frames, and every time is a sample count, so the result is deterministic.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, List, Optional, Protocol

import numpy as np

from ..inference import MediaError
from .audio import check_samples, level_dbfs

VAD_KINDS = ('silero', 'energy')
SILERO_RATES = (8000, 16000)
SILERO_CONTEXT = {16000: 64, 8000: 32}
SILERO_FRAME = {16000: 512, 8000: 256}


def frame_samples(sample_rate: int) -> int:
    """Samples per VAD frame: Silero's frame (32 ms) at 8 and 16 kHz, else 32 ms."""
    return SILERO_FRAME.get(sample_rate, max(1, int(round(0.032 * sample_rate))))


class Vad(Protocol):
    """A speech probability in [0, 1] per frame of `frame_samples` samples."""

    name: str
    sample_rate: int
    frame_samples: int

    def probability(self, frame: np.ndarray) -> float: ...

    def reset(self) -> None: ...

    def fresh(self) -> 'Vad': ...


class EnergyVad:
    """Level against an adaptive noise floor; see the module docstring."""

    name = 'energy'

    def __init__(self, sample_rate: int = 16000, min_dbfs: float = -35.0, margin_db: float = 10.0,
                 floor_window_s: float = 10.0, floor_min_frames: int = 10,
                 softness_db: float = 2.0) -> None:
        if sample_rate <= 0:
            raise MediaError(f'VAD sample rate must be positive, got {sample_rate}')
        self.sample_rate = sample_rate
        self.frame_samples = frame_samples(sample_rate)
        self.min_dbfs = min_dbfs
        self.margin_db = margin_db
        self.floor_min_frames = floor_min_frames
        self.softness_db = softness_db
        self._window = max(floor_min_frames, int(floor_window_s * sample_rate / self.frame_samples))
        self._levels: Deque[float] = collections.deque(maxlen=self._window)

    def threshold_dbfs(self) -> float:
        """The level a frame needs now to count as speech."""
        if len(self._levels) < self.floor_min_frames:
            return self.min_dbfs
        floor = float(np.percentile(np.fromiter(self._levels, dtype=np.float64), 10))
        return max(self.min_dbfs, floor + self.margin_db)

    def probability(self, frame: np.ndarray) -> float:
        check_samples(frame, 'VAD frame')
        level = level_dbfs(frame)
        threshold = self.threshold_dbfs()
        self._levels.append(level)
        z = (level - threshold) / self.softness_db
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))

    def reset(self) -> None:
        self._levels.clear()

    def fresh(self) -> 'EnergyVad':
        return EnergyVad(self.sample_rate, self.min_dbfs, self.margin_db,
                         self._window * self.frame_samples / self.sample_rate,
                         self.floor_min_frames, self.softness_db)


def silero_model_path() -> Path:
    """The Silero ONNX file inside the installed faster-whisper package (found without
    importing it); MediaError naming the fix when it is missing."""
    import importlib.util
    spec = importlib.util.find_spec('faster_whisper')
    if spec is None or not spec.submodule_search_locations:
        raise MediaError('Silero VAD needs the faster-whisper package (pip install '
                         'faster-whisper==1.2.1)')
    for root in spec.submodule_search_locations:
        path = Path(root) / 'assets' / 'silero_vad_v6.onnx'
        if path.is_file():
            return path
    raise MediaError('faster-whisper is installed without assets/silero_vad_v6.onnx')


class SileroVad:
    """Silero v6 run frame by frame with onnxruntime; see the module docstring. `fresh()` gives
    an instance with its own state that shares the loaded model."""

    name = 'silero'

    def __init__(self, sample_rate: int = 16000, session: Any = None) -> None:
        if sample_rate not in SILERO_RATES:
            raise MediaError(f'Silero VAD runs at 8000 or 16000 Hz, not {sample_rate}')
        self.sample_rate = sample_rate
        self.frame_samples = SILERO_FRAME[sample_rate]
        self._context_len = SILERO_CONTEXT[sample_rate]
        if session is None:
            session = self._load()
        self._session = session
        self.reset()

    @staticmethod
    def _load() -> Any:
        path = silero_model_path()
        try:
            import onnxruntime
        except ImportError as exc:
            raise MediaError('Silero VAD needs onnxruntime (installed with faster-whisper)') \
                from exc
        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4
        try:
            return onnxruntime.InferenceSession(str(path), sess_options=opts,
                                                providers=['CPUExecutionProvider'])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise MediaError(f'cannot load the Silero VAD model {path}: {exc}') from exc

    def reset(self) -> None:
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(self._context_len, dtype=np.float32)

    def fresh(self) -> 'SileroVad':
        return SileroVad(self.sample_rate, self._session)

    def probability(self, frame: np.ndarray) -> float:
        frame = np.asarray(frame, dtype=np.float32)
        check_samples(frame, 'VAD frame')
        if frame.size != self.frame_samples:
            raise MediaError(f'Silero VAD frames are {self.frame_samples} samples, '
                             f'got {frame.size}')
        x = np.concatenate([self._context, frame])[None, :]
        prob, self._h, self._c = self._session.run(None, {'input': x, 'h': self._h,
                                                          'c': self._c})
        self._context = frame[-self._context_len:].copy()
        return float(np.asarray(prob).reshape(-1)[0])


def make_vad(kind: str, sample_rate: int) -> Vad:
    """A VAD by name ('silero' or 'energy'); MediaError when it cannot be built."""
    if kind == 'silero':
        return SileroVad(sample_rate)
    if kind == 'energy':
        return EnergyVad(sample_rate)
    raise MediaError(f'unknown VAD {kind!r}: expected one of {", ".join(VAD_KINDS)}')


@dataclass
class Utterance:
    """One stretch of speech. Sample indices count from the first sample fed to the segmenter;
    `samples` spans [start, end): pre-roll before the speech, hangover after it."""

    samples: np.ndarray
    sample_rate: int
    start: int             # first sample of `samples`
    speech_start: int      # first sample of the first speech frame
    speech_end: int        # end of the last speech frame
    end: int               # end of `samples`
    voice_probability: float   # mean probability over the frames from speech start to its end
    forced: bool = False   # closed at max_utterance_s, not by silence
    probabilities: List[float] = field(default_factory=list, repr=False)

    @property
    def duration_s(self) -> float:
        return (self.end - self.start) / self.sample_rate

    @property
    def speech_s(self) -> float:
        return (self.speech_end - self.speech_start) / self.sample_rate

    @property
    def hangover_s(self) -> float:
        """End of speech -> the end of the audio that closed the utterance."""
        return (self.end - self.speech_end) / self.sample_rate


class UtteranceSegmenter:
    """Frames in, utterances out. A frame whose probability is at least `threshold` is speech;
    one below `threshold - 0.15` (Silero's hysteresis) is silence; in between keeps the current
    state. An utterance opens on a speech frame (with `pre_roll_s` of the audio before it),
    closes after `min_silence_s` of silence (kept as hangover) or at `max_utterance_s`, and is
    dropped when its speech lasts less than `min_speech_s`."""

    def __init__(self, sample_rate: int, frame_samples: int, threshold: float = 0.5,
                 pre_roll_s: float = 0.2, min_silence_s: float = 0.3,
                 min_speech_s: float = 0.25, max_utterance_s: float = 30.0) -> None:
        if sample_rate <= 0 or frame_samples <= 0:
            raise MediaError('segmenter needs a positive sample rate and frame size')
        if not 0.0 < threshold <= 1.0:
            raise MediaError(f'VAD threshold must be in (0, 1], got {threshold}')
        if max_utterance_s <= 0 or min_silence_s < 0 or min_speech_s < 0 or pre_roll_s < 0:
            raise MediaError('segmenter times must be non-negative (max_utterance_s positive)')
        self.sample_rate = sample_rate
        self.frame_samples = frame_samples
        self.threshold = threshold
        self.neg_threshold = max(0.0, threshold - 0.15)
        self.pre_roll = int(round(pre_roll_s * sample_rate))
        self.min_silence = int(round(min_silence_s * sample_rate))
        self.min_speech = int(round(min_speech_s * sample_rate))
        self.max_len = max(frame_samples, int(round(max_utterance_s * sample_rate)))
        self._fed = 0                    # samples fed so far
        self._roll: Deque[np.ndarray] = collections.deque()
        self._roll_len = 0
        self._open = False
        self._parts: List[np.ndarray] = []
        self._start = self._speech_start = self._speech_end = 0
        self._silence = 0                # samples of silence since the last speech frame
        self._speaking = False           # hysteresis state
        self._probs: List[float] = []
        self.last_probability = 0.0

    @property
    def speaking(self) -> bool:
        """An utterance is open."""
        return self._open

    @property
    def samples_fed(self) -> int:
        return self._fed

    def feed(self, frame: np.ndarray, probability: float) -> List[Utterance]:
        """One frame (any length; VAD frames normally) and its speech probability; returns the
        utterances this frame closed (zero or one, two only when max length cuts)."""
        frame = np.asarray(frame, dtype=np.float32)
        if not math.isfinite(probability):
            raise MediaError(f'VAD probability is not a number: {probability}')
        self.last_probability = probability
        begin, self._fed = self._fed, self._fed + frame.size
        if probability >= self.threshold:
            self._speaking = True
        elif probability < self.neg_threshold:
            self._speaking = False
        out: List[Utterance] = []
        if not self._open:
            if self._speaking:
                self._open = True
                self._parts = list(self._roll)
                self._start = begin - self._roll_len
                self._speech_start = begin
                self._speech_end = self._fed
                self._silence = 0
                self._probs = [probability]
                self._parts.append(frame)
                self._roll.clear()
                self._roll_len = 0
            else:
                self._remember(frame)
            return out
        self._parts.append(frame)
        if self._speaking:
            self._speech_end = self._fed
            self._silence = 0
        else:
            self._silence += frame.size
        self._probs.append(probability)
        if self._silence >= self.min_silence and not self._speaking:
            done = self._close(forced=False)
            if done is not None:
                out.append(done)
        elif self._fed - self._start >= self.max_len:
            done = self._close(forced=True)
            if done is not None:
                out.append(done)
        return out

    def flush(self) -> List[Utterance]:
        """End of the input: close an open utterance (its speech ends where it last was)."""
        if not self._open:
            return []
        done = self._close(forced=False)
        return [done] if done is not None else []

    def _remember(self, frame: np.ndarray) -> None:
        if self.pre_roll <= 0:
            return
        self._roll.append(frame)
        self._roll_len += frame.size
        while self._roll and self._roll_len - self._roll[0].size >= self.pre_roll:
            self._roll_len -= self._roll.popleft().size

    def _close(self, forced: bool) -> Optional[Utterance]:
        self._open = False
        samples = np.concatenate(self._parts) if self._parts else np.zeros(0, np.float32)
        # The hangover is the next utterance's pre-roll, should speech start again at once;
        # after a cut at max length the next one continues the audio without overlap.
        self._roll.clear()
        self._roll_len = 0
        if not forced:
            for part in self._parts:
                self._remember(part)
        self._parts = []
        # Pre-roll longer than asked (whole frames): trim to exactly pre_roll samples.
        extra = max(0, (self._speech_start - self._start) - self.pre_roll)
        start = self._start + extra
        samples = samples[extra:]
        speech_frames = max(1, int(math.ceil((self._speech_end - self._speech_start)
                                             / self.frame_samples)))
        probs = self._probs[:speech_frames]
        utt = Utterance(samples=samples, sample_rate=self.sample_rate, start=start,
                        speech_start=self._speech_start, speech_end=self._speech_end,
                        end=self._fed, voice_probability=float(np.mean(probs)) if probs else 0.0,
                        forced=forced, probabilities=list(self._probs))
        self._probs = []
        self._silence = 0
        if forced:
            self._speaking = False   # the next speech frame opens a new utterance
        if utt.speech_end - utt.speech_start < self.min_speech:
            return None
        return utt


class VoicePipeline:
    """Blocks of any length in, utterances out: cuts the blocks into the VAD's frames (the
    remainder waits for the next block), asks the VAD, and feeds the segmenter. The microphone
    node runs its device or file through one, and every played file through a fresh one."""

    def __init__(self, vad: Vad, segmenter: UtteranceSegmenter) -> None:
        if vad.frame_samples != segmenter.frame_samples or vad.sample_rate != segmenter.sample_rate:
            raise MediaError('VAD and segmenter disagree on frame size or sample rate')
        self.vad = vad
        self.segmenter = segmenter
        self._pending = np.zeros(0, dtype=np.float32)

    @property
    def sample_rate(self) -> int:
        return self.segmenter.sample_rate

    def feed(self, block: np.ndarray) -> List[Utterance]:
        block = np.asarray(block, dtype=np.float32)
        check_samples(block, 'audio block')
        buf = np.concatenate([self._pending, block]) if self._pending.size else block
        n = self.vad.frame_samples
        whole = buf.size // n * n
        out: List[Utterance] = []
        for i in range(0, whole, n):
            frame = buf[i:i + n]
            out.extend(self.segmenter.feed(frame, self.vad.probability(frame)))
        self._pending = buf[whole:].copy()
        return out

    def finish(self, pad_s: float = 0.5) -> List[Utterance]:
        """End of input: `pad_s` of silence (so a last utterance closes as it would on a live
        microphone), then whatever is still open."""
        out = self.feed(np.zeros(int(round(pad_s * self.sample_rate)), dtype=np.float32))
        out.extend(self.segmenter.flush())
        return out

    def fresh(self) -> 'VoicePipeline':
        """A pipeline with the same settings and its own state (the same loaded VAD model)."""
        s = self.segmenter
        seg = UtteranceSegmenter(s.sample_rate, s.frame_samples, s.threshold,
                                 s.pre_roll / s.sample_rate, s.min_silence / s.sample_rate,
                                 s.min_speech / s.sample_rate, s.max_len / s.sample_rate)
        return VoicePipeline(self.vad.fresh(), seg)
