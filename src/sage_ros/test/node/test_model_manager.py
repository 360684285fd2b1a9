"""Model manager node over real rclpy: a truthful lifecycle (configure returns once loaded,
with services answering meanwhile; deactivate answers goals; cleanup frees), one FIFO for
generate and swap with cancel of a waiting goal, a bounded destroy, the heartbeat, swap
progress and cancel, fallback in results and status, every status field, run-time parameter
changes, swap history kept across restarts, and infer on the non-chat entries (real whisper and
Haar cascade): kinds in status, eviction of the chat model under a budget, refusals."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import rclpy
import yaml
from lifecycle_msgs.msg import Transition
from action_msgs.msg import GoalStatus
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.action import ActionClient
from rclpy.context import Context
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from sage_interfaces.action import Generate, Infer, SwapModel
from sage_interfaces.msg import ChatMessage, Heartbeat, ModelStatus

from conftest import params_for
from sage_ros import graph, names
from sage_ros.cli.graph_runner import context_args
from sage_ros.nodes.common import LATCHED, ConfigError
from sage_ros.nodes.liveness import HEARTBEAT_QOS
from sage_ros.nodes.model_manager import ModelManagerNode
from node_harness import Harness, LoadGate, call, send_goal, wait_for

HELLO = [ChatMessage(role='user', content='hello')]
MM = (graph.MODEL_MANAGER,)


def transition(h: Harness, transition_id: int) -> bool:
    req = ChangeState.Request(transition=Transition(id=transition_id))
    return bool(call(h, ChangeState, f'{names.MODEL_MANAGER}/change_state', req).success)


def set_params(h: Harness, **values: object) -> List[Any]:
    req = SetParameters.Request(parameters=[Parameter(k.replace('__', '.'), value=v)
                                            .to_parameter_msg() for k, v in values.items()])
    return list(call(h, SetParameters, f'{names.MODEL_MANAGER}/set_parameters', req).results)


def started(make: Callable[..., Harness], **overrides: object) -> tuple[Harness, ModelManagerNode,
                                                                        List[ModelStatus]]:
    h = make(MM, **overrides)
    mm = h.node(ModelManagerNode)
    assert isinstance(mm, ModelManagerNode)
    status = h.collect(ModelStatus, names.MODELS_STATUS, LATCHED)
    wait_for(lambda: status and status[-1].lifecycle_state == 'active' and status[-1].loaded
             and not status[-1].busy, what='default role loaded')
    return h, mm, status


def call_async(h: Harness, srv_type: Any, name: str, request: Any) -> Any:
    client = h.probe.create_client(srv_type, name)
    assert client.wait_for_service(timeout_sec=10.0)
    return client.call_async(request)


def test_configure_returns_once_loaded_and_services_answer_meanwhile(
        harness: Callable[..., Harness]) -> None:
    h = harness(MM, **{'model_manager:autostart': False})
    mm = h.node(ModelManagerNode)
    assert isinstance(mm, ModelManagerNode)
    status = h.collect(ModelStatus, names.MODELS_STATUS, LATCHED)
    beats = h.collect(Heartbeat, names.HEARTBEAT, HEARTBEAT_QOS)
    wait_for(lambda: beats, what='a heartbeat')
    assert not beats[-1].ready and 'unconfigured' in beats[-1].not_ready_reason
    gate = LoadGate(mm, 'small')
    configuring = call_async(h, ChangeState, f'{names.MODEL_MANAGER}/change_state',
                             ChangeState.Request(transition=Transition(
                                 id=Transition.TRANSITION_CONFIGURE)))
    wait_for(gate.held.is_set, what='load held')
    # The transition is still running: lifecycle and parameter services answer meanwhile.
    state = call(h, GetState, f'{names.MODEL_MANAGER}/get_state', GetState.Request())
    assert state.current_state.label == 'configuring' and not configuring.done()
    got = call(h, GetParameters, f'{names.MODEL_MANAGER}/get_parameters',
               GetParameters.Request(names=['default_role']))
    assert got.values[0].string_value == 'small'
    assert not transition(h, Transition.TRANSITION_ACTIVATE), 'no activate while configuring'
    wait_for(lambda: status[-1].loading_role == 'small' and status[-1].busy
             and status[-1].lifecycle_state == 'configuring', what='loading status')
    gate.open()
    wait_for(configuring.done, 60.0, 'configure returned')
    assert configuring.result().success
    assert [m.role for m in status[-1].loaded] == ['small'], 'configure returns once loaded'
    assert status[-1].lifecycle_state == 'inactive'
    assert not send_goal(ActionClient(h.probe, Generate, names.MODEL_GENERATE),
                         Generate.Goal(role='small', messages=HELLO))[0], 'closed while inactive'
    assert transition(h, Transition.TRANSITION_ACTIVATE)
    wait_for(lambda: beats[-1].ready, what='ready heartbeat once active with a model')
    ok, result, _ = send_goal(ActionClient(h.probe, Generate, names.MODEL_GENERATE),
                              Generate.Goal(role='small', messages=HELLO))
    assert ok and result.error_code == Generate.Result.NONE and result.role == 'small'
    assert not result.swapped and result.requested_role == 'small' and result.fallback == ''


def test_configure_fails_with_the_reason_when_nothing_loads(
        harness: Callable[..., Harness], tiny_models: Dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / 'bad'
    shutil.copytree(tiny_models['small'], bad)
    (bad / 'tokenizer.json').write_text('{not json')      # files present, load fails
    h = harness(MM, **{'model_manager:autostart': False,
                       'model_manager:models.small.path': str(bad),
                       'model_manager:models.large.path': str(bad)})
    mm = h.node(ModelManagerNode)
    assert isinstance(mm, ModelManagerNode)
    status = h.collect(ModelStatus, names.MODELS_STATUS, LATCHED)
    assert not transition(h, Transition.TRANSITION_CONFIGURE)
    state = call(h, GetState, f'{names.MODEL_MANAGER}/get_state', GetState.Request())
    assert state.current_state.label == 'unconfigured' and mm.pool is None
    wait_for(lambda: status and 'tokenizer' in status[-1].error
             and status[-1].lifecycle_state == 'unconfigured', what='the reason in status')


def test_deactivate_answers_waiting_goals_and_stops_the_running_one_cleanup_frees(
        harness: Callable[..., Harness]) -> None:
    h, mm, status = started(harness, **{'model_manager:policy.substitute': False})
    gate = LoadGate(mm, 'large')
    swap = ActionClient(h.probe, SwapModel, names.MODEL_SWAP)
    gen = ActionClient(h.probe, Generate, names.MODEL_GENERATE)
    assert swap.wait_for_server(timeout_sec=10.0) and gen.wait_for_server(timeout_sec=10.0)
    running = swap.send_goal_async(SwapModel.Goal(role='large', reason='held'))
    wait_for(gate.held.is_set, what='swap held')
    waiting = gen.send_goal_async(Generate.Goal(role='small', messages=HELLO))
    wait_for(waiting.done, what='waiting goal accepted')
    waiting_result = waiting.result().get_result_async()
    wait_for(lambda: mm.queue.counts() == (1, 1), what='one running, one waiting')
    deactivating = call_async(h, ChangeState, f'{names.MODEL_MANAGER}/change_state',
                              ChangeState.Request(transition=Transition(
                                  id=Transition.TRANSITION_DEACTIVATE)))
    wait_for(waiting_result.done, what='the waiting goal answered at once')
    res = waiting_result.result().result
    assert res.error_code == Generate.Result.INACTIVE and 'deactivated' in res.error_msg
    gate.open()                    # the held load sees the stop at its next step
    wait_for(deactivating.done, 30.0, 'deactivate returned')
    assert deactivating.result().success
    running_result = running.result().get_result_async()
    wait_for(running_result.done, what='the running goal answered')
    assert running_result.result().result.error_code == SwapModel.Result.INACTIVE
    assert mm.queue.idle()
    assert transition(h, Transition.TRANSITION_CLEANUP)
    # cleanup returned: the models are gone already, not in a moment
    assert mm.pool is None and not mm._retiring
    wait_for(lambda: status[-1].lifecycle_state == 'unconfigured' and not status[-1].loaded
             and not status[-1].busy, what='nothing loaded after cleanup')


def test_goals_wait_in_fifo_order_and_a_waiting_goal_can_be_cancelled(
        harness: Callable[..., Harness]) -> None:
    h, mm, status = started(harness, **{'model_manager:policy.substitute': False})
    beats = h.collect(Heartbeat, names.HEARTBEAT, HEARTBEAT_QOS)
    gate = LoadGate(mm, 'large')
    swap = ActionClient(h.probe, SwapModel, names.MODEL_SWAP)
    gen = ActionClient(h.probe, Generate, names.MODEL_GENERATE)
    assert swap.wait_for_server(timeout_sec=10.0) and gen.wait_for_server(timeout_sec=10.0)
    done_order: List[str] = []
    first = swap.send_goal_async(SwapModel.Goal(role='large', reason='held'))
    wait_for(gate.held.is_set, what='swap held')
    handles, results = {}, {}
    for name in ('a', 'b', 'c'):
        sent = gen.send_goal_async(Generate.Goal(role='large', messages=HELLO))
        wait_for(sent.done, what=f'goal {name} accepted')
        handles[name] = sent.result()
        results[name] = handles[name].get_result_async()
        results[name].add_done_callback(lambda _, n=name: done_order.append(n))
    wait_for(lambda: mm.queue.counts() == (1, 3), what='three waiting')
    wait_for(lambda: beats and (beats[-1].goals_active, beats[-1].goals_queued) == (1, 3),
             what='goal counts in the heartbeat')
    cancelling = handles['b'].cancel_goal_async()
    wait_for(cancelling.done, what='cancel answered')
    wait_for(lambda: done_order == ['b'], what='the cancelled goal answered while the swap holds')
    b = results['b'].result()
    assert b.result.error_code == Generate.Result.CANCELLED
    assert b.status == GoalStatus.STATUS_CANCELED
    gate.open()
    first_result = first.result().get_result_async()
    wait_for(first_result.done, 30.0, 'swap done')
    wait_for(lambda: len(done_order) == 3, 60.0, 'the others answered')
    assert done_order == ['b', 'a', 'c'], 'answered in the order they came'
    for name in ('a', 'c'):
        r = results[name].result().result
        assert r.error_code == Generate.Result.NONE and r.role == 'large' and not r.swapped


def test_destroy_node_is_bounded_during_a_held_load(harness: Callable[..., Harness]) -> None:
    h, mm, status = started(harness)
    gate = LoadGate(mm, 'large')
    swap = ActionClient(h.probe, SwapModel, names.MODEL_SWAP)
    assert swap.wait_for_server(timeout_sec=10.0)
    swap.send_goal_async(SwapModel.Goal(role='large', reason='held'))
    wait_for(gate.held.is_set, what='swap held')
    h.executor.remove_node(mm)
    h.nodes.remove(mm)
    t0 = time.monotonic()
    mm.destroy_node()   # the goal is stuck in the gate: destroy must not wait for it
    assert time.monotonic() - t0 < 6.0
    gate.open()


def test_swap_streams_bytes_and_shards_and_can_be_cancelled(
        harness: Callable[..., Harness], tiny_models: Dict[str, Path]) -> None:
    h, mm, status = started(harness, **{'model_manager:preread_chunk_mib': 1})
    swap = ActionClient(h.probe, SwapModel, names.MODEL_SWAP)
    ok, result, feedback = send_goal(swap, SwapModel.Goal(role='large', reason='test'))
    size = (tiny_models['large'] / 'model.safetensors').stat().st_size
    assert ok and result.error_code == SwapModel.Result.NONE and result.memory_bytes > 0
    reads = [f for f in feedback if f.stage == 'weights']
    assert reads[-1].bytes_done == reads[-1].bytes_total == size
    assert (reads[-1].shards_done, reads[-1].shards_total) == (1, 1)
    assert feedback[-1].stage == 'done' and feedback[-1].progress == 1.0
    wait_for(lambda: [m.role for m in status[-1].loaded] == ['large'], what='large loaded')

    gate = LoadGate(mm, 'small')
    assert swap.wait_for_server(timeout_sec=10.0)
    sent = swap.send_goal_async(SwapModel.Goal(role='small', reason='to be cancelled'))
    wait_for(gate.held.is_set, what='swap held')
    handle = sent.result()
    result_future = handle.get_result_async()
    cancelling = handle.cancel_goal_async()
    wait_for(cancelling.done, what='cancel accepted')
    gate.open()
    wait_for(result_future.done, 30.0, 'cancelled result')
    assert result_future.result().result.error_code == SwapModel.Result.CANCELLED
    wait_for(lambda: not status[-1].busy, what='idle')
    assert [m.role for m in status[-1].loaded] == ['large'], 'the resident model stays'
    assert not status[-1].history[0].succeeded and 'cancelled' in status[-1].history[0].error


def test_a_corrupt_model_falls_back_and_says_so(
        harness: Callable[..., Harness], tiny_models: Dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / 'bad-large'
    shutil.copytree(tiny_models['large'], bad)
    weights = (bad / 'model.safetensors').read_bytes()
    (bad / 'model.safetensors').write_bytes(weights[:len(weights) // 3])
    h, mm, status = started(harness, **{'model_manager:models.large.path': str(bad)})
    gen = ActionClient(h.probe, Generate, names.MODEL_GENERATE)
    ok, result, _ = send_goal(gen, Generate.Goal(role='large', messages=HELLO))
    assert ok and result.error_code == Generate.Result.NONE and result.text is not None
    assert (result.role, result.requested_role, result.model) == ('small', 'large', 'tiny-small')
    assert 'truncated' in result.fallback and "answered with 'small'" in result.fallback
    wait_for(lambda: 'truncated' in status[-1].error and not status[-1].busy, what='error status')
    failed = status[-1].history[0]
    assert (failed.to_role, failed.succeeded) == ('large', False) and 'truncated' in failed.error
    ok, result, _ = send_goal(gen, Generate.Goal(role='small', messages=HELLO))
    assert ok and result.role == 'small' and result.fallback == '', 'the session continues'
    ok, result, _ = send_goal(ActionClient(h.probe, SwapModel, names.MODEL_SWAP),
                              SwapModel.Goal(role='large'))
    assert ok and result.error_code == SwapModel.Result.LOAD_FAILED
    assert 'truncated' in result.error_msg


def test_status_fills_every_field(harness: Callable[..., Harness]) -> None:
    h, mm, status = started(harness, **{'model_manager:memory_budget_gib': 1.0,
                                        'model_manager:models.small.keep_resident': True})
    gen = ActionClient(h.probe, Generate, names.MODEL_GENERATE)
    assert send_goal(gen, Generate.Goal(role='small', messages=HELLO))[0]
    assert send_goal(gen, Generate.Goal(role='large', messages=HELLO))[0]
    wait_for(lambda: not status[-1].busy and status[-1].loaded[0].uses == 1, what='settled')
    s = status[-1]
    assert s.lifecycle_state == 'active' and s.default_role == 'small' and s.error == ''
    assert list(s.available_roles) == ['small', 'large', 'speech', 'vision', 'embedder']
    assert s.loading_role == ''
    assert s.memory_budget_bytes == 1 << 30 and s.memory_available_bytes > 0
    assert [m.role for m in s.loaded] == ['large'] and not s.loaded[0].keep_resident
    assert s.memory_used_bytes == s.loaded[0].memory_bytes > 0
    assert s.swap_count == 2 and [r.to_role for r in s.history] == ['large', 'small']
    newest = s.history[0]
    assert newest == s.last_swap and newest.succeeded and newest.evicted == ['small']
    assert newest.from_role == 'small' and newest.memory_bytes == s.loaded[0].memory_bytes
    assert newest.bytes_read > 0 and newest.duration_s > 0 and newest.reason
    assert s.loaded[0].load_duration_s > 0 and s.loaded[0].loaded_at.sec > 0


def test_model_entries_change_at_run_time(
        harness: Callable[..., Harness], tiny_models: Dict[str, Path], tmp_path: Path) -> None:
    h, mm, status = started(harness)
    moved = tmp_path / 'moved-small'
    shutil.copytree(tiny_models['small'], moved)
    results = set_params(h, models__small__path=str(moved))
    assert results[0].successful
    wait_for(lambda: status[-1].loaded and status[-1].loaded[0].path == str(moved)
             and not status[-1].busy, what='default role reloaded from its new path')
    assert status[-1].history[0].reason == 'configuration changed'
    assert status[-1].history[0].evicted == ['small']

    for name, value, why in (('models__small__path', str(tmp_path / 'nowhere'), 'not found'),
                             ('models__large__dtype', 'int7', 'unknown dtype'),
                             ('models__large__device', 'tpu', 'unknown device'),
                             ('models__small__fallback', ['small'], 'not other configured roles'),
                             ('models__speech__dtype', 'bfloat16', 'for a speech model'),
                             ('models__speech__fallback', ['small'], 'do not mix'),
                             ('models__speech__kind', 'chat', 'read-only'),
                             ('roles', ['a'], 'read-only')):
        r = set_params(h, **{name: value})[0]
        assert not r.successful and why in r.reason, (name, r.reason)
    assert set_params(h, policy__min_dwell_s=0.0, max_resident=2)[0].successful
    assert mm.pool is not None and mm.pool.policy.config.min_dwell_s == 0.0
    assert mm.pool.max_resident == 2


def test_swap_history_survives_a_restart(tiny_models: Dict[str, Path], tmp_path: Path,
                                         harness: Callable[..., Harness]) -> None:
    first = Harness(params_for(tiny_models), tmp_path, MM)
    try:
        status = first.collect(ModelStatus, names.MODELS_STATUS, LATCHED)
        wait_for(lambda: status and status[-1].lifecycle_state == 'active'
                 and status[-1].loaded and not status[-1].busy, what='active, loaded')
        ok, _, _ = send_goal(ActionClient(first.probe, SwapModel, names.MODEL_SWAP),
                             SwapModel.Goal(role='large', reason='before restart'))
        assert ok
    finally:
        first.close()
    h, mm, status = started(harness)
    wait_for(lambda: status[-1].swap_count == 3, what='count continues')
    assert [(r.to_role, r.reason) for r in status[-1].history] == [
        ('small', 'configure'), ('large', 'before restart'), ('small', 'configure')]


def test_a_default_role_outside_the_roles_is_one_clear_error(
        tiny_models: Dict[str, Path], tmp_path: Path) -> None:
    pf = tmp_path / 'bad.yaml'
    params = params_for(tiny_models, **{'model_manager:default_role': 'medium'})
    pf.write_text(yaml.safe_dump(params))
    context = Context()
    rclpy.init(args=context_args(names.DEFAULT_NAMESPACE, pf), context=context)
    try:
        with pytest.raises(ConfigError, match="default_role 'medium' is not one of the roles"):
            ModelManagerNode(context=context)
    finally:
        rclpy.try_shutdown(context=context)


def test_goals_beyond_max_goals_are_refused(harness: Callable[..., Harness]) -> None:
    h, mm, status = started(harness, **{'model_manager:max_goals': 1,
                                        'model_manager:policy.substitute': False})
    gate = LoadGate(mm, 'large')
    gen = ActionClient(h.probe, Generate, names.MODEL_GENERATE)
    outcome: List[Any] = []
    first = threading.Thread(target=lambda: outcome.append(send_goal(gen, Generate.Goal(
        role='large', messages=HELLO))))
    first.start()                 # holds the one slot while its swap to large is held
    wait_for(gate.held.is_set, what='swap held')
    accepted, _, _ = send_goal(gen, Generate.Goal(role='small', messages=HELLO))
    assert not accepted, 'a second goal must be refused while max_goals are in flight'
    gate.open()
    first.join(60.0)
    assert outcome and outcome[0][0] and outcome[0][1].role == 'large'
    ok, result, _ = send_goal(gen, Generate.Goal(role='large', messages=HELLO))
    assert ok and result.error_code == Generate.Result.NONE, 'the slot is free again'


def _cuda() -> bool:
    import torch
    return bool(torch.cuda.is_available())


@pytest.mark.skipif(_cuda(), reason='checks the fallback on a machine without CUDA')
def test_a_cuda_entry_loads_on_the_cpu_without_cuda_or_fails_clearly(
        harness: Callable[..., Harness]) -> None:
    h, mm, status = started(harness, **{'model_manager:models.small.device': 'cuda',
                                        'model_manager:models.large.device': 'auto'})
    assert [(m.role, m.device) for m in status[-1].loaded] == [('small', 'cpu')]
    ok, result, _ = send_goal(ActionClient(h.probe, SwapModel, names.MODEL_SWAP),
                              SwapModel.Goal(role='large'))
    assert ok and result.error_code == SwapModel.Result.NONE
    wait_for(lambda: [(m.role, m.device) for m in status[-1].loaded] == [('large', 'cpu')],
             what='auto = cpu here')

    strict = harness(MM, **{'model_manager:autostart': False, 'model_manager:cpu_fallback': False,
                            'model_manager:models.small.device': 'cuda',
                            'model_manager:models.large.device': 'cuda'})
    node = strict.node(ModelManagerNode)
    assert isinstance(node, ModelManagerNode)
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert node.pool is None and 'CUDA is not available' in node._error


# ---- infer: the non-chat entries (real faster-whisper base, OpenCV's Haar cascade) ----------
def _pcm16(path: Path) -> bytes:
    from sage_ros.core.perception.audio import read_wav, to_pcm16
    samples, rate = read_wav(path)
    assert rate == 16000
    return to_pcm16(samples)


def _infer(h: Harness, goal: Infer.Goal, timeout: float = 120.0) -> Any:
    ok, result, feedback = send_goal(ActionClient(h.probe, Infer, names.MODEL_INFER), goal,
                                     timeout)
    assert ok, 'infer goal refused'
    return result, feedback


@pytest.mark.slow
def test_infer_transcribes_speech_and_detects_a_face_next_to_the_chat_model(
        harness: Callable[..., Harness], tmp_path: Path) -> None:
    from media_support import astronaut_jpeg, speak
    h, mm, status = started(harness)
    assert list(status[-1].available_roles) == ['small', 'large', 'speech', 'vision',
                                                 'embedder']
    wav = speak('the red cup is on the kitchen table', tmp_path / 'cup.wav')
    result, feedback = _infer(h, Infer.Goal(role='speech', task='transcribe',
                                            audio=_pcm16(wav), sample_rate=16000))
    assert result.error_code == Infer.Result.NONE, result.error_msg
    assert result.role == result.requested_role == 'speech' and result.kind == 'speech'
    assert result.model == 'faster-whisper-base' and result.fallback == ''
    assert result.swapped and result.load_s > 0 and result.run_s > 0
    assert result.text.strip() and result.language == 'en'
    assert list(result.evicted) == [], 'no budget: the chat model stays'
    stages = [f.stage for f in feedback]
    assert 'loading' in stages and stages[-1] == 'running' and feedback[-1].progress == 1.0

    photo = astronaut_jpeg(tmp_path / 'astronaut.jpg')
    result, _ = _infer(h, Infer.Goal(role='vision', task='detect', image_format='jpeg',
                                     image_data=photo.read_bytes()))
    assert result.error_code == Infer.Result.NONE, result.error_msg
    assert result.kind == 'vision' and result.model == 'opencv-haar-frontalface'
    assert [d.label for d in result.detections] == ['face']
    face = result.detections[0]
    assert 0.0 <= face.score <= 1.0 and face.width > 0 and face.height > 0
    assert result.text.strip(), 'the scene description'

    again, _ = _infer(h, Infer.Goal(role='speech', task='transcribe', audio=_pcm16(wav),
                                    sample_rate=16000))
    assert again.error_code == Infer.Result.NONE and not again.swapped and again.load_s == 0
    wait_for(lambda: not status[-1].busy and len(status[-1].loaded) == 3, what='settled')
    kinds = {m.role: m.kind for m in status[-1].loaded}
    assert kinds == {'small': 'chat', 'speech': 'speech', 'vision': 'vision'}
    assert {m.role: m.uses for m in status[-1].loaded}['speech'] == 2
    ok, gen, _ = send_goal(ActionClient(h.probe, Generate, names.MODEL_GENERATE),
                           Generate.Goal(role='small', messages=HELLO))
    assert ok and gen.error_code == Generate.Result.NONE and not gen.swapped


@pytest.mark.slow
def test_infer_evicts_the_chat_model_when_the_budget_needs_it_and_says_so(
        harness: Callable[..., Harness], tmp_path: Path, capfd: pytest.CaptureFixture[str]
        ) -> None:
    from media_support import speak
    h, mm, status = started(harness, **{'model_manager:memory_reserve_gib': 0.0})
    assert mm.pool is not None
    small = status[-1].loaded[0].memory_bytes
    need = mm.pool.estimate_need('speech')
    # Room for the speech model, or for the chat model, not for both.
    budget = (need + small // 2) / (1 << 30)
    assert set_params(h, memory_budget_gib=budget)[0].successful
    wav = speak('hello robot', tmp_path / 'hello.wav')
    result, _ = _infer(h, Infer.Goal(role='speech', task='transcribe', audio=_pcm16(wav),
                                     sample_rate=16000))
    assert result.error_code == Infer.Result.NONE, result.error_msg
    assert list(result.evicted) == ['small'] and result.swapped
    wait_for(lambda: not status[-1].busy and status[-1].history
             and status[-1].history[0].to_role == 'speech', what='the swap record')
    record = status[-1].history[0]
    assert record.succeeded and list(record.evicted) == ['small']
    assert [m.role for m in status[-1].loaded] == ['speech']
    logged: List[str] = []

    def said() -> bool:
        logged.append(capfd.readouterr().err)
        return "evicted 'small' to load 'speech'" in ''.join(logged)
    wait_for(said, what='the eviction in the log')


@pytest.mark.slow
def test_wrong_kinds_and_garbage_are_refused_with_the_reason_and_infer_still_serves(
        harness: Callable[..., Harness], tmp_path: Path) -> None:
    from media_support import astronaut_jpeg
    h, mm, status = started(harness)
    ok, gen, _ = send_goal(ActionClient(h.probe, Generate, names.MODEL_GENERATE),
                           Generate.Goal(role='speech', messages=HELLO))
    assert ok and gen.error_code == Generate.Result.INVALID_INPUT
    assert 'speech entry' in gen.error_msg and names.MODEL_INFER in gen.error_msg
    photo = astronaut_jpeg(tmp_path / 'astronaut.jpg').read_bytes()
    cases = [
        (Infer.Goal(role='small', task='detect', image_format='jpeg', image_data=photo),
         Infer.Result.INVALID_INPUT, 'chat entry'),
        (Infer.Goal(role='vision', task='transcribe', audio=b'\0\0', sample_rate=16000),
         Infer.Result.INVALID_INPUT, 'needs a speech or omni entry'),
        (Infer.Goal(role='nobody', task='detect', image_format='jpeg', image_data=photo),
         Infer.Result.UNKNOWN_ROLE, 'nobody'),
        (Infer.Goal(role='vision', task='look', image_format='jpeg', image_data=photo),
         Infer.Result.INVALID_INPUT, 'unknown infer task'),
        (Infer.Goal(role='vision', task='detect', image_format='jpeg',
                    image_data=photo[:len(photo) // 3]), Infer.Result.INVALID_INPUT, ''),
        (Infer.Goal(role='vision', task='detect', image_format='rgb8', width=4, height=4,
                    image_data=b'\0' * 47), Infer.Result.INVALID_INPUT, ''),
        (Infer.Goal(role='speech', task='transcribe', audio=b'\0\0\0', sample_rate=16000),
         Infer.Result.INVALID_INPUT, 'odd length'),
        (Infer.Goal(role='speech', task='transcribe', audio=b'\0\0' * 800, sample_rate=0),
         Infer.Result.INVALID_INPUT, 'sample_rate 0'),
    ]
    for goal, code, words in cases:
        result, _ = _infer(h, goal)
        assert result.error_code == code and words in result.error_msg, \
            (goal.role, goal.task, result.error_code, result.error_msg)
        assert result.error_msg, 'every refusal says why'
    result, _ = _infer(h, Infer.Goal(role='', task='detect', image_format='jpeg',
                                     image_data=photo))
    assert result.error_code == Infer.Result.NONE and result.role == 'vision', \
        'role "" = the first entry that serves the task'
    assert [d.label for d in result.detections] == ['face']


@pytest.mark.slow
def test_infer_goals_do_not_wait_behind_a_swap_and_a_waiting_one_can_be_cancelled(
        harness: Callable[..., Harness], tmp_path: Path) -> None:
    """Infer has its own FIFO: a resident vision model answers while a swap is held; with one
    infer slot, a second infer waits behind a first one (blocked on the held load) and can be
    cancelled meanwhile; the first is answered once the swap ends."""
    from media_support import astronaut_jpeg
    h, mm, status = started(harness, **{'model_manager:policy.substitute': False,
                                        'model_manager:infer_concurrency': 1})
    infer = ActionClient(h.probe, Infer, names.MODEL_INFER)
    swap = ActionClient(h.probe, SwapModel, names.MODEL_SWAP)
    assert swap.wait_for_server(timeout_sec=10.0) and infer.wait_for_server(timeout_sec=10.0)
    detect = Infer.Goal(role='vision', task='detect', image_format='jpeg',
                        image_data=astronaut_jpeg(tmp_path / 'a.jpg').read_bytes())
    first, _ = _infer(h, detect)   # vision is resident from now on
    assert first.error_code == Infer.Result.NONE, first.error_msg
    gate = LoadGate(mm, 'large')
    held = swap.send_goal_async(SwapModel.Goal(role='large', reason='held'))
    wait_for(gate.held.is_set, what='swap held')
    during, _ = _infer(h, detect)
    assert during.error_code == Infer.Result.NONE, during.error_msg
    assert [d.label for d in during.detections] == ['face']
    assert mm.queue.counts() == (1, 0)   # the swap still holds the generate/swap FIFO

    handles = []
    for goal in (Infer.Goal(role='embedder', task='embed', texts=['hello']), detect):
        sent = infer.send_goal_async(goal)
        wait_for(sent.done, what='infer goal accepted')
        handles.append(sent.result())
    wait_for(lambda: mm.infer_queue.counts() == (1, 1), what='one infer running, one waiting')
    cancelled = handles[1].get_result_async()
    handles[1].cancel_goal_async()
    wait_for(cancelled.done, what='the cancelled goal answered while the swap holds')
    assert cancelled.result().status == GoalStatus.STATUS_CANCELED
    assert cancelled.result().result.error_code == Infer.Result.CANCELLED
    gate.open()
    embedded = handles[0].get_result_async()
    wait_for(embedded.done, 120.0, 'the embedding answered after the swap')
    assert embedded.result().result.error_code == Infer.Result.NONE
    assert embedded.result().result.dim == 384
    wait_for(held.done, what='swap accepted')
    swapped = held.result().get_result_async()
    wait_for(swapped.done, 30.0, 'swap done')
    assert swapped.result().result.error_code == SwapModel.Result.NONE


@pytest.mark.slow
@pytest.mark.skipif(_cuda(), reason='checks the fallback on a machine without CUDA')
def test_a_cuda_speech_entry_loads_on_the_cpu_in_a_compute_type_the_cpu_runs(
        harness: Callable[..., Harness], tmp_path: Path) -> None:
    from media_support import speak
    h, mm, status = started(harness, **{'model_manager:models.speech.device': 'cuda',
                                        'model_manager:models.speech.dtype': 'int8_float16'})
    result, _ = _infer(h, Infer.Goal(role='speech', task='transcribe', sample_rate=16000,
                                     audio=_pcm16(speak('hello', tmp_path / 'hello.wav'))))
    assert result.error_code == Infer.Result.NONE, result.error_msg
    wait_for(lambda: not status[-1].busy and len(status[-1].loaded) == 2, what='settled')
    speech = next(m for m in status[-1].loaded if m.role == 'speech')
    assert (speech.device, speech.dtype, speech.kind) == ('cpu', 'int8', 'speech')


@pytest.mark.parametrize('override, message', [
    ({'model_manager:default_role': 'speech'}, "default_role 'speech' is a speech entry"),
    ({'model_manager:models.vision.kind': 'camera'}, "models.vision.kind: 'camera' is not one"),
    ({'model_manager:preload': ['ghost']}, "preload: ['ghost'] are not configured roles"),
])
def test_a_bad_kind_default_role_or_preload_is_one_clear_error(
        override: Dict[str, Any], message: str, tiny_models: Dict[str, Path],
        tmp_path: Path) -> None:
    pf = tmp_path / 'bad.yaml'
    pf.write_text(yaml.safe_dump(params_for(tiny_models, **override)))
    context = Context()
    rclpy.init(args=context_args(names.DEFAULT_NAMESPACE, pf), context=context)
    try:
        with pytest.raises(ConfigError, match=message.replace('[', r'\[').replace(']', r'\]')):
            ModelManagerNode(context=context)
    finally:
        rclpy.try_shutdown(context=context)


def test_preloaded_roles_load_after_the_default_one(harness: Callable[..., Harness]) -> None:
    h, mm, status = started(harness, **{'model_manager:preload': ['vision']})
    wait_for(lambda: not status[-1].busy and len(status[-1].loaded) == 2, what='vision preloaded')
    assert {m.role: m.kind for m in status[-1].loaded} == {'small': 'chat', 'vision': 'vision'}
    assert [(r.to_role, r.reason) for r in status[-1].history][:2] == [
        ('vision', 'preload'), ('small', 'configure')]


@pytest.mark.slow
def test_infer_embeds_sentences_with_the_embedder_entry(harness: Callable[..., Harness]
                                                        ) -> None:
    import numpy as np
    h, mm, status = started(harness)
    texts = ['the red cup is on the table', 'a cup, red, on a table', 'turn left']
    result, _ = _infer(h, Infer.Goal(role='embedder', task='embed', texts=texts))
    assert result.error_code == Infer.Result.NONE, result.error_msg
    assert result.kind == 'embedding' and result.model == 'all-MiniLM-L6-v2'
    assert result.dim == 384 and len(result.vectors) == len(texts) * 384
    v = np.asarray(result.vectors, dtype=np.float32).reshape(len(texts), 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]), 'paraphrases are closer'


def test_goals_of_a_requester_that_stops_beating_are_stopped(
        harness: Callable[..., Harness]) -> None:
    """A generation for a node that went silent (as a kill -9 looks) stops within the liveness
    timeout and says why; its goal waiting in the queue is answered the same way; a goal that
    names no requester (as `ros2 action send_goal`) or a live one is served in full."""
    h, mm, status = started(harness, **{'model_manager:models.small.max_new_tokens': 4000,
                                        'model_manager:models.small.context_window': 5000})
    asker = '/sage/test_asker'
    beats = h.probe.create_publisher(Heartbeat, names.HEARTBEAT, HEARTBEAT_QOS)
    beating = threading.Event()
    beating.set()

    def beat() -> None:
        if beating.is_set():
            beats.publish(Heartbeat(node=asker, instance_id='i1', ready=True, period_s=0.1))
    h.probe.create_timer(0.1, beat)
    wait_for(lambda: mm._requesters.alive(asker) is not None, what="the asker's heartbeat seen")
    gen = ActionClient(h.probe, Generate, names.MODEL_GENERATE)
    assert gen.wait_for_server(timeout_sec=10.0)
    tokens: List[int] = []
    goals = [Generate.Goal(role='small', messages=HELLO, requester=asker,
                           requester_instance='i1') for _ in range(2)]
    sent = [gen.send_goal_async(g, feedback_callback=lambda f: tokens.append(
        f.feedback.completion_tokens)) for g in goals]
    wait_for(lambda: all(s.done() for s in sent), what='both goals accepted')
    results = [s.result().get_result_async() for s in sent]
    wait_for(lambda: len(tokens) >= 5, 30.0, 'the generation streaming')
    beating.clear()                      # the asker is "killed"
    wait_for(lambda: all(r.done() for r in results), 30.0, 'both goals stopped')
    for r in results:
        res = r.result().result
        assert res.error_code == Generate.Result.CANCELLED, (res.error_code, res.error_msg)
        assert res.error_msg == (f'abandoned: its requester {asker} stopped '
                                 '(no heartbeat for 2.0 s)')
    assert max(tokens) < 4000
    # A goal of no requester, and of a live one, run to their end (8 tokens here).
    for extra in ({}, {'requester': '/sage/model_manager',
                       'requester_instance': mm._heartbeat.instance_id}):
        ok, res, fb = send_goal(gen, Generate.Goal(role='small', messages=HELLO,
                                                   max_new_tokens=8, **extra))
        assert ok and res.error_code == Generate.Result.NONE, res.error_msg
        assert res.completion_tokens == 8
