"""SNARC salience per sensor: surprise, novelty, arousal, reward and conflict, each in [0, 1].

Every dimension comes from the observation and the sensor's own history; nothing is a
per-modality constant (the prototype's live loop used constants, so its FOCUS state was
unreachable). An observation carries text (embedded by an injectable text embedder: MiniLM in
the running graph, a hashing embedder where no model is wanted), a compact feature vector
(audio, vision), or both; each is a "channel" with its own memory.

- surprise: error of a running EMA predictor of the channel's vector, relative to the vector's
  size, placed in the sensor's own recent error distribution (a z-score through a logistic).
- novelty: 1 - the best similarity to what this sensor has seen (cosine for text embeddings,
  relative distance for feature vectors); 1 for a sensor's first observation.
- arousal: intensity (capitals, '!', length for text; log-magnitude for features) placed in the
  sensor's intensity history the same way; for a sensor that reports motion (a camera), at
  least its motion spike: how far the motion is above the sensor's own recent motion.
- reward: the value of outcomes of similar past observations, shrunk toward the sensor's mean
  outcome; exactly 0.5 until the sensor has any outcome.
- conflict: the largest of (a) disagreement between sensors observed close in time, measured as
  an unexpected gap between their surprises (sensors watching one world usually move together),
  (b) disagreement of past outcomes for observations like this one (mixed evidence), and (c)
  content against a sensor: words asserting that all is calm ("all clear", "nothing here",
  "no one is here"; `calm_assertion`) while another sensor's motion spikes (a camera's motion
  far above its own recent level; `Observation.motion`), both within `conflict_window_s`. The
  rule is symmetric: whichever of the two is scored second carries the conflict, so the speech
  heard during motion, and the frames that keep moving after the words, are both marked.

The weighted total uses weights that adapt from outcomes (bounded, normalised, exportable for
persistence); the score also carries a confidence and a cognitive stance.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from .params import check_ranges, tunable

DIMENSIONS = ('surprise', 'novelty', 'arousal', 'reward', 'conflict')
# Cognitive stances (the values of Salience.STANCE_*).
STANCE_CURIOUS = 'curious'
STANCE_FOCUSED = 'focused'
STANCE_SKEPTICAL = 'skeptical'
STANCE_CAUTIOUS = 'cautious'
STANCE_ROUTINE = 'routine'

TextEmbedder = Callable[[Sequence[str]], np.ndarray]
"""texts -> (len(texts), d) array of unit vectors; the dot product is the cosine similarity."""


def ngram_embedder(dim: int = 256) -> TextEmbedder:
    """A deterministic embedder from hashed character trigrams and words; no model needed.

    Identical texts get identical vectors and texts sharing most trigrams are close, which is
    what novelty and surprise need; it knows nothing of meaning (MiniLM does).
    """
    def embed(texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), dim), dtype=np.float64)
        for row, text in enumerate(texts):
            low = f' {text.lower()} '
            grams = [low[i:i + 3] for i in range(max(0, len(low) - 2))] + low.split()
            for g in grams:
                h = zlib.crc32(g.encode('utf-8', 'replace'))
                out[row, h % dim] += 1.0 if (h >> 16) & 1 else -1.0
            norm = np.linalg.norm(out[row])
            if norm > 0:
                out[row] /= norm
        return out
    return embed


@dataclass(frozen=True)
class Observation:
    """What a sensor reported: text, a compact feature vector, or both."""

    text: str = ''
    features: Tuple[float, ...] = ()
    t: float = 0.0          # [s] when it was observed (for cross-sensor conflict)
    modality: str = 'text'  # 'text', 'audio', 'image', ... (routing uses it)
    # [0, 1] how much of the scene moved (a camera frame's changed-pixel fraction); None for a
    # sensor that measures no motion. Only the content-vs-sensor conflict uses it.
    motion: Optional[float] = None


@dataclass(frozen=True)
class SalienceWeights:
    """Initial weights of the five dimensions (normalised to sum 1; they adapt from outcomes)."""

    surprise: float = tunable(0.25, 'Weight of surprise in the total salience', 0.0, 1.0)
    novelty: float = tunable(0.25, 'Weight of novelty in the total salience', 0.0, 1.0)
    arousal: float = tunable(0.2, 'Weight of arousal in the total salience', 0.0, 1.0)
    reward: float = tunable(0.15, 'Weight of reward in the total salience', 0.0, 1.0)
    conflict: float = tunable(0.15, 'Weight of conflict in the total salience', 0.0, 1.0)

    def __post_init__(self) -> None:
        check_ranges(self)

    def normalised(self) -> Tuple[float, ...]:
        raw = tuple(max(0.0, getattr(self, d)) for d in DIMENSIONS)
        s = sum(raw)
        if s <= 0.0:
            return tuple(1.0 / len(raw) for _ in raw)
        return tuple(w / s for w in raw)


@dataclass(frozen=True)
class SalienceParams:
    """Every constant of the detectors, with its documented default."""

    surprise_alpha: float = tunable(
        0.3, 'EMA rate of the running predictor (weight of the newest observation)', 0.01, 1.0)
    error_window: int = tunable(50, 'Prediction errors kept per sensor and channel', 2, 10_000,
                                unit='observations', runtime=False)
    prior_error: float = tunable(
        1.0, 'Relative prediction error assumed before a sensor has history (1: an unrelated '
        'observation)', 0.0, 2.0)
    prior_error_sd: float = tunable(0.3, 'Spread of that assumed error', 0.01, 2.0)
    prior_weight: float = tunable(
        2.0, 'How many observations the assumed error and intensity count as', 0.0, 1000.0,
        unit='observations')
    error_sd_floor: float = tunable(
        0.05, 'Smallest error spread used, so a steady input\'s tiny jitter is not surprising',
        1e-6, 2.0)
    surprise_z_center: float = tunable(
        1.5, 'Error z-score at which surprise is 0.5', -10.0, 10.0, unit='standard deviations')
    surprise_z_slope: float = tunable(
        2.0, 'Steepness of the logistic from error z-score to surprise', 0.1, 20.0)
    text_caps_weight: float = tunable(
        0.6, 'Share of capital letters in a text\'s intensity', 0.0, 1.0)
    text_exclaim_weight: float = tunable(
        0.3, 'Share of exclamation marks in a text\'s intensity', 0.0, 1.0)
    text_length_weight: float = tunable(0.1, 'Share of length in a text\'s intensity', 0.0, 1.0)
    text_exclaim_full: float = tunable(
        3.0, 'Exclamation marks that count as full intensity', 1.0, 1000.0, unit='marks')
    text_length_full: float = tunable(
        100.0, 'Words that count as full length (on a log scale)', 1.0, 1e6, unit='words')
    text_style_weight: float = tunable(
        0.5, 'Weight of style (capitals, "!", length) next to meaning in the text predictor',
        0.0, 10.0)
    novelty_memory: int = tunable(500, 'Observations remembered per sensor for novelty', 1,
                                  100_000, unit='observations', runtime=False)
    arousal_window: int = tunable(50, 'Intensities kept per sensor and channel', 2, 10_000,
                                  unit='observations', runtime=False)
    text_arousal_prior: float = tunable(
        0.15, 'Text intensity assumed before a sensor has history', 0.0, 1.0)
    arousal_prior_sd: float = tunable(
        0.15, 'Spread of the assumed intensity (text: intensity units; features: log units)',
        0.01, 10.0)
    arousal_sd_floor: float = tunable(0.05, 'Smallest intensity spread used', 1e-6, 10.0)
    arousal_z_center: float = tunable(
        1.0, 'Intensity z-score at which arousal is 0.5', -10.0, 10.0,
        unit='standard deviations')
    arousal_z_slope: float = tunable(
        2.0, 'Steepness of the logistic from intensity z-score to arousal', 0.1, 20.0)
    reward_memory: int = tunable(500, 'Outcomes remembered per sensor', 1, 100_000,
                                 unit='outcomes', runtime=False)
    reward_neighbours: int = tunable(10, 'Most similar past outcomes that predict reward', 1,
                                     1000, unit='outcomes')
    reward_min_similarity: float = tunable(
        0.5, 'Similarity below which a past outcome says nothing about this observation',
        0.0, 1.0)
    reward_prior_strength: float = tunable(
        1.0, 'Weight of the sensor\'s mean outcome against similar outcomes', 0.0, 1000.0)
    reward_base_alpha: float = tunable(
        0.1, 'EMA rate of a sensor\'s mean outcome', 0.0, 1.0)
    conflict_window_s: float = tunable(
        5.0, 'Observations of two sensors this close in time can conflict', 0.0, 3600.0,
        unit='s')
    conflict_alpha: float = tunable(
        0.1, 'EMA rate of the surprise gap expected between two sensors', 0.0, 1.0)
    motion_min: float = tunable(
        0.02, 'Motion (changed-pixel fraction) below which a frame is no motion spike: it '
        'neither arouses nor contradicts words that say all is calm', 0.0, 1.0)
    motion_sd_floor: float = tunable(
        0.01, 'Smallest spread of a sensor\'s recent motion used for its motion z-score (the '
        'spike is that z-score through the surprise logistic)', 1e-6, 1.0)
    conflict_min_outcomes: int = tunable(
        2, 'Similar past outcomes needed before their disagreement counts as conflict', 2,
        1000, unit='outcomes')
    weight_learning_rate: float = tunable(
        0.05, 'Step of the weight update from one outcome (0 = fixed weights)', 0.0, 1.0)
    weight_min: float = tunable(0.05, 'Smallest weight a dimension can learn', 0.0, 0.2)
    weight_max: float = tunable(0.5, 'Largest weight a dimension can learn', 0.2, 1.0)
    confidence_history: int = tunable(
        10, 'Observations of a sensor before its scores get full confidence', 1, 10_000,
        unit='observations')
    confidence_dispersion: float = tunable(
        2.0, 'How much disagreement between the five dimensions lowers confidence '
        '(confidence x (1 - this x variance))', 0.0, 100.0)
    stance_skeptical_conflict: float = tunable(
        0.6, 'Conflict at or above which the stance is skeptical', 0.0, 1.0)
    stance_cautious_arousal: float = tunable(
        0.7, 'Arousal at or above which (with low reward) the stance is cautious', 0.0, 1.0)
    stance_cautious_reward: float = tunable(
        0.4, 'Reward at or below which high arousal makes the stance cautious', 0.0, 1.0)
    stance_focused_total: float = tunable(
        0.6, 'Total salience at or above which the stance is focused', 0.0, 1.0)
    stance_curious_novelty: float = tunable(
        0.6, 'Novelty or surprise at or above which the stance is curious', 0.0, 1.0)
    max_abs_feature: float = tunable(
        1e6, 'Feature values are clipped to +-this (NaN counts as 0)', 1.0, 1e30)

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.weight_min * len(DIMENSIONS) > 1.0 or self.weight_max * len(DIMENSIONS) < 1.0:
            raise ValueError('weight_min and weight_max must allow weights summing to 1 '
                             f'(weight_min <= {1 / len(DIMENSIONS)} <= weight_max)')


@dataclass(frozen=True)
class SalienceScore:
    surprise: float
    novelty: float
    arousal: float
    reward: float
    conflict: float
    total: float
    confidence: float = 0.0
    stance: str = STANCE_ROUTINE
    weights: Tuple[float, ...] = ()
    # What the scorer needs to learn from this observation's outcome (not part of the score).
    signature: Tuple[Tuple[str, np.ndarray], ...] = field(default=(), compare=False, repr=False)

    def dims(self) -> Tuple[float, ...]:
        return (self.surprise, self.novelty, self.arousal, self.reward, self.conflict)


class SalienceScorer(Protocol):
    """What the kernel needs from a salience engine."""

    @property
    def weights(self) -> Tuple[float, ...]: ...

    def score(self, sensor_id: str, observation: Observation) -> SalienceScore: ...

    def record_outcome(self, sensor_id: str, score: SalienceScore, value: float) -> None:
        """`value` in [0, 1]: how well attending to this observation turned out."""

    def export_state(self) -> Dict[str, Any]: ...

    def restore_state(self, state: Dict[str, Any]) -> None: ...


# ---- helpers ---------------------------------------------------------------------------------
def clip01(x: float) -> float:
    """[0, 1], with NaN -> 0."""
    if not isinstance(x, (int, float)) or math.isnan(x):
        return 0.0
    return min(1.0, max(0.0, float(x)))


def _logistic(z: float, center: float, slope: float) -> float:
    arg = -slope * (z - center)
    if arg > 700:
        return 0.0
    return 1.0 / (1.0 + math.exp(arg))


def project_weights(raw: Sequence[float], lo: float, hi: float) -> Tuple[float, ...]:
    """The weights closest to `raw` (shifted by one constant) that sum to 1 within [lo, hi]."""
    v = np.nan_to_num(np.asarray(raw, dtype=np.float64), nan=1.0 / len(raw))
    lo_s, hi_s = float(v.min()) - hi, float(v.max()) - lo

    def total(shift: float) -> float:
        return float(np.clip(v - shift, lo, hi).sum())

    for _ in range(100):
        mid = 0.5 * (lo_s + hi_s)
        if total(mid) > 1.0:
            lo_s = mid
        else:
            hi_s = mid
    w = np.clip(v - 0.5 * (lo_s + hi_s), lo, hi)
    return tuple(float(x) for x in w / w.sum())


def text_style(text: str, p: Optional[SalienceParams] = None) -> Tuple[float, float, float]:
    """(capitals ratio, exclamation level, length level), each in [0, 1]."""
    p = p or SalienceParams()
    letters = [c for c in text if c.isalpha()]
    caps = sum(1 for c in letters if c.isupper()) / len(letters) if len(letters) >= 3 else 0.0
    bangs = min(1.0, text.count('!') / p.text_exclaim_full)
    length = min(1.0, math.log1p(len(text.split())) / math.log1p(p.text_length_full))
    return (caps, bangs, length)


def text_intensity(text: str, p: Optional[SalienceParams] = None) -> float:
    """[0, 1]: how loud a text is (capitals, exclamations, length), as the weights say."""
    p = p or SalienceParams()
    caps, bangs, length = text_style(text, p)
    total = p.text_caps_weight + p.text_exclaim_weight + p.text_length_weight
    if total <= 0:
        return 0.0
    return (p.text_caps_weight * caps + p.text_exclaim_weight * bangs
            + p.text_length_weight * length) / total


# Words that assert nothing is happening: "all clear", "nothing here", "no one is here", "it is
# quiet", "the coast is clear", "everything is fine". A "not" just before cancels the match.
_CALM = re.compile(
    r"\b(?:"
    r"all(?: is| looks| seems|'s)? (?:clear|calm|quiet|fine|good|ok|okay|well|safe)"
    r"|(?:the )?coast is clear"
    r"|nothing(?: is)? (?:here|there|happening|moving|going on|to see|to report|wrong|around)"
    r"|(?:no ?one|nobody|no body)(?: is|'s)? (?:here|there|around|in (?:here|there|the room))"
    r"|there(?: is|'s) (?:no ?one|nobody|nothing)(?: here| there| around)?"
    r"|(?:it|everything|everything here)(?: is|'s) (?:calm|quiet|clear|fine|still|safe|empty)"
    r"|the (?:room|area|house|hall) is (?:empty|clear|quiet)"
    r")\b")
_NEGATED = re.compile(r"\b(?:not|n't|never|isn't|is not)\s*$")


def calm_assertion(text: str) -> float:
    """[0, 1]: how plainly `text` asserts that all is calm, clear or empty (1: it says so,
    e.g. "all clear", "nothing here", "no one is here"; 0: it does not, or negates it: "it is
    not all clear"). The content side of the content-vs-sensor conflict."""
    low = ' '.join(text.lower().replace('\u2019', "'").split())
    for m in _CALM.finditer(low):
        if not _NEGATED.search(low[:m.start()]):
            return 1.0
    return 0.0


class _RelativeScale:
    """Where a value sits in its own recent distribution (with a prior), as a z-score."""

    def __init__(self, window: int, prior_mean: Optional[float], prior_sd: float,
                 prior_weight: float, sd_floor: float) -> None:
        self.values: Deque[float] = deque(maxlen=window)
        self.prior_mean = prior_mean   # None: taken from the first value
        self.prior_sd = prior_sd
        self.prior_weight = prior_weight
        self.sd_floor = sd_floor

    def z(self, x: float) -> float:
        prior = x if self.prior_mean is None else self.prior_mean
        n = len(self.values)
        w = self.prior_weight
        if n + w <= 0:
            return 0.0
        mean = (w * prior + sum(self.values)) / (w + n)
        var = (w * (self.prior_sd ** 2 + (prior - mean) ** 2)
               + sum((v - mean) ** 2 for v in self.values)) / (w + n)
        sd = max(math.sqrt(max(var, 0.0)), self.sd_floor)
        return (x - mean) / sd

    def add(self, x: float) -> None:
        if self.prior_mean is None:
            self.prior_mean = x
        self.values.append(x)


def _similarity(kind: str, a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return 0.0
    if kind == 'text':          # unit vectors: cosine, negative = unrelated
        return clip01(float(a @ b))
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na + nb == 0.0:
        return 1.0
    return clip01(1.0 - float(np.linalg.norm(a - b)) / (na + nb))


class _Channel:
    """One sensor's memory for one kind of vector ('text' or 'features')."""

    def __init__(self, kind: str, p: SalienceParams) -> None:
        self.kind = kind
        self.prediction: Optional[np.ndarray] = None
        self.errors = _RelativeScale(p.error_window, p.prior_error, p.prior_error_sd,
                                     p.prior_weight, p.error_sd_floor)
        self.seen: Deque[np.ndarray] = deque(maxlen=p.novelty_memory)
        self.intensity = _RelativeScale(
            p.arousal_window, p.text_arousal_prior if kind == 'text' else None,
            p.arousal_prior_sd, p.prior_weight, p.arousal_sd_floor)


@dataclass
class _Sensor:
    channels: Dict[str, _Channel] = field(default_factory=dict)
    seen: int = 0
    outcomes: Deque[Tuple[str, np.ndarray, float]] = field(default_factory=deque)
    base_reward: float = 0.5
    outcome_count: int = 0
    last_t: Optional[float] = None
    last_surprise: float = 0.0
    motion: Optional[_RelativeScale] = None   # its motion history (sensors that report one)
    spike: Tuple[float, float] = (0.0, -math.inf)   # (latest motion spike, when)
    calm: Tuple[float, float] = (0.0, -math.inf)    # (latest calm assertion, when)


class SnarcSalience:
    """The SNARC engine behind `SalienceScorer`."""

    def __init__(self, embedder: TextEmbedder, params: Optional[SalienceParams] = None,
                 weights: Optional[SalienceWeights] = None) -> None:
        self.embedder = embedder
        self.params = params or SalienceParams()
        self._weights = (weights or SalienceWeights()).normalised()
        self._weights = project_weights(self._weights, self.params.weight_min,
                                        self.params.weight_max)
        self._sensors: Dict[str, _Sensor] = {}
        self._expected_gap: Dict[Tuple[str, str], float] = {}

    # ---- configuration -----------------------------------------------------------------------
    @property
    def weights(self) -> Tuple[float, ...]:
        return self._weights

    def set_weights(self, weights: SalienceWeights) -> None:
        """Replace the learned weights (learning continues from these)."""
        self._weights = project_weights(weights.normalised(), self.params.weight_min,
                                        self.params.weight_max)

    def set_params(self, params: SalienceParams) -> None:
        """New constants; memory sizes only apply to sensors seen after the change."""
        self.params = params
        self._weights = project_weights(self._weights, params.weight_min, params.weight_max)

    def export_state(self) -> Dict[str, Any]:
        return {'weights': list(self._weights),
                'base_reward': {k: s.base_reward for k, s in self._sensors.items()}}

    def restore_state(self, state: Dict[str, Any]) -> None:
        w = state.get('weights')
        if isinstance(w, list) and len(w) == len(DIMENSIONS):
            try:
                self._weights = project_weights([float(x) for x in w], self.params.weight_min,
                                                self.params.weight_max)
            except (TypeError, ValueError):
                pass
        for name, r in dict(state.get('base_reward') or {}).items():
            if isinstance(r, (int, float)):
                self._sensor(str(name)).base_reward = clip01(float(r))

    # ---- scoring -----------------------------------------------------------------------------
    def _sensor(self, sensor_id: str) -> _Sensor:
        s = self._sensors.get(sensor_id)
        if s is None:
            s = self._sensors[sensor_id] = _Sensor(outcomes=deque(maxlen=self.params.reward_memory))
        return s

    def _vectors(self, obs: Observation) -> List[Tuple[str, np.ndarray, np.ndarray, float]]:
        """(channel, meaning vector, predictor vector, intensity) per channel present."""
        p = self.params
        out = []
        if obs.text:
            emb = np.asarray(self.embedder([obs.text]), dtype=np.float64).reshape(-1)
            emb = np.nan_to_num(emb, nan=0.0, posinf=0.0, neginf=0.0)
            norm = float(np.linalg.norm(emb))
            emb = emb / norm if norm > 0 else emb
            style = np.asarray(text_style(obs.text, p), dtype=np.float64) * p.text_style_weight
            out.append(('text', emb, np.concatenate([emb, style]), text_intensity(obs.text, p)))
        if len(obs.features):
            try:
                raw = np.asarray(obs.features, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raw = np.zeros(0)
            if raw.size:
                m = p.max_abs_feature
                vec = np.clip(np.nan_to_num(raw, nan=0.0, posinf=m, neginf=-m), -m, m)
                out.append(('features', vec, vec, math.log1p(float(np.linalg.norm(vec)))))
        return out

    def score(self, sensor_id: str, observation: Observation) -> SalienceScore:
        p = self.params
        s = self._sensor(sensor_id)
        surprise = novelty = arousal = 0.0
        signature: List[Tuple[str, np.ndarray]] = []
        for kind, vec, pred_vec, inten in self._vectors(observation):
            ch = s.channels.get(kind)
            if ch is None or (ch.prediction is not None and ch.prediction.shape != pred_vec.shape):
                ch = s.channels[kind] = _Channel(kind, p)   # new, or the vector changed shape
            # surprise: relative error of the running predictor, within its own distribution
            if ch.prediction is None:
                ch_surprise = 0.0     # nothing was predicted before the first observation
                ch.prediction = pred_vec.copy()
            else:
                scale = max(0.5 * (float(np.linalg.norm(pred_vec))
                                   + float(np.linalg.norm(ch.prediction))), 1e-9)
                err = float(np.linalg.norm(pred_vec - ch.prediction)) / scale
                ch_surprise = _logistic(ch.errors.z(err), p.surprise_z_center, p.surprise_z_slope)
                ch.errors.add(err)
                ch.prediction = p.surprise_alpha * pred_vec + (1 - p.surprise_alpha) * ch.prediction
            # novelty: distance to everything this sensor has seen on this channel
            if ch.seen:
                best = max(_similarity(kind, vec, old) for old in ch.seen)
                ch_novelty = 1.0 - best
            else:
                ch_novelty = 1.0
            ch.seen.append(vec)
            # arousal: intensity relative to the sensor's history
            ch_arousal = _logistic(ch.intensity.z(inten), p.arousal_z_center, p.arousal_z_slope)
            ch.intensity.add(inten)
            surprise = max(surprise, clip01(ch_surprise))
            novelty = max(novelty, clip01(ch_novelty))
            arousal = max(arousal, clip01(ch_arousal))
            signature.append((kind, vec))

        spike: Optional[float] = None
        if observation.motion is not None and math.isfinite(float(observation.motion)):
            spike = self._motion_spike(s, float(observation.motion))
            arousal = max(arousal, spike)
        reward, outcome_conflict = self._reward(s, signature)
        conflict = max(outcome_conflict, self._cross_conflict(sensor_id, observation.t, surprise)
                       if signature else 0.0,
                       self._content_conflict(sensor_id, s, observation, spike))
        dims = tuple(clip01(x) for x in (surprise, novelty, arousal, reward, conflict))
        total = clip01(sum(w * d for w, d in zip(self._weights, dims)))
        history = min(1.0, s.seen / p.confidence_history)
        confidence = clip01(history * (1.0 - min(1.0, p.confidence_dispersion
                                                  * float(np.var(dims)))))
        if signature:
            s.seen += 1
            s.last_t, s.last_surprise = observation.t, dims[0]
        return SalienceScore(dims[0], dims[1], dims[2], dims[3], dims[4], total=total,
                             confidence=confidence,
                             stance=self._stance(dims, total), weights=self._weights,
                             signature=tuple(signature))

    def _reward(self, s: _Sensor, signature: Sequence[Tuple[str, np.ndarray]]
                ) -> Tuple[float, float]:
        """(expected value, disagreement of similar outcomes) for this observation."""
        p = self.params
        if not s.outcomes or not signature:
            return s.base_reward, 0.0
        sims: List[Tuple[float, float]] = []
        for kind, vec, value in reversed(s.outcomes):   # newest first: ties favour recent
            best = max((_similarity(kind, v, vec) for k, v in signature if k == kind),
                       default=0.0)
            if best >= p.reward_min_similarity:
                sims.append((best, value))
        sims.sort(key=lambda sv: -sv[0])
        near = sims[:p.reward_neighbours]
        wsum = sum(w for w, _ in near)
        reward = ((sum(w * v for w, v in near) + p.reward_prior_strength * s.base_reward)
                  / (wsum + p.reward_prior_strength)) if wsum + p.reward_prior_strength > 0 \
            else s.base_reward
        conflict = 0.0
        if len(near) >= p.conflict_min_outcomes and wsum > 0:
            mean = sum(w * v for w, v in near) / wsum
            sd = math.sqrt(sum(w * (v - mean) ** 2 for w, v in near) / wsum)
            conflict = 2.0 * sd     # values in [0, 1]: the largest spread is 0.5
        return clip01(reward), clip01(conflict)

    def _cross_conflict(self, sensor_id: str, t: float, surprise: float) -> float:
        """An unexpected gap between this sensor's surprise and recent ones of other sensors."""
        p = self.params
        worst = 0.0
        for other, o in self._sensors.items():
            if other == sensor_id or o.last_t is None:
                continue
            if not math.isfinite(t) or abs(t - o.last_t) > p.conflict_window_s:
                continue
            gap = abs(surprise - o.last_surprise)
            key = (min(sensor_id, other), max(sensor_id, other))
            expected = self._expected_gap.get(key)
            if expected is None:
                expected = gap    # the first gap is what this pair looks like
            if gap > expected:
                worst = max(worst, (gap - expected) / max(1.0 - expected, 1e-9))
            self._expected_gap[key] = expected + p.conflict_alpha * (gap - expected)
        return clip01(worst)

    def _motion_spike(self, s: _Sensor, motion: float) -> float:
        """[0, 1]: how far `motion` is above this sensor's recent motion (its z-score through
        the surprise logistic); 0 below `motion_min`. Adds it to the history."""
        p = self.params
        if s.motion is None:
            s.motion = _RelativeScale(p.error_window, None, p.motion_sd_floor,
                                      p.prior_weight, p.motion_sd_floor)
        m = clip01(motion)
        spike = 0.0
        if m >= p.motion_min:
            spike = _logistic(s.motion.z(m), p.surprise_z_center, p.surprise_z_slope)
        s.motion.add(m)
        return spike

    def _content_conflict(self, sensor_id: str, s: _Sensor, obs: Observation,
                          spike: Optional[float]) -> float:
        """Words that say all is calm against another sensor's motion spike (or the reverse)
        within `conflict_window_s`: the calm assertion times the spike (`spike`: this
        observation's, None without motion). Records this observation's own calm assertion and
        spike for the sensors scored after it."""
        t = obs.t
        if not math.isfinite(t):
            return 0.0
        window = self.params.conflict_window_s
        worst = 0.0
        if spike is not None:
            s.spike = (spike, t)
            calm = max((o.calm[0] for k, o in self._sensors.items()
                        if k != sensor_id and abs(t - o.calm[1]) <= window), default=0.0)
            worst = max(worst, spike * calm)
        if obs.text:
            calm = calm_assertion(obs.text)
            s.calm = (calm, t)
            spike = max((o.spike[0] for k, o in self._sensors.items()
                         if k != sensor_id and abs(t - o.spike[1]) <= window), default=0.0)
            worst = max(worst, calm * spike)
        return clip01(worst)

    def _stance(self, dims: Tuple[float, ...], total: float) -> str:
        p = self.params
        surprise, novelty, arousal, reward, conflict = dims
        if conflict >= p.stance_skeptical_conflict:
            return STANCE_SKEPTICAL
        if arousal >= p.stance_cautious_arousal and reward <= p.stance_cautious_reward:
            return STANCE_CAUTIOUS
        if total >= p.stance_focused_total:
            return STANCE_FOCUSED
        if novelty >= p.stance_curious_novelty or surprise >= p.stance_curious_novelty:
            return STANCE_CURIOUS
        return STANCE_ROUTINE

    # ---- learning ----------------------------------------------------------------------------
    def record_outcome(self, sensor_id: str, score: SalienceScore, value: float) -> None:
        """Learn from how attending to an observation turned out (`value` in [0, 1]).

        The sensor's reward memory gets the observation; the weights move toward the dimensions
        that were high when the outcome beat the predicted total (and away when it fell short),
        then are projected back to [weight_min, weight_max] with sum 1.
        """
        p = self.params
        value = clip01(value)
        s = self._sensor(sensor_id)
        for kind, vec in score.signature:
            s.outcomes.append((kind, vec, value))
        s.base_reward += p.reward_base_alpha * (value - s.base_reward)
        s.outcome_count += 1
        dims = np.asarray(score.dims(), dtype=np.float64)
        error = value - score.total
        step = p.weight_learning_rate * error * (dims - dims.mean())
        if p.weight_learning_rate > 0 and np.all(np.isfinite(step)):
            self._weights = project_weights(np.asarray(self._weights) + step, p.weight_min,
                                            p.weight_max)
