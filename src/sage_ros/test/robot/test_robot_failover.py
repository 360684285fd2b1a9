"""Under the real `ros2 launch`: kill -9 a node in the middle of a long answer.

The turn it was working on fails at once with a clear reason (heartbeats, not a 300 s deadline),
launch starts the node again (`respawn`; a model manager is configured and activated again by
the launch's lifecycle events), the graph gets ready again and the next turn is answered.
Tiny random models with answers of 2000 tokens, so a generation is still running when the node
is killed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List

import pytest

from graph_support import Probe, long_answer_params
from robot_support import (Launch, RobotShell, robot_domain, shell, workspace,  # noqa: F401
                           write_params)

pytestmark = pytest.mark.robot

NS = '/robot1'
TOKENS = 2000
FAILED_WITHIN_S = 10.0      # the bound: a gone node's turn fails within 10 s
BACK_WITHIN_S = 30.0        # ... and the node is back (respawned, ready) within 30 s
ANSWER_TIMEOUT_S = 300.0    # a 2000-token answer of the tiny model on a loaded CI machine


CASES = {
    # node executable: (what to say, the node's block as the Response names it)
    'language_block': ('hello robot, tell me about your day', 'language'),
    'model_manager': ('hello robot, tell me about your day', 'language'),
    'reasoning_block': ('Design a plan to tidy the kitchen table, then explain each step.',
                        'reasoning'),
}


@pytest.mark.parametrize('executable', sorted(CASES))
def test_a_killed_node_fails_its_turn_comes_back_and_serves(
        executable: str, shell: RobotShell, tiny_models: Dict[str, Path],
        tmp_path: Path) -> None:
    from sage_interfaces.msg import Response, ResponseChunk

    from sage_ros import names
    say, block = CASES[executable]
    params = long_answer_params(tiny_models, TOKENS, {
        'kernel:routing.reasoning_min_salience': 0.0,   # every complex turn goes to reasoning
        'reasoning_block:tokens.decompose': TOKENS // 4,   # long steps: still running when
        'reasoning_block:tokens.solve': TOKENS // 2,       # the block is killed
        'reasoning_block:tokens.integrate': TOKENS,
    })
    params['/**/text_sensor']['ros__parameters']['source'] = 'topic'
    launch = Launch(shell, 'demo.launch.py', f'namespace:={NS}', 'respawn_delay:=1.0',
                    f'params_file:={write_params(tmp_path / "long.yaml", params)}')
    probe = Probe(shell.domain, NS)
    chunks: List[ResponseChunk] = []
    probe.node.create_subscription(ResponseChunk, probe.fqn(names.RESPONSE_STREAM),
                                   chunks.append, 100)
    try:
        probe.wait_ready(180.0)
        first_pid = launch.wait_started(executable, 1, 5.0)
        fqn = probe.fqn(executable)
        # The kernel sends a complex turn to reasoning only while that block serves.
        probe.wait(lambda: fqn in probe.beats and probe.beats[fqn].ready and probe.ready()
                   and probe.state is not None and block in probe.state.blocks, 60.0,
                   f'{fqn} ready (its heartbeat) and the kernel routing to {block}')
        oid = probe.send(say)
        # In the middle of the answer: the node works on a goal (its heartbeat says so) and,
        # for a language answer, text has started streaming.
        probe.wait(lambda: probe.beats[fqn].goals_active > 0 and (
            block != 'language' or any(c.observation_id == oid for c in chunks)), 60.0,
            f'{fqn} working on the turn')
        assert probe.response_to(oid) is None, 'answered before the kill: make answers longer'

        old_instance = probe.beats[fqn].instance_id
        launch.kill_node(executable)
        killed = time.monotonic()
        failed = probe.wait_response(oid, FAILED_WITHIN_S + 5.0)
        took = time.monotonic() - killed
        assert failed.status == Response.STATUS_FAILED, (failed.status, failed.error)
        assert failed.error, 'a failed turn says why'
        assert took < FAILED_WITHIN_S, f'failed after {took:.1f} s: {failed.error}'

        new_pid = launch.wait_started(executable, 2, BACK_WITHIN_S)
        assert new_pid != first_pid
        def back() -> bool:
            beat = probe.beats.get(fqn)
            return (beat is not None and beat.instance_id != old_instance and beat.ready
                    and probe.ready() and probe.state is not None and block in probe.state.blocks)
        probe.wait(back, max(1.0, BACK_WITHIN_S - (time.monotonic() - killed)),
                   f'{executable} back (a new instance, ready) and the kernel routing to {block}')

        # The next turn needs no long answer: shorten it the robot way, at run time (once the
        # daemon `ros2 param` asks knows the kernel).
        assert f'{NS}/kernel' in shell.node_list({f'{NS}/kernel'})
        for name, value in (('atp.answer_tokens', '32'), ('routing.reasoning_grant', '10.0')):
            out = shell.param_set(f'{NS}/kernel', name, value)
            assert 'Set parameter successful' in out, out
        again = probe.send(say)
        answer = probe.wait_response(again, ANSWER_TIMEOUT_S)
        assert answer.status == Response.STATUS_OK, (answer.status, answer.error)
        assert answer.block == block
    except AssertionError as exc:
        raise AssertionError(f'{exc}\n--- launch output ---\n{launch.text()[-4000:]}') from None
    finally:
        probe.close()
        launch.close()
