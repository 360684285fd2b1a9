"""Multi-session recall: what the next session remembers, with DREAM, without it, and by recency.

The sessions of `bench/data/memory_sessions.json` (facts about people, places, objects and
routines told among chit-chat and tasks, some repeated in other words later, some changed) are
played through the real `MemoryStore` the way the graph does it: every answered turn is
journalled with `record_turn` (its SNARC salience scored by the kernel's scorer with MiniLM),
indexed into memories as the memory block's indexer does (episodes; "remember that X" pinned),
and the session is closed. At the start of each later session its questions (other words than
the telling) are asked of the memory, in three arms measured in the same run:

- dream:    the store with DREAM consolidation (`core.memory.dream.consolidate`) after each session;
- no_dream: the same turns in a second store, never consolidated (the baseline);
- recency:  plain recency, the last N journalled turns, N = the turns that fit the memory budget
            the model manager's context fitting gives memory (`context.memory_share` of the demo
            small model's window after the answer's reserve), counted with that model's tokenizer.

recall@5: a question is a hit when one of the top 5 contains one of its keys (whole words,
case-insensitive); for a changed fact only the new value counts, and a memory holding the old
value ranked above the first one holding the new value is a miss. Then the demo's small model
answers each question greedily with the recalled memories in its prompt (the real
`ModelPool.generate` path, preamble/memory fitted by `fit_to_window`), or with the recent turns
as its conversation history, and an answer is correct when it contains a key and no old value.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import re
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from common import demo_spec, offline_model_params, report

DATA = Path(__file__).resolve().parent / 'data' / 'memory_sessions.json'
DAY_S = 86400.0
TURN_GAP_S = 40.0           # [s] between two turns of a session in the simulated timeline
PINNED = re.compile(r'^\s*(?:please\s+)?remember(?:\s+that|\s*:)\s+(?P<fact>.+)$', re.I)


def has_key(text: str, key: str) -> bool:
    """`key` occurs in `text` as whole words, case-insensitive."""
    return re.search(r'(?<!\w)' + re.escape(key.lower()) + r'(?!\w)', text.lower()) is not None


def judge(ranked: Sequence[str], keys: Sequence[str], stale: Sequence[str],
          k: int = 5) -> Tuple[bool, int, int]:
    """(hit, rank of the first text with a key, rank of the first text with an old value only);
    ranks are 1-based, 0 = absent from the top k."""
    new_rank = stale_rank = 0
    for i, text in enumerate(ranked[:k], 1):
        if not new_rank and any(has_key(text, key) for key in keys):
            new_rank = i
        elif not stale_rank and any(has_key(text, key) for key in stale):
            stale_rank = i
    hit = bool(new_rank) and not (stale_rank and stale_rank < new_rank)
    return hit, new_rank, stale_rank


def answer_correct(answer: str, keys: Sequence[str], stale: Sequence[str]) -> Tuple[bool, bool]:
    """(has a key, has a key and no old value): an answer naming both the new and the old
    value ("Helen retired, your boss is Samir") is right but not strictly."""
    right = any(has_key(answer, key) for key in keys)
    return right, right and not any(has_key(answer, key) for key in stale)


def display_path(path: Path) -> str:
    """`path` relative to the repository when inside it."""
    root = Path(__file__).resolve().parents[1]
    full = path.resolve()
    return str(full.relative_to(root)) if full.is_relative_to(root) else str(path)


def load_dataset(path: Path) -> Dict[str, Any]:
    data: Dict[str, Any] = json.loads(path.read_text())
    n_sessions = len(data['sessions'])
    for q in data['questions']:
        if not 1 <= q['session'] <= n_sessions:
            raise ValueError(f'question {q["id"]} asked in session {q["session"]} of {n_sessions}')
    return data


class MemoryConfig:
    """The memory block's parameters of the demo profile (recall weights, what becomes an
    episode, pinned memories per recall, the dream's parameters), so the benchmark recalls and
    dreams as the running graph does."""

    def __init__(self, params: Dict[str, Any]) -> None:
        from sage_ros.core.memory.store import RecallWeights
        mb: Dict[str, Any] = params.get('/**/memory_block', {}).get('ros__parameters', {})
        w = mb.get('weights', {})
        self.weights = RecallWeights(**{f.name: float(w[f.name])
                                        for f in dataclasses.fields(RecallWeights) if f.name in w})
        self.episode_min_salience = float(mb.get('min_salience', 0.0))
        self.max_text = int(mb.get('max_text_chars', 4000))
        self.max_pinned = int(mb.get('max_pinned', 8))
        self.dream: Dict[str, Any] = dict(mb.get('dream', {}))


def pinned_request(text: str) -> Optional[str]:
    """X of a "remember that X" turn: the memory block's own rule when it is importable."""
    try:
        from sage_ros.nodes.memory_block import pinned_request as product
    except ImportError:
        m = PINNED.match(text)
        return m.group('fact').strip() if m else None
    return product(text)


