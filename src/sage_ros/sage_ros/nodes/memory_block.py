"""Memory block node: the `blocks/memory` action over the robot's one SQLite store.

RECALL runs on the language block's response path, so it is one query embedding and one
indexed search (no queue: STORE, RECALL and FORGET are short and run side by side).

Embeddings (`embedder`): "minilm" runs the offline MiniLM in this process; "model_manager" asks
the model manager's `embedder_role` entry (the same MiniLM, kept resident there, so the vectors
are the same and this process does not hold a second copy) through `model_manager/infer`, task
embed, within `embedder_timeout_s`, and falls back to the in-process MiniLM (said once, with the
reason) when the model manager is absent, refuses or fails, trying it again after
`embedder_retry_s`; "ngram" is hashed n-grams, for tests. Nothing
slow happens on that path: answered turns are turned into memories in the background, from the
kernel's journal (`MemoryStore.unindexed_turns`), woken by each `response` and polled every
`index_period_s`: a turn "remember that X" (or "remember: X") becomes a pinned memory X, any
other answered turn an episode with its salience (below `min_salience`: journalled only).

RECALL answers pinned memories first (up to `max_pinned`, the most similar first), then the
best hits (`recall_k`), and the awakening preamble (`core.memory.awakening`: session, phase,
continuity threads; refreshed in the background). Filters: kind, source, person, since/until.

DREAM: when the kernel's `state` says DREAM with consolidation allowed, a worker thread
consolidates (`core.memory.dream.consolidate`) the closed sessions not yet dreamed and the
current one, and stops between items as soon as the kernel leaves DREAM or the node stops (each
item is one transaction: an interrupted dream leaves the store consistent, the next one goes
on). Closed sessions not dreamed yet (a session ended by a signal) are consolidated at start
too (`dream.at_start`), unless the kernel is in FOCUS or CRISIS. After a completed dream, with
`sleep_training.enabled`, the small model is trained on the dream bundles
(`core.memory.sleep_training.run_sleep_training`). Progress is on `memory/status`.
"""

from __future__ import annotations

import importlib
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from sage_interfaces.action import Infer, Memory
from sage_interfaces.msg import (BlockDescription, KernelState, MemoryItem, MemoryStatus,
                                 ModelStatus, Response)

from .. import names
from ..core.embeddings import EMBEDDING_DIM
from ..core.memory.awakening import (DEFAULT_PHASES, Awakening, Phase, awaken, parse_phases)
from ..core.memory.facts import pinned_request
from ..core.memory.store import (KINDS, Hit, Memory as StoredMemory, MemoryStore, RecallWeights,
                                 Turn)
from ..core.params import param_docs
from ..core.salience import TextEmbedder, ngram_embedder
from ..core.store import resolve_state_file, state_dir
from .action_call import CallError, ThreadSafeActionClient, call_action
from .common import LATCHED, RELIABLE, RESULT_KEEP_S, ConfigError, declare, run_node, stamp
from .liveness import HeartbeatPublisher, requester

ACTION_TYPE = 'sage_interfaces/action/Memory'
EMBEDDERS = ('minilm', 'model_manager', 'ngram')
STOP_WAIT_S = 2.5          # [s] destroy_node waits this long for the workers


