"""Speech to text with faster-whisper (CTranslate2): the runner of the 'speech' model kind.

The model is a CTranslate2 Whisper directory (`model.bin`, `config.json`, `tokenizer.json`;
`sage models prepare` assembles `offline:faster-whisper-base`). Nothing is ever downloaded: a
path that is not such a directory is a LoadError.

Decoding is greedy (beam 1, temperature 0, no fallback) with no VAD and no conditioning on
earlier text: the microphone node has already cut the audio into one utterance, a turn waits
for this transcript, and the token cap per second of audio bounds what noise can cost (with
faster-whisper's temperature fallback, 2 s of white noise took 14 s here; without, under 2 s).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

import numpy as np

from ..inference import KIND_SPEECH, TASK_TRANSCRIBE, InferOutput, InferRequest, MediaError
from ..models import (OFFLINE_PREFIX, Cancelled, LoadError, LoadProgress, ModelError,
                      WeightInfo, resolve_model_path)

if TYPE_CHECKING:
    from ..models import LoadedModel, ModelSpec

StopFn = Callable[[], bool]

SAMPLE_RATE = 16000             # [Hz] what Whisper's feature extractor expects
MIN_AUDIO_S = 0.1               # [s] shorter than this holds no word
MAX_PEAK = 1.5                  # above this the samples are not float audio in [-1, 1]
TOKENS_PER_S = 8.0             # decode cap per second of audio (speech is ~4 tokens/s)
MAX_WINDOW_TOKENS = 200         # Whisper's 448-token context also holds the prompt (<= 223)
# A window the model itself finds is not speech is dropped: on noise Whisper writes text such
# as "1.0.0.0." or "1kg" with no_speech_prob 0.77-0.79 (espeak speech: 0.01-0.08). Whisper's own
# rule (no_speech > 0.6 AND avg_logprob < -1) let those through (avg_logprob -0.7).
NO_SPEECH_DROP = 0.6
THREADS_ENV = 'SAGE_ASR_THREADS'
REQUIRED_FILES = ('model.bin', 'config.json', 'tokenizer.json')
_CT2_MAGIC_VERSIONS = range(1, 64)   # model.bin starts with a small little-endian uint32 version

# Memory estimate. The shipped weights are float16 (model.bin ~ 2 bytes per parameter); the
# compute type converts them at load time. Measured with faster-whisper-base on CPU: int8 RSS
# +138 MB after load, +179 MB after a first transcription; float32 +348 / +389 MB (model.bin
# is 145 MB). So: weights = model.bin size x the ratio below, plus a fixed working set.
_WEIGHT_RATIO: Dict[str, float] = {
    'int8': 0.5, 'int8_float32': 0.5, 'int8_float16': 0.5, 'int8_bfloat16': 0.5,
    'int16': 1.0, 'float16': 1.0, 'bfloat16': 1.0, 'float32': 2.0}
WORKING_SET_BYTES = 96 << 20    # [bytes] runtime, mel features, decoder caches


def _compute_type(spec: 'ModelSpec') -> str:
    return spec.dtype or 'default'


def estimate_bytes(model_bin_bytes: int, compute_type: str, device: str) -> int:
    """Memory a loaded Whisper model takes: the converted weights plus a working set.
    'default' keeps float16 on CUDA and computes in float32 on a CPU."""
    ratio = _WEIGHT_RATIO.get(compute_type)
    if ratio is None:  # 'default' and anything CTranslate2 picks itself
        ratio = 1.0 if device.startswith('cuda') else 2.0
    return int(model_bin_bytes * ratio) + WORKING_SET_BYTES


def _broken(spec: 'ModelSpec', why: str) -> LoadError:
    hint = ' (run `sage models prepare`)' if spec.path.startswith(OFFLINE_PREFIX) else ''
    return LoadError(f'cannot load speech model for role {spec.role!r}: {why}{hint}')


def _split_device(spec: 'ModelSpec') -> Tuple[str, int]:
    device = spec.device or 'cpu'
    if device == 'cpu':
        return 'cpu', 0
    if device == 'cuda' or device.startswith('cuda:'):
        return 'cuda', int(device.partition(':')[2] or 0)
    raise _broken(spec, f'device {device!r} is not supported by CTranslate2 (use cpu or cuda)')


def cpu_threads() -> int:
    """Threads for CPU inference: $SAGE_ASR_THREADS, or 0 for CTranslate2's default."""
    raw = os.environ.get(THREADS_ENV, '').strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise LoadError(f'{THREADS_ENV}={raw!r} is not a thread count (a whole number >= 0)')
    return value


def token_cap(duration_s: float) -> int:
    """Tokens a window may decode: generous for speech (about 3 words a second), and a bound
    on the time a hallucination loop over noise can take."""
    return min(MAX_WINDOW_TOKENS, int(TOKENS_PER_S * min(duration_s, 30.0)) + 16)


def check_audio(request: InferRequest) -> np.ndarray:
    """The request's audio as mono float32 at 16 kHz, or MediaError saying what is wrong."""
    audio = request.audio
    if audio is None:
        raise MediaError('no audio in the request')
    x = np.asarray(audio)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise MediaError(f'audio must be mono (one channel), got an array of shape {x.shape}')
    if not np.issubdtype(x.dtype, np.floating):
        raise MediaError(f'audio must be float samples in [-1, 1], got {x.dtype}')
    if request.sample_rate <= 0:
        raise MediaError(f'bad sample rate {request.sample_rate}')
    if x.size < MIN_AUDIO_S * request.sample_rate:
        raise MediaError(f'audio too short: {x.size / request.sample_rate:.3f} s '
                         f'(at least {MIN_AUDIO_S} s)')
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise MediaError('audio has NaN or infinite samples')
    peak = float(np.abs(x).max())
    if peak > MAX_PEAK:
        raise MediaError(f'audio peak {peak:.1f} is outside [-1, 1]: pass float samples, not '
                         'raw PCM values')
    if request.sample_rate != SAMPLE_RATE:
        from .audio import resample   # numpy/scipy only
        x = np.asarray(resample(x, request.sample_rate, SAMPLE_RATE), dtype=np.float32)
    return x