def index_turns(store: Any, cfg: MemoryConfig) -> int:
    """Index answered turns into memories by the memory block's rule (`index_once`): "remember
    that X" -> a pinned memory X, any other turn at or above its salience floor -> an episode of
    the user's text; every turn is marked indexed."""
    done = 0
    while True:
        turns = store.unindexed_turns(limit=64)
        if not turns:
            return done
        for t in turns:
            what = pinned_request(t.text)
            if what is not None:
                store.add_memory('pinned', what, source=t.source, session=t.session,
                                 turn_id=t.id, salience=t.salience, pinned=True,
                                 now=t.answered or t.received)
            elif t.text.strip() and t.salience >= cfg.episode_min_salience:
                store.add_memory('episode', ' '.join(t.text.split())[:cfg.max_text],
                                 source=t.source, session=t.session, turn_id=t.id,
                                 salience=t.salience, now=t.answered or t.received)
        store.mark_indexed([t.id for t in turns])
        done += len(turns)


class Simulation:
    """One arm's store, fed the dataset's sessions turn by turn on a simulated timeline."""

    def __init__(self, name: str, path: Path, embedder: Any,
                 saliences: Dict[Tuple[int, int], float], dream: bool, bundle_dir: Path,
                 t0: float, model_id: str, cfg: MemoryConfig) -> None:
        from sage_ros.core.memory.store import MemoryStore
        self.name = name
        self.cfg = cfg
        self.store = MemoryStore(path, embedder=embedder)
        self.saliences = saliences
        self.dream = dream
        self.bundle_dir = bundle_dir
        self.t0 = t0
        self.model_id = model_id
        self.turn_counter = 0
        self.dreams: List[Dict[str, Any]] = []
        self.dream_s: List[float] = []
        self.index_s: List[float] = []

    def session_start(self, number: int) -> float:
        return self.t0 + (number - 1) * DAY_S

    def play(self, number: int, turns: Sequence[Dict[str, Any]],
             before: Callable[['Simulation', float], None]) -> None:
        """Open session `number`, let `before` ask its questions, journal and index its turns,
        close it, and dream it (dream arm)."""
        from sage_ros.core.memory.store import TurnRecord
        start = self.session_start(number)
        session = self.store.open_session(start)
        before(self, start)
        t = start
        for i, turn in enumerate(turns):
            t = start + (i + 1) * TURN_GAP_S
            self.turn_counter += 1
            self.store.record_turn(session.id, TurnRecord(
                turn_id=self.turn_counter, observation_id=f'bench-{number}-{i}', source='console',
                text=turn['text'], answer=turn['answer'], status='ok', error='',
                salience=self.saliences[(number, i)], role='small', model=self.model_id,
                received=t, answered=t + 1.0))
        t_idx = time.perf_counter()
        index_turns(self.store, self.cfg)
        self.index_s.append(time.perf_counter() - t_idx)
        end = t + 60.0
        self.store.close_session(session.id, 'bench', end)
        if self.dream:
            self._dream(session.id, end + 60.0)

    def _dream(self, session_id: int, now: float) -> None:
        import importlib
        dream_mod: Any = importlib.import_module('sage_ros.core.memory.dream')
        fields = {f.name for f in dataclasses.fields(dream_mod.DreamParams)}
        given = {k: v for k, v in self.cfg.dream.items() if k in fields}
        # The benchmark wants the result, not a polite background worker: full duty, one pass.
        given.update({k: v for k, v in (('duty_cycle', 1.0), ('max_items', 1_000_000))
                      if k in fields})
        params = dream_mod.DreamParams(**given)
        t = time.perf_counter()
        rec = dream_mod.consolidate(self.store, [session_id], params, lambda: False,
                                    lambda stage, frac: None, self.bundle_dir, now)
        self.dream_s.append(time.perf_counter() - t)
        self.dreams.append({k: getattr(rec, k) for k in
                            ('session', 'interrupted', 'merged', 'facts', 'updated', 'pruned')})

    def recall(self, question: str, now: float, k: int) -> List[Tuple[str, str, float]]:
        """(text, kind, score) of the top k memories of `search` for `question`."""
        hits = self.store.search(question, k=k, now=now, weights=self.cfg.weights)
        return [(h.memory.text, h.memory.kind, float(h.score)) for h in hits]

    def prompt_memories(self, question: str, now: float, k: int) -> Tuple[str, List[str]]:
        """(preamble, memory lines) the language block would give the model: the memory
        block's RECALL (pinned first, up to max_pinned, then the k best others), each line
        worded by `core.language.memory_line`, and the awakening preamble."""
        from sage_ros.core.language import memory_line
        pinned: List[Any] = []
        if self.cfg.max_pinned:
            ranked = self.store.search(question, self.cfg.max_pinned, kinds=['pinned'], now=now,
                                       weights=self.cfg.weights)
            pinned = [h.memory for h in ranked if h.memory.pinned]
            seen = {m.id for m in pinned}
            for m in self.store.pinned():
                if len(pinned) >= self.cfg.max_pinned:
                    break
                if m.id not in seen:
                    pinned.append(m)
                    seen.add(m.id)
        taken = {m.id for m in pinned}
        hits = self.store.search(question, k + len(taken), now=now, weights=self.cfg.weights)
        rest = [h.memory for h in hits if h.memory.id not in taken][:k]
        lines = [memory_line(m.kind, m.text, int(m.session)) for m in [*pinned, *rest]]
        try:
            from sage_ros.core.memory.awakening import awaken
            preamble = str(awaken(self.store).preamble)
        except (ImportError, AttributeError):
            preamble = ''
        return preamble, lines


