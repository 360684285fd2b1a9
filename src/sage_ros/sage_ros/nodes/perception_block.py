"""Perception block node: the `blocks/perception` action over the model manager's `infer`.

A goal carries an utterance (pcm_s16le), an image, or both. Two paths:

- modular: speech to text on `speech_role` (Infer transcribe) for the audio, face detection on
  `vision_role` (Infer detect, whose text is the scene description) for the image; both when
  both are present, one after the other (the model manager serves one goal at a time anyway).
- omni: one pass of the omni model on `omni_role`: Infer transcribe for audio alone (the
  transcript), else Infer omni with the image, the audio and the prompt: its "Heard:" line is
  the transcript, its "Seen:" line (or all its text) the description, and all its text the
  answer when the goal asks to `respond`. When the omni model cannot answer (its role is not
  configured, it cannot be loaded, it fails, it times out, the model manager is unreachable)
  the modular path answers, with `Result.fallback` saying why; each cause is logged once.

The block owns no model (`memory_estimate_bytes` 0): the model manager loads, budgets and
evicts. Its description says `loaded` (and its heartbeat `ready`) while the model manager is
alive, active, and its infer server reachable. block_type: modular for the modular path,
hybrid for the omni path (one omni model, the modular models as its fallback).

Latencies: `asr_s` and `detection_s` are the wall time of each Infer call as this block saw
it (queueing and any load included; the model's own time is in the model manager's log);
`total_s` runs from the goal's acceptance to its result. `atp_spent` is `atp.per_s` times the
seconds spent in Infer calls.

Goals wait in a bounded FIFO (`max_goals`) holding no thread; `concurrency` goals run at once.
A goal with no audio and no image, audio without a sample rate, audio of odd byte length, an
unknown path, or media the model manager cannot decode is answered INVALID_INPUT with the
reason in one warning line; the block keeps serving. A sample whose modular role is not
configured on the model manager is UNSUPPORTED_MODALITY; any other failure FAILED.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from rcl_interfaces.msg import SetParametersResult
from rclpy.action import ActionServer, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from sage_interfaces.action import Infer, Perception
from sage_interfaces.msg import BlockDescription, ModelStatus

from .. import names
from ..core.inference import TASK_DETECT, TASK_OMNI, TASK_TRANSCRIBE
from ..core.perception.omni import split_lines
from .action_call import (CallCancelled, CallError, CallTimeout, Dependency, ServerGone,
                          ServerUnavailable, ThreadSafeActionClient, call_action)
from .common import LATCHED, RESULT_KEEP_S, ConfigError, declare, run_node, stamp
from .goal_queue import GoalQueue, answer_dropped
from .liveness import HeartbeatPublisher, declare_liveness_timeout, requester
from .manager_readiness import ManagerReadiness

ACTION_TYPE = 'sage_interfaces/action/Perception'
PATH_MODULAR = 'modular'
PATH_OMNI = 'omni'
PATHS = (PATH_MODULAR, PATH_OMNI)
CAPABILITIES = ('speech_to_text', 'face_detection', 'scene_description')
OMNI_CAPABILITIES = (*CAPABILITIES, 'audio_vision_qa')
STOP_WAIT_S = 2.5     # [s] destroy_node waits this long for the running goals to stop
# Infer result codes the omni path falls back on; INVALID_INPUT (the sample itself) and
# CANCELLED do not.
_FALL_BACK = {Infer.Result.INACTIVE, Infer.Result.UNKNOWN_ROLE, Infer.Result.LOAD_FAILED,
              Infer.Result.FAILED}


class InferFailed(RuntimeError):
    """An Infer call did not answer; `code` is the Infer result code (FAILED for a call that
    never got a result)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Stopped(RuntimeError):
    """The goal was cancelled or the node is stopping."""


@dataclass
class Perceived:
    """What one goal perceived, filled path by path."""

    path: str = PATH_MODULAR
    fallback: str = ''
    models: List[str] = field(default_factory=list)
    transcript: str = ''
    language: str = ''
    description: str = ''
    answer: str = ''
    detections: List[Any] = field(default_factory=list)
    asr_s: float = 0.0
    detection_s: float = 0.0
    infer_s: float = 0.0       # [s] every Infer call, for the ATP spent

    def served_by(self, model: str) -> None:
        if model and model not in self.models:
            self.models.append(model)