class SpeechRunner:
    """faster-whisper behind the pool's Runner interface (task 'transcribe')."""

    kind = KIND_SPEECH

    def inspect(self, spec: 'ModelSpec') -> WeightInfo:
        directory = Path(resolve_model_path(spec.path))
        if not directory.is_dir():
            raise _broken(spec, f'{directory} is not a directory (a CTranslate2 Whisper model '
                                'directory is needed; nothing is downloaded)')
        missing = [n for n in REQUIRED_FILES if not (directory / n).is_file()]
        if missing:
            raise _broken(spec, f'{", ".join(missing)} missing in {directory}')
        try:
            config = json.loads((directory / 'config.json').read_text())
            if not isinstance(config, dict):
                raise ValueError('not an object')
            json.loads((directory / 'tokenizer.json').read_text())
            with open(directory / 'model.bin', 'rb') as fh:
                head = fh.read(4)
            size = (directory / 'model.bin').stat().st_size
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise _broken(spec, f'unreadable file in {directory}: {exc}') from None
        if len(head) < 4 or int.from_bytes(head, 'little') not in _CT2_MAGIC_VERSIONS:
            raise _broken(spec, f'{directory / "model.bin"} is not a CTranslate2 model')
        files = tuple(directory / n for n in REQUIRED_FILES)
        file_bytes = sum(f.stat().st_size for f in files)
        device, _ = _split_device(spec)
        return WeightInfo(directory, files, file_bytes,
                          estimate_bytes(size, _compute_type(spec), device))

    def import_libraries(self) -> None:
        """faster-whisper with CTranslate2, PyAV and onnxruntime: seconds of imports, done
        before the load is measured (and at the model manager's configure)."""
        import faster_whisper  # noqa: F401

    def load(self, spec: 'ModelSpec', info: WeightInfo, report: Callable[[LoadProgress], None],
             should_stop: Optional[StopFn]) -> Tuple[Any, Any]:
        device, index = _split_device(spec)
        threads = cpu_threads()
        if should_stop is not None and should_stop():
            raise Cancelled(f'loading role {spec.role!r} cancelled')
        # The pool has read the files through the page cache (fraction 0-0.8): building the
        # CTranslate2 model is the rest.
        shards, total = len(info.files), info.file_bytes
        report(LoadProgress(spec.role, 'weights', 0.85, total, total, shards, shards))
        try:
            from faster_whisper import WhisperModel
        except ImportError as exc:
            raise LoadError(f'speech role {spec.role!r} needs faster-whisper: {exc}') from None
        try:
            model = WhisperModel(str(info.directory), device=device, device_index=index,
                                 compute_type=_compute_type(spec), cpu_threads=threads)
        except (RuntimeError, ValueError, OSError) as exc:
            # CTranslate2 says what is wrong: an unknown compute type, no CUDA, a bad model.bin
            raise _broken(spec, str(exc).strip().splitlines()[0] if str(exc).strip()
                          else type(exc).__name__) from None
        report(LoadProgress(spec.role, 'weights', 0.95, total, total, shards, shards))
        return model, None

    def tensor_bytes(self, model: Any) -> int:
        return 0   # CTranslate2 keeps its weights outside torch: the pool measures RSS

    def run(self, loaded: 'LoadedModel', request: InferRequest,
            should_stop: Optional[StopFn]) -> InferOutput:
        if request.task != TASK_TRANSCRIBE:
            raise ModelError(f'a speech model serves {TASK_TRANSCRIBE!r}, not {request.task!r}')
        audio = check_audio(request)
        duration = audio.size / SAMPLE_RATE
        t0 = time.monotonic()
        try:
            segments, info = loaded.model.transcribe(
                audio, language=loaded.spec.language.strip() or None,
                beam_size=1, temperature=0.0, vad_filter=False,
                condition_on_previous_text=False, initial_prompt=request.prompt.strip() or None,
                max_new_tokens=min(request.max_new_tokens or token_cap(duration),
                                   MAX_WINDOW_TOKENS))
            texts = []
            no_speech = 0.0
            count = dropped = 0
            for segment in segments:   # decoding happens while iterating
                if should_stop is not None and should_stop():
                    raise Cancelled('transcription cancelled')
                count += 1
                no_speech = max(no_speech, float(segment.no_speech_prob))
                if segment.no_speech_prob > NO_SPEECH_DROP:
                    dropped += 1
                    continue
                texts.append(segment.text.strip())
        except ModelError:
            raise
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f'transcription failed: {exc}') from None
        run_s = time.monotonic() - t0
        text = ' '.join(t for t in texts if t)
        return InferOutput(
            text=text, language=str(info.language or ''), run_s=run_s,
            extra={'audio_s': round(duration, 3), 'rtf': round(run_s / duration, 3),
                   'language_probability': round(float(info.language_probability or 0.0), 3),
                   'segments': count, 'dropped_segments': dropped,
                   'no_speech_prob': round(no_speech, 3),
                   'compute_type': _compute_type(loaded.spec)})
