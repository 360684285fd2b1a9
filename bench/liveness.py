"""Liveness under `sage up --processes`: a node killed (kill -9) during an answer.

For the language block, the model manager and the reasoning block, N times each: a turn is sent,
the node is killed while it works on it, and the benchmark measures

- failover: death -> the Response FAILED that says what stopped (the user's clear answer),
- ready: death -> the restarted node beats ready and the kernel is ready again,
- answered: death -> the next turn (sent at once after the failover; it should wait in the
  kernel until the graph is ready; when it fails instead, that is counted and it is asked again)
  is answered,

with `turn_s`, a turn's own duration with nothing killed, measured in the same run: `answered`
includes one such generation. Real processes, the respawn delay of `sage up` (2 s by default),
the tiny random models of the test suite (they never stop early, so every answer is `--tokens`
long). Prints one JSON object; goals: failover < 10 s, ready < 30 s (the issue's bounds).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'src' / 'sage_ros' / 'test'))

from common import percentile, report  # noqa: E402


def spread(values: List[float]) -> Dict[str, float]:
    return {'n': len(values), 'median_s': round(statistics.median(values), 3),
            'min_s': round(min(values), 3), 'max_s': round(max(values), 3),
            'p90_s': round(percentile(values, 90), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--runs', type=int, default=5, help='kills per node')
    ap.add_argument('--tokens', type=int, default=1000, help='length of every answer')
    ap.add_argument('--respawn-delay', type=float, default=2.0)
    ap.add_argument('--domain', type=int, default=0, help='ROS domain (default: a free one)')
    args = ap.parse_args()

    import yaml

    from conftest import build_tiny_model
    from graph_support import (Output, Probe, child_pid, claim_domain, expected_nodes,
                               long_answer_params, start_up, stop)
    from sage_ros import names

    lock = None
    domain = args.domain
    if not domain:
        domain, lock = claim_domain()
    targets = [(names.LANGUAGE_BLOCK, 'hello there'),
               (names.MODEL_MANAGER, 'hello there'),
               (names.REASONING_BLOCK, 'Design a plan for a robot to tidy the kitchen table')]
    results: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ['SAGE_STATE_DIR'] = str(root / 'state')
        models = {'small': build_tiny_model(root / 'tiny-small', seed=1),
                  'large': build_tiny_model(root / 'tiny-large', seed=2)}
        params = root / 'long.yaml'
        # ATP for hundreds of turns: the kernel must never defer one for want of energy.
        params.write_text(yaml.safe_dump(long_answer_params(
            models, args.tokens, {'kernel:routing.reasoning_min_salience': 0.0,
                                  'kernel:atp.capacity': 1e6})))
        proc = start_up(params, domain, '--processes', '--respawn-delay',
                        str(args.respawn_delay), '--max-restarts', str(args.runs + 5))
        output = Output(proc)
        probe = Probe(domain)
        fqns = [names.qualify(n) for n, _ in expected_nodes()]

        def serving() -> bool:
            return probe.ready() and all(
                probe.alive(f) and probe.beats[f].ready for f in fqns)

        def turn(text: str, timeout: float = 300.0) -> Any:
            oid = probe.send(text)
            return probe.wait_response(oid, timeout)

        try:
            probe.wait(serving, 180, 'the graph serving')
            for node, text in targets:
                fqn = names.qualify(node)
                rows: Dict[str, List[float]] = {'failover': [], 'ready': [], 'answered': [],
                                                'turn': []}
                tokens: Dict[str, List[int]] = {'turn': [], 'answered': []}
                blocks: List[str] = []
                at_once_failed: List[str] = []
                unprovoked: List[str] = []
                errors: List[str] = []
                for _ in range(args.runs):
                    probe.wait(serving, 120, 'the graph serving')
                    for _ in range(3):
                        t0 = time.monotonic()
                        r = turn(text)
                        if r.status == r.STATUS_OK:
                            break
                        # Nothing was killed: a false "gone" on an overloaded machine.
                        unprovoked.append(r.error)
                        probe.wait(serving, 120, 'the graph serving')
                    assert r.status == r.STATUS_OK, r.error
                    rows['turn'].append(time.monotonic() - t0)
                    tokens['turn'].append(r.completion_tokens)
                    oid = probe.send(text)
                    try:
                        probe.wait(lambda: fqn in probe.beats
                                   and probe.beats[fqn].goals_active > 0 and probe.alive(fqn),
                                   60, f'{node} busy')
                    except AssertionError:
                        state = probe.state
                        raise AssertionError(
                            f'{node} never busy; response: {probe.response_to(oid)}; kernel: '
                            f'{state.last_decision if state else None}') from None
                    probe.spin(0.5)
                    old = probe.beats[fqn].instance_id
                    os.kill(child_pid(output, node), signal.SIGKILL)
                    killed = time.monotonic()
                    failed = probe.wait_response(oid, 60)
                    rows['failover'].append(time.monotonic() - killed)
                    errors.append(failed.error if failed.status == failed.STATUS_FAILED
                                  else f'status {failed.status}')
                    nxt = probe.send(text)   # at once: it should wait for the graph
                    probe.wait(lambda: probe.beats[fqn].instance_id != old and serving(), 120,
                               f'{node} back')
                    rows['ready'].append(time.monotonic() - killed)
                    answer = probe.wait_response(nxt, 300)
                    for _ in range(3):
                        if answer.status == answer.STATUS_OK:
                            break
                        # Failed instead of waiting (a race: see the report); ask again now.
                        at_once_failed.append(answer.error)
                        probe.wait(serving, 120, 'the graph serving')
                        answer = turn(text)
                    assert answer.status == answer.STATUS_OK, answer.error
                    rows['answered'].append(time.monotonic() - killed)
                    tokens['answered'].append(answer.completion_tokens)
                    blocks.append(answer.block)
                results[node] = {**{f'{k}_s' if k == 'turn' else k: spread(v)
                                    for k, v in rows.items()},
                                 'completion_tokens': {k: v for k, v in tokens.items()},
                                 'next_turn_answered_by': sorted(set(blocks)),
                                 'failure_reasons': sorted(set(errors)),
                                 'next_turn_failed_instead_of_waiting': len(at_once_failed),
                                 'next_turn_failure_reasons': sorted(set(at_once_failed)),
                                 'baseline_turns_failed': len(unprovoked),
                                 'baseline_failure_reasons': sorted(set(unprovoked))}
                print(f'{node}: failover {results[node]["failover"]["median_s"]} s, ready '
                      f'{results[node]["ready"]["median_s"]} s, answered '
                      f'{results[node]["answered"]["median_s"]} s', file=sys.stderr, flush=True)
        finally:
            probe.close()
            stop(proc, output=output)
            if lock is not None:
                lock.close()
    report('liveness', {'runs': args.runs, 'tokens': args.tokens,
                        'respawn_delay_s': args.respawn_delay, 'mode': 'sage up --processes',
                        'models': 'tiny random Qwen2 (2 layers, hidden 64), CPU',
                        'results': results})


if __name__ == '__main__':
    main()
