"""The reasoning block's engine: iterative refinement (IRP) of a problem through a language model.

The prototype's IRP contract (`init_state`, `step`, `energy`, `halt`), applied to text:

* **Steps.** Each step is one call to the language block: *decompose* the problem into at most
  `max_parts` sub-questions, *solve* each part, *check* the parts the current answer does not
  cover (re-ask them once more, with the larger model), and finally *integrate* the partial
  results into one answer. Only the integration is recorded in the conversation; every other
  step is ephemeral.
* **Energy** (lower is better, in [0, sum of the weights]) is measured, never asked of the model:
  ``weight_uncovered * mean(1 - coverage) + weight_unanswered * unanswered share
  + weight_empty * [answer empty]``. A part's coverage is the best cosine similarity between the
  part and a sentence of the current answer (sentence embeddings), mapped linearly from
  `cover_floor` (0) to `cover_threshold` (1). A part is unanswered when it has no answer of its
  own and the current answer does not cover it. The current answer is the integrated answer
  once there is one, else the part answers so far.
* **Halting** of the refinement loop, checked before every step: energy at or below
  `target_energy` (converged); the energy slope over the last `halt_window` steps, i.e. the mean
  decrease per step, below `min_slope` (converged if the energy fell since the start, else
  stalled: a run that never progressed has not converged; a rising energy halts too, unlike the
  prototype's absolute slope); every part solved and checked; the step cap; the budget; a step
  whose output repeats an earlier one; or a step that changed nothing measurable (the energy did
  not drop and no part's answer changed: stalled). The integration step always follows (it is
  paid for from a reserve), so a halted run still answers.
* **No refinement into repetition** (the prototype's "refined version" failure): an output whose
  embedding is at least `repeat_similarity` similar to an earlier output (or to the problem or a
  part, i.e. an echo), whose word n-grams were mostly seen before, or which loops on its own
  n-grams, is discarded and halts the loop. A check step keeps the new answer only when it lowers
  the energy, so the loop's energy never rises.

Cost model (ATP): a step costs ``atp_per_step + atp_per_token * completion tokens``. Every step is
sent with a token cap, so its worst case is known before it starts; a refinement step starts only
if the budget left after the integration reserve pays for its worst case with at least
`min_step_tokens` tokens. The goal's ATP budget thereby sets the iteration cap, and `atp_spent`
never exceeds the budget when the language block honours the token cap.
"""

from __future__ import annotations

import enum
import math
import re
import string
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .blocks import BlockType, CapabilityBlock
from .embeddings import EmbeddingError
from .params import check_ranges, tunable
from .text import InvalidText, sanitize

EmbedFn = Callable[[Sequence[str]], np.ndarray]  # texts -> unit-norm rows
StopFn = Callable[[], bool]


class StepKind(str, enum.Enum):
    DECOMPOSE = 'decompose'
    SOLVE = 'solve'
    CHECK = 'check'
    INTEGRATE = 'integrate'


class HaltReason(str, enum.Enum):
    TARGET = 'target'          # energy reached target_energy (converged)
    SLOPE = 'slope'            # the energy slope flattened after progress (converged)
    STALLED = 'stalled'        # no progress: a step changed nothing measurable, or the energy
                               # slope flattened with no progress since the start
    COMPLETE = 'complete'      # every part solved and checked; nothing left to try
    BUDGET = 'budget'          # the ATP left cannot pay for another refinement step
    MAX_STEPS = 'max_steps'    # the step cap leaves room only for the integration
    REPETITION = 'repetition'  # a step repeated an earlier output: no progress
    CANCELLED = 'cancelled'
    FAILED = 'failed'          # the language block failed

    @property
    def converged(self) -> bool:
        return self in (HaltReason.TARGET, HaltReason.SLOPE)


class InvalidProblem(ValueError):
    """A goal that cannot be worked on; the message says why, in words."""


class LanguageCancelled(Exception):
    """The language step was cancelled (the reasoning goal is being cancelled)."""


class LanguageFailed(RuntimeError):
    """The language block could not answer a step; the message says why."""


