"""`sage chat`: talk to a running SAGE graph, or to one started in this process.

The console sends typed observations (`observations/text`) with ids of its own (its instance id
and a counter) and source `console`, and takes as its answers only the responses and stream
chunks that carry those ids: two consoles on one graph, or a console beside a robot's own
publishers, never take each other's answers. It waits for `KernelState.ready`, and when the
kernel stops or restarts while a turn is out (its heartbeat), it sends the turn again to the
kernel that comes back.

It shows the session number and developmental phase at start. Lines starting with `/` are
commands, never turns (`/help` lists them): /state, /sleep (kernel/sleep), /remember TEXT and
/forget ID|TEXT (the memory block's `blocks/memory`), /sessions (the robot's database), /reset,
and /quit, which ends the session (`session/end`, with a dream) and waits, bounded, for the
memory block to consolidate it, showing its progress (`memory/status`). Ctrl-D is /quit.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Tuple

import rclpy
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sage_interfaces.action import Memory
from sage_interfaces.msg import (KernelState, MemoryItem, MemoryStatus, ModelStatus, Response,
                                 ResponseChunk, Salience, TextObservation)
from sage_interfaces.srv import EndSession, ResetConversation, Sleep

from .. import graph, names
from ..core.text import InvalidText, sanitize
from ..graph import Profile
from ..core.store import resolve_state_file
from ..nodes.action_call import CallError, ThreadSafeActionClient, call_action
from ..nodes.common import LATCHED, RELIABLE, destroy_nodes, executor_threads, init_context
from ..nodes.liveness import LivenessWatch
from .graph_runner import GraphError, check_params_file, context_args, create_nodes

CONSOLE_NODE = 'sage_console'
CONSOLE_SOURCE = 'console'
KERNEL_TIMEOUT_S = 2.0     # [s] the kernel's heartbeat silent this long: it stopped
RESEND_S = 5.0             # [s] a turn sent again to a restarted kernel, not yet scored: again
SERVICE_WAIT_S = 3.0       # [s] a command's service or action server not there by then: say so
DREAM_START_S = 5.0        # [s] /quit: a dream the memory block has not begun by then: none comes
# Answers of every console and sensor arrive here; as deep as the kernel's, so a burst is not lost.
ANSWERS_IN = QoSProfile(depth=1000, history=HistoryPolicy.KEEP_LAST,
                        reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)


@dataclass
class TurnOutcome:
    response: Response
    streamed: str


class ConsoleNode(Node):
    """Publishes turns on `observations/text` and collects what the graph says back to them."""

    def __init__(self, context: Context, source: str = CONSOLE_SOURCE) -> None:
        super().__init__(CONSOLE_NODE, context=context)
        self.instance = uuid.uuid4().hex[:8]
        self.source = source
        self._count = 0
        self._lock = threading.Lock()
        self.obs_pub = self.create_publisher(TextObservation, names.OBSERVATIONS_TEXT, RELIABLE)
        self.responses: 'queue.Queue[Response]' = queue.Queue()
        self.chunks: 'queue.Queue[ResponseChunk]' = queue.Queue()
        self.state: Optional[KernelState] = None
        self.models: Optional[ModelStatus] = None
        self.salience: Dict[str, Salience] = {}   # by observation id, the latest few
        self.kernel_fqn = names.qualify(names.KERNEL, self.get_namespace())
        self.create_subscription(Response, names.RESPONSE, self._on_response, ANSWERS_IN)
        self.create_subscription(Salience, names.SALIENCE, self._on_salience, ANSWERS_IN)
        self.create_subscription(ResponseChunk, names.RESPONSE_STREAM, self._on_chunk, RELIABLE)
        self.create_subscription(KernelState, names.STATE, self._on_state, LATCHED)
        self.create_subscription(ModelStatus, names.MODELS_STATUS, self._on_models, LATCHED)
        self.memory_status: Optional[MemoryStatus] = None
        self.create_subscription(MemoryStatus, names.MEMORY_STATUS, self._on_memory_status,
                                 LATCHED)
        self.memory_client = ThreadSafeActionClient(self, Memory, names.BLOCK_MEMORY)
        self.watch = LivenessWatch(self, KERNEL_TIMEOUT_S)
        # `sage chat --voice`: answers to what the microphone heard (not this console's turns).
        self.on_heard: Optional[Callable[[Response], None]] = None

    def mine(self, observation_id: str) -> bool:
        return observation_id.startswith(f'{self.instance}/')

    def send(self, text: str, observation_id: str = '') -> str:
        """Publish one turn; returns its id (a new one unless `observation_id` is given)."""
        if not observation_id:
            with self._lock:
                self._count += 1
                observation_id = f'{self.instance}/{self._count}'
        msg = TextObservation(observation_id=observation_id, source=self.source, text=text)
        msg.header.stamp = self.get_clock().now().to_msg()
        self.obs_pub.publish(msg)
        return observation_id

    def forget(self, observation_id: str) -> None:
        with self._lock:
            self.salience.pop(observation_id, None)

    def _on_response(self, msg: Response) -> None:
        if self.mine(msg.observation_id):
            self.responses.put(msg)
        elif self.on_heard is not None and msg.modality == 'speech':
            self.on_heard(msg)

    def _on_chunk(self, msg: ResponseChunk) -> None:
        if self.mine(msg.observation_id):
            self.chunks.put(msg)

    def _on_state(self, msg: KernelState) -> None:
        self.state = msg

    def _on_models(self, msg: ModelStatus) -> None:
        self.models = msg

    def _on_memory_status(self, msg: MemoryStatus) -> None:
        self.memory_status = msg

    def _on_salience(self, msg: Salience) -> None:
        if not self.mine(msg.observation_id):
            return
        with self._lock:
            self.salience[msg.observation_id] = msg
            for old in list(self.salience)[:-64]:
                del self.salience[old]

    def kernel_instance(self) -> Optional[str]:
        """The running kernel's instance id (it changes when the kernel restarts), None while
        its heartbeat is silent."""
        beat = self.watch.alive(self.kernel_fqn)
        return beat.instance_id if beat is not None else None

    def kernel_alive(self) -> bool:
        return self.kernel_instance() is not None

    def graph_running(self) -> bool:
        ns = self.get_namespace()
        return (names.KERNEL, ns) in self.get_node_names_and_namespaces()

    def ready(self) -> bool:
        """The kernel beats, says the graph is ready, and hears this console."""
        return (self.kernel_alive() and self.state is not None and self.state.ready
                and self.obs_pub.get_subscription_count() > 0)

    def not_ready_reason(self) -> str:
        if not self.kernel_alive():
            return 'no heartbeat from the kernel'
        if self.state is None:
            return 'no kernel state yet'
        if not self.state.ready:
            return self.state.ready_reason or 'the kernel says it is not ready'
        return 'the kernel does not hear this console yet'


class Chat:
    """A console session: embedded or attached graph, interactive or scripted turns."""

    def __init__(self, profile: Profile, namespace: str, params_file: Optional[str],
                 mode: str, verbose: bool, out: IO[str] = sys.stdout, err: IO[str] = sys.stderr):
        self.profile, self.namespace, self.mode = profile, namespace, mode
        self.params_file, self.verbose = params_file, verbose
        self.out, self.err = out, err
        self.context = Context()
        self.executor: Optional[MultiThreadedExecutor] = None
        self.console: Optional[ConsoleNode] = None
        self.embedded: List[Node] = []
        self._spin: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self.state_file: Optional[Path] = None    # the kernel's database, from the parameters
        self.dream_timeout_s = 120.0
        self.extra_params: List[Path] = []   # under the user's --params-file (e.g. --voice's)

    def say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    # ---- start-up ----------------------------------------------------------------------------
    def start(self, discovery_s: float, ready_timeout_s: float) -> None:
        # `--params-file` goes on top of base.yaml and the profile's overlay.
        extra = [*self.extra_params,
                 *([check_params_file(self.params_file)] if self.params_file else [])]
        files = graph.params_files(self.profile, extra)
        self.state_file = kernel_state_file(files)
        # Without rclpy's signal handlers: Ctrl-C is a KeyboardInterrupt here, and `stop` then
        # destroys the nodes while the context still carries their last messages.
        init_context(context_args(self.namespace, files if self.mode != 'attach' else None,
                                  '' if self.verbose else 'fatal'), self.context)
        self.console = ConsoleNode(self.context)
        self.executor = MultiThreadedExecutor(num_threads=executor_threads(len(self.profile.nodes)),
                                              context=self.context)
        self.executor.add_node(self.console)
        self._spin = threading.Thread(target=self._spin_executor, daemon=True)
        self._spin.start()

        attach = self.mode == 'attach'
        if self.mode == 'auto':
            deadline = time.monotonic() + discovery_s
            while time.monotonic() < deadline and not attach:
                attach = self.console.graph_running()
                time.sleep(0.1)
        if attach:
            self.say(f'attached to the SAGE graph in {self.namespace}')
        else:
            self.say(f'starting the {self.profile.name} graph in this process '
                     f'({", ".join(str(f) for f in files)})')
            specs = [s for s in self.profile.nodes if s.name != names.TEXT_SENSOR]
            self.embedded = create_nodes(specs, self.context)
            for n in self.embedded:
                self.executor.add_node(n)
        self._wait_ready(ready_timeout_s)
        self.say(self.session_line())

    def session_line(self) -> str:
        """'session 3 (phase: infant)', from the kernel's state."""
        s = self.console.state if self.console is not None else None
        if s is None or not s.session:
            return 'session unknown (the kernel has not said)'
        return f'session {s.session}' + (f' (phase: {s.phase})' if s.phase else '')

    def _spin_executor(self) -> None:
        assert self.executor is not None
        try:
            while not self._stopping.is_set() and self.context.ok():
                self.executor.spin_once(timeout_sec=0.1)
        except ExternalShutdownException:
            pass
        except Exception as exc:  # a node callback raised: report it, the console times out
            self.say(f'sage: internal error in the graph: {type(exc).__name__}: {exc}')
            if self.verbose:
                traceback.print_exc()

    def _wait_ready(self, timeout_s: float) -> None:
        """Until `KernelState.ready` (and the kernel hears this console); a model manager that
        can load nothing ends the wait at once with its reason."""
        assert self.console is not None
        deadline = time.monotonic() + timeout_s
        said_loading = False
        while not self.console.ready():
            models = self.console.models
            # Only a configure that failed (back to unconfigured) is final: while configuring,
            # a failed default load may still be followed by its fallback's.
            if (models is not None and models.error and not models.loaded
                    and not models.loading_role and models.lifecycle_state == 'unconfigured'):
                raise GraphError(f'model manager: {models.error}')  # nothing could load
            if not said_loading and models is not None and models.loading_role:
                self.say(f'loading the {models.loading_role} model...')
                said_loading = True
            if time.monotonic() > deadline:
                raise GraphError(f'the graph was not ready within {timeout_s:.0f} s '
                                 f'({self.console.not_ready_reason()})')
            time.sleep(0.05)

    def stop(self) -> None:
        """Destroy the nodes while the executor still delivers what their destroy_node waits
        for (bounded), then shut down: nothing is left running against a destroyed node."""
        self._stopping.set()
        if self._spin is not None:
            self._spin.join(timeout=5.0)
        nodes = [*self.embedded, *([self.console] if self.console is not None else [])]
        if self.executor is not None:
            destroy_nodes(self.executor, nodes)
        else:
            for n in nodes:
                n.destroy_node()
        rclpy.try_shutdown(context=self.context)

    # ---- turns -------------------------------------------------------------------------------
    def turn(self, line: str, stream: bool, timeout_s: float) -> TurnOutcome:
        """Send one turn and wait for the response with its id. If the kernel stops or restarts
        meanwhile (the turn was lost with it), send it again, same id, once it is ready."""
        console = self.console
        assert console is not None
        deadline = time.monotonic() + timeout_s
        kernel = console.kernel_instance()
        oid = console.send(line)
        streamed: List[str] = []
        said_stopped = False
        resent_at: Optional[float] = None
        while time.monotonic() < deadline:
            try:
                while True:
                    chunk = console.chunks.get_nowait()
                    if chunk.observation_id == oid:
                        streamed.append(chunk.text)
                        if stream:
                            self.out.write(chunk.text)
                            self.out.flush()
            except queue.Empty:
                pass
            try:
                resp = console.responses.get(timeout=0.02)
            except queue.Empty:
                resp = None
            if resp is not None and resp.observation_id == oid:
                return TurnOutcome(resp, ''.join(streamed))
            # A kernel that went silent and came back as the same instance still has the turn;
            # a new instance lost it.
            now = console.kernel_instance()
            if now is None and not said_stopped:
                self.say('(the kernel stopped; the turn goes again when it is back)')
                said_stopped = True
            if now is not None and now != kernel:
                if not said_stopped:
                    self.say('(the kernel restarted; sending the turn again)')
                self._wait_ready(max(1.0, deadline - time.monotonic()))
                kernel, said_stopped = console.kernel_instance(), False
                streamed.clear()
                console.forget(oid)        # the old kernel's score of it
                console.send(line, oid)
                resent_at = time.monotonic()
            elif (resent_at is not None and oid not in console.salience
                  and time.monotonic() - resent_at > RESEND_S):
                # Right after a kill -9, DDS still counts the dead kernel's subscription, so
                # the turn may have gone to it: send it again until the new kernel scores it.
                console.send(line, oid)
                resent_at = time.monotonic()
        raise GraphError(f'no response within {timeout_s:.0f} s')

    def status_line(self, r: Response) -> str:
        """One line under each answer: who answered, any swap or fallback, and the kernel's view
        (metabolic state, salience and stance, ATP)."""
        if r.status != Response.STATUS_OK:
            kind = 'rejected' if r.status == Response.STATUS_REJECTED else 'failed'
            return f'[{kind}: {r.error}]'
        parts = [f'{r.role}: {r.model}', r.complexity, f'{r.latency_s:.2f} s']
        if r.block and r.block != 'language':
            parts.insert(0, f'via {r.block}')
        models = self.console.models if self.console else None
        if r.swapped:
            swap = models.last_swap if models is not None else None
            if swap is not None and swap.to_role == r.role and swap.succeeded:
                parts.append(f'swapped {swap.from_role or "-"} -> {swap.to_role} '
                             f'in {swap.duration_s:.1f} s')
            else:
                parts.append('model swapped')
        if r.fallback:
            parts.append(f'asked for {r.requested_role}: {r.fallback}')
        sal = self.console.salience.get(r.observation_id) if self.console else None
        mind = f'{r.metabolic_state or "?"} salience {r.salience:.2f}'
        if sal is not None and sal.stance:
            mind += f' ({sal.stance})'
        parts.append(mind)
        s = self.console.state if self.console else None
        atp = f'ATP -{r.atp_spent:.1f}'
        if s is not None:
            atp += f' -> {s.atp_level:.0f}/{s.atp_capacity:.0f}'
            if s.metabolic_state != r.metabolic_state:
                atp += f', now {s.metabolic_state}'
        parts.append(atp)
        return '[' + ' · '.join(parts) + ']'


