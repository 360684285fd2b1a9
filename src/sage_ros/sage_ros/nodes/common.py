"""What every SAGE node shares: QoS profiles, parameter declaration, time stamps, main()."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, List, Optional, Sequence

import rclpy
from builtin_interfaces.msg import Time
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
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
# Every message matters (observations, responses, salience).
RELIABLE = QoSProfile(depth=50, history=HistoryPolicy.KEEP_LAST,
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)


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
    """A wall-clock `builtin_interfaces/Time` (the kernel does not run on simulated time)."""
    t = time.time() if t is None else t
    sec = int(t)
    return Time(sec=sec, nanosec=int((t - sec) * 1e9))


def executor_threads(nodes: int) -> int:
    """Threads for an executor: action servers block one thread per running goal (inference),
    and their clients' callbacks need others, so the CPU count alone (2 on CI) is too few."""
    return max(4, 4 * nodes)


def spin_nodes(nodes: Sequence[Node]) -> None:
    """Spin until Ctrl-C or external shutdown, then destroy the nodes."""
    executor = MultiThreadedExecutor(num_threads=executor_threads(len(nodes)),
                                     context=nodes[0].context)
    for n in nodes:
        executor.add_node(n)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        for n in nodes:
            n.destroy_node()


def run_node(factory: Callable[[], Node], args: Optional[List[str]] = None) -> int:
    """`main()` of a node executable: a configuration mistake is one error line, not a trace."""
    rclpy.init(args=args if args is not None else sys.argv)
    try:
        try:
            node = factory()
        except ConfigError as exc:
            print(f'error: {exc}', file=sys.stderr)
            return 2
        spin_nodes([node])
        return 0
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a node stops, wherever it lands
    finally:
        rclpy.try_shutdown()