@dataclass(frozen=True)
class LanguageRequest:
    """One step sent to the language block (mirrors Language.Goal)."""

    kind: StepKind
    text: str
    context: str           # shown to the model for this turn only, never recorded
    complexity: str        # 'simple' or 'complex': picks the model role
    ephemeral: bool        # True: not recorded in the conversation
    max_new_tokens: int    # [tokens] cap, so the step's worst-case cost is known
    atp_budget: float      # [ATP] worst-case cost of this step
    turn_id: int = 0       # the reasoning goal's turn, passed on to the language block


@dataclass(frozen=True)
class LanguageReply:
    text: str
    completion_tokens: int
    model: str = ''
    role: str = ''
    swapped: bool = False


# Answers one request; raises LanguageCancelled when stopped, LanguageFailed on errors.
LanguageFn = Callable[[LanguageRequest, StopFn], LanguageReply]

DECOMPOSE_PROMPT = ('Break the following problem into at most {max_parts} short sub-questions '
                    'that together solve it. Write one sub-question per line and nothing else.\n\n'
                    'Problem: {problem}')
SOLVE_CONTEXT = ('This question is one part of a larger problem: {problem}\n'
                 'Answer only this part, briefly and concretely.')
CHECK_PROMPT = 'Answer directly and concretely: {question}'
CHECK_CONTEXT = ('An earlier answer did not address this question. '
                 'It is one part of a larger problem: {problem}')
INTEGRATE_CONTEXT = ('Partial results worked out for this problem:\n{results}\n'
                     'Use them to give one complete, coherent answer.')


def _check_template(name: str, template: str, keys: Tuple[str, ...]) -> None:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    unknown = fields - set(keys)
    if unknown:
        raise ValueError(f'{name}: unknown placeholder(s) {sorted(unknown)}; '
                         f'allowed: {", ".join(keys)}')