def as_json(line: str, r: Response, salience: Optional[Salience] = None) -> str:
    record: Dict[str, Any] = {
        'turn_id': r.turn_id, 'observation_id': r.observation_id, 'source': r.source,
        'input': line, 'response': r.text, 'truncated': bool(r.truncated), 'model': r.model,
        'block': r.block, 'role': r.role, 'requested_role': r.requested_role,
        'fallback': r.fallback,
        'complexity': r.complexity, 'latency_s': round(float(r.latency_s), 3),
        'swapped': bool(r.swapped), 'status': ('ok', 'rejected', 'failed')[r.status],
        'error': r.error, 'metabolic_state': r.metabolic_state,
        'salience': round(float(r.salience), 3), 'atp_spent': round(float(r.atp_spent), 3)}
    if salience is not None:
        record['stance'] = salience.stance
        record['snarc'] = {d: round(float(getattr(salience, d)), 3) for d in
                           ('surprise', 'novelty', 'arousal', 'reward', 'conflict')}
    return json.dumps(record, ensure_ascii=False)


SHORTENED = ' (shortened)'


def answer_text(r: Response) -> str:
    """The answer as shown: says so when it was shortened to its token budget."""
    return r.text + (SHORTENED if r.truncated else '')


def script_lines(path: str) -> Iterator[str]:
    """The script's lines; standard input line by line as they arrive (a live pipe works)."""
    if path == '-':
        yield from (line.rstrip('\n') for line in iter(sys.stdin.readline, ''))
        return
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            yield from (line.rstrip('\n') for line in f)
    except FileNotFoundError:
        raise GraphError(f'no such script file: {path}') from None