def check_goal(goal: Perception.Goal) -> str:
    """Why a goal cannot be perceived ('' = it can): what can be told without decoding."""
    if goal.path not in ('', *PATHS):
        return f'unknown path {goal.path!r}; expected {" or ".join(PATHS)} (or "")'
    has_audio, has_image = len(goal.audio) > 0, len(goal.image_data) > 0
    if not has_audio and not has_image:
        return 'no audio and no image in the goal'
    if has_audio and goal.sample_rate == 0:
        return 'audio given with sample_rate 0'
    if has_audio and len(goal.audio) % 2:
        return f'audio of odd length ({len(goal.audio)} bytes) is not pcm_s16le'
    if has_image and not goal.image_format:
        return 'image data given without image_format'
    return ''


class PerceptionBlockNode(Node):
    """Serves `blocks/perception` over the model manager's `model_manager/infer`."""

    def __init__(self, node_name: str = names.PERCEPTION_BLOCK, **kwargs: object) -> None:
        super().__init__(node_name, **kwargs)  # type: ignore[arg-type]
        path = declare(self, 'path', PATH_MODULAR,
                       'Perception path: modular (speech_role + vision_role) or omni (omni_role, '
                       'the modular path as its fallback)')
        if path not in PATHS:   # a run-time change is checked by _validate_parameters
            raise ConfigError(f'parameter path={path!r}: expected one of {", ".join(PATHS)}')
        declare(self, 'speech_role', 'speech', 'Model manager role that transcribes audio')
        declare(self, 'vision_role', 'vision', 'Model manager role that detects in images')
        declare(self, 'omni_role', 'omni', 'Model manager role of the omni path')
        declare(self, 'prompt', '',
                'Instruction put before the omni model\'s own (a "Heard:" and a "Seen:" line) '
                'when a goal brings no prompt; \'\' = its own only')
        declare(self, 'model_manager_wait_s', 10.0,
                'How long to wait for the model manager\'s infer server per call [s]',
                min_value=0.0, max_value=3600.0)
        declare(self, 'infer_timeout_s', 120.0,
                'Longest one Infer call may take, any load included [s]; the omni path then '
                'falls back to the modular one', min_value=0.1, max_value=86400.0)
        declare(self, 'max_goals', 8,
                'Goals running or waiting at once (FIFO); more are refused', min_value=1,
                max_value=1000)
        concurrency = declare(self, 'concurrency', 1,
                              'Goals worked on at once (the model manager runs one model at a '
                              'time: more only overlap the transfers)', read_only=True,
                              min_value=1, max_value=16)
        declare(self, 'atp.per_s', 1.0,
                'ATP reported spent per second of Infer calls [ATP/s]', min_value=0.0,
                max_value=1000.0)
        self._stopping = threading.Event()
        self._said: Set[str] = set()        # omni fallback causes already logged
        self._accepted: Dict[bytes, float] = {}
        self._lock = threading.Lock()
        timeout_s = declare_liveness_timeout(self)
        self._manager_name = names.qualify(names.MODEL_MANAGER, self.get_namespace())
        self.manager = Dependency(self, self._manager_name, 'model manager', timeout_s,
                                  on_change=self._check_ready)
        self.client = ThreadSafeActionClient(self, Infer, names.MODEL_INFER,
                                             callback_group=ReentrantCallbackGroup())
        self.readiness = ManagerReadiness(self, 'perception', self.manager,
                                          self.client.server_is_ready, names.MODEL_INFER,
                                          self._readiness_changed, self._stopping)
        self.create_subscription(ModelStatus, names.MODELS_STATUS, self.readiness.on_models,
                                 LATCHED, callback_group=MutuallyExclusiveCallbackGroup())
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

        self._heartbeat = HeartbeatPublisher(self, 'perception', self._liveness)
        self.queue = GoalQueue('perception block', lambda: int(self._p('max_goals')),
                               self._dropped, concurrency=int(concurrency),
                               on_change=self._heartbeat.publish)
        self._server = ActionServer(
            self, Perception, names.BLOCK_PERCEPTION,
            execute_callback=self.queue.wrap(self._execute), goal_callback=self._on_goal,
            handle_accepted_callback=self._on_accepted,
            cancel_callback=self.queue.cancel_callback,
            callback_group=MutuallyExclusiveCallbackGroup(), result_timeout=RESULT_KEEP_S)
        self._description_pub = self.create_publisher(BlockDescription, names.BLOCKS_DESCRIPTION,
                                                      LATCHED)
        self._publish_description()
        self.create_timer(self._heartbeat.period_s / 2, self._check_ready,
                          callback_group=MutuallyExclusiveCallbackGroup())
        self.get_logger().info(
            f'perception block on {self.resolve_topic_name(names.BLOCK_PERCEPTION)} (path '
            f'{self._p("path")}: speech {self._p("speech_role")!r}, vision '
            f'{self._p("vision_role")!r}, omni {self._p("omni_role")!r}); waiting for the model '
            f'manager {self._manager_name}')

    def _p(self, name: str) -> Any:
        return self.get_parameter(name).value

    # ---- parameters ----------------------------------------------------------------------
    def _validate_parameters(self, params: List[Parameter]) -> SetParametersResult:
        for p in params:
            if p.name == 'path' and p.value not in PATHS:
                return SetParametersResult(successful=False, reason=(
                    f'path: {p.value!r} is not one of {", ".join(PATHS)}'))
            if p.name in ('speech_role', 'vision_role', 'omni_role') and \
                    not (isinstance(p.value, str) and p.value.strip()):
                return SetParametersResult(successful=False,
                                           reason=f'{p.name}: a role name must not be empty')
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: List[Parameter]) -> None:
        if getattr(self, '_description_pub', None) is None:
            return    # declarations (this callback sees those too)
        if any(p.name == 'path' for p in params):
            self.get_logger().info(f'path changed to {self._p("path")}')
            self._publish_description()

    # ---- readiness -----------------------------------------------------------------------
    def _check_ready(self) -> None:
        self.readiness.check()

    def _readiness_changed(self) -> None:
        self._publish_description()
        self._heartbeat.publish()

    def _liveness(self) -> Tuple[bool, str, int, int]:
        active, queued = self.queue.counts()
        ready, why = self.readiness.state
        return ready, why, active, queued

    def _publish_description(self) -> None:
        omni = self._p('path') == PATH_OMNI
        loaded = self.readiness.state[0]
        self._description_pub.publish(BlockDescription(
            stamp=stamp(), name='perception',
            block_type=BlockDescription.TYPE_HYBRID if omni else BlockDescription.TYPE_MODULAR,
            capabilities=list(OMNI_CAPABILITIES if omni else CAPABILITIES),
            modalities=['audio', 'image', 'text'] if omni else ['audio', 'image'],
            action_name=self.resolve_topic_name(names.BLOCK_PERCEPTION), action_type=ACTION_TYPE,
            loaded=loaded, memory_estimate_bytes=0, concurrency=self.queue.concurrency))

    # ---- the action ----------------------------------------------------------------------
    def _on_goal(self, goal: Perception.Goal) -> GoalResponse:
        refusal = 'shutting down' if self._stopping.is_set() else self.queue.refusal()
        if refusal:
            self.get_logger().warning(f'perception goal {goal.turn_id}: refused, {refusal}')
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _on_accepted(self, gh: ServerGoalHandle) -> None:
        with self._lock:
            self._accepted[bytes(gh.goal_id.uuid)] = time.monotonic()
        self.queue.handle_accepted(gh)

    def _accepted_at(self, gh: ServerGoalHandle) -> float:
        with self._lock:
            return self._accepted.pop(bytes(gh.goal_id.uuid), time.monotonic())

    def _dropped(self, gh: ServerGoalHandle, reason: Optional[str]) -> Perception.Result:
        self._accepted_at(gh)
        return answer_dropped(gh, Perception.Result(), reason, Perception.Result.FAILED)

    def _execute(self, gh: ServerGoalHandle) -> Perception.Result:
        goal: Perception.Goal = gh.request
        t0 = self._accepted_at(gh)
        result = Perception.Result()
        if goal.sample_rate and len(goal.audio):
            result.audio_duration_s = len(goal.audio) / 2 / float(goal.sample_rate)

        def fail(code: int, message: str) -> Perception.Result:
            result.error_code, result.error_msg = code, message
            result.total_s = time.monotonic() - t0
            if code == result.CANCELLED and gh.is_cancel_requested:
                gh.canceled()
            else:
                gh.abort()
            return result

        problem = check_goal(goal)
        if problem:
            self.get_logger().warning(f'perception goal {goal.turn_id}: invalid input: '
                                      f'{problem}')
            return fail(result.INVALID_INPUT, problem)
        path = goal.path or self._p('path')

        def should_stop() -> bool:
            return gh.is_cancel_requested or self._stopping.is_set()
        got = Perceived()
        try:
            if path == PATH_OMNI:
                self._omni(gh, goal, got, should_stop)
            if path == PATH_MODULAR or got.fallback:
                got.path = PATH_MODULAR
                self._modular(gh, goal, got, should_stop)
        except Stopped as exc:
            if gh.is_cancel_requested:
                return fail(result.CANCELLED, 'cancelled')
            return fail(result.FAILED, str(exc) or 'the perception block is shutting down')
        except InferFailed as exc:
            if exc.code == Infer.Result.INVALID_INPUT:
                self.get_logger().warning(f'perception goal {goal.turn_id}: invalid input: '
                                          f'{exc}')
                return fail(result.INVALID_INPUT, str(exc))
            message = f'{got.fallback}; modular path failed too: {exc}' if got.fallback \
                else str(exc)
            self.get_logger().error(f'perception goal {goal.turn_id}: {message}')
            result.fallback = got.fallback
            # A modality whose role the model manager does not have is not served at all.
            unserved = exc.code == Infer.Result.UNKNOWN_ROLE
            return fail(result.UNSUPPORTED_MODALITY if unserved else result.FAILED, message)
        result.path, result.fallback, result.model = got.path, got.fallback, ','.join(got.models)
        result.transcript, result.language = got.transcript, got.language
        result.description, result.answer = got.description, got.answer
        result.detections = got.detections
        result.labels = [d.label for d in got.detections]
        result.scores = [float(d.score) for d in got.detections]
        result.asr_s, result.detection_s = got.asr_s, got.detection_s
        result.atp_spent = float(self._p('atp.per_s')) * got.infer_s
        result.total_s = time.monotonic() - t0
        gh.succeed()
        self.get_logger().info(
            f'perceived goal {goal.turn_id} ({goal.source or "?"}) on the {got.path} path in '
            f'{result.total_s:.2f} s: ' + '; '.join(
                s for s in (f'heard {got.transcript!r}' if len(goal.audio) else '',
                            f'{len(got.detections)} detection(s)' if len(goal.image_data)
                            else '') if s))
        return result

    # ---- paths ---------------------------------------------------------------------------
    def _modular(self, gh: ServerGoalHandle, goal: Perception.Goal, got: Perceived,
                 should_stop: Callable[[], bool]) -> None:
        if len(goal.audio):
            self._feedback(gh, 'transcribing', 0.0)
            r, took = self._infer(Infer.Goal(
                role=self._p('speech_role'), task=TASK_TRANSCRIBE, audio=goal.audio,
                sample_rate=goal.sample_rate), gh, should_stop)
            got.transcript, got.language, got.asr_s = r.text.strip(), r.language, took
            got.infer_s += took
            got.served_by(r.model)
        if len(goal.image_data):
            self._feedback(gh, 'detecting', 0.5 if len(goal.audio) else 0.0)
            r, took = self._infer(Infer.Goal(
                role=self._p('vision_role'), task=TASK_DETECT, image_format=goal.image_format,
                width=goal.width, height=goal.height, image_data=goal.image_data), gh,
                should_stop)
            got.detections, got.detection_s = list(r.detections), took
            got.infer_s += took
            got.description = r.text.strip()
            got.served_by(r.model)
        elif got.transcript:
            got.description = f'Someone said: "{got.transcript}"'
        else:
            got.description = (f'Sound with no recognisable words '
                               f'({len(goal.audio) / 2 / goal.sample_rate:.1f} s).')
        self._feedback(gh, 'done', 1.0)

    def _omni(self, gh: ServerGoalHandle, goal: Perception.Goal, got: Perceived,
              should_stop: Callable[[], bool]) -> None:
        """One omni pass; on a failure that the modular path may not share, `got.fallback`
        says why and the caller goes on with the modular path."""
        role = self._p('omni_role')
        models = self.readiness.models
        if models is not None and models.available_roles and \
                role not in models.available_roles:
            self._fall_back(got, f'omni role {role!r} is not configured on the model manager',
                            f'unknown:{role}')
            return
        audio_only = len(goal.audio) > 0 and len(goal.image_data) == 0 and not goal.respond
        self._feedback(gh, 'omni', 0.0)
        call = Infer.Goal(role=role, task=TASK_TRANSCRIBE if audio_only else TASK_OMNI,
                          audio=goal.audio, sample_rate=goal.sample_rate,
                          image_format=goal.image_format, width=goal.width, height=goal.height,
                          image_data=goal.image_data, respond=goal.respond,
                          prompt='' if audio_only else (goal.prompt or self._p('prompt')))
        try:
            r, took = self._infer(call, gh, should_stop)
        except InferFailed as exc:
            if exc.code not in _FALL_BACK:
                raise
            self._fall_back(got, f'omni path unavailable: {exc}', f'{exc.code}:{role}')
            return
        got.path = PATH_OMNI
        got.infer_s += took
        got.served_by(r.model)
        text = r.text.strip()
        if audio_only:
            got.transcript, got.language, got.asr_s = text, r.language, took
            got.description = f'Someone said: "{text}"' if text else \
                'Sound with no recognisable words.'
        else:
            lines = {} if goal.respond else split_lines(text)
            heard = lines.get('heard', '')
            if len(goal.audio) and heard.strip(' .').lower() not in ('', 'nothing'):
                got.transcript, got.language = heard, r.language
            got.description = lines.get('seen') or text
            got.answer = text if goal.respond else ''
            got.detections = list(r.detections)
            got.detection_s = took if len(goal.image_data) else 0.0
        self._feedback(gh, 'done', 1.0)

    def _fall_back(self, got: Perceived, why: str, cause: str) -> None:
        got.fallback = f'{why}; answered on the modular path'
        if cause not in self._said:
            self._said.add(cause)
            self.get_logger().warning(got.fallback)

    @staticmethod
    def _feedback(gh: ServerGoalHandle, stage: str, progress: float) -> None:
        gh.publish_feedback(Perception.Feedback(stage=stage, progress=float(progress)))

    def _infer(self, goal: Infer.Goal, gh: ServerGoalHandle, should_stop: Callable[[], bool]
               ) -> Tuple[Infer.Result, float]:
        """One Infer call: (its result, its wall time); InferFailed with the Infer code when
        it did not answer, Stopped when the goal was cancelled or the node stops."""
        goal.requester, goal.requester_instance = requester(self)
        t0 = time.monotonic()
        try:
            wrapped = call_action(
                self.client, goal, what='model manager',
                server_wait_s=float(self._p('model_manager_wait_s')),
                timeout_s=float(self._p('infer_timeout_s')), should_stop=should_stop,
                gone=self.manager.guard(), abandon=self._stopping.is_set)
        except CallCancelled as exc:
            raise Stopped(str(exc)) from None
        except (ServerUnavailable, ServerGone) as exc:
            self._check_ready()
            raise InferFailed(Infer.Result.INACTIVE, str(exc)) from None
        except CallTimeout as exc:
            raise InferFailed(Infer.Result.FAILED, str(exc)) from None
        except CallError as exc:
            raise InferFailed(Infer.Result.FAILED, str(exc)) from None
        took = time.monotonic() - t0
        res: Infer.Result = wrapped.result
        if res.error_code == res.CANCELLED and not should_stop():
            # The model manager took this node for gone (its heartbeats late): a failure.
            raise InferFailed(Infer.Result.FAILED, f'the model manager stopped the call: '
                              f'{res.error_msg}')
        if res.error_code == res.CANCELLED:
            raise Stopped('the model manager cancelled the call')
        if res.error_code != res.NONE:
            raise InferFailed(res.error_code, res.error_msg or
                              f'{goal.task} on {goal.role!r} failed (code {res.error_code})')
        return res, took

    def destroy_node(self) -> None:
        """Bounded (~3 s): running calls are cancelled, waiting goals answered."""
        self._stopping.set()
        self._heartbeat.publish_last()
        self.queue.close('the perception block is shutting down')
        self.queue.drop_queued('the perception block is shutting down')
        if not self.queue.wait_idle(STOP_WAIT_S):
            self.get_logger().warning('a perception goal was still running at shutdown')
        self._server.destroy()
        super().destroy_node()


def main(args: Optional[List[str]] = None) -> int:
    return run_node(PerceptionBlockNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