@dataclass(frozen=True)
class ReasoningParams:
    """Every constant of the engine, with its default; ranges are checked on construction."""

    max_problem_chars: int = tunable(4000, 'Longer problems are refused', 1, 1_000_000,
                                     unit='characters')
    max_steps: int = tunable(24, 'Hard cap on steps per goal, integration included', 1, 1000)
    max_parts: int = tunable(4, 'Sub-questions a problem is split into at most', 1, 64)
    max_part_chars: int = tunable(400, 'Longer sub-questions are dropped', 1, 100_000,
                                  unit='characters')
    min_part_chars: int = tunable(8, 'Shorter decomposition lines are not sub-questions', 0,
                                  10_000, unit='characters')
    retries_per_part: int = tunable(1, 'Check steps for a part the answer does not cover', 0,
                                    100)
    atp_per_step: float = tunable(0.5, 'Fixed cost of one language step', 0.0, 1e6, unit='ATP',
                                  param='atp.per_step')
    atp_per_token: float = tunable(0.05, 'Cost of a generated token', 0.0, 1e6,
                                   unit='ATP/token', param='atp.per_token')
    decompose_tokens: int = tunable(96, 'Token cap of the decomposition step', 1, 100_000,
                                    unit='tokens', param='tokens.decompose')
    solve_tokens: int = tunable(64, 'Token cap of a solve or check step', 1, 100_000,
                                unit='tokens', param='tokens.solve')
    integrate_tokens: int = tunable(160, 'Token cap of the integration step', 1, 100_000,
                                    unit='tokens', param='tokens.integrate')
    min_step_tokens: int = tunable(16, 'A step the budget pays fewer tokens for does not start',
                                   1, 100_000, unit='tokens', param='tokens.min_step')
    weight_uncovered: float = tunable(0.5, 'Energy weight of the parts the answer does not cover',
                                      0.0, 100.0, param='energy.weight_uncovered')
    weight_unanswered: float = tunable(0.4, 'Energy weight of the parts with no answer', 0.0,
                                       100.0, param='energy.weight_unanswered')
    weight_empty: float = tunable(0.1, 'Energy added while the answer is empty', 0.0, 100.0,
                                  param='energy.weight_empty')
    cover_floor: float = tunable(0.2, 'Cosine similarity that counts as no coverage', -1.0, 1.0,
                                 param='energy.cover_floor')
    cover_threshold: float = tunable(0.5, 'Cosine similarity that counts as full coverage', -1.0,
                                     1.0, param='energy.cover_threshold')
    halt_window: int = tunable(3, 'Steps over which the energy slope is measured', 1, 100,
                               unit='steps', param='halt.window')
    min_slope: float = tunable(0.02, 'Mean energy decrease per step below which the loop has '
                               'converged', 0.0, 10.0, param='halt.min_slope')
    target_energy: float = tunable(0.05, 'Energy at or below which the problem counts as solved',
                                   0.0, 100.0, param='halt.target_energy')
    repeat_similarity: float = tunable(0.95, 'Cosine similarity to an earlier output that counts '
                                       'as repetition', -1.0, 1.0, param='halt.repeat_similarity')
    repeat_ngram: int = tunable(4, 'n of the word n-gram repetition tests', 1, 32, unit='words',
                                param='halt.repeat_ngram')
    repeat_ngram_fraction: float = tunable(0.8, "Share of an output's n-grams seen before that "
                                           'counts as repetition', 0.0, 1.0,
                                           param='halt.repeat_ngram_fraction')
    min_distinct_ngrams: float = tunable(0.5, 'Share of distinct n-grams below which an output '
                                         'loops on itself', 0.0, 1.0,
                                         param='halt.min_distinct_ngrams')
    decompose_prompt: str = tunable(DECOMPOSE_PROMPT, 'Decomposition request; placeholders '
                                    '{problem}, {max_parts}', param='prompts.decompose')
    solve_context: str = tunable(SOLVE_CONTEXT, 'Context of a solve step; placeholder {problem}',
                                 param='prompts.solve_context')
    check_prompt: str = tunable(CHECK_PROMPT, 'Check request; placeholders {question}, {problem}',
                                param='prompts.check')
    check_context: str = tunable(CHECK_CONTEXT, 'Context of a check step; placeholders '
                                 '{question}, {problem}', param='prompts.check_context')
    integrate_context: str = tunable(INTEGRATE_CONTEXT, 'Context of the integration; '
                                     'placeholders {results}, {problem}',
                                     param='prompts.integrate_context')

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.cover_threshold <= self.cover_floor:
            raise ValueError(f'cover_threshold ({self.cover_threshold}) must be above '
                             f'cover_floor ({self.cover_floor})')
        if self.min_step_tokens > min(self.decompose_tokens, self.solve_tokens,
                                      self.integrate_tokens):
            raise ValueError('min_step_tokens must not exceed any step\'s token cap')
        _check_template('decompose_prompt', self.decompose_prompt, ('problem', 'max_parts'))
        _check_template('solve_context', self.solve_context, ('problem',))
        _check_template('check_prompt', self.check_prompt, ('question', 'problem'))
        _check_template('check_context', self.check_context, ('question', 'problem'))
        _check_template('integrate_context', self.integrate_context, ('results', 'problem'))

    def token_cap(self, kind: StepKind) -> int:
        return {StepKind.DECOMPOSE: self.decompose_tokens, StepKind.SOLVE: self.solve_tokens,
                StepKind.CHECK: self.solve_tokens,
                StepKind.INTEGRATE: self.integrate_tokens}[kind]


@dataclass
class Part:
    question: str
    answer: str = ''
    attempts: int = 0   # solve and check steps spent on it


@dataclass
class ReasoningState:
    """The IRP state: the problem, its parts and their answers, the energy trace, the budget."""

    problem: str
    atp_budget: float
    step_cap: int                 # steps allowed, integration included
    reserve: float                # [ATP] kept for the integration step
    parts: List[Part]
    turn_id: int = 0
    decomposed: bool = False
    answer: str = ''              # the integrated answer ('' until integration)
    steps: int = 0
    atp_spent: float = 0.0
    energies: List[float] = field(default_factory=list)   # E0 (initial state), E1, ...
    outputs: List[str] = field(default_factory=list)      # every model output so far
    halt: Optional[HaltReason] = None
    completion_tokens: int = 0    # [tokens] generated over all steps
    model: str = ''               # model of the latest step (the integration, once done)
    role: str = ''
    swapped: bool = False         # any step needed a model swap

    def draft(self) -> str:
        return '\n'.join(p.answer for p in self.parts if p.answer)

    def current_answer(self) -> str:
        return self.answer or self.draft()


@dataclass(frozen=True)
class StepRecord:
    """One step as streamed in feedback."""

    step: int
    kind: StepKind
    energy: float
    summary: str
    atp_spent: float