def kernel_state_file(files: List[Path]) -> Optional[Path]:
    """The kernel's `state_file` as the parameters files set it (the robot's database), None
    for 'none'."""
    value = ''
    try:
        params = graph.load_params(files)
    except Exception:  # a broken file is reported by the graph itself; the default stays
        params = {}
    for key, section in params.items():
        if str(key).rstrip('/').rsplit('/', 1)[-1] in (names.KERNEL, '*', '**') and isinstance(
                section, dict):
            found = (section.get('ros__parameters') or {}).get('state_file')
            if isinstance(found, str):
                value = found
    return resolve_state_file(value)


# ---- commands ----------------------------------------------------------------------------------
class Quit(Exception):
    """/quit: the session has been ended (or could not be); the console exits."""


HELP = """commands (never sent as turns):
  /state            the kernel's state: session, phase, metabolic state, ATP, blocks
  /sleep            enter DREAM now (the memory block consolidates while it dreams)
  /remember TEXT    pin TEXT: it is considered for every answer, in every session
  /forget ID|TEXT   forget memory ID (see /sessions, `sage memory list`), or what best matches TEXT
  /sessions         the last sessions with their summaries
  /reset            forget this conversation's history (memories stay)
  /quit             end the session (summary, note, dream), then exit; Ctrl-D does the same
  /help             this list"""


