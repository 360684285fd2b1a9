"""What every SAGE node shares: QoS profiles, parameter declaration, time stamps, main()."""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence

import rclpy
from builtin_interfaces.msg import Time
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.context import Context
from rclpy.executors import (Executor, ExternalShutdownException, MultiThreadedExecutor,
                             ShutdownException)
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from ..core.embeddings import EmbeddingError
from ..core.routing import Complexity, DatasetError, complexity_classifier, estimate_complexity

# Latest value kept for late joiners (state, status, descriptions).
LATCHED = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                     reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
# Latched topics with one publisher per block: room for every block's latest message.
LATCHED_MANY = QoSProfile(depth=32, history=HistoryPolicy.KEEP_LAST,
                          reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.TRANSIENT_LOCAL)
# Observations in: a burst of 1,000 must reach the kernel, not be dropped by DDS (the kernel
# then answers each one, if only to say why it was not served).
OBSERVATIONS_IN = QoSProfile(depth=1000, history=HistoryPolicy.KEEP_LAST,
                             reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
# Every message matters (observations, responses, salience).
RELIABLE = QoSProfile(depth=50, history=HistoryPolicy.KEEP_LAST,
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)

# [s] How long an action server keeps a finished goal's result. Our clients (and `ros2 action
# send_goal`) ask for it as soon as the goal is accepted, so a minute is plenty; rclpy's default
# (900 s) held three goals per turn, about 80 KB of RSS per turn, for a quarter of an hour.
RESULT_KEEP_S = 60


class ConfigError(ValueError):
    """A parameter value that cannot work; the message names the parameter."""


def declare(node: Node, name: str, default: Any, description: str, *,
            read_only: bool = False, min_value: Optional[float] = None,
            max_value: Optional[float] = None) -> Any:
    """Declare a parameter with a descriptor (and a range for numbers) and return its value."""
    desc = ParameterDescriptor(description=description, read_only=read_only)
    if min_value is not None and max_value is not None:
        if isinstance(default, bool):
            pass
        elif isinstance(default, int):
            desc.integer_range = [IntegerRange(from_value=int(min_value), to_value=int(max_value),
                                               step=0)]
        elif isinstance(default, float):
            desc.floating_point_range = [FloatingPointRange(from_value=float(min_value),
                                                            to_value=float(max_value), step=0.0)]
    return node.declare_parameter(name, default, desc).value


def declare_router(node: Node, purpose: str) -> Callable[[str], Complexity]:
    """The node's `router` parameter: its complexity classifier, built now (the learned one
    takes seconds to train); the keyword heuristic, with a warning, if MiniLM or the labelled
    prompts are missing."""
    name = declare(node, 'router', 'learned',
                   f'Complexity classifier {purpose}: "learned" (MiniLM exemplars + features) or '
                   '"keyword" (the first heuristic)', read_only=True)
    t0 = time.monotonic()
    try:
        classify = complexity_classifier(name)
    except ValueError as exc:
        raise ConfigError(f'parameter router: {exc}') from exc
    except (EmbeddingError, DatasetError) as exc:
        node.get_logger().warning(f'learned complexity router unavailable ({exc}); '
                                  'using the keyword heuristic')
        return estimate_complexity
    node.get_logger().info(f'complexity router {name!r} ready in {time.monotonic() - t0:.1f} s')
    return classify


def stamp(t: Optional[float] = None) -> Time:
    """A wall-clock `builtin_interfaces/Time`: for the wall times the core records (a model's
    load, a swap) and the model manager's and blocks' status stamps. The kernel, whose decisions
    follow `use_sim_time`, stamps with its node clock instead."""
    t = time.time() if t is None else t
    sec = int(t)
    return Time(sec=sec, nanosec=int((t - sec) * 1e9))


def executor_threads(nodes: int) -> int:
    """Threads for an executor: action servers block one thread per running goal (inference),
    and their clients' callbacks need others, so the CPU count alone (2 on CI) is too few."""
    return max(4, 4 * nodes)


# Shutdown bounds. `ros2 launch` sends SIGTERM 5 s after its SIGINT and SIGKILL 5 s later, so a
# node must be gone well within 5 s: destroy_node of each node (they run side by side) gets
# DESTROY_GRACE_S, then callbacks still running (a generation that ignores its cancel) get
# EXIT_GRACE_S before the process exits without them.
DESTROY_GRACE_S = 3.5
EXIT_GRACE_S = 1.0


def _say(line: str) -> None:
    """Write one line to stderr from a signal handler: os.write, because a print() there can
    re-enter a buffered write that the signal interrupted."""
    try:
        os.write(2, (line + '\n').encode(errors='replace'))
    except OSError:
        pass


class StopSignals:
    """SIGINT and SIGTERM stop a SAGE process once.

    The first asks the spin loop to stop (every node's destroy_node then runs, so what must be
    saved is saved); later ones are ignored. A terminal's Ctrl-C signals the whole process
    group and `ros2 launch` forwards one more SIGINT: with Python's default handler (or rclpy's)
    the second one lands as KeyboardInterrupt in the middle of the shutdown and the process dies
    with exit code -2. Installed in place of rclpy's handlers (`init_context` turns those off).
    """

    def __init__(self, who: str = 'sage') -> None:
        self.who = who
        self.requested = threading.Event()
        self.signal_name = ''
        self._previous: Dict[int, Any] = {}

    def install(self) -> 'StopSignals':
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested.is_set():
            _say(f'[{self.who}] {name}: already stopping')
            return
        self.signal_name = name
        self.requested.set()

    def request(self, why: str = 'requested') -> None:
        """Stop without a signal (tests, an embedding program)."""
        if not self.requested.is_set():
            self.signal_name = why
            self.requested.set()


def init_context(args: Optional[List[str]], context: Optional[Context] = None) -> None:
    """rclpy.init without rclpy's signal handlers: `StopSignals` decides what a signal does.
    (rclpy's own SIGINT handler shuts every context down at once, so a node's destroy_node could
    no longer publish or save, and chains to KeyboardInterrupt.)"""
    rclpy.init(args=args, context=context, signal_handler_options=SignalHandlerOptions.NO)


def spin_nodes(nodes: Sequence[Node], stop: Optional[StopSignals] = None) -> None:
    """Spin until SIGINT, SIGTERM (`stop`) or external shutdown, then destroy the nodes, bounded:
    the executor keeps spinning while they are destroyed (a destroy_node may wait for a cancel
    or result that only the executor delivers), and none is waited on beyond DESTROY_GRACE_S."""
    stop = stop if stop is not None else StopSignals().install()
    context = nodes[0].context
    executor = MultiThreadedExecutor(num_threads=executor_threads(len(nodes)), context=context)
    for n in nodes:
        executor.add_node(n)
    try:
        while not stop.requested.is_set() and context.ok():
            executor.spin_once(timeout_sec=0.2)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass   # KeyboardInterrupt only before StopSignals was installed
    finally:
        if stop.signal_name:
            who = stop.who if len(nodes) > 1 else nodes[0].get_fully_qualified_name()
            _say(f'[{who}] {stop.signal_name}: stopping')
        destroy_nodes(executor, nodes)


def destroy_nodes(executor: Executor, nodes: Sequence[Node]) -> List[str]:
    """Destroy `nodes` side by side while `executor` keeps spinning; returns the names of those
    whose destroy_node did not return within DESTROY_GRACE_S (the process exits without them)."""
    pending = {n.get_name(): n for n in nodes}
    lock = threading.Lock()

    def destroy(name: str, node: Node) -> None:
        try:
            node.destroy_node()
        except Exception as exc:  # a node that fails to clean up must not stop the others
            _say(f'[{name}] error while stopping: {exc}')
        with lock:
            pending.pop(name, None)
        try:
            executor.wake()
        except Exception:
            pass

    for name, n in list(pending.items()):
        threading.Thread(target=destroy, args=(name, n), daemon=True,
                         name=f'destroy-{name}').start()
    deadline = time.monotonic() + DESTROY_GRACE_S
    while time.monotonic() < deadline:
        with lock:
            if not pending:
                break
        try:
            executor.spin_once(timeout_sec=0.05)
        except (ExternalShutdownException, ShutdownException):
            time.sleep(0.05)
        except Exception:  # entities disappearing under the wait set while nodes go
            time.sleep(0.05)
    executor.shutdown(timeout_sec=0)
    # Let idle worker threads end now; busy ones are waited for in `exit_code`.
    pool = getattr(executor, '_executor', None)
    if isinstance(pool, ThreadPoolExecutor):
        pool.shutdown(wait=False, cancel_futures=True)
    with lock:
        left = sorted(pending)
    if left:
        _say(f'[sage] {", ".join(left)}: still stopping after {DESTROY_GRACE_S:.1f} s; '
             'exiting without waiting')
    return left


def ignore_stop_signals() -> None:
    """From now on SIGINT and SIGTERM do nothing (SIGKILL still ends the process). For the very
    end of a process: Python's finalization puts the default handlers back, so a late second
    SIGINT (`ros2 launch` forwarding one) would still kill the exiting process with -2; ignored
    signals stay ignored."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def exit_code(code: int) -> int:
    """Return `code`, and make sure the process then exits within EXIT_GRACE_S: at exit Python
    joins every worker thread, and one still running a callback (a generation that ignores its
    cancel) would hold the exit however long it takes; a daemon watchdog flushes and ends the
    process instead. Idle workers end at once, so a clean exit never waits for the watchdog.
    SIGINT and SIGTERM are ignored once the threads are done (`atexit` runs then, before the
    interpreter puts the default handlers back)."""
    atexit.register(ignore_stop_signals)

    def watchdog() -> None:
        time.sleep(EXIT_GRACE_S)
        busy = [t.name for t in threading.enumerate()
                if t is not threading.current_thread() and not t.daemon and t.is_alive()]
        _say(f'[sage] exiting with {len(busy)} callback(s) still running ({", ".join(busy)})')
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    threading.Thread(target=watchdog, daemon=True, name='exit-watchdog').start()
    return code


def run_node(factory: Callable[[], Node], args: Optional[List[str]] = None) -> int:
    """`main()` of a node executable: a configuration mistake is one error line, not a trace;
    SIGINT or SIGTERM stops it cleanly with exit code 0 (see `StopSignals`)."""
    stop = StopSignals().install()
    init_context(args if args is not None else sys.argv)
    code = 0
    try:
        try:
            node = factory()
        except ConfigError as exc:
            print(f'error: {exc}', file=sys.stderr)
            code = 2
        else:
            spin_nodes([node], stop)
    except KeyboardInterrupt:
        pass  # a signal before StopSignals took over
    finally:
        # The exit watchdog first: a middleware shutdown that hangs (seen once under heavy
        # load, past launch's SIGTERM and into its SIGKILL) must not keep the process.
        code = exit_code(code)
        rclpy.try_shutdown()
    return code
