"""Complexity of a request and the model role that should serve it.

Two classifiers with the same signature (`str -> Complexity`):

- `estimate_complexity` (alias `keyword_complexity`): the plan's first keyword heuristic, kept as
  the baseline and as the no-model fallback.
- `ComplexityRouter`: cheap text features (length, clauses, question type, imperative and
  deliberative verbs, conditions, contrasts, numbers) combined with similarity to hand-labelled
  exemplars (k nearest neighbours and class centroids over MiniLM sentence embeddings) by a small
  multinomial logistic model. It trains at start-up on the training split of
  `data/complexity_prompts.tsv`, deterministically: about a second on two CPU cores once the
  embedding model is loaded (embedding ~330 exemplars; the fit itself takes < 0.1 s).

No ROS, no downloads: the embedder is injectable (any `list[str] -> (n, d)` array of unit
vectors); the default is the offline MiniLM of `core.embeddings`.
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np


class Complexity(str, enum.Enum):
    SIMPLE = 'simple'
    MODERATE = 'moderate'
    COMPLEX = 'complex'

    @classmethod
    def parse(cls, value: str) -> 'Complexity':
        try:
            return cls(value.strip().lower())
        except ValueError:
            raise ValueError(f"unknown complexity {value!r}; expected one of "
                             f"{', '.join(c.value for c in cls)}") from None


CLASSES: Tuple[Complexity, ...] = tuple(Complexity)

# --- The plan's keyword heuristic (baseline) --------------------------------------------------

_COMPLEX_WORDS = frozenset({
    'design', 'explain', 'analyze', 'analyse', 'plan', 'compare', 'why', 'derive', 'prove',
    'architecture', 'strategy', 'evaluate', 'optimize', 'optimise', 'implement', 'debug',
})
_GREETINGS = frozenset({'hi', 'hello', 'hey', 'thanks', 'thank', 'bye', 'goodbye', 'ok', 'okay',
                        'yes', 'no', 'morning', 'evening'})
_WORD = re.compile(r"[a-zA-Z']+")


def estimate_complexity(text: str) -> Complexity:
    """The plan's keyword heuristic: complex on a 'design/explain/why...' word or > 50 words,
    simple for short questions and greetings, moderate otherwise."""
    words = [w.lower() for w in _WORD.findall(text)]
    if not words:
        return Complexity.SIMPLE
    if any(w in _COMPLEX_WORDS for w in words) or len(words) > 50:
        return Complexity.COMPLEX
    if len(words) <= 4 and (words[0] in _GREETINGS or text.rstrip().endswith('?')):
        return Complexity.SIMPLE
    if len(words) < 10 and text.rstrip().endswith('?'):
        return Complexity.SIMPLE
    return Complexity.MODERATE


keyword_complexity = estimate_complexity


@dataclass(frozen=True)
class RoleMap:
    """Which model role serves each complexity."""

    simple: str = 'small'
    moderate: str = 'small'
    complex: str = 'large'

    def role_for(self, complexity: Complexity) -> str:
        return str(getattr(self, complexity.value))


# --- Labelled prompts -------------------------------------------------------------------------

DATA_FILE = Path(__file__).resolve().parents[1] / 'data' / 'complexity_prompts.tsv'
HELD_OUT_MODULUS = 4  # a prompt is held out when the first byte of its sha256 is divisible by it


class DatasetError(ValueError):
    """The labelled prompt file is missing or malformed; the message names the file and line."""


@dataclass(frozen=True)
class LabelledPrompt:
    text: str
    label: Complexity
    held_out: bool


def is_held_out(text: str) -> bool:
    """The fixed held-out split: depends on the prompt alone, not on its line or the file order,
    so adding prompts never moves an existing one between train and test."""
    return hashlib.sha256(text.encode('utf-8')).digest()[0] % HELD_OUT_MODULUS == 0


def load_prompts(path: Optional[Path] = None) -> List[LabelledPrompt]:
    """Read `label<TAB>prompt` lines ('#' comments and blank lines skipped)."""
    path = Path(path) if path is not None else DATA_FILE
    try:
        lines = path.read_text(encoding='utf-8').splitlines()
    except OSError as exc:
        raise DatasetError(f'cannot read labelled prompts {path}: {exc.strerror}') from None
    prompts: List[LabelledPrompt] = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith('#'):
            continue
        label, sep, text = line.partition('\t')
        text = text.strip()
        if not sep or not text:
            raise DatasetError(f'{path}:{number}: expected label<TAB>prompt')
        try:
            complexity = Complexity.parse(label)
        except ValueError as exc:
            raise DatasetError(f'{path}:{number}: {exc}') from None
        prompts.append(LabelledPrompt(text, complexity, is_held_out(text)))
    return prompts


def split_prompts(prompts: Sequence[LabelledPrompt]
                  ) -> Tuple[List[LabelledPrompt], List[LabelledPrompt]]:
    """(training, held-out)."""
    return ([p for p in prompts if not p.held_out], [p for p in prompts if p.held_out])


# --- Cheap text features ----------------------------------------------------------------------

_TOKEN = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*|\d+(?:[.,:]\d+)*")
_SENTENCE_END = re.compile(r'[.!?]+(?:\s+|$)')
_FILLERS = frozenset({'please', 'hey', 'hi', 'hello', 'ok', 'okay', 'so', 'now', 'robot', 'sage',
                      'and', 'just', 'also'})
_FACT_QUESTION_STARTS = frozenset({
    'what', "what's", 'where', "where's", 'who', "who's", 'when', 'which', 'is', 'are', 'was',
    'were', 'did', 'do', 'does', 'has', 'have', 'will', 'whose', 'can', 'could', 'how'})
_IMPERATIVE_VERBS = frozenset({
    'go', 'come', 'bring', 'take', 'put', 'pick', 'turn', 'stop', 'open', 'close', 'move',
    'follow', 'wait', 'hand', 'fetch', 'get', 'grab', 'check', 'find', 'tell', 'show', 'set',
    'cancel', 'play', 'call', 'hold', 'look', 'wake', 'charge', 'switch', 'read', 'give', 'let',
    'keep', 'clear', 'load', 'sort', 'tidy', 'water', 'fold', 'label', 'log', 'mark', 'record',
    'send', 'ask', 'remind', 'guide', 'walk', 'scan', 'restock', 'sweep', 'vacuum', 'mop', 'dim',
    'greet', 'carry', 'patrol', 'gather', 'describe', 'repeat', 'say', 'make', 'count', 'clean',
    'back', 'pause', 'speak', 'feed', 'lock', 'unlock', 'raise', 'lower', 'drop', 'leave', 'stay',
    'list', 'print', 'measure', 'photograph', 'dial', 'text', 'email', 'unplug', 'plug'})
# Generic words and phrases that ask the model to deliberate (weigh, decide, construct) rather
# than to fetch or act. Kept to common English, not to words of the labelled prompts.
_DELIBERATIVE_WORDS = frozenset({
    'suggest', 'propose', 'decide', 'choose', 'think', 'reason', 'reasoning', 'organise',
    'organize', 'prioritise', 'prioritize', 'estimate', 'assess', 'evaluate', 'design', 'plan',
    'draft', 'develop', 'outline', 'argue', 'justify', 'compare', 'balance', 'trade-off',
    'tradeoff', 'pros', 'cons', 'risk', 'risks', 'strategy', 'approach', 'procedure', 'schedule',
    'analyse', 'analyze', 'optimise', 'optimize', 'diagnose', 'debug', 'best', 'better', 'worse',
    'safest', 'fastest', 'cheapest', 'possible', 'options', 'alternatives', 'consequences'})
_DELIBERATIVE_PHRASES = ('work out', 'figure out', 'come up with', 'find a way', 'walk me through',
                         'think through', 'what if', 'how would', 'how should', 'what would',
                         'set up', 'put together', 'take into account')
_CONDITION_WORDS = frozenset({'if', 'unless', 'otherwise', 'suppose', 'supposing', 'given',
                              'whether', 'case', 'assuming', 'considering', 'taking'})
_CONTRAST_WORDS = frozenset({'but', 'versus', 'vs', 'or', 'instead', 'rather', 'than', 'between',
                             'without', 'while', 'although', 'though', 'whereas', 'even'})
_SEQUENCE_WORDS = frozenset({'and', 'then', 'after', 'before', 'first', 'each', 'every', 'all',
                             'afterwards', 'next', 'finally', 'step'})
_MODAL_WORDS = frozenset({'should', 'would', 'could', 'might', 'must', 'shall'})
_OPEN_QUESTION_MODALS = frozenset({'would', 'should', 'could', 'can', 'might', 'do', 'does',
                                   'to', 'we'})  # 'how would...', not 'how many...'
_NUMBER_WORDS = frozenset({'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten',
                           'eleven', 'twelve', 'twenty', 'thirty', 'forty', 'fifty', 'hundred',
                           'half', 'twice', 'dozen'})

FEATURE_NAMES: Tuple[str, ...] = (
    'log_words', 'sentences', 'clause_marks', 'question', 'short_fact_question', 'how_modal',
    'why', 'imperative', 'greeting', 'deliberative', 'conditions', 'contrasts', 'sequence',
    'numbers', 'modals', 'long_word_fraction', 'keyword_heuristic')


def prompt_features(text: str) -> Dict[str, float]:
    """Cheap surface features of a request, in `FEATURE_NAMES` order (microseconds each)."""
    tokens = [t.lower() for t in _TOKEN.findall(text)]
    words = [t for t in tokens if not t[0].isdigit()]
    n = len(tokens)
    first = next((t for t in tokens if t not in _FILLERS), tokens[0] if tokens else '')
    after_how = tokens[tokens.index('how') + 1] if 'how' in tokens[:-1] else ''
    stripped = text.strip()
    is_question = stripped.endswith('?')
    joined = ' ' + ' '.join(tokens) + ' '
    return {
        'log_words': math.log1p(n),
        'sentences': float(max(1, len(_SENTENCE_END.findall(stripped + ' ')))) if n else 0.0,
        'clause_marks': float(sum(text.count(c) for c in ',;:')),
        'question': float(is_question),
        'short_fact_question': float(is_question and n <= 10 and first in _FACT_QUESTION_STARTS),
        'how_modal': float(after_how in _OPEN_QUESTION_MODALS),
        'why': float('why' in tokens),
        'imperative': float(first in _IMPERATIVE_VERBS),
        'greeting': float(bool(tokens) and tokens[0] in _GREETINGS),
        'deliberative': float(sum(t in _DELIBERATIVE_WORDS for t in tokens)
                              + sum(joined.count(f' {p} ') for p in _DELIBERATIVE_PHRASES)),
        'conditions': float(sum(t in _CONDITION_WORDS for t in tokens)),
        'contrasts': float(sum(t in _CONTRAST_WORDS for t in tokens)),
        'sequence': float(sum(t in _SEQUENCE_WORDS for t in tokens)),
        'numbers': float(sum(t[0].isdigit() or t in _NUMBER_WORDS for t in tokens)),
        'modals': float(sum(t in _MODAL_WORDS for t in tokens)),
        'long_word_fraction': (sum(len(w) >= 8 for w in words) / len(words)) if words else 0.0,
        'keyword_heuristic': CLASSES.index(estimate_complexity(text)) / 2.0,
    }


def feature_matrix(texts: Sequence[str]) -> np.ndarray:
    return np.array([[f[name] for name in FEATURE_NAMES]
                     for f in map(prompt_features, texts)], dtype=np.float64).reshape(
                         len(texts), len(FEATURE_NAMES))


# --- The router -------------------------------------------------------------------------------

Embedder = Callable[[Sequence[str]], np.ndarray]
"""Texts -> (n, d) float array of unit-norm embeddings (cosine = dot product)."""

DEFAULT_NEIGHBOURS = 9         # exemplars that vote
DEFAULT_VOTE_TEMPERATURE = 0.05  # softmax temperature over cosine similarity for the votes
DEFAULT_L2 = 0.01              # ridge penalty of the logistic model (5-fold CV, training split)
_CENTROID_SCALE = 10.0         # centroid cosine gaps are ~0.1; brings them to the features' scale
_FIT_STEPS = 1500
_FIT_LEARNING_RATE = 0.5


def _default_embedder() -> Embedder:
    from .embeddings import shared_embedder
    return shared_embedder().embed


def _unit_rows(vectors: np.ndarray, expected_rows: int) -> np.ndarray:
    """Validate an embedder's answer and renormalise (cheap; guards against sloppy embedders)."""
    array = np.asarray(vectors, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != expected_rows:
        raise ValueError(f'embedder returned shape {array.shape}, expected ({expected_rows}, d)')
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.maximum(norms, 1e-12)


def _normalised(text: str) -> str:
    """Case, spacing and punctuation do not make a different request."""
    return ' '.join(t.lower() for t in _TOKEN.findall(text))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class ComplexityRouter:
    """k-NN vote and centroid similarity over labelled exemplars, plus text features, combined by
    a multinomial logistic model. Callable like `estimate_complexity`.

    Training is stacked so the combiner never sees an exemplar's own vote: the neighbour votes
    and centroid similarities of the training prompts are computed leave-one-out. A prompt that
    is an exemplar (ignoring case, spacing and punctuation) gets the exemplar's label outright.
    """

    def __init__(self, exemplars: Sequence[LabelledPrompt], embedder: Optional[Embedder] = None,
                 neighbours: int = DEFAULT_NEIGHBOURS,
                 vote_temperature: float = DEFAULT_VOTE_TEMPERATURE,
                 l2: float = DEFAULT_L2) -> None:
        counts = {c: sum(p.label is c for p in exemplars) for c in CLASSES}
        if min(counts.values()) < 2:
            raise ValueError(f'each complexity needs at least 2 exemplars, got '
                             f'{ {c.value: n for c, n in counts.items()} }')
        if not 1 <= neighbours < len(exemplars):
            raise ValueError(f'neighbours={neighbours} must be in [1, {len(exemplars) - 1}]')
        if vote_temperature <= 0 or l2 < 0:
            raise ValueError('vote_temperature must be > 0 and l2 >= 0')
        self._embed = embedder or _default_embedder()
        self.exemplars: Tuple[LabelledPrompt, ...] = tuple(exemplars)
        self._labelled: Dict[str, Complexity] = {}
        for p in self.exemplars:
            key = _normalised(p.text)
            if self._labelled.setdefault(key, p.label) is not p.label:
                raise ValueError(f'exemplar {p.text!r} is labelled both '
                                 f'{self._labelled[key].value} and {p.label.value}')
        self.neighbours = neighbours
        self.vote_temperature = vote_temperature
        self.l2 = l2
        texts = [p.text for p in self.exemplars]
        self._labels = np.array([CLASSES.index(p.label) for p in self.exemplars])
        self._onehot = np.eye(len(CLASSES))[self._labels]
        self._vectors = _unit_rows(self._embed(texts), len(texts))
        self._class_sums = self._onehot.T @ self._vectors          # (classes, d)
        self._centroids = self._class_sums / np.maximum(
            np.linalg.norm(self._class_sums, axis=1, keepdims=True), 1e-12)
        features = feature_matrix(texts)
        self._feature_mean = features.mean(axis=0)
        self._feature_scale = np.where(features.std(axis=0) > 1e-9, features.std(axis=0), 1.0)
        sims = self._vectors @ self._vectors.T
        np.fill_diagonal(sims, -np.inf)  # leave-one-out: an exemplar never votes for itself
        loo_sums = self._class_sums[self._labels] - self._vectors
        loo_centroid_sims = np.empty((len(texts), len(CLASSES)))
        for c in range(len(CLASSES)):
            sums = np.where((self._labels == c)[:, None], loo_sums, self._class_sums[c])
            loo_centroid_sims[:, c] = np.einsum('nd,nd->n', self._vectors, sums) / np.maximum(
                np.linalg.norm(sums, axis=1), 1e-12)
        inputs = self._inputs(features, self._votes(sims), loo_centroid_sims)
        self._weights, self._bias = self._fit(inputs, self._onehot)

    @classmethod
    def from_dataset(cls, path: Optional[Path] = None, embedder: Optional[Embedder] = None,
                     **options: Any) -> 'ComplexityRouter':
        """Train on the training split of the labelled prompts (default: the shipped set)."""
        training, _ = split_prompts(load_prompts(path))
        return cls(training, embedder, **options)

    # Scoring -------------------------------------------------------------------------------

    def _votes(self, sims: np.ndarray) -> np.ndarray:
        """Similarity-weighted class vote of the nearest exemplars, (n, classes), rows sum to 1."""
        nearest = np.argsort(-sims, axis=1, kind='stable')[:, :self.neighbours]
        top = np.take_along_axis(sims, nearest, axis=1)
        weights = _softmax(top / self.vote_temperature)
        return np.einsum('nk,nkc->nc', weights, self._onehot[nearest])

    def _inputs(self, features: np.ndarray, votes: np.ndarray,
                centroid_sims: np.ndarray) -> np.ndarray:
        scaled = (features - self._feature_mean) / self._feature_scale
        centred = centroid_sims - centroid_sims.mean(axis=1, keepdims=True)
        return np.hstack([scaled, votes, centred * _CENTROID_SCALE])

    def _fit(self, inputs: np.ndarray, targets: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Full-batch gradient descent from zero: deterministic, < 0.1 s for ~300 rows."""
        n, d = inputs.shape
        weights = np.zeros((d, targets.shape[1]))
        bias = np.zeros(targets.shape[1])
        for _ in range(_FIT_STEPS):
            error = _softmax(inputs @ weights + bias) - targets
            weights -= _FIT_LEARNING_RATE * (inputs.T @ error / n + self.l2 * weights)
            bias -= _FIT_LEARNING_RATE * error.mean(axis=0)
        return weights, bias

    def _analyse(self, texts: Sequence[str]) -> Dict[str, np.ndarray]:
        vectors = _unit_rows(self._embed(list(texts)), len(texts))
        sims = vectors @ self._vectors.T
        features = feature_matrix(texts)
        votes = self._votes(sims)
        centroid_sims = vectors @ self._centroids.T
        probs = _softmax(self._inputs(features, votes, centroid_sims) @ self._weights + self._bias)
        for row, text in enumerate(texts):
            label = self._labelled.get(_normalised(text))
            if label is not None:  # a labelled prompt is ground truth for itself
                probs[row] = np.eye(len(CLASSES))[CLASSES.index(label)]
        return {'sims': sims, 'features': features, 'votes': votes,
                'centroid_sims': centroid_sims, 'probs': probs}

    def score_many(self, texts: Sequence[str]) -> List[Dict[Complexity, float]]:
        """Probability of each complexity per text (one embedding batch for all texts)."""
        if not texts:
            return []
        probs = self._analyse(texts)['probs']
        return [{c: float(row[i]) for i, c in enumerate(CLASSES)} for row in probs]

    def scores(self, text: str) -> Dict[Complexity, float]:
        return self.score_many([text])[0]

    @staticmethod
    def _decide(text: str, probs: np.ndarray) -> Complexity:
        """The most probable complexity; text with no words is simple (nothing to reason about)."""
        if not _TOKEN.search(text):
            return Complexity.SIMPLE
        return CLASSES[int(np.argmax(probs))]

    def classify_many(self, texts: Sequence[str]) -> List[Complexity]:
        if not texts:
            return []
        probs = self._analyse(texts)['probs']
        return [self._decide(t, row) for t, row in zip(texts, probs)]

    def classify(self, text: str) -> Complexity:
        return self.classify_many([text])[0]

    __call__ = classify

    def explain(self, text: str, nearest: int = 3) -> Dict[str, Any]:
        """Why `text` got its complexity: final scores, each component, the nearest exemplars."""
        parts = self._analyse([text])
        probs = parts['probs'][0]
        order = np.argsort(-parts['sims'][0], kind='stable')[:max(0, nearest)]
        labelled = self._labelled.get(_normalised(text))
        return {
            'complexity': self._decide(text, probs).value,
            'scores': {c.value: float(probs[i]) for i, c in enumerate(CLASSES)},
            'neighbour_vote': {c.value: float(parts['votes'][0][i])
                               for i, c in enumerate(CLASSES)},
            'centroid_similarity': {c.value: float(parts['centroid_sims'][0][i])
                                    for i, c in enumerate(CLASSES)},
            'features': dict(zip(FEATURE_NAMES, map(float, parts['features'][0]))),
            'keyword_heuristic': estimate_complexity(text).value,
            'exemplar_label': labelled.value if labelled else None,
            'nearest': [{'prompt': self.exemplars[j].text,
                         'label': self.exemplars[j].label.value,
                         'similarity': float(parts['sims'][0][j])} for j in order],
        }


_shared_router: Optional[ComplexityRouter] = None
_shared_router_lock = threading.Lock()


def shared_router() -> ComplexityRouter:
    """One router per process over the shipped prompts and the shared MiniLM embedder."""
    global _shared_router
    with _shared_router_lock:
        if _shared_router is None:
            _shared_router = ComplexityRouter.from_dataset()
        return _shared_router


CLASSIFIERS = ('learned', 'keyword')


def complexity_classifier(kind: str) -> Callable[[str], Complexity]:
    """The classifier a node's `router` parameter names: 'learned' (`shared_router()`, built
    now, so the cost is paid at start-up rather than on the first turn) or 'keyword'."""
    if kind == 'keyword':
        return estimate_complexity
    if kind == 'learned':
        return shared_router()
    raise ValueError(f'unknown router {kind!r}; expected one of {", ".join(CLASSIFIERS)}')
