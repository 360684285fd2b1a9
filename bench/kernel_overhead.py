"""The kernel's own overhead: observation published -> goal accepted by a block, p50/p99,
against a raw rclpy publish -> subscribe hop measured in the same run and process.

The block is a stand-in Language server that accepts every goal and records when; it succeeds
at once, so nothing but the kernel (sanitise, SNARC scoring with MiniLM novelty, metabolic
update, ATP allocation, dispatch) sits between the two timestamps beyond DDS itself. ATP is
made plentiful so every observation is dispatched. Goal: kernel p50 - hop p50 < hop p50.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

from common import InProcessGraph, report, summary_ms, wait_until

SENTENCES = ['where is the red cup', 'please bring me the blue box', 'what time is it',
             'the kitchen door is open', 'how many people are in the room', 'stop moving now',
             'tell me about the weather', 'is the battery charged', 'go to the charging dock',
             'who is at the front door']


def timed(send: Callable[[], object], key: str, arrivals: Dict[str, float],
          signal: threading.Event) -> float:
    """Seconds from `send()` until `key` shows up in `arrivals` (set by a callback that also
    sets `signal`)."""
    signal.clear()
    t0 = time.perf_counter()
    send()
    while key not in arrivals:
        if not signal.wait(30):
            raise TimeoutError(f'{key!r} never arrived')
        signal.clear()
    return arrivals[key] - t0


def core_decision_times(runs: int, embedder: str, router: str) -> List[float]:
    """The same decision without ROS: `Kernel.observe` + `Kernel.cycle`, MiniLM novelty and the
    complexity router included, on fresh sentences (no embedding cache hits)."""
    from sage_ros.core.blocks import BlockDescriptor, BlockType
    from sage_ros.core.embeddings import shared_embedder
    from sage_ros.core.kernel import Kernel, KernelConfig, WorkResult
    from sage_ros.core.routing import complexity_classifier
    from sage_ros.core.salience import SnarcSalience, ngram_embedder

    embed = shared_embedder().embed if embedder == 'minilm' else ngram_embedder()
    kernel = Kernel(SnarcSalience(embed), KernelConfig())
    kernel.complexity = complexity_classifier(router)
    kernel.blocks.update(BlockDescriptor(
        name='language', block_type=BlockType.MONOLITHIC, capabilities=('conversation',),
        modalities=('text',), action_name='/sage/blocks/language',
        action_type='sage_interfaces/action/Language', loaded=True, memory_estimate_bytes=0))
    now = time.time()
    times: List[float] = []
    for i in range(runs + 10):
        t0 = time.perf_counter()
        kernel.observe('text', f'{SENTENCES[i % len(SENTENCES)]} [{i}]', now + i)
        result = kernel.cycle(now + i)
        elapsed = time.perf_counter() - t0
        for d in result.dispatches:
            kernel.complete(d.turn_id, WorkResult(True, completion_tokens=8), now + i + 0.5)
        if i >= 10:
            times.append(elapsed)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--runs', type=int, default=200)
    ap.add_argument('--period-s', type=float, default=0.05, help='pause between samples [s]')
    ap.add_argument('--embedder', choices=('minilm', 'ngram'), default='minilm',
                    help='the kernel\'s salience.text_embedder')
    ap.add_argument('--router', choices=('learned', 'keyword'), default='learned',
                    help='the kernel\'s complexity router')
    args = ap.parse_args()

    import yaml
    from rclpy.action import ActionClient, ActionServer, GoalResponse
    from sage_interfaces.action import Language
    from sage_interfaces.msg import BlockDescription, KernelState, Response
    from std_msgs.msg import String

    from sage_ros import graph, names
    from sage_ros.graph import PROFILES, params_path
    from sage_ros.nodes.common import LATCHED, RELIABLE, stamp

    params = yaml.safe_load(params_path(PROFILES['demo']).read_text())
    kp = params['/**/kernel']['ros__parameters']
    kp.setdefault('atp', {}).update(capacity=1e6)
    kp['atp']['recharge_per_s'] = 1e5
    kp['state_file'] = 'none'
    kp['router'] = args.router
    kp.setdefault('salience', {})['text_embedder'] = args.embedder

    with tempfile.TemporaryDirectory() as tmp:
        g = InProcessGraph((graph.KERNEL,), params, Path(tmp))
        try:
            node = g.probe
            accepted: Dict[str, float] = {}
            arrived = threading.Event()

            def on_goal(goal: Language.Goal) -> GoalResponse:
                accepted.setdefault(goal.text, time.perf_counter())
                arrived.set()
                return GoalResponse.ACCEPT

            def execute(gh: object) -> Language.Result:
                gh.succeed()  # type: ignore[attr-defined]
                return Language.Result(text='ok', model='stand-in', role='small')

            ActionServer(node, Language, names.BLOCK_LANGUAGE, execute_callback=execute,
                         goal_callback=on_goal)
            desc = node.create_publisher(BlockDescription, names.BLOCKS_DESCRIPTION, LATCHED)
            desc.publish(BlockDescription(
                stamp=stamp(), name='language', block_type='monolithic',
                capabilities=['conversation'], modalities=['text'],
                action_name=node.resolve_topic_name(names.BLOCK_LANGUAGE),
                action_type='sage_interfaces/action/Language', loaded=True))
            text_pub = node.create_publisher(String, names.TEXT_IN, RELIABLE)

            # Raw hop: the same kind of publisher and subscription, on the same executor.
            got: Dict[str, float] = {}
            hopped = threading.Event()

            def on_hop(m: String) -> None:
                got.setdefault(m.data, time.perf_counter())
                hopped.set()
            hop_pub = node.create_publisher(String, 'bench/hop', RELIABLE)
            node.create_subscription(String, 'bench/hop', on_hop, RELIABLE)
            states: List[KernelState] = []
            node.create_subscription(KernelState, names.STATE, states.append, LATCHED)
            wait_until(lambda: bool(states) and 'language' in states[-1].blocks, 30,
                       'the kernel to see the block')
            wait_until(lambda: text_pub.get_subscription_count() > 0
                       and hop_pub.get_subscription_count() > 0, 30, 'subscribers')

            def kernel_once(i: int) -> float:
                text = f'{SENTENCES[i % len(SENTENCES)]} ({i})'
                return timed(lambda: text_pub.publish(String(data=text)), text, accepted, arrived)

            def hop_once(i: int) -> float:
                key = f'hop {i}'
                return timed(lambda: hop_pub.publish(String(data=key)), key, got, hopped)

            direct = ActionClient(node, Language, names.BLOCK_LANGUAGE)
            wait_until(lambda: direct.wait_for_server(timeout_sec=0.1), 30, 'the stand-in server')

            def goal_hop_once(i: int) -> float:
                """A raw goal request to the same server: the last leg of the kernel's path."""
                text = f'direct goal {i}'
                return timed(lambda: direct.send_goal_async(Language.Goal(text=text)), text,
                             accepted, arrived)

            answered: List[int] = []
            node.create_subscription(Response, names.RESPONSE,
                                     lambda m: answered.append(m.turn_id), RELIABLE)

            def settle(turns: int) -> None:
                """Let the kernel finish the turn (result, ATP, state) before the next sample,
                so neither measurement pays for the other's aftermath."""
                wait_until(lambda: len(answered) >= turns, 30, 'the response')
                time.sleep(args.period_s)

            warm_up = 10          # first embedding, first goal, discovery of the block
            for i in range(warm_up):
                kernel_once(-1 - i)
                settle(i + 1)
                hop_once(-1 - i)
            kernel: List[float] = []
            hop: List[float] = []
            goal_hop: List[float] = []
            for i in range(args.runs):
                hop.append(hop_once(i))
                time.sleep(args.period_s)
                goal_hop.append(goal_hop_once(i))
                time.sleep(args.period_s)
                kernel.append(kernel_once(i))
                settle(warm_up + i + 1)
        finally:
            g.close()

    core = core_decision_times(args.runs, args.embedder, args.router)
    k, h, gh = summary_ms(kernel), summary_ms(hop), summary_ms(goal_hop)
    added = round(k['p50_ms'] - h['p50_ms'], 3)
    # What the kernel itself adds once both legs of its path (a topic hop in, a goal request
    # out) are taken away.
    own = round(k['p50_ms'] - h['p50_ms'] - gh['p50_ms'], 3)
    report('kernel_overhead', {
        'runs': args.runs, 'embedder': args.embedder, 'router': args.router,
        'raw_hop': h, 'raw_goal_request': gh, 'observation_to_goal_accepted': k,
        'kernel_own_p50_ms': own,
        'core_decision_no_ros': summary_ms(core),
        'kernel_added_p50_ms': added, 'hops_added_p50': round(added / h['p50_ms'], 2),
        'goal': 'kernel adds less than one extra hop at p50', 'goal_met': added < h['p50_ms']})


if __name__ == '__main__':
    main()
