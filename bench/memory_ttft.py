"""Time to first token of a turn with memory against one without, through the real nodes.

Two in-process graphs run side by side in one process, each on its own namespace and database:
kernel + language block + model manager + memory block (memory on: the language block recalls
from `blocks/memory` and the model gets the preamble and memories), and kernel + language block
+ model manager with `language_block.memory.enabled: false` (memory off). Both load the same
model (default: the demo's small model, greedy). The memory graph's store is filled beforehand
with the told turns of `bench/data/memory_sessions.json` as episodes (embedded with MiniLM), so
the questions of that set recall real memories. Turns are the set's questions, sent as
`observations/text` by a console-like probe, one at a time, alternating between the graphs (and
which goes first), each after a conversation reset so both see the same history (none). The
time to first token is observation published -> first `response/stream` chunk of that turn.
The RECALL call's own time is measured by the probe, a Memory goal to `blocks/memory` with the
same text, after each memory turn.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Sequence

from common import InProcessGraph, offline_model_params, percentile, report, wait_until

DATA = Path(__file__).resolve().parent / 'data' / 'memory_sessions.json'


def stats_ms(values_s: Sequence[float]) -> Dict[str, Any]:
    """n, p50, p95, min, max and mean in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    if not ms:
        return {'n': 0}
    return {'n': len(ms), 'p50_ms': round(percentile(ms, 50), 2),
            'p95_ms': round(percentile(ms, 95), 2), 'min_ms': round(min(ms), 2),
            'max_ms': round(max(ms), 2), 'mean_ms': round(statistics.fmean(ms), 2)}


def set_key(params: Dict[str, Any], node: str, dotted: str, value: Any) -> None:
    cursor = params.setdefault(f'/**/{node}', {}).setdefault('ros__parameters', {})
    *parents, leaf = dotted.split('.')
    for p in parents:
        cursor = cursor.setdefault(p, {})
    cursor[leaf] = value


def graph_params(db: Path, memory: bool, max_new_tokens: int,
                 models: Optional[Dict[str, str]] = None,
                 kernel_embedder: str = 'minilm') -> Dict[str, Any]:
    """The demo parameters for a benchmark graph: ATP plentiful (every turn is served), no
    circadian clock, no idle dream, every node on the database `db`, answers capped at
    `max_new_tokens`; `models` replaces the roles' model directories (tiny models)."""
    params = copy.deepcopy(offline_model_params('demo'))
    set_key(params, 'kernel', 'atp.capacity', 1e6)
    for state in ('wake', 'focus', 'rest', 'crisis'):
        set_key(params, 'kernel', f'states.{state}.recharge_per_s', 1e5)
    set_key(params, 'kernel', 'metabolism.circadian_period_s', 0.0)
    set_key(params, 'kernel', 'metabolism.dream_idle_s', 1e6)
    set_key(params, 'kernel', 'salience.text_embedder', kernel_embedder)
    for node in ('kernel', 'model_manager', 'memory_block'):
        set_key(params, node, 'state_file', str(db))
    set_key(params, 'language_block', 'memory.enabled', memory)
    mm = params['/**/model_manager']['ros__parameters']
    for role, m in mm['models'].items():
        if models and role in models:
            m.update(model_id=Path(models[role]).name, path=models[role], context_window=512)
        m['max_new_tokens'] = max_new_tokens
    return params