def saliences_for(data: Dict[str, Any], embed: Any) -> Dict[Tuple[int, int], float]:
    """SNARC total of every turn, scored in order by the kernel's scorer (MiniLM novelty), as
    the kernel would journal it."""
    from sage_ros.core.salience import Observation, SnarcSalience
    scorer = SnarcSalience(embed)
    out: Dict[Tuple[int, int], float] = {}
    for s in data['sessions']:
        base = (s['session'] - 1) * DAY_S
        for i, turn in enumerate(s['turns']):
            score = scorer.score('console', Observation(text=turn['text'], t=base + i * TURN_GAP_S))
            out[(s['session'], i)] = float(score.total)
    return out


def token_counter(model_path: str) -> Callable[[Sequence[Any]], int]:
    """Tokens of a chat (the model's template), as the model manager counts them."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)

    def count(messages: Sequence[Any]) -> int:
        ids: Any = tok.apply_chat_template(
            [{'role': m.role, 'content': m.content} for m in messages], tokenize=True,
            add_generation_prompt=True)
        if hasattr(ids, 'keys'):       # a BatchEncoding in newer transformers
            ids = ids['input_ids']
        return len(ids)
    return count


def recent_turns(journal: Sequence[Tuple[str, str]], budget_tokens: int,
                 count: Callable[[Sequence[Any]], int], system: Any) -> List[Tuple[str, str]]:
    """The newest turns (oldest first) whose chat messages fit `budget_tokens` beside `system`."""
    from sage_ros.core.conversation import ChatTurn
    base = count([system])
    kept: List[Tuple[str, str]] = []
    for user, answer in reversed(journal):
        trial = [(user, answer), *kept]
        msgs = [system, *[m for u, a in trial
                          for m in (ChatTurn('user', u), ChatTurn('assistant', a))]]
        if count(msgs) - base > budget_tokens:
            break
        kept = trial
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--data', type=Path, default=DATA)
    ap.add_argument('--k', type=int, default=5)
    ap.add_argument('--no-model', action='store_true', help='recall@k only, no answers')
    ap.add_argument('--max-new-tokens', type=int, default=24)
    ap.add_argument('--role', default='small', help='demo role that answers')
    ap.add_argument('--details', type=Path, help='write every question\'s ranking here (JSON)')
    args = ap.parse_args()

    from sage_ros.core.conversation import DEFAULT_SYSTEM_PROMPT, ChatTurn
    from sage_ros.core.context import DEFAULT_MEMORY_SHARE
    from sage_ros.core.embeddings import shared_embedder

    wall0 = time.perf_counter()
    data = load_dataset(args.data)
    embed = shared_embedder().embed
    saliences = saliences_for(data, embed)
    params = offline_model_params('demo')
    mm = params['/**/model_manager']['ros__parameters']
    spec = demo_spec(args.role, args.max_new_tokens)
    share = float(mm.get('context', {}).get('memory_share', DEFAULT_MEMORY_SHARE))
    memory_budget = int(share * (spec.context_window - args.max_new_tokens))
    count = token_counter(spec.path)
    cfg = MemoryConfig(params)
    system = ChatTurn('system', DEFAULT_SYSTEM_PROMPT)

    by_session: Dict[int, List[Dict[str, Any]]] = defaultdict(list)
    for q in data['questions']:
        by_session[q['session']].append(q)
    results: Dict[str, Dict[str, Any]] = {q['id']: {'q': q} for q in data['questions']}
    journal: List[Tuple[str, str]] = []      # (user, answer) of every turn so far

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = 1.7e9
        arms = [Simulation('dream', root / 'dream.db', embed, saliences, True, root / 'bundles',
                           t0, spec.model_id, cfg),
                Simulation('no_dream', root / 'plain.db', embed, saliences, False,
                           root / 'bundles-none', t0, spec.model_id, cfg)]
        search_s: List[float] = []

        def ask(sim: Simulation, now: float, *, number: int) -> None:
            for q in by_session.get(number, []):
                t = time.perf_counter()
                top = sim.recall(q['text'], now, args.k)
                search_s.append(time.perf_counter() - t)
                results[q['id']][sim.name] = top
                results[q['id']][sim.name + '_prompt'] = sim.prompt_memories(q['text'], now, args.k)

        for s in data['sessions']:
            number = s['session']
            for sim in arms:
                sim.play(number, s['turns'], functools.partial(ask, number=number))
            # Recency is asked at the same moment: the journal before this session's turns.
            for q in by_session.get(number, []):
                recent = recent_turns(journal, memory_budget, count, system)
                results[q['id']]['recency'] = recent
                top_a = [t for t, _, _ in results[q['id']].get('dream', [])]
                block_tokens = (count([ChatTurn('system', system.content + '\n\n' +
                                                '\n'.join(f'- {t}' for t in top_a))])
                                - count([system])) if top_a else 0
                results[q['id']]['recency_same_tokens'] = recent_turns(
                    journal, block_tokens, count, system)
            journal.extend((t['text'], t['answer']) for t in s['turns'])

        live = {sim.name: {kind: sim.store.count(kind) for kind in
                           ('episode', 'fact', 'pinned', 'note', 'summary')} for sim in arms}
        dreams = arms[0].dreams
        dream_s = arms[0].dream_s
        for sim in arms:
            sim.store.close()

    # ---- recall@k ----------------------------------------------------------------------------
    arm_names = ('dream', 'no_dream', 'recency', 'recency_same_tokens')

    def texts(qid: str, arm: str) -> List[str]:
        r = results[qid][arm]
        if arm.startswith('recency'):
            return [u for u, _ in reversed(r)]     # newest first: recency's ranking
        return [t for t, _, _ in r]

    per_q: List[Dict[str, Any]] = []
    for qid, r in results.items():
        q = r['q']
        row: Dict[str, Any] = {'id': qid, 'session': q['session'], 'fact': q['fact'],
                               'changed': q['changed']}
        for arm in arm_names:
            k = args.k if not arm.startswith('recency') else len(r[arm])
            hit, new_rank, stale_rank = judge(texts(qid, arm), q['keys'], q['stale_keys'], k)
            row[arm] = {'hit': hit, 'rank': new_rank, 'stale_rank': stale_rank}
        for arm in ('dream', 'no_dream'):
            lines = r[arm + '_prompt'][1]
            row[arm + '_in_prompt'] = judge(lines, q['keys'], q['stale_keys'], len(lines))[0]
        row['dream_top_differs'] = texts(qid, 'dream') != texts(qid, 'no_dream')
        per_q.append(row)

    facts = {f['id']: f for f in data['facts']}
    repeated = {t['fact'] for s in data['sessions'] for t in s['turns'] if t['kind'] == 'repeat'}

    def rate(rows: Sequence[Dict[str, Any]], arm: str) -> Dict[str, Any]:
        n = len(rows)
        hits = sum(1 for x in rows if x[arm]['hit'])
        return {'n': n, 'hits': hits, 'rate': round(hits / n, 3) if n else None}

    def breakdown(arm: str) -> Dict[str, Any]:
        out: Dict[str, Any] = {'all': rate(per_q, arm)}
        out['changed_facts'] = rate([x for x in per_q if x['changed']], arm)
        out['stale_above_new'] = sum(
            1 for x in per_q if x[arm]['stale_rank']
            and (not x[arm]['rank'] or x[arm]['stale_rank'] < x[arm]['rank']))
        out['repeated_facts'] = rate(
            [x for x in per_q if x['fact'] in repeated and not x['changed']], arm)
        out['by_category'] = {c: rate([x for x in per_q if facts[x['fact']]['category'] == c], arm)
                              for c in ('person', 'place', 'object', 'routine')}
        out['by_sessions_back'] = {
            str(d): rate([x for x in per_q if x['session'] - facts[x['fact']]['session'] == d], arm)
            for d in sorted({x['session'] - facts[x['fact']]['session'] for x in per_q})}
        return out

    recall = {arm: breakdown(arm) for arm in arm_names}
    recency_n = [len(results[q]['recency']) for q in results]
    recency_eq_n = [len(results[q]['recency_same_tokens']) for q in results]

    # ---- answers by the demo's small model --------------------------------------------------
    answers: Dict[str, Any] = {}
    if not args.no_model:
        answers = answer_questions(results, spec, system, args.max_new_tokens)
        for qid, by_arm in answers['per_question'].items():
            for row in per_q:
                if row['id'] == qid:
                    row['answers'] = by_arm

    if args.details:
        args.details.write_text(json.dumps({
            'questions': per_q,
            'recalled': {qid: {arm: texts(qid, arm)[:args.k] for arm in ('dream', 'no_dream')}
                         for qid in results}}, indent=1))

    r_a, r_b = recall['dream']['all']['rate'], recall['no_dream']['all']['rate']
    report('memory_recall', {
        'dataset': {'path': display_path(args.data),
                    'sessions': len(data['sessions']), 'turns': len(journal),
                    'facts': len(data['facts']), 'questions': len(per_q),
                    'changed_fact_questions': sum(1 for x in per_q if x['changed']),
                    'repeated_facts': len(repeated)},
        'k': args.k,
        'embedder': 'MiniLM (all-MiniLM-L6-v2, offline)',
        'recall_weights': dataclasses.asdict(cfg.weights),
        'memory_budget_tokens': memory_budget,
        'recency_turns': {'median': statistics.median(recency_n), 'min': min(recency_n),
                          'max': max(recency_n)},
        'recency_same_tokens_turns': {'median': statistics.median(recency_eq_n),
                                      'min': min(recency_eq_n), 'max': max(recency_eq_n)},
        'recall_at_k': recall,
        'in_prompt_hit_rate': {
            arm: round(sum(1 for x in per_q if x[arm + '_in_prompt']) / len(per_q), 3)
            for arm in ('dream', 'no_dream')},
        'dream_minus_no_dream': (round(r_a - r_b, 3)
                                 if r_a is not None and r_b is not None else None),
        'dream_minus_recency': round(r_a - recall['recency']['all']['rate'], 3),
        'questions_whose_top_k_dream_changed': sum(1 for x in per_q if x['dream_top_differs']),
        'live_memories_at_end': live,
        'dreams': dreams,
        'dream_s_per_session': [round(x, 2) for x in dream_s],
        'search_ms': {'p50': round(1000 * statistics.median(search_s), 2),
                      'max': round(1000 * max(search_s), 2), 'n': len(search_s)},
        'answers': {k: v for k, v in answers.items() if k != 'per_question'},
        'wall_s': round(time.perf_counter() - wall0, 1),
    })


def answer_questions(results: Dict[str, Dict[str, Any]], spec: Any, system: Any,
                     max_new_tokens: int) -> Dict[str, Any]:
    """Every question answered greedily by the demo model: with the dream arm's memories, the
    no-dream arm's, the recent turns as history, and with nothing (the floor)."""
    from sage_ros.core.conversation import ChatTurn
    from sage_ros.core.models import ModelPool

    pool = ModelPool({spec.role: spec}, spec.role)
    pool.load(spec.role)
    accepts_memory = 'memory' in inspect.signature(pool.generate).parameters
    per_question: Dict[str, Dict[str, Any]] = {}
    correct: Dict[str, int] = defaultdict(int)
    correct_strict: Dict[str, int] = defaultdict(int)
    used: Dict[str, List[int]] = defaultdict(list)
    t0 = time.perf_counter()
    for qid, r in results.items():
        q = r['q']
        user = ChatTurn('user', q['text'])
        prompts: Dict[str, Tuple[List[Any], str, List[str]]] = {
            'dream': ([system, user], *r['dream_prompt']),
            'no_dream': ([system, user], *r['no_dream_prompt']),
            'recency': ([system, *[m for u, a in r['recency']
                                   for m in (ChatTurn('user', u), ChatTurn('assistant', a))], user],
                        '', []),
            'none': ([system, user], '', []),
        }
        per_question[qid] = {}
        for arm, (messages, preamble, memory) in prompts.items():
            if (memory or preamble) and not accepts_memory:
                raise RuntimeError('ModelPool.generate has no memory argument yet')
            kw: Dict[str, Any] = {'memory': memory, 'preamble': preamble} if accepts_memory else {}
            res = pool.generate(spec.role, messages, max_new_tokens=max_new_tokens,
                                temperature=0.0, **kw)
            ok, strict = answer_correct(res.text, q['keys'], q['stale_keys'])
            correct[arm] += ok
            correct_strict[arm] += strict
            used[arm].append(int(getattr(res, 'memory_used', 0)))
            per_question[qid][arm] = {'correct': ok, 'strict': strict,
                                      'answer': res.text.strip()[:160]}
    n = len(results)
    return {
        'model': spec.model_id, 'greedy': True, 'max_new_tokens': max_new_tokens,
        'correct': {arm: {'n': n, 'correct': c, 'rate': round(c / n, 3),
                          'strict_rate': round(correct_strict[arm] / n, 3)}
                    for arm, c in correct.items()},
        'memories_in_prompt_median': {arm: statistics.median(v) for arm, v in used.items()},
        'generate_s': round(time.perf_counter() - t0, 1),
        'per_question': per_question,
    }


if __name__ == '__main__':
    main()
