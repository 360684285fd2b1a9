"""Nodes in one process over real rclpy (discovery off): lifecycle, actions, the text path."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lifecycle_msgs.msg import State
from rclpy.action import ActionClient
from sage_interfaces.action import Generate, SwapModel
from sage_interfaces.msg import ChatMessage, KernelState, ModelStatus, Response, Salience
from std_msgs.msg import String

from node_harness import Harness, send_goal, wait_for
from sage_ros import graph, names
from sage_ros.nodes.common import LATCHED, RELIABLE
from sage_ros.nodes.model_manager import ModelManagerNode


def test_model_manager_lifecycle_and_actions(harness: Callable[..., Harness]) -> None:
    h = harness((graph.MODEL_MANAGER,), **{'model_manager:autostart': False})
    mm = h.node(ModelManagerNode)
    assert isinstance(mm, ModelManagerNode)
    status = h.collect(ModelStatus, names.MODELS_STATUS, LATCHED)
    gen = ActionClient(h.probe, Generate, names.MODEL_GENERATE)
    swap = ActionClient(h.probe, SwapModel, names.MODEL_SWAP)
    hello = Generate.Goal(role='small', messages=[ChatMessage(role='user', content='hello')])

    accepted, _, _ = send_goal(gen, hello)
    assert not accepted, 'generate must be closed before activation'

    mm.trigger_configure()
    assert mm._state_machine.current_state[1] == 'inactive'
    assert not send_goal(gen, hello)[0], 'generate must stay closed while inactive'
    mm.trigger_activate()
    wait_for(lambda: status and status[-1].lifecycle_state == 'active', what='active status')
    wait_for(lambda: [m.role for m in status[-1].loaded] == ['small'], what='default role loaded')

    ok, result, feedback = send_goal(gen, hello)
    assert ok and result.error_code == Generate.Result.NONE
    assert result.model == 'tiny-small' and not result.swapped and result.completion_tokens == 8
    # Feedback and result travel separately: the last feedback may arrive after the result.
    # Stopped at max_new_tokens without EOS (the tiny models never end): shortened, and the
    # text is what streamed, cut back to its last sentence end when it has one.
    assert result.truncated
    wait_for(lambda: ''.join(f.text for f in feedback).strip().startswith(result.text),
             what='every streamed piece')
    assert len(feedback) > 1
    wait_for(lambda: not status[-1].busy, what='idle status after generate')
    assert any(m.busy for m in status), 'status must show the manager busy while generating'

    ok, result, feedback = send_goal(swap, SwapModel.Goal(role='large', reason='test'))
    assert ok and result.error_code == SwapModel.Result.NONE and result.model == 'tiny-large'
    wait_for(lambda: feedback[-1].stage == 'done', what='the final progress feedback')
    assert feedback[-1].progress == 1.0
    wait_for(lambda: [m.role for m in status[-1].loaded] == ['large'], what='large loaded')
    assert status[-1].last_swap.from_role == 'small' and status[-1].last_swap.to_role == 'large'

    ok, result, _ = send_goal(gen, Generate.Goal(role='nope', messages=hello.messages))
    assert ok and result.error_code == Generate.Result.UNKNOWN_ROLE and 'nope' in result.error_msg

    mm.trigger_deactivate()
    mm.trigger_cleanup()
    wait_for(lambda: status[-1].lifecycle_state == 'unconfigured' and not status[-1].loaded,
             what='models unloaded on cleanup')


def test_model_manager_configure_fails_clearly_on_a_missing_model(
        harness: Callable[..., Harness], tmp_path: Path) -> None:
    # A missing model falls back to the next role; configure fails when no role has a model.
    h = harness((graph.MODEL_MANAGER,), **{'model_manager:autostart': False,
                                          'model_manager:models.small.path': str(tmp_path / 'none'),
                                          'model_manager:models.large.path': str(tmp_path / 'none')})
    mm = h.node(ModelManagerNode)
    status = h.collect(ModelStatus, names.MODELS_STATUS, LATCHED)
    assert isinstance(mm, ModelManagerNode)
    mm.trigger_configure()
    assert mm._state_machine.current_state[0] == State.PRIMARY_STATE_UNCONFIGURED
    wait_for(lambda: status and 'not found' in status[-1].error, what='error in status')


def test_text_in_to_response_through_kernel_language_block_and_model_manager(
        harness: Callable[..., Harness]) -> None:
    # The swap policy would let the resident large model answer the later simple turns; this
    # test follows the requested roles, so it turns stand-ins off. The circadian clock is off:
    # by day it lowers the focus threshold to below these turns' salience.
    h = harness((graph.KERNEL, graph.LANGUAGE_BLOCK, graph.MODEL_MANAGER),
                **{'model_manager:policy.substitute': False,
                   'kernel:metabolism.circadian_period_s': 0.0})
    responses = h.collect(Response, names.RESPONSE)
    salience = h.collect(Salience, names.SALIENCE)
    states = h.collect(KernelState, names.STATE, LATCHED)
    wait_for(lambda: states and 'language' in states[-1].blocks, what='kernel knows the block')
    pub = h.probe.create_publisher(String, names.TEXT_IN, RELIABLE)
    models = h.collect(ModelStatus, names.MODELS_STATUS, LATCHED)
    wait_for(lambda: models and models[-1].lifecycle_state == 'active', what='model manager active')

    lines = ['hello', 'Design a charging schedule for the robot', '', 'x' * 1_000_000,
             'ctrl\x07 chars\x1b[31m\x7f', 'what did I say first?']
    for line in lines:
        pub.publish(String(data=line))
    wait_for(lambda: len(responses) == len(lines), 120, 'a response per observation')
    by_turn = {r.turn_id: r for r in responses}
    ids = sorted(by_turn)      # unique across kernel restarts: they start at wall ms * 1000
    assert ids == list(range(ids[0], ids[0] + len(lines)))
    r = [by_turn[i] for i in ids]
    assert r[0].status == Response.STATUS_OK and r[0].role == 'small' and r[0].completion_tokens == 8
    assert r[0].model == 'tiny-small' and r[0].complexity == 'simple' and r[0].latency_s > 0
    assert r[1].status == Response.STATUS_OK and r[1].role == 'large' and r[1].swapped
    assert r[2].status == Response.STATUS_REJECTED and 'empty' in r[2].error
    assert r[3].status == Response.STATUS_REJECTED and 'too long' in r[3].error
    assert r[4].status == Response.STATUS_OK and r[4].input_text == 'ctrl chars[31m'
    assert r[4].role == 'small' and r[4].swapped           # back to small after the large turn
    assert r[5].status == Response.STATUS_OK and r[5].role == 'small' and not r[5].swapped
    # rejected input is not scored
    assert sorted(s.turn_id - ids[0] + 1 for s in salience) == [1, 2, 5, 6]
    assert all(x.truncated for x in r if x.status == Response.STATUS_OK)
    wait_for(lambda: states[-1].active_dispatches == 0, what='dispatches settled')
    last = states[-1]
    assert last.observations_total == 6 and last.rejected_total == 2 and last.dispatches_total == 4
    assert last.metabolic_state == 'WAKE' and last.atp_level < last.atp_capacity
    assert {t.name for t in last.trust} == {'language', 'text'}