def is_command(line: str) -> bool:
    """'/word ...' is a command; '/' alone or '/ 3' is text."""
    s = line.strip()
    return len(s) > 1 and s[0] == '/' and s[1].isalpha()


def run_command(chat: Chat, line: str) -> str:
    """Run one command; returns what to show. Raises Quit for /quit and /exit."""
    name, _, arg = line.strip().partition(' ')
    arg = arg.strip()
    name = name.lower()
    handlers: Dict[str, Callable[[Chat, str], str]] = {
        '/state': state_summary, '/sleep': sleep, '/remember': remember, '/forget': forget,
        '/sessions': list_sessions, '/reset': lambda c, a: reset_conversation(c),
        '/help': lambda c, a: HELP, '/quit': quit_session, '/exit': quit_session}
    handler = handlers.get(name)
    if handler is None:
        return f'unknown command {name} (not sent); /help lists the commands'
    return handler(chat, arg)


def call_service(chat: Chat, srv_type: Any, name: str, request: Any, what: str,
                 timeout_s: float = 10.0) -> Tuple[Any, str]:
    """(response, '') or (None, why in words)."""
    assert chat.console is not None
    client = chat.console.create_client(srv_type, name)
    try:
        if not client.wait_for_service(timeout_sec=SERVICE_WAIT_S):
            return None, f'{what} is not reachable ({name})'
        future = client.call_async(request)
        deadline = time.monotonic() + timeout_s
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not future.done():
            return None, f'{what} did not answer within {timeout_s:.0f} s'
        res = future.result()
        return (res, '') if res is not None else (None, f'{what} sent no answer')
    finally:
        chat.console.destroy_client(client)


