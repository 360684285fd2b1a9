"""What a RECALL costs when the memory block embeds through the model manager.

The demo model manager (roles small + embedder: the SmolLM2 chat model and MiniLM, both real)
and the memory block run in one process on one executor, as the node tests do; the memory block
has `embedder: model_manager`. Measured in the same run, each with fresh query texts (the
in-process embedder caches what it embedded once):

- `recall_model_manager`: RECALL goal sent -> result, the query embedded by the model manager's
  `embedder` entry (`model_manager/infer`, task embed);
- `recall_in_process`: the same with the memory block's in-process MiniLM (its fallback path,
  forced), the baseline;
- `embed_model_manager` / `embed_in_process`: the embedding alone, each way;
- `recall_during_generation`: RECALLs sent while the model manager streams a long generation.
  Infer goals have their own queue and the pool runs MiniLM beside the chat model, so these
  should not wait for the generation; one that took longer than `embedder_timeout_s` would
  embed in-process instead (`fell_back` says how many did).

Prints one JSON object: per arm runs, median, spread (max - min), p99, in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from common import InProcessGraph, offline_model_params, percentile, report, wait_until


def summary(took_s: Sequence[float]) -> Dict[str, float]:
    ms = sorted(t * 1000.0 for t in took_s)
    return {'runs': len(ms), 'median_ms': round(statistics.median(ms), 2),
            'spread_ms': round(ms[-1] - ms[0], 2), 'p99_ms': round(percentile(ms, 99), 2),
            'min_ms': round(ms[0], 2), 'max_ms': round(ms[-1], 2)}


def send(client: Any, goal: Any, timeout_s: float = 60.0) -> Any:
    """Goal sent -> result, waited for with events (no polling delay in the figure)."""
    done = threading.Event()
    sent = client.send_goal_async(goal)
    sent.add_done_callback(lambda _: done.set())
    if not done.wait(timeout_s) or not sent.result().accepted:
        raise RuntimeError('goal not accepted')
    done.clear()
    result = sent.result().get_result_async()
    result.add_done_callback(lambda _: done.set())
    if not done.wait(timeout_s):
        raise TimeoutError('no result')
    return result.result().result


def timed(fn: Callable[[str], Any], texts: Sequence[str]) -> List[float]:
    took = []
    for text in texts:
        t0 = time.perf_counter()
        fn(text)
        took.append(time.perf_counter() - t0)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--runs', type=int, default=30, help='RECALLs / embeddings per arm')
    ap.add_argument('--timeout', type=float, default=3.0, help='memory_block embedder_timeout_s')
    args = ap.parse_args()

    from rclpy.action import ActionClient
    from sage_interfaces.action import Generate, Memory
    from sage_interfaces.msg import ChatMessage

    from sage_ros import graph, names
    from sage_ros.nodes.memory_block import MemoryBlockNode, RemoteEmbedder

    params = offline_model_params('demo', roles=['small', 'embedder'])
    mm = params['/**/model_manager']['ros__parameters']
    mm['preload'] = ['embedder']
    mm['models']['small']['fallback'] = ['none']     # 'large' is not among the roles
    with tempfile.TemporaryDirectory(prefix='sage-bench-') as tmp:
        mm['state_file'] = str(Path(tmp) / 'models.db')
        mb = params.setdefault('/**/memory_block', {}).setdefault('ros__parameters', {})
        mb.update(embedder='model_manager', state_file='none', embedder_timeout_s=args.timeout,
                  embedder_retry_s=0.0, embedder_wait_s=600.0)
        g = InProcessGraph((graph.MODEL_MANAGER, graph.MEMORY_BLOCK), params, Path(tmp))
        try:
            g.wait_models_active()
            node = next(n for n in g.nodes if isinstance(n, MemoryBlockNode))
            remote = node.remote_embedder
            assert isinstance(remote, RemoteEmbedder)
            wait_until(lambda: remote.remote_calls > 0 or bool(remote.fallback_reason), 120,
                       'the memory block warm-up')
            if remote.fallback_reason:
                raise SystemExit(f'the model manager does not embed: {remote.fallback_reason}')
            memory = ActionClient(g.probe, Memory, names.BLOCK_MEMORY)
            generate = ActionClient(g.probe, Generate, names.MODEL_GENERATE)
            assert memory.wait_for_server(timeout_sec=30) and generate.wait_for_server(30)
            for i, fact in enumerate(['the red cup is on the kitchen table',
                                      'the charger is under the desk in the lab',
                                      'Ada takes the bus at eight']):
                send(memory, Memory.Goal(operation=Memory.Goal.OP_STORE, text=fact))

            def recall(text: str) -> None:
                r = send(memory, Memory.Goal(operation=Memory.Goal.OP_RECALL, text=text))
                if r.error_code != Memory.Result.NONE:
                    raise RuntimeError(r.error_msg)

            def queries(arm: str) -> List[str]:
                return [f'where did I leave the {arm} thing number {i}?'
                        for i in range(args.runs)]

            timed(recall, queries('warm-up')[:5])
            remote.local(queries('warm-up local')[:5])
            results: Dict[str, Any] = {
                'recall_model_manager': summary(timed(recall, queries('remote recall'))),
                'embed_model_manager': summary(timed(lambda t: remote.remote([t]),
                                                     queries('remote embed'))),
                'embed_in_process': summary(timed(lambda t: remote.local([t]),
                                                  queries('local embed')))}
            calls = remote.remote_calls
            remote.pause_remote(1e9, 'benchmark: the in-process arm')
            results['recall_in_process'] = summary(timed(recall, queries('local recall')))
            assert remote.remote_calls == calls

            # RECALL while the chat model streams a long answer.
            remote.resume_remote()
            long_answer = threading.Thread(target=send, args=(generate, Generate.Goal(
                role='small', max_new_tokens=400, messages=[ChatMessage(
                    role='user', content='Tell me a long story about a robot and a cup.')])),
                kwargs={'timeout_s': 600.0})
            long_answer.start()
            time.sleep(0.5)    # let the generation start streaming (a bench, not a test)
            local_before = remote.local_calls
            during = timed(recall, queries('during generation')[:5])
            results['recall_during_generation'] = {
                **summary(during), 'each_ms': [round(t * 1000.0, 1) for t in during],
                'fell_back': remote.local_calls - local_before,
                'generation_still_running': long_answer.is_alive(),
                'embedder_timeout_s': args.timeout}
            long_answer.join(600.0)
            results['notes'] = ('one process, one executor (as the node tests); fresh query '
                                'texts per arm; RECALL = goal sent -> result')
            report('memory_embed_remote', results)
        finally:
            g.close()


if __name__ == '__main__':
    main()
