"""`sage chat`: talk to a running SAGE graph, or to one started in this process."""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import IO, Any, Dict, Iterator, List, Optional

import rclpy
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from sage_interfaces.msg import KernelState, ModelStatus, Response, ResponseChunk, Salience
from std_msgs.msg import String

from .. import names
from ..core.text import InvalidText, sanitize
from ..graph import Profile, params_path
from ..nodes.common import LATCHED, RELIABLE, executor_threads
from .graph_runner import GraphError, check_params_file, context_args, create_nodes

CONSOLE_NODE = 'sage_console'


@dataclass
class TurnOutcome:
    response: Response
    streamed: str


class ConsoleNode(Node):
    """Publishes turns on `text_in` and collects what the graph says back."""

    def __init__(self, context: Context) -> None:
        super().__init__(CONSOLE_NODE, context=context)
        self.text_pub = self.create_publisher(String, names.TEXT_IN, RELIABLE)
        self.responses: 'queue.Queue[Response]' = queue.Queue()
        self.chunks: 'queue.Queue[ResponseChunk]' = queue.Queue()
        self.state: Optional[KernelState] = None
        self.models: Optional[ModelStatus] = None
        self.salience: Dict[int, Salience] = {}   # by turn id, the latest few
        self.create_subscription(Response, names.RESPONSE, self.responses.put, RELIABLE)
        self.create_subscription(Salience, names.SALIENCE, self._on_salience, RELIABLE)
        self.create_subscription(ResponseChunk, names.RESPONSE_STREAM, self.chunks.put, RELIABLE)
        self.create_subscription(KernelState, names.STATE, self._on_state, LATCHED)
        self.create_subscription(ModelStatus, names.MODELS_STATUS, self._on_models, LATCHED)

    def _on_state(self, msg: KernelState) -> None:
        self.state = msg

    def _on_models(self, msg: ModelStatus) -> None:
        self.models = msg

    def _on_salience(self, msg: Salience) -> None:
        self.salience[msg.turn_id] = msg
        for old in sorted(self.salience)[:-64]:
            del self.salience[old]

    def graph_running(self) -> bool:
        ns = self.get_namespace()
        return (names.KERNEL, ns) in self.get_node_names_and_namespaces()

    def ready(self) -> bool:
        return (self.models is not None and self.models.lifecycle_state == 'active'
                and self.state is not None and 'language' in self.state.blocks
                and self.text_pub.get_subscription_count() > 0)


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
        self._last_turn = 0

    def say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    # ---- start-up ----------------------------------------------------------------------------
    def start(self, discovery_s: float, ready_timeout_s: float) -> None:
        params = check_params_file(self.params_file or params_path(self.profile))
        rclpy.init(args=context_args(self.namespace, params if self.mode != 'attach' else None,
                                     '' if self.verbose else 'fatal'),
                   context=self.context)
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
            self.say(f'starting the {self.profile.name} graph in this process ({params})')
            specs = [s for s in self.profile.nodes if s.name != names.TEXT_SENSOR]
            self.embedded = create_nodes(specs, self.context)
            for n in self.embedded:
                self.executor.add_node(n)
        self._wait_ready(ready_timeout_s)

    def _spin_executor(self) -> None:
        assert self.executor is not None
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass
        except Exception as exc:  # a node callback raised: report it, the console times out
            self.say(f'sage: internal error in the graph: {type(exc).__name__}: {exc}')
            if self.verbose:
                traceback.print_exc()

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.console is not None
        deadline = time.monotonic() + timeout_s
        said_loading = False
        while not self.console.ready():
            models = self.console.models
            if (models is not None and models.error and not models.loaded
                    and not models.loading_role and models.lifecycle_state != 'active'):
                raise GraphError(f'model manager: {models.error}')  # nothing could load
            if not said_loading and models is not None and models.loading_role:
                self.say(f'loading the {models.loading_role} model...')
                said_loading = True
            if time.monotonic() > deadline:
                raise GraphError(f'the graph was not ready within {timeout_s:.0f} s '
                                 f'(models: {models.lifecycle_state if models else "no status"})')
            time.sleep(0.05)

    def stop(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(timeout_sec=5.0)
        if self._spin is not None:
            self._spin.join(timeout=5.0)
        for n in self.embedded:
            n.destroy_node()
        if self.console is not None:
            self.console.destroy_node()
        rclpy.try_shutdown(context=self.context)

    # ---- turns -------------------------------------------------------------------------------
    def turn(self, line: str, stream: bool, timeout_s: float) -> TurnOutcome:
        assert self.console is not None
        expected = sanitize(line)
        self.console.text_pub.publish(String(data=line))
        deadline = time.monotonic() + timeout_s
        streamed: List[str] = []
        current: Optional[int] = None
        while time.monotonic() < deadline:
            try:
                while True:
                    chunk = self.console.chunks.get_nowait()
                    if current is None and chunk.turn_id > self._last_turn:
                        current = chunk.turn_id
                    if chunk.turn_id == current:
                        streamed.append(chunk.text)
                        if stream:
                            self.out.write(chunk.text)
                            self.out.flush()
            except queue.Empty:
                pass
            try:
                resp = self.console.responses.get(timeout=0.02)
            except queue.Empty:
                continue
            if resp.turn_id > self._last_turn and resp.input_text == expected:
                self._last_turn = resp.turn_id
                return TurnOutcome(resp, ''.join(streamed))
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
        sal = self.console.salience.get(r.turn_id) if self.console else None
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
        'turn_id': r.turn_id, 'input': line, 'response': r.text, 'model': r.model,
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


def script_lines(path: str) -> Iterator[str]:
    if path == '-':
        yield from (line.rstrip('\n') for line in sys.stdin)
        return
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            yield from (line.rstrip('\n') for line in f)
    except FileNotFoundError:
        raise GraphError(f'no such script file: {path}') from None


def run_script(chat: Chat, path: str, as_json_lines: bool, timeout_s: float) -> int:
    lines = [line for line in script_lines(path) if line.strip()]
    if not lines:
        raise GraphError(f'no input: {"standard input" if path == "-" else path} has no non-empty lines')
    failed = 0
    for line in lines:
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
            sal = chat.console.salience.get(r.turn_id) if chat.console else None
            print(as_json(line, r, sal), file=chat.out, flush=True)
        else:
            print(f'you> {line}\nsage> {r.text}\n{chat.status_line(r)}', file=chat.out, flush=True)
    return 1 if failed else 0


def run_interactive(chat: Chat, timeout_s: float) -> int:
    chat.say('Type a message and press Enter; /reset forgets the conversation, Ctrl-D or /quit ends.')
    while True:
        try:
            line = input('you> ')
        except EOFError:
            print(file=chat.out)
            return 0
        if line.strip() in ('/quit', '/exit'):
            return 0
        if line.strip() == '/reset':
            chat.say(reset_conversation(chat))
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
            rest = r.text[len(done):] if r.text.startswith(done) else ('\n' + r.text if done else r.text)
            chat.out.write(rest)
        print(f'\n{chat.status_line(r)}', file=chat.out, flush=True)


def reset_conversation(chat: Chat) -> str:
    from sage_interfaces.srv import ResetConversation
    assert chat.console is not None
    client = chat.console.create_client(ResetConversation, names.LANGUAGE_RESET)
    try:
        if not client.wait_for_service(timeout_sec=5.0):
            return 'reset failed: the language block is not reachable'
        future = client.call_async(ResetConversation.Request())
        deadline = time.monotonic() + 5.0
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        res = future.result()
        return (f'conversation reset ({res.turns_forgotten} exchanges forgotten)' if res
                else 'reset failed: no answer')
    finally:
        chat.console.destroy_client(client)