def state_summary(chat: Chat, arg: str) -> str:
    s = chat.console.state if chat.console is not None else None
    if s is None:
        return 'no kernel state yet'
    since = f' (since {s.previous_state} -> {s.metabolic_state}: {s.transition_reason})' \
        if s.previous_state else ''
    lines = [chat.session_line(),
             f'{s.metabolic_state}{since}',
             f'ATP {s.atp_level:.0f}/{s.atp_capacity:.0f} ({s.atp_reserved:.0f} reserved); '
             f'{s.active_dispatches} running; {s.observations_total} observations, '
             f'{s.rejected_total} rejected',
             ('ready' if s.ready else f'not ready: {s.ready_reason}') +
             f'; blocks: {", ".join(s.blocks) or "none"}',
             f'last decision: {s.last_decision}']
    m = chat.console.memory_status if chat.console is not None else None
    if m is not None:
        dream = (f'dreaming ({m.dream_stage} {m.dream_progress:.0%})' if m.dreaming
                 else f'last dream: {m.last_dream or "none yet"}')
        lines.append(f'memory: {m.memories} memories ({m.pinned} pinned), '
                     f'{m.unindexed_turns} turns to index; {dream}')
    return '\n'.join(lines)


def sleep(chat: Chat, arg: str) -> str:
    res, why = call_service(chat, Sleep, names.KERNEL_SLEEP,
                            Sleep.Request(reason=arg or 'asked from the console'), 'the kernel')
    if res is None:
        return f'not asleep: {why}'
    return res.message


def memory_goal(chat: Chat, goal: Memory.Goal) -> Tuple[Any, str]:
    """(result, '') or (None, why): one goal to the memory block."""
    assert chat.console is not None
    try:
        wrapped = call_action(chat.console.memory_client, goal, what='memory block',
                              server_wait_s=SERVICE_WAIT_S, timeout_s=10.0)
    except CallError as exc:
        if 'not reachable' in str(exc):
            return None, 'the memory block is not running'
        return None, str(exc)
    result = wrapped.result
    if result.error_code != Memory.Result.NONE:
        return None, result.error_msg or f'error {result.error_code}'
    return result, ''