class RemoteEmbedder:
    """Embeddings from the model manager's embedding entry (`model_manager/infer`, task embed),
    with the in-process MiniLM as the fallback: when the model manager is not reachable, refuses,
    fails or answers late, this call and those of the next `retry_s` embed locally; the switch
    each way is logged once, with the reason. Callable from any thread (a TextEmbedder)."""

    def __init__(self, node: Node, role: str, timeout_s: float, retry_s: float,
                 local: Callable[[], TextEmbedder], stopping: threading.Event) -> None:
        self._node = node
        self.role = role
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._local_factory = local
        self._local: Optional[TextEmbedder] = None
        self._stopping = stopping
        self._lock = threading.Lock()
        self._down_until = 0.0          # monotonic: embed locally until then
        self.fallback_reason = ''       # why the last call embedded locally ('' = it did not)
        self.remote_calls = 0
        self.local_calls = 0
        self.client = ThreadSafeActionClient(node, Infer, names.MODEL_INFER,
                                             callback_group=ReentrantCallbackGroup())
        # The model manager's lifecycle state and roles, from its latched status: while it is
        # not active (configuring at start-up) or has no such role, embed in-process at once.
        self._manager: Optional[Tuple[str, Tuple[str, ...]]] = None
        node.create_subscription(ModelStatus, names.MODELS_STATUS, self._on_status, LATCHED,
                                 callback_group=MutuallyExclusiveCallbackGroup())

    def _on_status(self, msg: ModelStatus) -> None:
        with self._lock:
            self._manager = (str(msg.lifecycle_state), tuple(msg.available_roles))

    def unusable(self) -> str:
        """Why the model manager cannot embed now, from its status ('' = try it)."""
        with self._lock:
            manager = self._manager
        if manager is None:
            return ''          # no status (yet): the goal itself says whether it is there
        state, roles = manager
        if state != 'active':
            return f'model manager is not active ({state})'
        if self.role not in roles:
            return (f'model manager has no role {self.role!r} (roles: '
                    f'{", ".join(roles) or "none"})')
        return ''

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        with self._lock:
            remote = time.monotonic() >= self._down_until
        if remote:
            try:
                problem = self.unusable()
                if problem:
                    raise CallError(problem)
                vectors = self.remote(texts)
            except CallError as exc:
                self._fall_back(str(exc))
            else:
                self._recovered()
                return vectors
        return self.local(texts)

    def remote(self, texts: Sequence[str]) -> np.ndarray:
        """Embed through the model manager (CallError with the reason if it cannot)."""
        node, instance = requester(self._node)
        wrapped = call_action(self.client, Infer.Goal(role=self.role, task='embed',
                                                      texts=list(texts), requester=node,
                                                      requester_instance=instance),
                              what='model manager', server_wait_s=0.0,
                              timeout_s=self.timeout_s, should_stop=self._stopping.is_set,
                              abandon=self._stopping.is_set)
        r = wrapped.result
        if r.error_code != Infer.Result.NONE:
            raise CallError(f'model manager embed on role {self.role!r} failed: '
                            f'{r.error_msg or f"error {r.error_code}"}')
        dim = int(r.dim)
        if dim != EMBEDDING_DIM or len(r.vectors) != dim * len(texts):
            raise CallError(f'model manager role {r.role!r} gave {len(r.vectors)} values of '
                            f'dimension {dim} for {len(texts)} text(s); the memories are '
                            f'{EMBEDDING_DIM}-dimensional MiniLM vectors')
        with self._lock:
            self.remote_calls += 1
        return np.asarray(r.vectors, dtype=np.float32).reshape(len(texts), dim)

    def warm_up(self, wait_s: float) -> None:
        """At start: embed once through the model manager, trying for up to `wait_s` (it may be
        starting, or configuring: not active yet); failing that, fall back and embed in-process
        (which loads MiniLM now rather than in the first RECALL)."""
        deadline = time.monotonic() + wait_s
        reason = 'model manager not reachable'
        while not self._stopping.is_set():
            problem = self.unusable()
            if problem:
                reason = problem
            elif self.client.server_is_ready():
                try:
                    self.remote(['warm up'])
                    return
                except CallError as exc:
                    reason = str(exc)
            if time.monotonic() >= deadline:
                break
            self._stopping.wait(0.5)
        if not self._stopping.is_set():
            self._fall_back(f'{reason} (at start, within {wait_s:g} s)')
            self.local(['warm up'])

    def local(self, texts: Sequence[str]) -> np.ndarray:
        """Embed with the in-process MiniLM (loaded on first use)."""
        with self._lock:
            if self._local is None:
                self._local = self._local_factory()
            embed = self._local
            self.local_calls += 1
        return np.asarray(embed(texts), dtype=np.float32)

    def pause_remote(self, seconds: float, reason: str) -> None:
        """Embed in-process for `seconds` (said once, with `reason`), e.g. to measure that path."""
        self._fall_back(reason, seconds)

    def resume_remote(self) -> None:
        """Try the model manager again at the next call."""
        with self._lock:
            self._down_until = 0.0

    def _fall_back(self, reason: str, seconds: Optional[float] = None) -> None:
        with self._lock:
            self._down_until = time.monotonic() + (self.retry_s if seconds is None else seconds)
            said = self.fallback_reason
            self.fallback_reason = reason
        if not said and not self._stopping.is_set():
            self._node.get_logger().warning(
                f'embedding with the in-process MiniLM instead of the model manager '
                f'(role {self.role!r}): {reason}; trying the model manager again every '
                f'{self.retry_s:g} s')

    def _recovered(self) -> None:
        with self._lock:
            was, self.fallback_reason = self.fallback_reason, ''
        if was:
            self._node.get_logger().info(f'embedding through the model manager (role '
                                         f'{self.role!r}) again')
def _dream() -> Any:
    """`core.memory.dream`, imported when first needed (it is the heaviest part)."""
    return importlib.import_module('sage_ros.core.memory.dream')


