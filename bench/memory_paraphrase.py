"""DREAM's fact merging: paraphrased duplicates merged, near misses kept apart, updates found.

Runs the decision DREAM makes (core/memory/facts.py: extract, then `decide` against the most
similar earlier facts, with the real MiniLM cosine) over bench/data/paraphrases.jsonl:
- groups: each fact told 3-5 times in other words. Every text of every group goes, in order,
  into ONE pool of fact memories (as a dream would see them, across topics), so a merge into
  another group's memory counts as a false merge. Reported: the fraction of paraphrased
  duplicates merged, sum(told - memories left) / sum(told - 1) (mem0: 15 paraphrases -> 13
  memories, about 20%), and the memories left.
- near misses: pairs on one topic that must stay two memories (another person, object, value).
- changed: an old fact and its new value; the new one must be an update (supersede), not a
  merge and not a second memory.
The same set then goes through `dream.consolidate` itself on a real MemoryStore
(`through_consolidate`: the group texts as the turns of one session, told round-robin so the
paraphrases of one fact are far apart; each pair as two sessions of a fresh store), which adds
the store's nearest-neighbour candidates and the kept-text choice to the decision.
The thresholds were tuned on the 'tune' split of the set; the 'holdout' split (every 4th item,
fixed in the file) is reported separately and was not looked at while tuning. Rows with
"set": "natural" (changed facts in natural speech, repeats, near misses with change words) are
also reported on their own ('natural'); all of that section was seen while its rules were
written, so its held-out test is the recall benchmark's set (bench/memory_recall.py). A cosine-only
baseline (merge when the cosine passes a threshold, the best one for the tune split) shows what
the values add.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from common import report

from sage_ros.core.memory.facts import Candidate, Fact, FactThresholds, decide, extract

DATA = Path(__file__).resolve().parent / 'data' / 'paraphrases.jsonl'


def load(path: Path = DATA) -> List[Dict[str, Any]]:
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class Pool:
    """Fact memories as DREAM keeps them: merges and supersessions, in memory."""

    facts: List[Fact] = field(default_factory=list)
    vectors: List[np.ndarray] = field(default_factory=list)
    owner: List[str] = field(default_factory=list)     # group id of the first text
    live: List[bool] = field(default_factory=list)

    def tell(self, fact: Fact, vec: np.ndarray, owner: str, th: FactThresholds,
             k: int = 8) -> Tuple[str, int]:
        """(action, index of the memory now holding the fact)."""
        cands: List[Candidate] = []
        if self.vectors:
            sims = np.stack(self.vectors) @ vec
            order = [int(i) for i in np.argsort(-sims) if self.live[int(i)]][:k]
            cands = [Candidate(i, self.facts[i], float(sims[i])) for i in order]
        d = decide(fact, cands, th)
        if d.action == 'merge':
            return 'merge', d.target
        self.facts.append(fact)
        self.vectors.append(vec)
        self.owner.append(owner)
        self.live.append(True)
        if d.action == 'update':
            self.live[d.target] = False
        return d.action, len(self.facts) - 1


def embed_all(texts: Sequence[str]) -> Dict[str, np.ndarray]:
    from sage_ros.core.embeddings import shared_embedder
    unique = sorted(set(texts))
    vecs = shared_embedder().embed(unique)
    return {t: np.asarray(v, dtype=np.float64) for t, v in zip(unique, vecs)}


def evaluate(rows: Sequence[Dict[str, Any]], th: FactThresholds,
             vectors: Dict[str, np.ndarray], cosine_only: Optional[float] = None
             ) -> Dict[str, Any]:
    """Scores of one split (rows already filtered)."""
    def facts_of(text: str) -> List[Fact]:
        found = extract(text)
        if cosine_only is not None and not found:
            found = [Fact(text, 'other', '', '')]
        return found

    def decide_pair(a: Fact, b: Fact) -> str:
        if cosine_only is not None:
            return 'merge' if float(vectors[a.text] @ vectors[b.text]) >= cosine_only else 'add'
        pool = Pool()
        pool.tell(a, vectors[a.text], 'a', th)
        return pool.tell(b, vectors[b.text], 'b', th)[0]

    groups = [r for r in rows if r['type'] == 'group']
    pool = Pool()
    told = extracted = 0
    duplicates = merged = 0
    false_merges = 0
    memories_left = 0
    missed: List[List[str]] = []
    for g in groups:
        holders = set()
        for text in g['texts']:
            told += 1
            found = facts_of(text)
            if not found:
                holders.add(('none', text))
                continue
            extracted += 1
            for fact in found[:1]:
                if cosine_only is not None:
                    action, idx = _cosine_tell(pool, fact, vectors[fact.text], g['id'],
                                               cosine_only)
                else:
                    action, idx = pool.tell(fact, vectors[fact.text], g['id'], th)
                if action == 'merge' and pool.owner[idx] != g['id']:
                    false_merges += 1
                holders.add(('memory', str(idx)))
        n = len(g['texts'])
        duplicates += n - 1
        merged += n - len(holders)
        memories_left += len(holders)
        if len(holders) > 1:
            missed.append(list(g['texts']))
    near = [r for r in rows if r['type'] == 'near_miss']
    near_merged: List[Tuple[str, str]] = []
    near_updated: List[Tuple[str, str]] = []
    for r in near:
        fa, fb = facts_of(r['a']), facts_of(r['b'])
        if not fa or not fb:
            continue
        action = decide_pair(fa[0], fb[0])
        if action == 'merge':
            near_merged.append((r['a'], r['b']))
        elif action == 'update':
            near_updated.append((r['a'], r['b']))
    changed = [r for r in rows if r['type'] == 'changed']
    detected = 0
    wrong: List[Tuple[str, str, str]] = []
    for r in changed:
        fa, fb = facts_of(r['old']), facts_of(r['new'])
        action = decide_pair(fa[0], fb[0]) if fa and fb else 'not extracted'
        if action == 'update':
            detected += 1
        else:
            wrong.append((r['old'], r['new'], action))
    return {
        'groups': len(groups), 'texts_told': told,
        'texts_with_a_fact': extracted,
        'paraphrase_duplicates': duplicates,
        'paraphrases_merged_fraction': round(merged / max(1, duplicates), 4),
        'memories_left': memories_left,
        'cross_group_false_merges': false_merges,
        'near_miss_pairs': len(near),
        'near_miss_false_merges': len(near_merged),
        'near_miss_false_updates': len(near_updated) if cosine_only is None else None,
        'changed_pairs': len(changed),
        'updates_detected': detected if cosine_only is None else 0,
        'examples': {'groups_not_fully_merged': missed[:5], 'near_miss_merged': near_merged[:5],
                     'near_miss_updated': near_updated[:5],
                     'changes_missed': wrong[:5] if cosine_only is None else []},
    }


def _cosine_tell(pool: Pool, fact: Fact, vec: np.ndarray, owner: str,
                 threshold: float) -> Tuple[str, int]:
    """The baseline: merge into the most similar memory when the cosine passes, else add."""
    if pool.vectors:
        sims = np.stack(pool.vectors) @ vec
        best = int(np.argmax(sims))
        if sims[best] >= threshold:
            return 'merge', best
    pool.facts.append(fact)
    pool.vectors.append(vec)
    pool.owner.append(owner)
    pool.live.append(True)
    return 'add', len(pool.facts) - 1


def through_consolidate(rows: Sequence[Dict[str, Any]], workdir: Path) -> Dict[str, Any]:
    """The same set through dream.consolidate on a real MemoryStore (MiniLM): the group texts
    as the turns of one session, told round-robin (paraphrases of one fact far apart, as in a
    real conversation); each near-miss and changed pair as two sessions of a fresh store."""
    from sage_ros.core.embeddings import shared_embedder
    from sage_ros.core.memory.dream import DreamParams, consolidate
    from sage_ros.core.memory.store import MemoryStore, TurnRecord

    embed = shared_embedder().embed
    params = DreamParams(duty_cycle=1.0)
    counter = [0]

    def fresh() -> MemoryStore:
        counter[0] += 1
        return MemoryStore(workdir / f'{counter[0]}.db', embedder=embed)

    def tell(store: MemoryStore, texts: Sequence[str], t: float) -> List[int]:
        s = store.open_session(t)
        ids = [store.record_turn(s.id, TurnRecord(i, f'{s.id}-{i}', 'console', text, 'ok.',
                                                  'ok', '', 0.5, 'small', 'm', t + i,
                                                  t + i)).id
               for i, text in enumerate(texts)]
        store.close_session(s.id, 'bench', t + len(texts))
        consolidate(store, [s.id], params, lambda: False, lambda a, b: None,
                    workdir / 'bundles', t + len(texts) + 1)
        return ids

    def holder(store: MemoryStore, turn_row: int) -> Optional[int]:
        found = [m for kind in ('fact', 'pinned') for m in store.list_memories(
            kind=kind, include_superseded=True, limit=100_000) if m.turn_id == turn_row]
        if not found:
            return None
        m = found[0]
        while m.superseded_by is not None:
            nxt = store.get(m.superseded_by)
            if nxt is None:
                return None
            m = nxt
        return m.id

    groups = [r for r in rows if r['type'] == 'group']
    order: List[Tuple[str, str]] = []
    for i in range(max(len(g['texts']) for g in groups)):
        order.extend((g['id'], g['texts'][i]) for g in groups if i < len(g['texts']))
    store = fresh()
    turn_rows = tell(store, [t for _, t in order], 1.7e9)
    holders: Dict[str, Set[Tuple[str, object]]] = {g['id']: set() for g in groups}
    owners: Dict[int, Set[str]] = {}
    for (gid, text), row in zip(order, turn_rows):
        h = holder(store, row)
        holders[gid].add(('memory', h) if h is not None else ('none', text))
        if h is not None:
            owners.setdefault(h, set()).add(gid)
    split_groups = [[t for t in g['texts']] for g in groups if len(holders[g['id']]) > 1]
    duplicates = sum(len(g['texts']) - 1 for g in groups)
    merged = sum(len(g['texts']) - len(holders[g['id']]) for g in groups)
    near_merged = 0
    for r in rows:
        if r['type'] == 'near_miss':
            st = fresh()
            tell(st, [r['a']], 1.7e9)
            tell(st, [r['b']], 1.7e9 + 3600)
            near_merged += int(st.count('fact') + st.count('pinned') < 2)
    detected = 0
    for r in rows:
        if r['type'] == 'changed':
            st = fresh()
            tell(st, [r['old']], 1.7e9)
            tell(st, [r['new']], 1.7e9 + 3600)
            live = [m.text for m in st.list_memories(kind='fact')]
            detected += int(live == [extract(r['new'])[0].text] if extract(r['new']) else 0)
    return {'texts_told': len(order), 'paraphrase_duplicates': duplicates,
            'paraphrases_merged_fraction': round(merged / max(1, duplicates), 4),
            'memories_left': sum(len(h) for h in holders.values()),
            'cross_group_false_merges': sum(len(o) - 1 for o in owners.values()),
            'near_miss_pairs': sum(1 for r in rows if r['type'] == 'near_miss'),
            'near_miss_false_merges': near_merged,
            'changed_pairs': sum(1 for r in rows if r['type'] == 'changed'),
            'updates_detected': detected,
            'examples': {'groups_not_fully_merged': split_groups[:5]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--data', type=Path, default=DATA)
    args = ap.parse_args()
    rows = load(args.data)
    texts: List[str] = []
    for r in rows:
        for t in r.get('texts', []) + [r[k] for k in ('a', 'b', 'old', 'new') if k in r]:
            texts.append(t)
            texts.extend(f.text for f in extract(t))
    vectors = embed_all(texts)
    th = FactThresholds()
    splits = {name: [r for r in rows if name == 'all' or r['split'] == name]
              for name in ('tune', 'holdout', 'all')}
    # The section of natural speech (changes told the way people tell them: "we moved ...",
    # "I sold ... and bought ...", repeats across sessions, near misses with change words),
    # added for DREAM's topic and change-cue rules; its own split is reported too.
    natural = [r for r in rows if r.get('set') == 'natural']
    if natural:
        splits['natural'] = natural
    results: Dict[str, Any] = {'thresholds': {k: getattr(th, k) for k in (
        'same_subject_floor', 'merge_similarity', 'merge_similarity_other_subject',
        'merge_similarity_two_sided', 'change_similarity')}}
    for name, subset in splits.items():
        results[name] = evaluate(subset, th, vectors)
    # Baseline: cosine alone, its threshold chosen for the best merged-minus-false-merges on
    # the tune split.
    best: Tuple[float, float] = (-1e9, 0.9)
    for t in np.arange(0.5, 0.96, 0.025):
        r = evaluate(splits['tune'], th, vectors, cosine_only=float(t))
        gain = r['paraphrases_merged_fraction'] - r['near_miss_false_merges'] / max(
            1, r['near_miss_pairs']) - r['cross_group_false_merges'] / max(1, r['texts_told'])
        if gain > best[0]:
            best = (gain, float(t))
    results['cosine_only_baseline'] = {
        'threshold': round(best[1], 3),
        **{name: {k: v for k, v in evaluate(subset, th, vectors, cosine_only=best[1]).items()
                  if k != 'examples'} for name, subset in splits.items()}}
    import tempfile
    with tempfile.TemporaryDirectory(prefix='sage-bench-paraphrase-') as tmp:
        results['through_consolidate'] = {name: through_consolidate(subset, Path(tmp) / name)
                                          for name, subset in splits.items()}
    report('memory_paraphrase', results)


if __name__ == '__main__':
    main()