def remember(chat: Chat, arg: str) -> str:
    if not arg:
        return 'usage: /remember TEXT'
    result, why = memory_goal(chat, Memory.Goal(
        operation=Memory.Goal.OP_STORE, text=arg, kind=MemoryItem.KIND_PINNED, pinned=True,
        source=CONSOLE_SOURCE))
    if result is None:
        return f'not remembered: {why}'
    stored = result.items[0] if result.items else None
    return f'remembered (memory {stored.id}): {stored.text}' if stored else 'remembered'


def forget(chat: Chat, arg: str) -> str:
    if not arg:
        return 'usage: /forget ID, or /forget TEXT (the memory that best matches it)'
    goal = Memory.Goal(operation=Memory.Goal.OP_FORGET)
    if arg.isdigit():
        goal.memory_id = int(arg)
    else:
        goal.text = arg
    result, why = memory_goal(chat, goal)
    if result is None:
        return f'nothing forgotten: {why}'
    if not result.items:
        return 'nothing forgotten: no memory matches'
    return '\n'.join(f'forgot memory {m.id} ({m.kind}): {m.text}' for m in result.items)


def list_sessions(chat: Chat, arg: str) -> str:
    from . import memory
    if chat.state_file is None:
        return 'sessions are not kept (the kernel\'s state_file is none)'
    try:
        store = memory.open_store(memory.state_file(str(chat.state_file)))
    except memory.MemoryCliError as exc:
        return f'no sessions: {exc}'
    try:
        found = store.sessions(limit=5)
    finally:
        store.close()
    return '\n'.join(line for s in found for line in memory.session_lines(s)) or 'no sessions yet'


def quit_session(chat: Chat, arg: str) -> str:
    """End the session (summary, note, dream), wait for the dream, bounded, then Quit."""
    console = chat.console
    assert console is not None
    before = console.memory_status
    res, why = call_service(chat, EndSession, names.SESSION_END,
                            EndSession.Request(reason=arg or 'user quit (console)', dream=True),
                            'the kernel', timeout_s=120.0)
    if res is None or not res.success:
        chat.say(f'session not ended: {why or res.message}')
        raise Quit()
    chat.say(res.message)
    if 'dreaming' in res.message and before is not None:
        wait_for_dream(chat, before.dreams_total)
    raise Quit()


def wait_for_dream(chat: Chat, dreams_before: int) -> None:
    """Until the memory block has finished the dream it began (memory/status), at most
    `dream_timeout_s`, showing each stage as it goes."""
    console = chat.console
    assert console is not None
    start = time.monotonic()
    shown = ''
    began = False
    while True:
        m = console.memory_status
        done = m is not None and m.dreams_total > dreams_before and not m.dreaming
        if m is not None and m.dreaming:
            began = True
            line = f'dreaming: {m.dream_stage or "consolidating"} {m.dream_progress:.0%}'
            if line != shown:
                chat.say(line)
                shown = line
        if done:
            chat.say(f'dream done: {m.last_dream}' if m is not None and m.last_dream
                     else 'dream done')
            return
        waited = time.monotonic() - start
        if not began and waited > DREAM_START_S:
            chat.say('no dream began (the memory block did not start one)')
            return
        if waited > chat.dream_timeout_s:
            chat.say(f'the dream goes on after {chat.dream_timeout_s:.0f} s; what it did so far '
                     'is kept, and an unfinished dream resumes at the next start')
            return
        time.sleep(0.1)


