"""The kernel's hearing and seeing: utterances and camera frames in, perception goals out,
percepts published, and transcripts and visual events turned into language turns.

Separate from `kernel.KernelNode` as `kernel_sessions` is: the node runs the engine; this desk
(`PerceptionDesk`) handles `observations/audio` and `observations/vision` on the node's callback
group and under its lock, and calls back into the node for what every turn shares (observe,
answers, salience, the journal).

- Every AudioObservation and VisualObservation is scored by the engine on its features, per
  source (`Observation(features=..., modality='audio'|'image')`; a frame's motion is appended to
  its appearance vector, so a moving scene is surprising and arousing), and its Salience is
  published.
- An utterance of a source that `hearing.people` names is a person talking: it goes to the
  perception block (a `Perception` goal with the audio, `atp.per_run` charged) when one is
  ready, else it waits (bounded by `deferred_ttl_s`, with the reason; expired: a rejected
  Response). The Percept goes out on `percepts`; a non-empty transcript becomes a language turn
  of the same turn id, observation id and source (Response.modality 'speech', input_text = the
  transcript, perception_s, audio_duration_s); an empty one is answered "no speech recognised",
  one without a wake word (when `hearing.wake_words` are set) "no wake word".
- A keyframe whose salience reaches `vision.perceive_salience` (or that was played through
  `camera/play`) goes to the perception block with its image; the Percept goes out, its
  description is kept as recent visual context (`vision.context_s`) for language goals, and
  a percept salient enough (`vision.turn_salience`) that found something (detections, motion
  onset) starts a turn of its own (modality 'vision'), at most one per camera every
  `vision.min_turn_period_s`. Frames are many: one keyframe per camera waits at most (the
  newest), and a vision percept's failure is a log line, not an answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from action_msgs.msg import GoalStatus
from rclpy.action.client import ClientGoalHandle
from rclpy.task import Future
from sage_interfaces.action import Perception
from sage_interfaces.msg import AudioObservation, Detection, Percept, Response, VisualObservation

from ..core.kernel import ACTION_PERCEPTION
from ..core.blocks import BlockDescriptor
from ..core.percepts import (MOTION_ONSET, PLAYED, VISION_TURN_CONTEXT, VisionTurnGate,
                             VisualContext, Waiting, WaitingSamples, vision_turn_text, wake_word)
from ..core.salience import Observation, SalienceScore
from .kernel_sessions import STATUS_EXPIRED, STATUS_FAILED, STATUS_REJECTED

if TYPE_CHECKING:
    from .kernel import KernelNode

AUDIO, IMAGE = 'audio', 'image'
SPEECH, VISION = 'speech', 'vision'           # Response.modality of the turns they start
PCM16 = 'pcm_s16le'
NO_SPEECH = 'no speech recognised'
NO_WAKE_WORD = 'no wake word'


@dataclass
class Sample:
    """One utterance or keyframe on its way to the perception block."""

    turn_id: int
    observation_id: str
    source: str
    modality: str               # AUDIO or IMAGE
    salience: float
    audio: bytes = b''
    sample_rate: int = 0
    audio_duration_s: float = 0.0
    image_format: str = ''
    width: int = 0
    height: int = 0
    image_data: bytes = b''
    motion: float = 0.0
    reason: str = ''            # a keyframe's reason (VisualObservation.reason)
    metabolic_state: str = ''


@dataclass
class _Running:
    sample: Sample
    block: str
    grant: float
    sent_at: float              # engine time
    handle: Optional[ClientGoalHandle] = None


@dataclass(frozen=True)
class TurnInfo:
    """What a turn that started from perception adds to its Response."""

    modality: str               # SPEECH or VISION
    perception_s: float
    audio_duration_s: float
    context: str = ''           # said to the language block with this turn only


@dataclass
class _Counts:
    perceived: int = 0
    failed: int = 0
    expired: int = 0
    ignored: Dict[str, int] = field(default_factory=dict)


class PerceptionDesk:
    """Utterances and keyframes to the perception block, percepts to turns (see the module)."""

    def __init__(self, node: 'KernelNode') -> None:
        self._node = node
        self._waiting: WaitingSamples[Sample] = WaitingSamples()
        self._running: Dict[int, _Running] = {}
        self._turns: Dict[int, TurnInfo] = {}
        self.visual = VisualContext()
        self._gate = VisionTurnGate()
        self.counts = _Counts()

    # ---- what the node asks ------------------------------------------------------------------
    def turn_info(self, turn_id: int) -> Optional[TurnInfo]:
        return self._turns.get(turn_id)

    def forget(self, turn_id: int) -> None:
        """The turn's Response is out."""
        self._turns.pop(turn_id, None)

    def context(self, turn_id: int, now: float) -> str:
        """Language.Goal.context for `turn_id`: recent visual descriptions, and for a vision
        turn what it is."""
        parts = [self.visual.context(now, self._node.core.config.vision.context_s)]
        info = self._turns.get(turn_id)
        if info is not None and info.context:
            parts.append(info.context)
        return '\n'.join(p for p in parts if p)

    @property
    def busy(self) -> int:
        """Perception goals running."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Samples waiting for the perception block."""
        return len(self._waiting)

    # ---- inputs ------------------------------------------------------------------------------
    def on_audio(self, msg: AudioObservation) -> None:
        node, core = self._node, self._node.core
        now = node._now()
        source = msg.source or 'microphone'
        problem = _audio_problem(msg)
        features = tuple(float(x) for x in msg.features) or _level_features(msg)
        obs = core.observe(source, Observation(features=features, modality=AUDIO, t=now), now,
                           msg.observation_id)
        if obs.score is not None:
            node._publish_salience(obs.turn_id, obs.observation_id, source, obs.score)
        if obs.rejection is not None or problem:
            reason = problem or (obs.rejection.reason if obs.rejection else '')
            node.get_logger().warning(f'utterance {obs.observation_id} rejected: {reason}')
            duration = float(msg.duration_s) if math.isfinite(msg.duration_s) else 0.0
            self._answer_rejected(Sample(obs.turn_id, obs.observation_id, source, AUDIO,
                                         _total(obs.score), audio_duration_s=duration,
                                         metabolic_state=obs.metabolic_state), reason, 0.0)
            return
        if not core.config.hearing.is_person(source):
            self._ignored(source, 'hearing.people does not name it: its utterances are only '
                                  'scored')
            return
        duration = len(msg.data) / 2.0 / msg.sample_rate      # what the samples say
        self._waiting.add(Sample(
            obs.turn_id, obs.observation_id, source, AUDIO, _total(obs.score),
            audio=bytes(msg.data), sample_rate=int(msg.sample_rate), audio_duration_s=duration,
            metabolic_state=obs.metabolic_state), now)
        node.get_logger().info(f'turn {obs.turn_id} ({obs.observation_id}): heard '
                               f'{duration:.1f} s from {source!r} (salience '
                               f'{_total(obs.score):.2f})')
        self.pump(now)

    def on_vision(self, msg: VisualObservation) -> None:
        node, core = self._node, self._node.core
        now = node._now()
        source = msg.source or 'camera'
        motion = float(msg.motion) if msg.motion == msg.motion else 0.0   # NaN -> 0
        features = tuple(float(x) for x in msg.features) + (motion,)
        obs = core.observe(source, Observation(features=features, modality=IMAGE, t=now,
                                               motion=motion), now, msg.observation_id)
        if obs.score is None:
            return      # this state does not accept the camera (said in the state's reason)
        node._publish_salience(obs.turn_id, obs.observation_id, source, obs.score)
        if not msg.keyframe:
            return
        if not msg.image_format or not len(msg.image_data):
            node.get_logger().warning(f'frame {msg.observation_id} ignored: a keyframe without '
                                      'an image (image_format and image_data are empty)')
            return
        v = core.config.vision
        salience = obs.score.total
        if msg.reason != PLAYED and salience < v.perceive_salience:
            return
        for w in self._waiting:      # one keyframe per camera waits: the newest
            if w.item.modality == IMAGE and w.item.source == source:
                self._waiting.remove(w)
        self._waiting.add(Sample(
            obs.turn_id, obs.observation_id, source, IMAGE, salience,
            image_format=msg.image_format, width=int(msg.width), height=int(msg.height),
            image_data=bytes(msg.image_data), motion=motion, reason=msg.reason,
            metabolic_state=obs.metabolic_state), now)
        self.pump(now)

    def _ignored(self, source: str, why: str) -> None:
        n = self.counts.ignored.get(source, 0)
        self.counts.ignored[source] = n + 1
        if n == 0:
            self._node.get_logger().info(f'utterances of {source!r} are not answered: {why}')

    # ---- dispatch ----------------------------------------------------------------------------
    def _block(self, modality: str) -> Optional[BlockDescriptor]:
        """A loaded perception block serving `modality` with a free slot."""
        used: Dict[str, int] = {}
        for r in self._running.values():
            used[r.block] = used.get(r.block, 0) + 1
        for b in sorted(self._node.core.blocks, key=lambda b: b.name):
            if (b.loaded and b.action_type == ACTION_PERCEPTION and modality in b.modalities
                    and (b.concurrency <= 0 or used.get(b.name, 0) < b.concurrency)):
                return b
        return None

    def _no_block_reason(self, modality: str) -> str:
        known = [b for b in self._node.core.blocks
                 if b.action_type == ACTION_PERCEPTION and modality in b.modalities]
        if not known:
            return f'waiting for the graph: no perception block serving {modality} is known'
        if any(b.loaded for b in known):
            return 'busy: the perception block works on its goals'
        return (f'waiting for the graph: the perception block does not serve '
                f'({self._node.why_not_serving(known[0])})')

    def pump(self, now: float) -> None:
        """Expire what waited too long, time out stuck goals, send what can go."""
        node, core = self._node, self._node.core
        ttl = core.config.kernel.deferred_ttl_s
        for w in self._waiting.expire(now, ttl):
            self.counts.expired += 1
            why = w.reason or 'waiting for the perception block'
            reason = f'expired after waiting {ttl:.0f} s: {why}'
            line = f'turn {w.item.turn_id} ({w.item.observation_id}) dropped: {reason}'
            if w.item.modality == AUDIO:
                node.get_logger().warning(line)
                self._answer_rejected(w.item, reason, 0.0, STATUS_EXPIRED)
            else:
                node.get_logger().info(line)
        deadline = core.config.routing.language_deadline_s
        for turn, r in list(self._running.items()):
            if now - r.sent_at >= deadline:
                if r.handle is not None:
                    r.handle.cancel_goal_async()
                self._failed(turn, f'no result from {r.block!r} within {deadline:.3g} s', now)
        for w in self._waiting:
            block = self._block(w.item.modality)
            if block is None:
                self._wait(w, self._no_block_reason(w.item.modality))
                continue
            client = node._block_clients.get(block.action_name)
            if client is None or not client.server_is_ready():
                self._wait(w, f'waiting for the graph: the {block.name} block is not '
                              f'reachable on {block.action_name}')
                continue
            grant = core.reserve_perception(now)
            if grant is None:
                self._wait(w, f'ATP short: perceiving needs {core.config.atp.per_run:.1f} ATP')
                continue
            self._waiting.remove(w)
            self._send(w.item, block, client, grant, now)

    def _wait(self, w: Waiting[Sample], reason: str) -> None:
        """Say why a sample waits, once per reason (frames come often: debug for them)."""
        if reason != w.reason:
            w.reason = reason
            line = f'turn {w.item.turn_id} ({w.item.observation_id}) waits: {reason}'
            if w.item.modality == AUDIO:
                self._node.get_logger().info(line)
            else:
                self._node.get_logger().debug(line)

    def _send(self, s: Sample, block: BlockDescriptor, client: Any, grant: float,
              now: float) -> None:
        node = self._node
        goal = Perception.Goal(turn_id=s.turn_id, source=s.source, audio=s.audio,
                               sample_rate=s.sample_rate, image_format=s.image_format,
                               width=s.width, height=s.height, image_data=s.image_data,
                               atp_budget=float(grant))
        self._running[s.turn_id] = _Running(s, block.name, grant, now)
        node.get_logger().info(f'turn {s.turn_id} ({s.observation_id}) -> {block.name} '
                               f'({s.modality}, {grant:.1f} ATP, salience {s.salience:.2f})')
        future = client.send_goal_async(goal)
        future.add_done_callback(
            lambda f: node._in_group(lambda: self._on_goal_response(s.turn_id, f)))

    def _on_goal_response(self, turn: int, future: Future) -> None:
        with self._node._lock:
            handle = future.result()
            r = self._running.get(turn)
            if r is None:
                if handle is not None and handle.accepted:
                    handle.cancel_goal_async()
                return
            if handle is None or not handle.accepted:
                self._failed(turn, f'block {r.block!r} refused the goal', self._node._now(),
                             started=False)
                return
            r.handle = handle
            handle.get_result_async().add_done_callback(
                lambda f: self._node._in_group(lambda: self._on_result(turn, f)))

    def lost(self, block: str, reason: str) -> None:
        """The block's process stopped or restarted: its goals fail now."""
        now = self._node._now()
        for turn, r in list(self._running.items()):
            if r.block == block:
                if r.handle is not None:      # a hung process may still hear the cancel
                    r.handle.cancel_goal_async()
                self._failed(turn, reason, now)

    # ---- results -----------------------------------------------------------------------------
    def _on_result(self, turn: int, future: Future) -> None:
        with self._node._lock:
            r = self._running.pop(turn, None)
            if r is None:
                return       # failed meanwhile (timed out, its block lost)
            node, core = self._node, self._node.core
            now = node._now()
            wrapped = future.result()
            result = wrapped.result
            charged = core.settle_perception(r.grant, True, now)
            perception_s = max(0.0, now - r.sent_at)
            s = r.sample
            ok = (wrapped.status == GoalStatus.STATUS_SUCCEEDED
                  and result.error_code == Perception.Result.NONE)
            error = '' if ok else (result.error_msg
                                   or f'goal ended with status {wrapped.status}')
            if ok and result.audio_duration_s > 0:
                s.audio_duration_s = float(result.audio_duration_s)   # as the block measured
            self._publish_percept(s, result, perception_s, error)
            if not ok:
                self.counts.failed += 1
                line = f'turn {turn} ({s.observation_id}): perception failed: {error}'
                if s.modality == AUDIO:
                    node.get_logger().error(line)
                    self._answer_failed(s, f'perception failed: {error}', charged, perception_s)
                else:
                    node.get_logger().warning(line)
                node._run_cycle(publish=True)
                return
            self.counts.perceived += 1
            if s.modality == AUDIO:
                self._heard(s, result.transcript, charged, perception_s)
            else:
                self._saw(s, result, perception_s, now)
            self.pump(now)

    def _heard(self, s: Sample, transcript: str, charged: float, perception_s: float) -> None:
        node = self._node
        text = ' '.join(transcript.split())
        node.get_logger().info(f'turn {s.turn_id} ({s.observation_id}) heard in '
                               f'{perception_s:.2f} s: {text[:80]!r}')
        if not text:
            self._answer_rejected(s, NO_SPEECH, charged, perception_s=perception_s)
            return
        words = node.core.config.hearing.wake_words
        if words and not wake_word(text, words):
            self._answer_rejected(s, NO_WAKE_WORD, charged, perception_s=perception_s,
                                  text=text)
            return
        self._turns[s.turn_id] = TurnInfo(SPEECH, perception_s, s.audio_duration_s)
        node._observe(s.source, text, s.observation_id, turn_id=s.turn_id)

    def _saw(self, s: Sample, result: Any, perception_s: float, now: float) -> None:
        node = self._node
        v = node.core.config.vision
        description = ' '.join(result.description.split())
        self.visual.add(s.source, description, now)
        found = bool(len(result.detections)) or s.reason == MOTION_ONSET
        start, why = self._gate.decide(s.source, s.salience, found and bool(description), now,
                                       v.turn_salience, v.min_turn_period_s)
        node.get_logger().info(f'turn {s.turn_id} ({s.observation_id}) seen in '
                               f'{perception_s:.2f} s: {description[:80]!r}'
                               + ('' if start else f' (no turn: {why})'))
        if start:
            self._turns[s.turn_id] = TurnInfo(
                VISION, perception_s, 0.0, VISION_TURN_CONTEXT.format(source=s.source))
            node._observe(s.source, vision_turn_text(s.source, description), s.observation_id,
                          turn_id=s.turn_id)

    def _failed(self, turn: int, reason: str, now: float, started: bool = True) -> None:
        r = self._running.pop(turn, None)
        if r is None:
            return
        charged = self._node.core.settle_perception(r.grant, started, now)
        self.counts.failed += 1
        self._node.get_logger().error(f'turn {turn} ({r.sample.observation_id}): perception '
                                      f'failed: {reason}')
        self._publish_percept(r.sample, None, max(0.0, now - r.sent_at), reason)
        if r.sample.modality == AUDIO:
            self._answer_failed(r.sample, f'perception failed: {reason}', charged,
                                max(0.0, now - r.sent_at))

    # ---- outputs -----------------------------------------------------------------------------
    def _publish_percept(self, s: Sample, result: Any, perception_s: float, error: str) -> None:
        node = self._node
        msg = Percept(stamp=node._stamp(), turn_id=s.turn_id, observation_id=s.observation_id,
                      source=s.source, modality=s.modality, motion=float(s.motion),
                      salience=float(s.salience), perception_s=float(perception_s),
                      audio_duration_s=float(s.audio_duration_s), error=error)
        if result is not None:
            msg.path, msg.fallback, msg.model = result.path, result.fallback, result.model
            msg.transcript, msg.description = result.transcript, result.description
            msg.detections = [Detection(label=d.label, score=float(d.score), x=d.x, y=d.y,
                                        width=d.width, height=d.height)
                              for d in result.detections]
            msg.asr_s, msg.detection_s = float(result.asr_s), float(result.detection_s)
            if result.audio_duration_s:
                msg.audio_duration_s = float(result.audio_duration_s)
        node._percept_pub.publish(msg)

    def _answer(self, s: Sample, status: int, reason: str, charged: float, perception_s: float,
                text: str = '') -> Response:
        return Response(stamp=self._node._stamp(), turn_id=s.turn_id,
                        observation_id=s.observation_id, source=s.source, input_text=text,
                        modality=SPEECH, perception_s=float(perception_s),
                        audio_duration_s=float(s.audio_duration_s), status=status, error=reason,
                        salience=float(s.salience), atp_spent=float(charged),
                        metabolic_state=s.metabolic_state)

    def _answer_rejected(self, s: Sample, reason: str, charged: float,
                         status: str = STATUS_REJECTED, perception_s: float = 0.0,
                         text: str = '') -> None:
        if reason in (NO_SPEECH, NO_WAKE_WORD):
            self._node.get_logger().info(f'turn {s.turn_id} ({s.observation_id}) not answered: '
                                         f'{reason}')
        self._node._publish_answer(self._answer(s, Response.STATUS_REJECTED, reason, charged,
                                                perception_s, text), status)

    def _answer_failed(self, s: Sample, reason: str, charged: float,
                       perception_s: float) -> None:
        self._node._publish_answer(self._answer(s, Response.STATUS_FAILED, reason, charged,
                                                perception_s), STATUS_FAILED)


def _total(score: Optional[SalienceScore]) -> float:
    return float(score.total) if score is not None else 0.0


def _level_features(msg: AudioObservation) -> Tuple[float, ...]:
    """Features for an utterance that came without any: its level, peak (dBFS mapped from
    -60..0 to 0..1) and duration (log scale, 30 s = 1)."""
    def unit(x: float) -> float:
        return min(1.0, max(0.0, x)) if math.isfinite(x) else 0.0
    return (unit((msg.level_dbfs + 60.0) / 60.0), unit((msg.peak_dbfs + 60.0) / 60.0),
            unit(math.log1p(max(0.0, msg.duration_s)) / math.log1p(30.0)))


def _audio_problem(msg: AudioObservation) -> str:
    """Why an utterance cannot be perceived ('' = it can)."""
    if msg.encoding and msg.encoding != PCM16:
        return f'unsupported encoding {msg.encoding!r} (expected {PCM16})'
    if not msg.sample_rate:
        return 'sample_rate is 0'
    if not len(msg.data):
        return 'no samples'
    if len(msg.data) % 2:
        return f'{len(msg.data)} bytes is not a whole number of 16-bit samples'
    return ''