class TurnSender:
    """Sends text observations to one graph as a console would and times each turn."""

    def __init__(self, g: InProcessGraph, name: str) -> None:
        from sage_interfaces.msg import KernelState, Response, ResponseChunk, TextObservation
        from sage_interfaces.srv import ResetConversation

        from sage_ros import names
        from sage_ros.nodes.common import LATCHED, RELIABLE
        self.g = g
        self.name = name
        self._TextObservation = TextObservation
        self.first: Dict[str, float] = {}
        self.done: Dict[str, Any] = {}
        self.event = threading.Event()
        self.states: Deque[Any] = deque(maxlen=1)     # the latest only: a soak runs for long
        node = g.probe
        node.create_subscription(ResponseChunk, names.RESPONSE_STREAM, self._on_chunk, RELIABLE)
        node.create_subscription(Response, names.RESPONSE, self._on_response, RELIABLE)
        node.create_subscription(KernelState, names.STATE, lambda m: self.states.append(m),
                                 LATCHED)
        self.pub = node.create_publisher(TextObservation, names.OBSERVATIONS_TEXT, RELIABLE)
        self.reset_client = node.create_client(ResetConversation, names.LANGUAGE_RESET)
        self._Reset = ResetConversation
        self.n = 0

    def _on_chunk(self, m: Any) -> None:
        self.first.setdefault(m.observation_id, time.perf_counter())

    def _on_response(self, m: Any) -> None:
        self.done.setdefault(m.observation_id, (time.perf_counter(), m))
        self.event.set()

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        wait_until(lambda: bool(self.states) and bool(getattr(self.states[-1], 'ready', True)),
                   timeout_s, f'{self.name}: KernelState.ready')
        wait_until(lambda: self.pub.get_subscription_count() > 0, 30,
                   f'{self.name}: the kernel to subscribe')

    def reset(self) -> None:
        if not self.reset_client.wait_for_service(timeout_sec=10.0):
            raise TimeoutError(f'{self.name}: no conversation reset service')
        fut = self.reset_client.call_async(self._Reset.Request())
        wait_until(fut.done, 30, f'{self.name}: reset')

    def turn(self, text: str, timeout_s: float = 300.0) -> Dict[str, Any]:
        """One turn: seconds to the first chunk and to the response, and what it said."""
        self.n += 1
        oid = f'bench-{self.name}/{self.n}'
        self.event.clear()
        t0 = time.perf_counter()
        self.pub.publish(self._TextObservation(observation_id=oid, source='console', text=text))
        deadline = time.monotonic() + timeout_s
        while oid not in self.done:
            if time.monotonic() > deadline:
                raise TimeoutError(f'{self.name}: no response to {text!r}')
            self.event.wait(0.5)
            self.event.clear()
        t_done, msg = self.done.pop(oid)
        t_first = self.first.pop(oid, None)
        if msg.status != 0:
            raise RuntimeError(f'{self.name}: turn failed ({msg.status}): {msg.error}')
        return {'ttft_s': (t_first - t0) if t_first is not None else None,
                'total_s': t_done - t0, 'memory_used': int(getattr(msg, 'memory_used', 0)),
                'prompt_tokens': int(msg.prompt_tokens), 'completion_tokens': int(msg.completion_tokens),
                'session': int(getattr(msg, 'session', 0)), 'state': msg.metabolic_state}


class RecallTimer:
    """RECALL goals straight to `blocks/memory`, timed from sending to the result."""

    def __init__(self, g: InProcessGraph) -> None:
        from rclpy.action import ActionClient
        from sage_interfaces.action import Memory

        from sage_ros import names
        self.Memory = Memory
        self.client = ActionClient(g.probe, Memory, names.BLOCK_MEMORY)
        wait_until(lambda: self.client.wait_for_server(timeout_sec=0.1), 120, 'blocks/memory')

    def recall(self, text: str, k: int) -> Dict[str, Any]:
        done = threading.Event()
        out: Dict[str, Any] = {}
        goal = self.Memory.Goal(operation=self.Memory.Goal.OP_RECALL, text=text, max_results=k)
        t0 = time.perf_counter()

        def on_result(f: Any) -> None:
            out['t'] = time.perf_counter() - t0
            res = f.result().result
            out['items'] = len(res.items)
            out['preamble'] = str(res.preamble)
            out['memory'] = [(str(i.kind), str(i.text), int(i.session)) for i in res.items]
            done.set()

        def on_sent(f: Any) -> None:
            f.result().get_result_async().add_done_callback(on_result)
        self.client.send_goal_async(goal).add_done_callback(on_sent)
        if not done.wait(30):
            raise TimeoutError('no RECALL result')
        return out


def fill_store(db: Path, data: Dict[str, Any]) -> int:
    """The set's told turns as episode memories (pinned for "remember that"), MiniLM-embedded."""
    from sage_ros.core.embeddings import shared_embedder
    from sage_ros.core.memory.store import MemoryStore
    store = MemoryStore(db, embedder=shared_embedder().embed)
    try:
        t = time.time() - 7 * 86400.0
        n = 0
        for s in data['sessions']:
            for turn in s['turns']:
                text = turn['text']
                pinned = text.lower().startswith('remember that ')
                store.add_memory('pinned' if pinned else 'episode',
                                 text[len('remember that '):] if pinned else text,
                                 source='console', salience=0.5, pinned=pinned, now=t)
                t += 60.0
                n += 1
        return n
    finally:
        store.close()


