"""Word error rate of the speech role (faster-whisper base, int8, greedy) on espeak-ng speech.

The sentences (bench/data/asr_sentences.txt, robot-directed requests) are spoken by espeak-ng in
several voices at 130, 175 and 220 words per minute, resampled to 16 kHz and padded with 0.5 s
of silence, and transcribed by the project's SpeechRunner (the model manager's 'speech' entry,
the demo's offline:faster-whisper-base) one utterance at a time, as the microphone node hands
them over. WER = word-level edit distance / reference words, after lowercasing, dropping
punctuation and spelling small numbers as words; reported per voice, per rate and overall, with
the real-time factor. Synthetic voices are a floor for quality, not a claim about real speakers.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from math import gcd
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from common import percentile, report

HERE = Path(__file__).resolve().parent
SENTENCES = HERE / 'data' / 'asr_sentences.txt'
VOICES = ('en-us', 'en-gb', 'en+f3', 'en-gb-scotland', 'en-029')
RATES = (130, 175, 220)
SAMPLE_RATE = 16000
_NUMBERS = {'0': 'zero', '1': 'one', '2': 'two', '3': 'three', '4': 'four', '5': 'five',
            '6': 'six', '7': 'seven', '8': 'eight', '9': 'nine', '10': 'ten'}


def load_sentences(path: Path = SENTENCES) -> List[str]:
    return [s.strip() for s in path.read_text(encoding='utf-8').splitlines()
            if s.strip() and not s.lstrip().startswith('#')]


def synthesize(text: str, voice: str = 'en-us', rate: int = 150, pad_s: float = 0.5,
               sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`text` spoken by espeak-ng: mono float32 at `sample_rate`, `pad_s` of silence each side."""
    import soundfile as sf
    from scipy.signal import resample_poly
    exe = shutil.which('espeak-ng')
    if exe is None:
        raise SystemExit('espeak-ng is not installed (apt-get install espeak-ng)')
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / 'espeak.wav'
        subprocess.run([exe, '-v', voice, '-s', str(rate), '-w', str(raw), text], check=True,
                       capture_output=True, timeout=60)
        x, src = sf.read(str(raw), dtype='float32', always_2d=True)
    mono = x.mean(axis=1)
    if src != sample_rate:
        g = gcd(int(src), sample_rate)
        mono = resample_poly(mono, sample_rate // g, int(src) // g).astype(np.float32)
    pad = np.zeros(int(pad_s * sample_rate), dtype=np.float32)
    return np.clip(np.concatenate([pad, mono, pad]), -1.0, 1.0).astype(np.float32)


def write_wav(path: Path, x: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    import soundfile as sf
    sf.write(str(path), x, sample_rate, subtype='PCM_16')
    return path


def words(text: str) -> List[str]:
    t = re.sub(r"[^a-z0-9' ]+", ' ', text.lower().replace('-', ' '))
    return [_NUMBERS.get(w, w) for w in t.split()]


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def speech_model(threads: int = 0) -> Tuple[Any, Any, Dict[str, Any]]:
    """(runner, loaded, entry): the demo's speech entry loaded by the project's SpeechRunner."""
    from common import offline_model_params

    from sage_ros.core.perception.speech import SpeechRunner
    mm = offline_model_params('demo')['/**/model_manager']['ros__parameters']
    entry = dict(mm['models']['speech']) if 'speech' in mm.get('models', {}) else {
        'model_id': 'faster-whisper-base', 'path': 'offline:faster-whisper-base',
        'dtype': 'int8', 'device': 'cpu'}
    try:
        from sage_ros.core.models import ModelSpec
        spec: Any = ModelSpec(role='speech', model_id=entry['model_id'], path=entry['path'],
                              dtype=entry.get('dtype', 'int8'), device=entry.get('device', 'cpu'),
                              kind='speech', language=entry.get('language', ''))
    except (TypeError, ValueError):   # a ModelSpec without kinds: the runner reads these only
        spec = SimpleNamespace(role='speech', model_id=entry['model_id'], path=entry['path'],
                               dtype=entry.get('dtype', 'int8'), device=entry.get('device', 'cpu'),
                               language=entry.get('language', ''))
    runner = SpeechRunner()
    info = runner.inspect(spec)
    t0 = time.monotonic()
    model, _ = runner.load(spec, info, lambda _p: None, None)
    entry['load_s'] = round(time.monotonic() - t0, 3)
    return runner, SimpleNamespace(spec=spec, model=model), entry


def transcribe(runner: Any, loaded: Any, audio: np.ndarray) -> Tuple[str, float]:
    from sage_ros.core.inference import TASK_TRANSCRIBE, InferRequest
    out = runner.run(loaded, InferRequest(task=TASK_TRANSCRIBE, audio=audio,
                                          sample_rate=SAMPLE_RATE), None)
    return out.text, float(out.run_s)


def transcribe_detected(runner: Any, loaded: Any, audio: np.ndarray) -> str:
    """The same runner and model with the language detected per utterance (`language: ''`)
    instead of the configured one: what the entry's `language` is worth."""
    from dataclasses import replace
    spec = replace(loaded.spec, language='') if hasattr(loaded.spec, '__dataclass_fields__') \
        else SimpleNamespace(**{**vars(loaded.spec), 'language': ''})
    return transcribe(runner, SimpleNamespace(spec=spec, model=loaded.model), audio)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--voices', default=','.join(VOICES))
    ap.add_argument('--rates', default=','.join(str(r) for r in RATES))
    ap.add_argument('--sentences', type=int, default=0, help='only the first N (0 = all)')
    ap.add_argument('--detected', action='store_true',
                    help="also decode each clip with the language detected (language '')")
    ap.add_argument('--show-errors', type=int, default=10, help='worst transcripts to list')
    args = ap.parse_args()
    voices = [v for v in args.voices.split(',') if v]
    rates = [int(r) for r in args.rates.split(',') if r]
    sentences = load_sentences()
    if args.sentences:
        sentences = sentences[:args.sentences]

    runner, loaded, entry = speech_model()
    transcribe(runner, loaded, synthesize('warm up', 'en-us', 175))
    cells: Dict[Tuple[str, int], List[Tuple[int, int]]] = {}
    detected: Dict[Tuple[str, int], List[Tuple[int, int]]] = {}
    rtf: List[float] = []
    worst: List[Dict[str, Any]] = []
    for voice in voices:
        for rate in rates:
            for s in sentences:
                audio = synthesize(s, voice, rate)
                hyp, run_s = transcribe(runner, loaded, audio)
                ref = words(s)
                errors = edit_distance(ref, words(hyp))
                cells.setdefault((voice, rate), []).append((errors, len(ref)))
                rtf.append(run_s / (audio.size / SAMPLE_RATE))
                if args.detected:
                    detected.setdefault((voice, rate), []).append(
                        (edit_distance(ref, words(transcribe_detected(runner, loaded, audio))),
                         len(ref)))
                if errors:
                    worst.append({'voice': voice, 'rate': rate, 'errors': errors,
                                  'reference': s, 'heard': hyp})

    def wer(pairs: List[Tuple[int, int]]) -> float:
        return round(sum(e for e, _ in pairs) / max(1, sum(n for _, n in pairs)), 4)

    per_voice = {v: wer([p for (vv, _), ps in cells.items() if vv == v for p in ps])
                 for v in voices}
    per_rate = {str(r): wer([p for (_, rr), ps in cells.items() if rr == r for p in ps])
                for r in rates}
    per_cell = {f'{v}@{r}': wer(ps) for (v, r), ps in cells.items()}
    everything = [p for ps in cells.values() for p in ps]
    sentence_exact = sum(1 for e, _ in everything if e == 0) / max(1, len(everything))
    worst.sort(key=lambda w: -w['errors'])
    forced: Dict[str, Any] = {}
    if detected:
        forced = {'wer_language_detected': wer([p for ps in detected.values() for p in ps]),
                  'wer_per_voice_language_detected': {
                      v: wer([p for (vv, _), ps in detected.items() if vv == v for p in ps])
                      for v in voices},
                  'note_language_detected': 'the same runner with the language detected per '
                                            "utterance (language '') instead of configured"}
    report('asr_wer', {
        'model': entry.get('model_id'), 'path': entry.get('path'), 'dtype': entry.get('dtype'),
        'language': entry.get('language', '') or 'detected',
        'load_s': entry.get('load_s'), 'decoding': 'greedy (beam 1), no VAD filter',
        'sentences': len(sentences), 'voices': voices, 'rates_wpm': rates,
        'utterances': len(everything), 'wer': wer(everything),
        'sentence_exact_fraction': round(sentence_exact, 4),
        'wer_per_voice': per_voice, 'wer_per_rate': per_rate, 'wer_per_voice_rate': per_cell,
        'rtf': {'p50': round(percentile(rtf, 50), 4), 'p99': round(percentile(rtf, 99), 4),
                'mean': round(statistics.fmean(rtf), 4)},
        **forced, 'worst': worst[:args.show_errors]})


if __name__ == '__main__':
    main()