def run_script(chat: Chat, path: str, as_json_lines: bool, timeout_s: float) -> int:
    """Each non-empty line is a turn (or a /command), sent as soon as it is read and the
    previous one is answered; 1 if any turn was not answered."""
    failed = sent = 0
    for line in script_lines(path):
        if not line.strip():
            continue
        sent += 1
        if is_command(line):
            try:
                shown = run_command(chat, line)
            except Quit:
                break
            if as_json_lines:
                print(json.dumps({'command': line.strip(), 'output': shown}, ensure_ascii=False),
                      file=chat.out, flush=True)
            else:
                print(f'you> {line}\n{shown}', file=chat.out, flush=True)
            continue
        try:
            sanitize(line)
        except InvalidText as exc:
            chat.say(f'skipped a line: {exc}')
            failed += 1
            continue
        outcome = chat.turn(line, stream=False, timeout_s=timeout_s)
        r = outcome.response
        failed += r.status != Response.STATUS_OK
        if as_json_lines:
            sal = chat.console.salience.get(r.observation_id) if chat.console else None
            print(as_json(line, r, sal), file=chat.out, flush=True)
        else:
            print(f'you> {line}\nsage> {answer_text(r)}\n{chat.status_line(r)}', file=chat.out,
                  flush=True)
    if not sent:
        raise GraphError(f'no input: {"standard input" if path == "-" else path} has no '
                         'non-empty lines')
    return 1 if failed else 0


def run_interactive(chat: Chat, timeout_s: float) -> int:
    chat.say('Type a message and press Enter; /help lists the commands, /quit or Ctrl-D ends '
             'the session.')
    while True:
        try:
            line = input('you> ')
        except EOFError:
            print(file=chat.out)
            line = '/quit'
        if is_command(line):
            try:
                chat.say(run_command(chat, line))
            except Quit:
                return 0
            continue
        try:
            sanitize(line)
        except InvalidText as exc:
            if line.strip():
                chat.say(f'not sent: {exc}')
            continue
        chat.out.write('sage> ')
        chat.out.flush()
        outcome = chat.turn(line, stream=True, timeout_s=timeout_s)
        r = outcome.response
        done = outcome.streamed.strip()
        if r.status == Response.STATUS_OK:
            # The answer as streamed, completed; one shortened at a sentence end is a prefix of
            # what streamed, so it is shown again, whole, on a line of its own.
            rest = r.text[len(done):] if r.text.startswith(done) else ('\n' + r.text if done else r.text)
            chat.out.write(rest + (SHORTENED if r.truncated else ''))
        print(f'\n{chat.status_line(r)}', file=chat.out, flush=True)


def reset_conversation(chat: Chat) -> str:
    res, why = call_service(chat, ResetConversation, names.LANGUAGE_RESET,
                            ResetConversation.Request(), 'the language block', timeout_s=5.0)
    if res is None:
        return f'reset failed: {why}'
    return f'conversation reset ({res.turns_forgotten} exchanges forgotten)'


# ---- --voice -----------------------------------------------------------------------------------
def input_device() -> Tuple[str, str]:
    """(name of the default input device, '') or ('', why there is none), as sounddevice (the
    microphone node's library) sees it."""
    try:
        import sounddevice
    except OSError as exc:   # no PortAudio library
        return '', f'sounddevice cannot load PortAudio ({exc})'
    except ImportError as exc:
        return '', f'sounddevice is not installed ({exc})'
    try:
        info = sounddevice.query_devices(kind='input')
    except Exception as exc:   # PortAudioError: no default input device
        return '', f'no input device ({exc})'
    return str(info.get('name', 'default') if isinstance(info, dict) else 'default'), ''


def voice_params() -> Path:
    """A parameters file turning on the microphone node's device source (embedded graph)."""
    import os
    import tempfile
    out_dir = Path(tempfile.gettempdir()) / f'sage_ros-params-{os.getuid()}'
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / 'voice.yaml'
    path.write_text(f'/**/{names.MICROPHONE}:\n  ros__parameters:\n    source: device\n',
                    encoding='utf-8')
    return path


def enable_voice(chat: Chat) -> bool:
    """Before `start`: listen with the default input device where there is one; else say so in
    one line (the chat goes on as text). True when listening is set up."""
    device, why = input_device()
    if not device:
        chat.say(f'--voice: {why}; this is a text chat')
        return False
    if chat.mode != 'attach':
        chat.extra_params.append(voice_params())
    chat.say(f'--voice: listening on {device!r}' + (
        ' (an attached graph uses its own microphone settings)' if chat.mode != 'embedded' else
        ''))
    return True


def show_heard(chat: Chat) -> None:
    """After `start`: print each answer to what the microphone heard as it arrives."""
    assert chat.console is not None

    def heard(r: Response) -> None:
        answer = answer_text(r) if r.status == Response.STATUS_OK else ''
        print(f'\n(heard) {r.input_text or "(nothing recognised)"}\nsage> {answer}\n'
              f'{chat.status_line(r)}', file=chat.out, flush=True)
    chat.console.on_heard = heard
