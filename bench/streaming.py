"""Time to first token through `blocks/language` against `generate` called directly.

Both paths use the same real offline model (the demo's small role), the same prompt and greedy
decoding, interleaved run by run so machine noise hits both alike. The graph path is a real
Language goal to the language block, which sends a Generate goal to the model manager; the
turns are ephemeral so the prompt stays the same. Goal: < 20 ms added at p50.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import List

from common import (InProcessGraph, demo_spec, offline_model_params, report, summary_ms,
                    wait_until)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--runs', type=int, default=20)
    ap.add_argument('--max-new-tokens', type=int, default=8)
    args = ap.parse_args()

    from rclpy.action import ActionClient
    from sage_interfaces.action import Language

    from sage_ros import graph, names
    from sage_ros.core.conversation import Conversation
    from sage_ros.core.models import ModelPool

    params = offline_model_params('demo')
    mm = params['/**/model_manager']['ros__parameters']
    small = mm['models'][mm['default_role']]
    prompt = 'Say hello to the people in the kitchen.'

    with tempfile.TemporaryDirectory() as tmp:
        g = InProcessGraph((graph.MODEL_MANAGER, graph.LANGUAGE_BLOCK), params, Path(tmp))
        try:
            g.wait_models_active()
            client = ActionClient(g.probe, Language, names.BLOCK_LANGUAGE)
            wait_until(lambda: client.wait_for_server(timeout_sec=0.1), 120, 'blocks/language')

            spec = demo_spec(mm['default_role'], args.max_new_tokens, name='direct')
            pool = ModelPool({'direct': spec}, 'direct')
            pool.load('direct')
            messages = Conversation().messages_for(prompt)

            def direct_ttft() -> float:
                t0 = time.perf_counter()
                first: List[float] = []
                pool.generate('direct', messages, max_new_tokens=args.max_new_tokens,
                              on_text=lambda _: first or first.append(time.perf_counter()))
                return first[0] - t0

            def graph_ttft() -> float:
                first: List[float] = []
                done = threading.Event()
                goal = Language.Goal(turn_id=1, text=prompt, complexity='simple',
                                     max_new_tokens=args.max_new_tokens, ephemeral=True)
                t0 = time.perf_counter()
                sent = client.send_goal_async(
                    goal, feedback_callback=lambda _: first or first.append(time.perf_counter()))
                sent.add_done_callback(
                    lambda f: f.result().get_result_async().add_done_callback(lambda _: done.set()))
                if not done.wait(120):
                    raise TimeoutError('no result from blocks/language')
                if not first:
                    raise RuntimeError('no feedback from blocks/language')
                return first[0] - t0

            graph_ttft()
            direct_ttft()   # warm both paths (first generate allocates caches)
            direct: List[float] = []
            through: List[float] = []
            for _ in range(args.runs):
                direct.append(direct_ttft())
                through.append(graph_ttft())
        finally:
            g.close()

    d, t = summary_ms(direct), summary_ms(through)
    added = round(t['p50_ms'] - d['p50_ms'], 3)
    report('streaming_ttft', {
        'model': small['model_id'], 'runs': args.runs,
        'direct_generate': d, 'through_blocks_language': t,
        'added_p50_ms': added, 'goal_added_p50_ms': 20.0, 'goal_met': added < 20.0})


if __name__ == '__main__':
    main()
