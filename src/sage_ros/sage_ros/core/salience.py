"""SNARC salience of text observations, computed from what each sensor has actually seen.

A first real scorer behind the `SalienceScorer` interface: every dimension is derived from the
observation and the sensor's own history, nothing is a per-modality constant. The cognition
engine replaces the detectors (embeddings, adaptive weights) without changing the interface.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, Protocol, Tuple

DIMENSIONS = ('surprise', 'novelty', 'arousal', 'reward', 'conflict')


@dataclass(frozen=True)
class SalienceScore:
    surprise: float
    novelty: float
    arousal: float
    reward: float
    conflict: float
    total: float


@dataclass(frozen=True)
class SalienceWeights:
    surprise: float = 0.25
    novelty: float = 0.3
    arousal: float = 0.2
    reward: float = 0.15
    conflict: float = 0.1

    def normalised(self) -> Tuple[float, ...]:
        raw = tuple(max(0.0, getattr(self, d)) for d in DIMENSIONS)
        s = sum(raw)
        if s <= 0.0:
            return tuple(1.0 / len(raw) for _ in raw)
        return tuple(w / s for w in raw)


class SalienceScorer(Protocol):
    """What the kernel needs from a salience engine."""

    def score(self, sensor_id: str, text: str) -> SalienceScore: ...

    def record_outcome(self, sensor_id: str, success: bool) -> None: ...


def _clip(x: float) -> float:
    if math.isnan(x):
        return 0.0
    return min(1.0, max(0.0, x))


def _features(text: str) -> Tuple[float, ...]:
    """A compact description of a text: length, shouting, punctuation, digits."""
    n = max(1, len(text))
    letters = [c for c in text if c.isalpha()]
    upper = sum(1 for c in letters if c.isupper()) / max(1, len(letters))
    marks = sum(1 for c in text if c in '!?') / n
    digits = sum(1 for c in text if c.isdigit()) / n
    return (math.log1p(len(text.split())) / 5.0, upper, 10.0 * marks, 5.0 * digits)


def _intensity(text: str) -> float:
    f = _features(text)
    return 0.5 * f[1] + 0.3 * min(f[2], 1.0) + 0.2 * min(f[0], 1.0)


def _trigrams(text: str) -> frozenset[str]:
    t = f'  {text.lower()}  '
    return frozenset(t[i:i + 3] for i in range(len(t) - 2))


@dataclass
class _SensorHistory:
    prediction: Tuple[float, ...] | None = None
    errors: Deque[float] = field(default_factory=lambda: deque(maxlen=100))
    seen: Deque[frozenset[str]] = field(default_factory=lambda: deque(maxlen=50))
    intensities: Deque[float] = field(default_factory=lambda: deque(maxlen=100))
    reward: float = 0.5


class TextSalience:
    """Per-sensor surprise, novelty, arousal and reward for text; conflict needs two sensors.

    - surprise: error of an EMA predictor of the text's features, relative to its recent errors
      (0 for a sensor's first observation: nothing was predicted yet).
    - novelty: 1 - the best character-trigram Jaccard similarity to the last 50 texts.
    - arousal: intensity (capitals, '!'/'?', length) relative to the sensor's history.
    - reward: EMA of dispatch outcomes, 0.5 until there are any.
    - conflict: 0 here; cross-sensor disagreement comes with the multi-sensor engine.
    """

    def __init__(self, weights: SalienceWeights | None = None, ema_alpha: float = 0.3,
                 reward_alpha: float = 0.2, min_error: float = 0.05) -> None:
        self.weights = weights or SalienceWeights()
        self._alpha = ema_alpha
        self._reward_alpha = reward_alpha
        self._min_error = min_error
        self._sensors: Dict[str, _SensorHistory] = {}

    def score(self, sensor_id: str, text: str) -> SalienceScore:
        h = self._sensors.setdefault(sensor_id, _SensorHistory())
        feats = _features(text)

        if h.prediction is None:
            surprise = 0.0
            h.prediction = feats
        else:
            err = math.dist(feats, h.prediction)
            # Relative to the usual error, but never to less than a floor: tiny fluctuations of
            # a steady input must not look maximally surprising.
            usual = max(statistics.fmean(h.errors) if h.errors else err, self._min_error)
            surprise = err / (err + usual) if err > 0 else 0.0
            h.errors.append(err)
            h.prediction = tuple(self._alpha * x + (1 - self._alpha) * p
                                 for x, p in zip(feats, h.prediction))

        grams = _trigrams(text)
        if h.seen:
            best = max(len(grams & g) / max(1, len(grams | g)) for g in h.seen)
            novelty = 1.0 - best
        else:
            novelty = 1.0
        h.seen.append(grams)

        inten = _intensity(text)
        if len(h.intensities) >= 2:
            mu = statistics.fmean(h.intensities)
            sd = statistics.pstdev(h.intensities)
            arousal = 0.5 + (inten - mu) / (2.0 * (sd + 0.1))
        else:
            arousal = inten
        h.intensities.append(inten)

        dims = [_clip(x) for x in (surprise, novelty, arousal, h.reward, 0.0)]
        total = _clip(sum(w * d for w, d in zip(self.weights.normalised(), dims)))
        return SalienceScore(surprise=dims[0], novelty=dims[1], arousal=dims[2], reward=dims[3],
                             conflict=dims[4], total=total)

    def record_outcome(self, sensor_id: str, success: bool) -> None:
        h = self._sensors.setdefault(sensor_id, _SensorHistory())
        h.reward += self._reward_alpha * ((1.0 if success else 0.0) - h.reward)
