"""Voice activity (core.perception.vad): both detectors on espeak-ng speech, silence and noise;
the segmenter's timing on frames made here, where every boundary is known."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest

from media_support import speak
from sage_ros.core.inference import MediaError
from sage_ros.core.perception.audio import read_wav
from sage_ros.core.perception.vad import (EnergyVad, SileroVad, UtteranceSegmenter, Utterance,
                                          VoicePipeline, make_vad, silero_model_path)

RATE = 16000
FRAME = 512


def _run(kind: str, x: np.ndarray, block: int = 700) -> List[Utterance]:
    vad = make_vad(kind, RATE)
    pipe = VoicePipeline(vad, UtteranceSegmenter(RATE, vad.frame_samples))
    out: List[Utterance] = []
    for i in range(0, x.size, block):   # blocks that are not whole frames
        out.extend(pipe.feed(x[i:i + block]))
    out.extend(pipe.finish())
    return out


@pytest.fixture(scope='module')
def phrase(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    path = speak('Please turn left and go to the kitchen.',
                 tmp_path_factory.mktemp('speech') / 'utt.wav', pad_s=1.0)
    x, rate = read_wav(path)
    assert rate == RATE
    return x


@pytest.mark.parametrize('kind', ['energy', 'silero'])
def test_speech_is_one_utterance_with_pre_roll_and_hangover(kind: str, phrase: np.ndarray
                                                            ) -> None:
    utts = _run(kind, phrase)
    assert len(utts) == 1
    u = utts[0]
    # The phrase starts after 1 s of padding and ends 1 s before the end.
    assert 0.8 < u.speech_start / RATE < 1.3
    assert phrase.size / RATE - 1.4 < u.speech_end / RATE < phrase.size / RATE - 0.8
    assert u.speech_start - u.start == pytest.approx(0.2 * RATE, abs=1)   # pre-roll
    assert u.hangover_s == pytest.approx(0.3, abs=FRAME / RATE + 1e-9)    # min_silence_s
    assert u.samples.size == u.end - u.start
    assert np.array_equal(u.samples, phrase[u.start:u.end])
    assert 0.5 <= u.voice_probability <= 1.0 and not u.forced


@pytest.mark.parametrize('kind', ['energy', 'silero'])
def test_silence_and_noise_are_not_speech(kind: str) -> None:
    rng = np.random.default_rng(7)
    assert _run(kind, np.zeros(2 * RATE, np.float32)) == []
    assert _run(kind, (rng.standard_normal(2 * RATE) * 0.01).astype(np.float32)) == []


def test_silero_is_stateful_and_fresh_instances_agree(phrase: np.ndarray) -> None:
    assert silero_model_path().name == 'silero_vad_v6.onnx'
    a = SileroVad(RATE)
    b = a.fresh()
    frames = [phrase[i:i + FRAME] for i in range(0, 3 * RATE, FRAME)][:60]
    pa = [a.probability(f) for f in frames]
    pb = [b.probability(f) for f in frames]
    assert pa == pb and all(0.0 <= p <= 1.0 for p in pa)
    with pytest.raises(MediaError, match='512 samples'):
        a.probability(phrase[:100])
    with pytest.raises(MediaError, match='8000 or 16000'):
        SileroVad(22050)


def _frames(pattern: str) -> List[float]:
    """'s' = a speech frame (probability 0.9), '.' = silence (0.05), 'm' = undecided (0.4)."""
    return [{'s': 0.9, '.': 0.05, 'm': 0.4}[c] for c in pattern]


def _segment(pattern: str, **kw: float) -> List[Utterance]:
    seg = UtteranceSegmenter(RATE, FRAME, **kw)
    out: List[Utterance] = []
    for i, p in enumerate(_frames(pattern)):
        out.extend(seg.feed(np.full(FRAME, i, np.float32), p))
    return out + seg.flush()


def test_segmenter_timing_is_exact_in_samples() -> None:
    # 10 silent frames, 12 speech frames, 12 silent: min_silence 0.3 s = 9.4 frames -> closes
    # after the 10th silent frame; pre-roll 0.2 s = 3200 samples.
    utts = _segment('.' * 10 + 's' * 12 + '.' * 12)
    assert len(utts) == 1
    u = utts[0]
    assert u.speech_start == 10 * FRAME and u.speech_end == 22 * FRAME
    assert u.start == 10 * FRAME - 3200 and u.end == 32 * FRAME
    assert u.samples.size == u.end - u.start
    assert u.samples[0] == 3 and u.samples[-1] == 31   # frame i carries the value i


def test_segmenter_min_speech_hysteresis_max_length_and_flush() -> None:
    assert _segment('.' * 5 + 's' * 5 + '.' * 15) == []            # 0.16 s < min_speech 0.25 s
    # An undecided frame keeps the state: speech with 'm' inside is one utterance.
    utts = _segment('.' * 3 + 's' * 6 + 'm' * 8 + 's' * 6 + '.' * 12)
    assert len(utts) == 1 and utts[0].speech_end == 23 * FRAME
    # A gap shorter than min_silence_s does not split; a longer one does.
    assert len(_segment('s' * 10 + '.' * 5 + 's' * 10 + '.' * 12)) == 1
    assert len(_segment('s' * 10 + '.' * 12 + 's' * 10 + '.' * 12)) == 2
    # Continuous speech is cut at max_utterance_s and goes on in a new utterance.
    long = _segment('s' * 110 + '.' * 12, max_utterance_s=1.0)
    assert [u.forced for u in long] == [True, True, True, False]
    assert all(u.end - u.start <= RATE + FRAME for u in long[:3])
    assert [u.start for u in long[1:]] == [u.end for u in long[:-1]]   # no gap, no overlap
    # Still speaking at the end of the input: flush closes it.
    tail = _segment('.' * 3 + 's' * 20)
    assert len(tail) == 1 and tail[0].speech_end == 23 * FRAME


def test_garbage_is_refused() -> None:
    seg = UtteranceSegmenter(RATE, FRAME)
    with pytest.raises(MediaError, match='not a number'):
        seg.feed(np.zeros(FRAME, np.float32), float('nan'))
    bad = np.zeros(FRAME, np.float32)
    bad[1] = np.inf
    with pytest.raises(MediaError, match='NaN or infinite'):
        EnergyVad(RATE).probability(bad)
    with pytest.raises(MediaError, match='NaN or infinite'):
        VoicePipeline(EnergyVad(RATE), seg).feed(bad)
    with pytest.raises(MediaError, match='threshold'):
        UtteranceSegmenter(RATE, FRAME, threshold=0.0)
    with pytest.raises(MediaError, match='positive'):
        EnergyVad(0)
    with pytest.raises(MediaError, match='unknown VAD'):
        make_vad('webrtc', RATE)