def _declare_tunables(node: Node, cls: Any, prefix: str, what: str) -> Any:
    """Every tunable field of `cls` as a read-only parameter `prefix.<field>` (unless the field
    names its parameter); a bad value is one ConfigError naming the parameter."""
    values: Dict[str, Any] = {}
    docs = param_docs(cls)
    for d in docs:
        param = d.param if d.param != d.name else f'{prefix}.{d.name}'
        if not param.startswith(prefix + '.'):
            param = f'{prefix}.{param}'
        values[d.name] = declare(node, param, d.default,
                                 d.doc + (f' [{d.unit}]' if d.unit else ''), read_only=True,
                                 min_value=d.lo, max_value=d.hi)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        for d in docs:
            message = re.sub(rf'\b{d.name}\b', f'{prefix}.{d.name}', message)
        raise ConfigError(f'memory block {what} parameters: {message}') from exc


def _item(m: StoredMemory, score: float = 0.0) -> MemoryItem:
    return MemoryItem(id=m.id, kind=m.kind, text=m.text, score=float(max(0.0, min(1.0, score))),
                      session=max(0, m.session), source=m.source, person=m.person,
                      created=float(m.created), mentions=max(0, m.mentions), pinned=m.pinned)


class MemoryBlockNode(Node):
    """Serves `blocks/memory`, indexes the kernel's journal into memories, dreams in DREAM."""

    def __init__(self, node_name: str = names.MEMORY_BLOCK, **kwargs: object) -> None:
        super().__init__(node_name, **kwargs)  # type: ignore[arg-type]
        state_file = declare(self, 'state_file', '',
                             "The robot's database; '' = <state dir>/sage.db, 'none' = a "
                             'temporary one, gone at shutdown', read_only=True)
        embedder_name = declare(self, 'embedder', 'minilm',
                                'Embeddings of memories and queries: "minilm" (offline MiniLM '
                                'in this process), "model_manager" (the model manager\'s '
                                'embedding entry, the same MiniLM; in-process MiniLM when it '
                                'is absent or fails) or "ngram" (hashed n-grams, for tests)',
                                read_only=True)
        if embedder_name not in EMBEDDERS:
            raise ConfigError(f'embedder must be one of {", ".join(EMBEDDERS)}, '
                              f'got {embedder_name!r}')
        embedder_role = declare(self, 'embedder_role', 'embedder',
                                'embedder model_manager: the model manager entry (kind '
                                'embedding, MiniLM) that embeds', read_only=True)
        embedder_timeout_s = declare(self, 'embedder_timeout_s', 3.0,
                                     'embedder model_manager: longest wait for one embedding '
                                     'from the model manager before embedding in-process [s]',
                                     read_only=True, min_value=0.1, max_value=600.0)
        embedder_retry_s = declare(self, 'embedder_retry_s', 30.0,
                                   'embedder model_manager: after a failure, embed in-process '
                                   'this long before trying the model manager again [s]',
                                   read_only=True, min_value=0.0, max_value=86400.0)
        self._embedder_wait_s = declare(self, 'embedder_wait_s', 30.0,
                                        'embedder model_manager: at start, wait this long for '
                                        'the model manager before embedding in-process [s]',
                                        read_only=True, min_value=0.0, max_value=3600.0)
        if embedder_name == 'model_manager' and not embedder_role.strip():
            raise ConfigError('embedder_role must name a model manager entry')
        self._recall_k = declare(self, 'recall_k', 5, 'Memories a RECALL returns by default, '
                                 'pinned ones not counted [memories]', min_value=1,
                                 max_value=100)
        self._max_pinned = declare(self, 'max_pinned', 8, 'Pinned memories put first in every '
                                   'RECALL (the most similar first) [memories]', min_value=0,
                                   max_value=100)
        d = RecallWeights()
        try:
            self.weights = RecallWeights(
                similarity=declare(self, 'weights.similarity', d.similarity,
                                   'Recall score weight of the cosine similarity', min_value=0.0,
                                   max_value=1.0),
                recency=declare(self, 'weights.recency', d.recency,
                                'Recall score weight of recency', min_value=0.0, max_value=1.0),
                salience=declare(self, 'weights.salience', d.salience,
                                 'Recall score weight of the salience of what was stored',
                                 min_value=0.0, max_value=1.0),
                importance=declare(self, 'weights.importance', d.importance,
                                   'Recall score weight of importance (scored while dreaming)',
                                   min_value=0.0, max_value=1.0),
                half_life_s=declare(self, 'weights.half_life_s', d.half_life_s,
                                    'Recency halves every this long [s]', min_value=1.0,
                                    max_value=1e9),
                min_similarity=declare(self, 'weights.min_similarity', d.min_similarity,
                                       'Hits less similar than this are not recalled [cosine]',
                                       min_value=-1.0, max_value=1.0))
        except ValueError as exc:
            raise ConfigError(f'memory block weights: {exc}') from exc
        self._forget_similarity = declare(
            self, 'forget_min_similarity', 0.5,
            'FORGET by text forgets the best matches at least this similar [cosine]',
            min_value=-1.0, max_value=1.0)
        self._min_salience = declare(self, 'min_salience', 0.0,
                                     'Answered turns below this salience stay in the journal '
                                     'but are not made episodes [0, 1]', min_value=0.0,
                                     max_value=1.0)
        self._max_text = declare(self, 'max_text_chars', 4000,
                                 'Longest memory text or query [characters]', min_value=16,
                                 max_value=1_000_000)
        self._index_period_s = declare(self, 'index_period_s', 1.0,
                                       'The journal is checked for new answered turns this '
                                       'often (and at each response) [s]', read_only=True,
                                       min_value=0.05, max_value=3600.0)
        self._index_batch = declare(self, 'index_batch', 32,
                                    'Turns embedded per indexing step [turns]', read_only=True,
                                    min_value=1, max_value=1024)
        self._name = declare(self, 'identity.name', 'SAGE', 'The robot\'s name, in the boot '
                             'preamble', read_only=True)
        try:
            self._phases: Tuple[Phase, ...] = parse_phases(declare(
                self, 'awakening.phases', [p.spec() for p in DEFAULT_PHASES],
                'Developmental phases in order, "name:min_sessions[:milestone=count,...]" '
                '(milestones: facts, pinned, episodes, notes, memories, dreams)',
                read_only=True))
        except ValueError as exc:
            raise ConfigError(f'awakening.phases: {exc}') from exc
        self._max_threads = declare(self, 'awakening.max_threads', 3,
                                    'Notes of earlier sessions in the preamble [notes]',
                                    read_only=True, min_value=0, max_value=50)
        self._max_chars = declare(self, 'awakening.max_chars', 700,
                                  'Longest boot preamble [characters]', read_only=True,
                                  min_value=80, max_value=20_000)
        self._dream_at_start = declare(self, 'dream.at_start', True,
                                       'Consolidate closed sessions not dreamed yet at start '
                                       '(a session ended by a signal)', read_only=True)
        bundle_dir = declare(self, 'dream.bundle_dir', '',
                             "Where dream bundles (JSONL) go; '' = <state dir>/dreams",
                             read_only=True)
        try:
            self.dream_params: Optional[Any] = _declare_tunables(self, _dream().DreamParams,
                                                                 'dream', 'dream')
        except ImportError as exc:   # an install without the consolidation: recall still works
            self.dream_params = None
            self.get_logger().error(f'DREAM consolidation unavailable: {exc}')
        from ..core.memory.sleep_training import SleepTrainingParams
        self.sleep_params = _declare_tunables(self, SleepTrainingParams, 'sleep_training',
                                              'sleep training')

        self._stopping = threading.Event()     # before the embedder: it watches it
        self._tmp: Optional[tempfile.TemporaryDirectory[str]] = None
        path = resolve_state_file(state_file)
        if path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix='sage-memory-')
            path = Path(self._tmp.name) / 'sage.db'
        self.bundle_dir = Path(bundle_dir).expanduser() if bundle_dir else \
            (path.parent if state_file.strip() else state_dir()) / 'dreams'
        self._embedder_name = embedder_name
        self.remote_embedder: Optional[RemoteEmbedder] = None
        if embedder_name == 'model_manager':
            from ..core.embeddings import minilm_path
            try:
                minilm_path()   # the fallback must exist (and the model manager's entry is it)
            except Exception as exc:
                raise ConfigError(f'embedder model_manager: the in-process fallback: '
                                  f'{exc}') from exc
            self.remote_embedder = RemoteEmbedder(self, embedder_role.strip(),
                                                  embedder_timeout_s, embedder_retry_s,
                                                  self._minilm, self._stopping)
            self.embedder: TextEmbedder = self.remote_embedder
        else:
            self.embedder = ngram_embedder() if embedder_name == 'ngram' else self._minilm()
        try:
            self.store = MemoryStore(path, embedder=self.embedder)
        except Exception as exc:  # a bad path, a newer schema: one line, not a trace
            raise ConfigError(f'state_file {str(path)!r}: {exc}') from exc
        for message in self.store.migration_messages:
            self.get_logger().info(message)

        self._lock = threading.Lock()
        self._awakening: Optional[Awakening] = None
        self._kernel: Optional[KernelState] = None
        self._dream_state: Dict[str, Any] = {'dreaming': False, 'stage': '', 'progress': 0.0,
                                             'last': ''}
        self._last_status: Optional[Tuple[Any, ...]] = None
        self._wake_indexer = threading.Event()
        self._wake_dreamer = threading.Event()
        self._index_lock = threading.Lock()
        self.indexed_total = 0
        self.dreams_run = 0

        self._heartbeat = HeartbeatPublisher(self, 'memory', self._liveness)
        self._status_pub = self.create_publisher(MemoryStatus, names.MEMORY_STATUS, LATCHED)
        self._description_pub = self.create_publisher(BlockDescription, names.BLOCKS_DESCRIPTION,
                                                      LATCHED)
        self._server = ActionServer(
            self, Memory, names.BLOCK_MEMORY, execute_callback=self._execute,
            goal_callback=self._on_goal, cancel_callback=lambda _: CancelResponse.ACCEPT,
            callback_group=ReentrantCallbackGroup(), result_timeout=RESULT_KEEP_S)
        group = MutuallyExclusiveCallbackGroup()
        self.create_subscription(KernelState, names.STATE, self._on_state, LATCHED,
                                 callback_group=group)
        self.create_subscription(Response, names.RESPONSE, lambda _: self._wake_indexer.set(),
                                 RELIABLE, callback_group=group)
        self._refresh()
        self._publish_description()
        self._indexer = threading.Thread(target=self._index_loop, name='memory-indexer',
                                         daemon=True)
        self._dreamer = threading.Thread(target=self._dream_loop, name='memory-dreamer',
                                         daemon=True)
        self._indexer.start()
        self._dreamer.start()
        if self._dream_at_start and self.store.undreamed_sessions():
            self._wake_dreamer.set()
        a = self._awakening
        self.get_logger().info(
            f'memory block on {self.resolve_topic_name(names.BLOCK_MEMORY)} ({self.store.path}, '
            f'{self.store.count()} memories, {embedder_name} embeddings)' +
            (f'; session {a.session}, phase {a.phase}' if a else ''))

    def _minilm(self) -> TextEmbedder:
        from ..core.embeddings import EmbeddingError, shared_embedder
        try:
            from ..core.embeddings import minilm_path
            minilm_path()
        except EmbeddingError as exc:
            raise ConfigError(f'embedder minilm: {exc}') from exc
        return shared_embedder().embed

    # ---- status --------------------------------------------------------------------------
    def _liveness(self) -> Tuple[bool, str, int, int]:
        if self._stopping.is_set():
            return False, 'shutting down', 0, 0
        return True, '', 0, 0

    def _publish_description(self) -> None:
        self._description_pub.publish(BlockDescription(
            stamp=stamp(), name='memory', block_type=BlockDescription.TYPE_MODULAR,
            capabilities=['memory', 'recall', 'consolidation'], modalities=['text'],
            action_name=self.resolve_topic_name(names.BLOCK_MEMORY), action_type=ACTION_TYPE,
            loaded=True, memory_estimate_bytes=0, concurrency=8))

    def awakening(self) -> Awakening:
        """The awakening as of the last refresh (computed now if there is none yet)."""
        with self._lock:
            a = self._awakening
        return a if a is not None else self._refresh()

    def _refresh(self) -> Awakening:
        """Recompute the awakening (session, phase, threads; pinned memories are given as
        memories by RECALL, not in the preamble) and publish the status if it changed."""
        a = awaken(self.store, self._name, self._phases, self._max_threads, max_pinned=0,
                   max_chars=self._max_chars)
        with self._lock:
            self._awakening = a
        self._publish_status()
        return a

    def _publish_status(self, force: bool = False) -> None:
        with self._lock:
            a, dream = self._awakening, dict(self._dream_state)
        if a is None or self._stopping.is_set():
            return
        key = (a.session, a.phase, self.store.count(), self.store.count('pinned'),
               self.store.unindexed_count(), dream['dreaming'], dream['stage'],
               round(float(dream['progress']), 2), self.store.dream_count(), dream['last'])
        with self._lock:
            if key == self._last_status and not force:
                return
            self._last_status = key
        self._status_pub.publish(MemoryStatus(
            stamp=stamp(), session=key[0], phase=key[1], memories=key[2], pinned=key[3],
            unindexed_turns=key[4], dreaming=key[5], dream_stage=key[6],
            dream_progress=float(key[7]), dreams_total=key[8], last_dream=key[9]))

    # ---- the action ----------------------------------------------------------------------
    def _on_goal(self, goal: Memory.Goal) -> GoalResponse:
        if self._stopping.is_set():
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _execute(self, gh: ServerGoalHandle) -> Memory.Result:
        goal: Memory.Goal = gh.request
        result = Memory.Result()
        ops: Dict[int, Callable[[Memory.Goal, Memory.Result], None]] = {
            Memory.Goal.OP_STORE: self._store_op, Memory.Goal.OP_RECALL: self._recall_op,
            Memory.Goal.OP_FORGET: self._forget_op}
        op = ops.get(goal.operation)
        problem = self._invalid(goal)
        if op is None or problem:
            result.error_code = result.INVALID_INPUT
            result.error_msg = problem or f'unknown operation {goal.operation}'
            gh.abort()
            return result
        try:
            op(goal, result)
        except Exception as exc:   # the store failed: say so, never a dead goal
            self.get_logger().error(f'memory operation {goal.operation} failed: {exc}')
            result.error_code, result.error_msg = result.FAILED, str(exc)
        if result.error_code == result.NONE:
            gh.succeed()
        else:
            gh.abort()
        return result

    def _invalid(self, goal: Memory.Goal) -> str:
        text = goal.text.strip()
        if goal.operation == Memory.Goal.OP_FORGET and goal.memory_id:
            return ''
        if not text:
            return 'empty text'
        if len(text) > self._max_text:
            return f'text longer than max_text_chars ({self._max_text})'
        if goal.kind and goal.kind not in KINDS:
            return f'unknown kind {goal.kind!r} (one of {", ".join(KINDS)})'
        return ''

    def _current_session_id(self) -> int:
        s = self.store.current_session()
        return s.id if s is not None else 0

    def _store_op(self, goal: Memory.Goal, result: Memory.Result) -> None:
        kind = goal.kind or ('pinned' if goal.pinned else 'fact')
        m = self.store.add_memory(
            kind, goal.text.strip(), source=goal.source, person=goal.person,
            session=self._current_session_id(), turn_id=int(goal.turn_id),
            salience=float(max(0.0, min(1.0, goal.salience))),
            pinned=bool(goal.pinned or kind == 'pinned'))
        result.items = [_item(m, 1.0)]
        pinned = ', pinned' if m.pinned and m.kind != 'pinned' else ''
        self.get_logger().info(f'stored memory {m.id} ({m.kind}{pinned})')
        self._publish_status()

    def recall(self, text: str, k: int = 0, kind: str = '', source: str = '', person: str = '',
               since: float = 0.0, until: float = 0.0) -> List[Tuple[StoredMemory, float]]:
        """Pinned memories first (the most similar first, at most `max_pinned`), then the best
        `k` other hits; each with its recall score (0 for a pinned memory not among the hits)."""
        k = k or self._recall_k
        query = np.asarray(self.embedder([text]), dtype=np.float32)[0]
        filters: Dict[str, Any] = dict(source=source or None, person=person or None,
                                       since=since or None, until=until or None)
        kinds = [kind] if kind else None
        pinned: List[Tuple[StoredMemory, float]] = []
        if self._max_pinned and kind in ('', 'pinned'):
            ranked = self.store.search(text, self._max_pinned, kinds=['pinned'],
                                       weights=self.weights, query_embedding=query, **filters)
            pinned = [(h.memory, h.score) for h in ranked if h.memory.pinned]
            seen = {m.id for m, _ in pinned}
            for m in self.store.pinned():     # always considered, even when not similar
                if len(pinned) >= self._max_pinned:
                    break
                if m.id not in seen and self._matches(m, kind, source, person, since, until):
                    pinned.append((m, 0.0))
                    seen.add(m.id)
        taken = {m.id for m, _ in pinned}
        hits: List[Hit] = self.store.search(text, k + len(taken), kinds=kinds,
                                            weights=self.weights, query_embedding=query,
                                            **filters)
        rest = [(h.memory, h.score) for h in hits if h.memory.id not in taken][:k]
        return pinned + rest

    @staticmethod
    def _matches(m: StoredMemory, kind: str, source: str, person: str, since: float,
                 until: float) -> bool:
        return ((not kind or m.kind == kind) and (not source or m.source == source)
                and (not person or m.person == person) and (not since or m.created >= since)
                and (not until or m.created < until))

    def _recall_op(self, goal: Memory.Goal, result: Memory.Result) -> None:
        found = self.recall(goal.text.strip(), int(goal.max_results), goal.kind, goal.source,
                            goal.person, float(goal.since), float(goal.until))
        result.items = [_item(m, score) for m, score in found]
        result.preamble = self.awakening().preamble

    def _forget_op(self, goal: Memory.Goal, result: Memory.Result) -> None:
        if goal.memory_id:
            targets = [m for m in [self.store.get(int(goal.memory_id))] if m is not None]
        else:
            hits = self.store.search(goal.text.strip(), int(goal.max_results) or 1,
                                     kinds=[goal.kind] if goal.kind else None,
                                     weights=self.weights)
            targets = [h.memory for h in hits if h.similarity >= self._forget_similarity]
        forgotten = [m for m in targets if self.store.forget(m.id)]
        if not forgotten:
            result.error_code = result.NOT_FOUND
            result.error_msg = (f'no memory {goal.memory_id}' if goal.memory_id
                                else f'no memory matches {goal.text.strip()!r}')
            return
        result.items = [_item(m) for m in forgotten]
        self.get_logger().info(f'forgot memor{"y" if len(forgotten) == 1 else "ies"} '
                               f'{", ".join(str(m.id) for m in forgotten)}')
        self._publish_status()

    # ---- indexing the journal ------------------------------------------------------------
    def index_once(self) -> int:
        """Turn up to `index_batch` answered, unindexed turns into memories; returns how many
        turns were taken. Embeds outside the store's lock, then one transaction per turn
        (memory + its indexed mark: a kill -9 never duplicates or loses one)."""
        with self._index_lock:
            turns: List[Turn] = self.store.unindexed_turns(self._index_batch)
            if not turns:
                return 0
            plans: List[Tuple[Turn, str, str]] = []
            for t in turns:
                what = pinned_request(t.text)
                if what is not None:
                    plans.append((t, 'pinned', what))
                elif t.text.strip() and t.salience >= self._min_salience:
                    plans.append((t, 'episode', ' '.join(t.text.split())[:self._max_text]))
                else:
                    plans.append((t, '', ''))
            texts = [text for _, kind, text in plans if kind]
            vectors = np.asarray(self.embedder(texts), dtype=np.float32) if texts else None
            i = 0
            for t, kind, text in plans:
                with self.store.transaction():
                    if kind:
                        assert vectors is not None
                        self.store.add_memory(
                            kind, text, source=t.source, session=t.session, turn_id=t.id,
                            salience=float(t.salience), pinned=kind == 'pinned',
                            embedding=vectors[i], now=t.answered or t.received)
                        i += 1
                    self.store.mark_indexed([t.id])
            self.indexed_total += len(turns)
            return len(turns)

    def _index_loop(self) -> None:
        try:    # load the embedding model now, not in the first RECALL (a turn's time)
            if self.remote_embedder is not None:
                self.remote_embedder.warm_up(self._embedder_wait_s)
            else:
                self.embedder(['warm up'])
        except Exception as exc:
            self.get_logger().error(f'embeddings unavailable: {exc}')
        while not self._stopping.is_set():
            self._wake_indexer.wait(self._index_period_s)
            self._wake_indexer.clear()
            if self._stopping.is_set():
                return
            try:
                while self.index_once() and not self._stopping.is_set():
                    pass
                self._refresh()
            except Exception as exc:   # a locked or failing store: try again next period
                if not self._stopping.is_set():
                    self.get_logger().error(f'indexing the journal failed: {exc}')

    # ---- DREAM ---------------------------------------------------------------------------
    def _on_state(self, msg: KernelState) -> None:
        """One dream per entry into DREAM (the kernel republishes its state periodically)."""
        with self._lock:
            was = self._kernel is not None and self._allowed(self._kernel)
            self._kernel = msg
        if self._allowed(msg) and not was:
            self._wake_dreamer.set()

    @staticmethod
    def _allowed(k: KernelState) -> bool:
        return k.metabolic_state == KernelState.STATE_DREAM and bool(k.consolidation_allowed)

    def _dream_allowed(self) -> bool:
        with self._lock:
            k = self._kernel
        return k is not None and self._allowed(k)

    def _attention_needed(self) -> bool:
        with self._lock:
            k = self._kernel
        return k is not None and k.metabolic_state in (KernelState.STATE_FOCUS,
                                                       KernelState.STATE_CRISIS)

    def _set_dream(self, **values: Any) -> None:
        with self._lock:
            self._dream_state.update(values)
        self._publish_status()

    def _dream_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake_dreamer.wait(0.5)
            if self._stopping.is_set():
                return
            if not self._wake_dreamer.is_set():
                continue
            self._wake_dreamer.clear()
            in_dream = self._dream_allowed()
            try:
                self.dream_once(in_dream)
            except Exception as exc:
                self.get_logger().error(f'dream failed: {exc}')
                self._set_dream(dreaming=False, stage='', progress=0.0,
                                last=f'failed: {exc}')

    def dream_once(self, in_dream: bool) -> Optional[Any]:
        """One consolidation: in DREAM, the closed sessions not dreamed yet and the current
        one, stopped when the kernel leaves DREAM; at start, the closed ones only, stopped by
        FOCUS or CRISIS. Returns the dream's record (None when there was nothing to do)."""
        sessions = [s.id for s in self.store.undreamed_sessions()]
        current = self.store.current_session()
        if in_dream and current is not None and current.id not in sessions:
            sessions.append(current.id)
        if not sessions or self.dream_params is None:
            return None
        if in_dream:
            def should_stop() -> bool:
                return self._stopping.is_set() or not self._dream_allowed()
        else:
            def should_stop() -> bool:
                return self._stopping.is_set() or self._attention_needed()
        while self.index_once() and not should_stop():
            pass     # the sessions' turns become memories first
        why = 'the kernel is dreaming' if in_dream else 'sessions closed without a dream'
        self.get_logger().info(f'dream: consolidating session(s) '
                               f'{", ".join(map(str, sessions))} ({why})')
        self._set_dream(dreaming=True, stage='starting', progress=0.0)
        last_publish = [0.0]

        def on_progress(stage: str, fraction: float) -> None:
            now = time.monotonic()
            with self._lock:
                changed = stage != self._dream_state['stage']
            if changed or now - last_publish[0] > 0.25 or fraction >= 1.0:
                last_publish[0] = now
                self._set_dream(stage=stage, progress=float(fraction))

        self.bundle_dir.mkdir(parents=True, exist_ok=True)
        dream = _dream()
        try:
            while True:   # a pass ends at dream.max_items ('partial'): the next goes on
                record = dream.consolidate(self.store, sessions, self.dream_params,
                                           should_stop, on_progress, self.bundle_dir,
                                           time.time())
                if record.interrupted or record.stage != 'partial' or should_stop():
                    break
        except Exception:
            self._set_dream(dreaming=False, stage='', progress=0.0)
            raise
        self.dreams_run += 1
        outcome = (f'interrupted at {record.stage}' if record.interrupted else 'complete')
        last = (f'sessions {", ".join(map(str, sessions))}: {outcome}; merged {record.merged}, '
                f'facts {record.facts}, updated {record.updated}, pruned {record.pruned}')
        self.get_logger().info(f'dream {last}')
        self._set_dream(dreaming=not record.interrupted and self.sleep_params.enabled,
                        stage='sleep training' if not record.interrupted and
                        self.sleep_params.enabled else '', progress=0.0, last=last)
        if not record.interrupted:
            self._sleep_train(should_stop)
        self._refresh()
        return record

    def _sleep_train(self, should_stop: Callable[[], bool]) -> None:
        """After a completed dream, when enabled: train the small model on the dream bundles
        (it says itself when it skips: spacing, too little data, peft missing)."""
        if not self.sleep_params.enabled:
            return
        from ..core.memory.sleep_training import run_sleep_training
        try:
            report = run_sleep_training(
                self.sleep_params.model_path, self.bundle_dir, self.sleep_params,
                should_stop=should_stop,
                on_progress=lambda stage, f: self._set_dream(stage=f'sleep training: {stage}',
                                                             progress=float(f)))
            self.get_logger().info(f'sleep training: {report.describe()}')
        finally:
            self._set_dream(dreaming=False, stage='', progress=0.0)

    # ---- shutdown ------------------------------------------------------------------------
    def destroy_node(self) -> None:
        """Bounded: the workers stop between items (a dream item is one transaction), then the
        store is closed."""
        self._stopping.set()
        self._wake_indexer.set()
        self._wake_dreamer.set()
        self._heartbeat.publish_last()
        deadline = time.monotonic() + STOP_WAIT_S
        for worker in (self._indexer, self._dreamer):
            worker.join(max(0.0, deadline - time.monotonic()))
        self._server.destroy()
        if not any(w.is_alive() for w in (self._indexer, self._dreamer)):
            self.store.close()
            if self._tmp is not None:
                self._tmp.cleanup()
        else:
            self.get_logger().warning('a memory worker was still running at shutdown')
        super().destroy_node()


def main(args: Optional[List[str]] = None) -> int:
    # In its own process the memory block runs only MiniLM, on the response path: one torch
    # thread embeds a query in ~10 ms where torch's default threads took 60-230 ms on a shared
    # 2-core machine (BENCHMARKS.md, memory search). torch's setting is process-wide, so a
    # one-process graph (`sage up`), where the models generate, leaves it alone.
    import torch
    torch.set_num_threads(1)
    return run_node(MemoryBlockNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