def direct_prefill(recalls: Sequence[Dict[str, Any]], texts: Sequence[str], max_new_tokens: int,
                   model_dir: Optional[str]) -> Dict[str, Any]:
    """What the longer prompt alone costs: `ModelPool.generate` in this process, no ROS, the same
    question with and without the preamble and memories that RECALL returned for it (worded as
    the language block words them), interleaved."""
    from common import demo_spec

    from sage_ros.core.conversation import Conversation
    from sage_ros.core.language import memory_line
    from sage_ros.core.models import ModelPool
    spec = demo_spec('small', max_new_tokens, path=model_dir, name='direct')
    pool = ModelPool({'direct': spec}, 'direct')
    pool.load('direct')

    def ttft(text: str, preamble: str, memory: Sequence[str]) -> float:
        first: List[float] = []

        def on_text(_: str) -> None:
            if not first:
                first.append(time.perf_counter())
        t0 = time.perf_counter()
        pool.generate('direct', Conversation().messages_for(text), max_new_tokens=max_new_tokens,
                      on_text=on_text, preamble=preamble, memory=memory)
        return first[0] - t0

    ttft(texts[0], '', ())
    with_mem: List[float] = []
    without: List[float] = []
    for r, text in zip(recalls, texts):
        lines = [memory_line(kind, t, session) for kind, t, session in r['memory']]
        with_mem.append(ttft(text, r['preamble'], lines))
        without.append(ttft(text, '', ()))
    a, b = stats_ms(with_mem), stats_ms(without)
    return {'with_memory': a, 'without_memory': b,
            'added_p50_ms': round(a['p50_ms'] - b['p50_ms'], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--runs', type=int, default=24, help='turns per graph')
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--max-new-tokens', type=int, default=16)
    ap.add_argument('--k', type=int, default=5, help='RECALL max_results for the probe\'s own calls')
    ap.add_argument('--no-direct', action='store_true',
                    help='skip the direct generate comparison (the prompt\'s own cost)')
    ap.add_argument('--model-dir', help='model directory for both roles (e.g. a tiny model); '
                    'default: the demo\'s models')
    args = ap.parse_args()

    from sage_ros import graph

    data = json.loads(DATA.read_text())
    questions = [q['text'] for q in data['questions']]
    models = {'small': args.model_dir, 'large': args.model_dir} if args.model_dir else None
    mm = offline_model_params('demo')['/**/model_manager']['ros__parameters']
    model_id = Path(args.model_dir).name if args.model_dir else mm['models'][mm['default_role']]['model_id']
    base_specs = (graph.KERNEL, graph.LANGUAGE_BLOCK, graph.MODEL_MANAGER)
    mem_spec = getattr(graph, 'MEMORY_BLOCK')

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / 'mem').mkdir()
        (root / 'off').mkdir()
        filled = fill_store(root / 'mem' / 'sage.db', data)
        g_mem = InProcessGraph((*base_specs, mem_spec),
                               graph_params(root / 'mem' / 'sage.db', True, args.max_new_tokens, models),
                               root / 'mem', namespace='/bench_mem')
        g_off = InProcessGraph(base_specs,
                               graph_params(root / 'off' / 'sage.db', False, args.max_new_tokens, models),
                               root / 'off', namespace='/bench_off')
        try:
            g_mem.wait_models_active()
            g_off.wait_models_active()
            mem, off = TurnSender(g_mem, 'mem'), TurnSender(g_off, 'off')
            mem.wait_ready()
            off.wait_ready()
            recall = RecallTimer(g_mem)
            for i in range(args.warmup):
                for s in (mem, off):
                    s.reset()
                    s.turn(questions[-1 - i])
            with_mem: List[Dict[str, Any]] = []
            without: List[Dict[str, Any]] = []
            recalls: List[Dict[str, Any]] = []
            sent: List[str] = []
            for i in range(args.runs):
                text = questions[i % len(questions)]
                sent.append(text)
                order = (mem, off) if i % 2 == 0 else (off, mem)
                for s in order:
                    s.reset()
                    (with_mem if s is mem else without).append(s.turn(text))
                recalls.append(recall.recall(text, args.k))
        finally:
            g_off.close()
            g_mem.close()

    direct = ({} if args.no_direct
              else direct_prefill(recalls, sent, args.max_new_tokens, args.model_dir))

    def col(rows: List[Dict[str, Any]], key: str) -> List[float]:
        return [r[key] for r in rows if r[key] is not None]

    t_mem, t_off = stats_ms(col(with_mem, 'ttft_s')), stats_ms(col(without, 'ttft_s'))
    added = round(t_mem['p50_ms'] - t_off['p50_ms'], 2)
    paired = [a['ttft_s'] - b['ttft_s'] for a, b in zip(with_mem, without)
              if a['ttft_s'] is not None and b['ttft_s'] is not None]
    report('memory_ttft', {
        'model': model_id, 'runs': args.runs, 'max_new_tokens': args.max_new_tokens,
        'memories_in_store': filled,
        'ttft_with_memory': t_mem, 'ttft_without_memory': t_off,
        'added_ttft_p50_ms': added,
        'added_ttft_paired': stats_ms(paired),
        'turn_total_with_memory': stats_ms(col(with_mem, 'total_s')),
        'turn_total_without_memory': stats_ms(col(without, 'total_s')),
        'recall_call': stats_ms([r['t'] for r in recalls]),
        'direct_generate_same_prompts': direct,
        'recall_items_median': statistics.median(r['items'] for r in recalls),
        'memory_used_median': statistics.median(r['memory_used'] for r in with_mem),
        'memory_used_min': min(r['memory_used'] for r in with_mem),
        'memory_used_without_max': max(r['memory_used'] for r in without),
        'prompt_tokens_median': {'with_memory': statistics.median(r['prompt_tokens'] for r in with_mem),
                                 'without_memory': statistics.median(r['prompt_tokens'] for r in without)},
    })


if __name__ == '__main__':
    main()