@dataclass(frozen=True)
class ReasoningOutcome:
    answer: str
    steps: int
    final_energy: float
    converged: bool
    atp_spent: float
    halt: HaltReason
    parts: Tuple[str, ...]
    energies: Tuple[float, ...]
    error: str = ''
    completion_tokens: int = 0
    model: str = ''
    role: str = ''
    swapped: bool = False


_BULLET = re.compile(r'^\s*(?:[-*\u2022]+|\(?\d{1,2}[.):]|\(?[a-zA-Z][.)])\s+')
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+|\n+')
_WORD = re.compile(r'\w+')


def split_sentences(text: str) -> List[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def ngrams(text: str, n: int) -> List[Tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return [tuple(words)] if words else []
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def _short(text: str, limit: int = 60) -> str:
    text = ' '.join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + '\u2026'


class ReasoningEngine:
    """Runs the refinement loop; the language model and the embedder are injected."""

    def __init__(self, language: LanguageFn, params: Optional[ReasoningParams] = None,
                 embed: Optional[EmbedFn] = None) -> None:
        self.language = language
        self.params = params or ReasoningParams()
        self._embed = embed

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._embed is None:
            from .embeddings import shared_embedder   # loaded on first use, not at import
            self._embed = shared_embedder().embed
        return self._embed(texts)

    # --- cost model -------------------------------------------------------------------------

    def step_cost(self, tokens: int) -> float:
        """[ATP] cost of one step that generates `tokens` tokens."""
        return self.params.atp_per_step + self.params.atp_per_token * max(0, tokens)

    def affordable_tokens(self, atp: float) -> int:
        """Most tokens one step can generate for `atp` (-1 if not even the step's fixed cost)."""
        p = self.params
        if atp + 1e-9 < p.atp_per_step:
            return -1
        if p.atp_per_token <= 0.0:
            return 1 << 30
        return int(math.floor((atp - p.atp_per_step) / p.atp_per_token + 1e-9))

    def min_budget(self) -> float:
        """[ATP] the least budget that pays for one (integration) step."""
        return self.step_cost(self.params.min_step_tokens)

    # --- IRP contract -----------------------------------------------------------------------

    def init_state(self, problem: str, atp_budget: float, max_steps: int = 0,
                   turn_id: int = 0) -> ReasoningState:
        """Validate the goal and build the initial state (one part: the problem itself)."""
        p = self.params
        try:
            text = sanitize(problem, p.max_problem_chars)
        except InvalidText as exc:
            raise InvalidProblem(f'problem: {exc}') from None
        if not math.isfinite(atp_budget) or atp_budget < 0.0:
            raise InvalidProblem(f'atp_budget must be a finite number >= 0, got {atp_budget}')
        if atp_budget + 1e-9 < self.min_budget():
            raise InvalidProblem(f'atp_budget {atp_budget:.2f} cannot pay for one step '
                                 f'(at least {self.min_budget():.2f} ATP)')
        if max_steps < 0:
            raise InvalidProblem(f'max_steps must be >= 0, got {max_steps}')
        cap = min(max_steps, p.max_steps) if max_steps else p.max_steps
        reserve = self.step_cost(min(p.integrate_tokens, self.affordable_tokens(atp_budget)))
        state = ReasoningState(problem=text, atp_budget=float(atp_budget), step_cap=cap,
                               reserve=reserve, parts=[Part(text)], turn_id=turn_id)
        state.energies.append(self.energy(state))
        return state

    def coverage(self, questions: Sequence[str], answer: str) -> np.ndarray:
        """Per question, in [0, 1]: how well the best-matching sentence of `answer` covers it."""
        sentences = split_sentences(answer)
        if not questions:
            return np.zeros(0)
        if not sentences:
            return np.zeros(len(questions))
        vecs = np.asarray(self.embed([*questions, *sentences]), dtype=np.float64)
        sims = vecs[:len(questions)] @ vecs[len(questions):].T
        best = np.nan_to_num(sims.max(axis=1), nan=0.0)
        p = self.params
        return np.clip((best - p.cover_floor) / (p.cover_threshold - p.cover_floor), 0.0, 1.0)

    def energy(self, state: ReasoningState) -> float:
        """Lower is better; see the module docstring."""
        p = self.params
        answer = state.current_answer()
        cov = self.coverage([q.question for q in state.parts], answer)
        unanswered = [not part.answer and c < 1.0 for part, c in zip(state.parts, cov)]
        return float(p.weight_uncovered * float(np.mean(1.0 - cov))
                     + p.weight_unanswered * float(np.mean(unanswered))
                     + p.weight_empty * (0.0 if answer.strip() else 1.0))

    def next_action(self, state: ReasoningState) -> Optional[Tuple[StepKind, int]]:
        """The next refinement step: decompose, solve the next part, or check the worst-covered
        part that still has a retry; None when nothing is left to try."""
        if not state.decomposed:
            return StepKind.DECOMPOSE, -1
        for i, part in enumerate(state.parts):
            if part.attempts == 0:
                return StepKind.SOLVE, i
        cov = self.coverage([q.question for q in state.parts], state.draft())
        candidates = [(c, i) for i, (part, c) in enumerate(zip(state.parts, cov))
                      if c < 1.0 and part.attempts <= self.params.retries_per_part]
        return (StepKind.CHECK, min(candidates)[1]) if candidates else None

    def _refinement_tokens(self, state: ReasoningState, kind: StepKind) -> int:
        """Token cap for a refinement step: what the budget beyond the integration reserve pays."""
        left = state.atp_budget - state.atp_spent - state.reserve
        return min(self.params.token_cap(kind), self.affordable_tokens(left))

    def halt(self, state: ReasoningState) -> Optional[HaltReason]:
        """Why the refinement loop stops before the next step (None: go on)."""
        p = self.params
        if state.halt is not None:
            return state.halt
        if state.steps + 1 >= state.step_cap:
            return HaltReason.MAX_STEPS
        energies = state.energies
        if state.decomposed and energies[-1] <= p.target_energy:
            return HaltReason.TARGET
        k = p.halt_window
        if len(energies) > k and (energies[-k - 1] - energies[-1]) / k < p.min_slope:
            return HaltReason.SLOPE if energies[-1] < energies[0] else HaltReason.STALLED
        action = self.next_action(state)
        if action is None:
            return HaltReason.COMPLETE
        kind = action[0]
        needed = p.min_step_tokens
        if kind is StepKind.DECOMPOSE:
            # Decomposing pays off only if at least one part can be solved afterwards.
            needed_atp = (self.step_cost(p.decompose_tokens) + self.step_cost(p.min_step_tokens)
                          + state.reserve)
            if state.atp_budget - state.atp_spent + 1e-9 < needed_atp:
                return HaltReason.BUDGET
            return None
        if self._refinement_tokens(state, kind) < needed:
            return HaltReason.BUDGET
        return None

    def repetition(self, text: str, earlier: Sequence[str]) -> str:
        """Why `text` is no progress over `earlier` texts ('' if it is): an echo or a repeat."""
        p = self.params
        grams = ngrams(text, p.repeat_ngram)
        if not grams:
            return ''
        if len(grams) >= p.repeat_ngram and len(set(grams)) / len(grams) < p.min_distinct_ngrams:
            return f'it loops on itself ({len(set(grams))} distinct of {len(grams)} n-grams)'
        seen = {g for t in earlier for g in ngrams(t, p.repeat_ngram)}
        if seen:
            share = sum(g in seen for g in grams) / len(grams)
            if share >= p.repeat_ngram_fraction:
                return f'{share:.0%} of its word {p.repeat_ngram}-grams appeared before'
        refs = [t for t in earlier if t.strip()]
        if refs:
            vecs = np.asarray(self.embed([text, *refs]), dtype=np.float64)
            sims = np.nan_to_num(vecs[1:] @ vecs[0], nan=0.0)
            best = int(np.argmax(sims))
            if sims[best] >= p.repeat_similarity:
                return (f'similarity {sims[best]:.2f} to an earlier text '
                        f'({_short(refs[best], 40)!r})')
        return ''

    def parse_parts(self, text: str, problem: str) -> List[str]:
        """Sub-questions from the decomposition: one per line (several questions on one line are
        split), bullets and numbers removed, duplicates and odd lengths dropped."""
        p = self.params
        parts: List[str] = []
        seen = set()
        for line in text.splitlines():
            for piece in re.split(r'(?<=\?)\s+', line):
                q = _BULLET.sub('', piece).strip().strip('"').strip()
                key = ' '.join(_WORD.findall(q.lower()))
                if (len(q) < p.min_part_chars or len(q) > p.max_part_chars or not key
                        or key in seen or q.endswith(':')):
                    continue
                seen.add(key)
                parts.append(q)
                if len(parts) == p.max_parts:
                    return parts
        return parts or [problem]

    def _request(self, state: ReasoningState, kind: StepKind, index: int,
                 tokens: int) -> LanguageRequest:
        """Sub-steps are ephemeral; the integration is the original problem, recorded, with the
        partial results as context. 'simple' for a part, 'complex' for the rest (model role)."""
        p = self.params
        cost = self.step_cost(tokens)
        if kind is StepKind.DECOMPOSE:
            text = p.decompose_prompt.format(problem=state.problem, max_parts=p.max_parts)
            context, complexity, ephemeral = '', 'complex', True
        elif kind is StepKind.SOLVE:
            text = state.parts[index].question
            context, complexity, ephemeral = (p.solve_context.format(problem=state.problem),
                                              'simple', True)
        elif kind is StepKind.CHECK:
            q = state.parts[index].question
            text = p.check_prompt.format(question=q, problem=state.problem)
            context, complexity, ephemeral = (
                p.check_context.format(question=q, problem=state.problem), 'complex', True)
        else:
            results = '\n'.join(f'{n}. {part.question}\n   {part.answer}' for n, part in
                                enumerate((q for q in state.parts if q.answer), start=1))
            text, complexity, ephemeral = state.problem, 'complex', False
            context = (p.integrate_context.format(results=results, problem=state.problem)
                       if results else '')
        return LanguageRequest(kind, text, context, complexity, ephemeral, tokens, cost,
                               state.turn_id)

    def _call(self, state: ReasoningState, request: LanguageRequest,
              should_stop: StopFn) -> str:
        reply = self.language(request, should_stop)
        state.steps += 1
        state.atp_spent += self.step_cost(reply.completion_tokens)
        state.completion_tokens += reply.completion_tokens
        state.model, state.role = reply.model, reply.role
        state.swapped = state.swapped or reply.swapped
        return reply.text.strip()

    def step(self, state: ReasoningState, should_stop: StopFn = lambda: False) -> StepRecord:
        """One refinement step (decompose, solve or check); appends its energy to the trace."""
        action = self.next_action(state)
        if action is None:
            raise RuntimeError('step() called with nothing left to do; check halt() first')
        kind, index = action
        tokens = min(self.params.token_cap(kind),
                     self.affordable_tokens(state.atp_budget - state.atp_spent - state.reserve))
        before = state.energies[-1]
        answer_before = state.parts[index].answer if index >= 0 else ''
        text = self._call(state, self._request(state, kind, index, tokens), should_stop)
        if kind is StepKind.DECOMPOSE:
            state.parts = [Part(q) for q in self.parse_parts(text, state.problem)]
            state.decomposed = True
            state.outputs.append(text)
            summary = (f'decomposed into {len(state.parts)} part(s): '
                       + '; '.join(_short(q.question, 50) for q in state.parts))
        else:
            part = state.parts[index]
            part.attempts += 1
            label = f'part {index + 1}/{len(state.parts)}'
            why = self.repetition(text, [*state.outputs, state.problem,
                                         *(q.question for q in state.parts)]) if text else ''
            state.outputs.append(text)
            if why:
                state.halt = HaltReason.REPETITION
                summary = f'{kind.value} {label}: output repeats ({why}); no progress, halting'
            elif not text:
                summary = f'{kind.value} {label}: empty answer'
            elif kind is StepKind.SOLVE:
                part.answer = text
                summary = f'solved {label}: {_short(text)!r}'
            else:
                previous, part.answer = part.answer, text
                if self.energy(state) < before:
                    summary = f'checked {label}: new answer covers it better: {_short(text)!r}'
                else:
                    part.answer = previous
                    summary = f'checked {label}: new answer was no better, kept the old one'
        energy = self.energy(state)
        if (kind is not StepKind.DECOMPOSE and state.halt is None and energy >= before
                and state.parts[index].answer == answer_before):
            # Each step must change something measurable; one that did not would be repeated.
            state.halt = HaltReason.STALLED
            summary += '; no progress, halting'
        state.energies.append(energy)
        return StepRecord(state.steps, kind, energy,
                          f'{summary} (energy {before:.2f} -> {energy:.2f})', state.atp_spent)

    def integrate(self, state: ReasoningState, should_stop: StopFn = lambda: False) -> StepRecord:
        """The final, recorded step: the original problem with the partial results as context."""
        tokens = max(1, min(self.params.integrate_tokens,
                            self.affordable_tokens(state.atp_budget - state.atp_spent)))
        before = state.energies[-1]
        answered = sum(1 for q in state.parts if q.answer)
        text = self._call(state, self._request(state, StepKind.INTEGRATE, -1, tokens),
                          should_stop)
        state.answer = text
        state.outputs.append(text)
        energy = self.energy(state)
        state.energies.append(energy)
        summary = (f'integrated {answered} of {len(state.parts)} part answer(s)'
                   + ('' if text else ', but the answer is empty'))
        return StepRecord(state.steps, StepKind.INTEGRATE, energy,
                          f'{summary} (energy {before:.2f} -> {energy:.2f})', state.atp_spent)

    def run(self, state: ReasoningState, on_step: Optional[Callable[[StepRecord], None]] = None,
            should_stop: StopFn = lambda: False) -> ReasoningOutcome:
        """init (done) -> loop {halt? -> step -> energy} -> integrate."""
        emit = on_step or (lambda _: None)
        error = ''
        reason: Optional[HaltReason] = None
        try:
            while True:
                if should_stop():
                    raise LanguageCancelled()
                reason = self.halt(state)
                if reason is not None:
                    break
                emit(self.step(state, should_stop))
            state.halt = reason
            if should_stop():
                raise LanguageCancelled()
            # Always affordable from the reserve, unless a step generated more than its cap.
            if self.affordable_tokens(state.atp_budget - state.atp_spent) >= 1:
                emit(self.integrate(state, should_stop))
        except LanguageCancelled:
            reason = HaltReason.CANCELLED
        except LanguageFailed as exc:
            reason, error = HaltReason.FAILED, str(exc) or 'the language block failed'
        except EmbeddingError as exc:
            reason, error = HaltReason.FAILED, f'sentence embeddings unavailable: {exc}'
        assert reason is not None
        answer = '' if reason in (HaltReason.CANCELLED, HaltReason.FAILED) else (
            state.answer or state.draft())
        return ReasoningOutcome(answer=answer, steps=state.steps,
                                final_energy=state.energies[-1], converged=reason.converged,
                                atp_spent=state.atp_spent, halt=reason,
                                parts=tuple(q.question for q in state.parts),
                                energies=tuple(state.energies), error=error,
                                completion_tokens=state.completion_tokens, model=state.model,
                                role=state.role, swapped=state.swapped)

    def solve(self, problem: str, atp_budget: float, max_steps: int = 0,
              on_step: Optional[Callable[[StepRecord], None]] = None,
              should_stop: StopFn = lambda: False, turn_id: int = 0) -> ReasoningOutcome:
        """`init_state` then `run`; raises InvalidProblem for a goal that cannot be worked on."""
        return self.run(self.init_state(problem, atp_budget, max_steps, turn_id), on_step,
                        should_stop)


class ReasoningBlock(CapabilityBlock):
    """The block as advertised: it holds no model; it is usable while the language block is
    reachable and the sentence embeddings its energy needs can load."""

    name = 'reasoning'
    block_type = BlockType.MODULAR

    def __init__(self, engine: ReasoningEngine) -> None:
        self.engine = engine
        self.language_available = False
        self.embedder_error = ''    # why the energy's sentence embeddings cannot load ('' = ok)

    @property
    def capabilities(self) -> Tuple[str, ...]:
        return ('reasoning', 'planning', 'decomposition')

    @property
    def modalities(self) -> Tuple[str, ...]:
        return ('text',)

    @property
    def loaded(self) -> bool:
        return self.language_available and not self.embedder_error

    def load(self) -> None:
        """Nothing to load: the language block and the model manager hold the models."""

    def unload(self) -> None:
        """Nothing to release."""
