"""`sage hear FILE.wav` and `sage see FILE`: play a recording through the graph's sensors.

Both find the graph as `sage chat` does (attach to one running in the namespace, else start the
profile's graph in this process: the same `Chat.start`), then call the sensor node's play
service with the file's bytes, so the file only has to exist where the command runs:

- `hear`: `microphone/play` runs the WAV through the microphone node's VAD; each utterance it
  publishes is perceived (speech to text) and answered by the kernel. The command waits for the
  Percept (`percepts`) and the Response (`response`) of every observation id the node returned
  and prints the transcript and the answer.
- `see`: `camera/play` publishes the image's (or video's) frames; the kernel perceives the
  keyframes it finds salient enough. The command waits until every keyframe has its Percept or
  the kernel is idle again, and prints salience, detections, description and any answer the
  kernel gave on its own (a visual event).

`hear --json` fields: transcript, response, status, asr_s (the model's transcription time),
perception_s (the kernel's perception goal), latency_s (the kernel's: observation received ->
answer complete), first_token_s (this command's: play sent -> first streamed token), vad_s,
audio_duration_s, model, observation_id(s), and one record per utterance under `utterances`.

A file that does not exist, or one the node rejects (not a WAV, truncated, NaN samples, not an
image or video), is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Dict, List, Optional, Sequence

from rclpy.context import Context
from rclpy.node import Node
from sage_interfaces.msg import (AudioObservation, KernelState, Percept, Response,
                                 ResponseChunk, Salience, VisualObservation)
from sage_interfaces.srv import PlayMedia

from .. import names
from ..nodes.common import LATCHED, RELIABLE
from .chat import ANSWERS_IN, Chat, answer_text
from .graph_runner import GraphError

PLAY_WAIT_S = 10.0      # [s] the sensor's play service not discovered by then: it is not running
TURN_START_S = 1.0      # [s] see: after the last percept, time for a visual turn to begin
PERCEPT_LAG_S = 1.0     # [s] hear: a percept may arrive after its answer by this much
SETTLE_S = 2.0          # [s] see: nothing new for this long while the kernel is idle: done
STATUS = ('ok', 'rejected', 'failed')


@dataclass
class Collected:
    """What the graph said about the observations of one play, by observation id."""

    percepts: Dict[str, Percept] = field(default_factory=dict)
    responses: Dict[str, Response] = field(default_factory=dict)
    streaming: Dict[str, float] = field(default_factory=dict)   # id -> last chunk (monotonic)
    audio: Dict[str, AudioObservation] = field(default_factory=dict)
    vision: Dict[str, VisualObservation] = field(default_factory=dict)
    salience: Dict[str, Salience] = field(default_factory=dict)
    first_token: Dict[str, float] = field(default_factory=dict)  # id -> first chunk (monotonic)
    last_event: float = 0.0


class PerceiveNode(Node):
    """Calls the play services and keeps what comes back on percepts, response, salience and
    the sensors' observation topics (every id: the play's ids are known only when it returns,
    and its first percepts may come before)."""

    def __init__(self, context: Context) -> None:
        super().__init__(f'sage_perceive_{uuid.uuid4().hex[:6]}', context=context)
        self._lock = threading.Lock()
        self.got = Collected()
        self.state: Optional[KernelState] = None
        self._play_clients: Dict[str, Any] = {}
        self.watch_source = ''   # the source id of the play: its messages count as news
        self.create_subscription(Percept, names.PERCEPTS, self._keep('percepts'), ANSWERS_IN)
        self.create_subscription(Response, names.RESPONSE, self._keep('responses'), ANSWERS_IN)
        self.create_subscription(Salience, names.SALIENCE, self._keep('salience'), ANSWERS_IN)
        self.create_subscription(ResponseChunk, names.RESPONSE_STREAM, self._on_chunk, RELIABLE)
        self.create_subscription(AudioObservation, names.OBSERVATIONS_AUDIO, self._keep('audio'),
                                 RELIABLE)
        self.create_subscription(VisualObservation, names.OBSERVATIONS_VISION,
                                 self._keep_vision, RELIABLE)
        self.create_subscription(KernelState, names.STATE, self._on_state, LATCHED)

    def _keep(self, what: str) -> Callable[[Any], None]:
        def keep(msg: Any) -> None:
            with self._lock:
                getattr(self.got, what)[msg.observation_id] = msg
                if self._played(msg):
                    self.got.last_event = time.monotonic()
        return keep

    def _played(self, msg: Any) -> bool:
        """Whether `msg` is about the file being played (its source), not another sensor's."""
        source = getattr(msg, 'source', None) or getattr(msg, 'sensor_id', '')
        return bool(self.watch_source) and source == self.watch_source

    def _keep_vision(self, msg: VisualObservation) -> None:
        if msg.keyframe:   # only keyframes are perceived; every frame would be 15 a second
            with self._lock:
                self.got.vision[msg.observation_id] = msg

    def _on_chunk(self, msg: ResponseChunk) -> None:
        now = time.monotonic()
        with self._lock:
            self.got.first_token.setdefault(msg.observation_id, now)
            self.got.streaming[msg.observation_id] = now
            if self._played(msg):
                self.got.last_event = now

    def _on_state(self, msg: KernelState) -> None:
        self.state = msg

    def snapshot(self) -> Collected:
        with self._lock:
            return Collected(dict(self.got.percepts), dict(self.got.responses),
                             dict(self.got.streaming), dict(self.got.audio),
                             dict(self.got.vision), dict(self.got.salience),
                             dict(self.got.first_token), self.got.last_event)

    def play(self, service: str, what: str, request: PlayMedia.Request,
             timeout_s: float) -> PlayMedia.Response:
        """Call a play service; GraphError when it is not there or does not answer. The client
        lives as long as the node: destroying it right after its answer races the executor,
        which may still be finishing that answer's callback."""
        client = self._play_clients.get(service)
        if client is None:
            client = self._play_clients[service] = self.create_client(PlayMedia, service)
        if not client.wait_for_service(timeout_sec=PLAY_WAIT_S):
            raise GraphError(f'the {what} node is not running ({service} not found in '
                             f'{self.get_namespace()})')
        future = client.call_async(request)
        deadline = time.monotonic() + timeout_s
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not future.done():
            raise GraphError(f'{service} did not answer within {timeout_s:.0f} s')
        res = future.result()
        if res is None:
            raise GraphError(f'{service} sent no answer')
        return res


def read_media(path: str) -> bytes:
    p = Path(path).expanduser()
    if not p.is_file():
        raise GraphError(f'no such file: {path}')
    return p.read_bytes()


class Perceiver:
    """A graph found or started like `sage chat`'s, with a PerceiveNode on its executor."""

    def __init__(self, chat: Chat) -> None:
        self.chat = chat
        self.node: Optional[PerceiveNode] = None

    def start(self, discovery_s: float, ready_timeout_s: float) -> PerceiveNode:
        self.chat.start(discovery_s, ready_timeout_s)
        assert self.chat.executor is not None
        self.node = PerceiveNode(self.chat.context)
        self.chat.executor.add_node(self.node)
        self.chat.embedded.append(self.node)   # destroyed with the graph's nodes at stop()
        return self.node

    def stop(self) -> None:
        self.chat.stop()


def _wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise GraphError(f'timed out after {timeout_s:.0f} s waiting for {what}')
        time.sleep(0.02)


def _detections(p: Percept) -> List[Dict[str, Any]]:
    return [{'label': d.label, 'score': round(float(d.score), 3), 'x': int(d.x), 'y': int(d.y),
             'width': int(d.width), 'height': int(d.height)} for d in p.detections]


def _response_record(r: Response) -> Dict[str, Any]:
    return {'observation_id': r.observation_id, 'modality': r.modality,
            'input': r.input_text, 'response': r.text, 'truncated': bool(r.truncated),
            'status': STATUS[r.status], 'error': r.error, 'model': r.model, 'role': r.role,
            'latency_s': round(float(r.latency_s), 3),
            'perception_s': round(float(r.perception_s), 3),
            'salience': round(float(r.salience), 3)}


# ---- sage hear -------------------------------------------------------------------------------
def hear_records(node: PerceiveNode, ids: Sequence[str], sent_at: float) -> List[Dict[str, Any]]:
    """One record per utterance: what the microphone measured, what perception heard, what
    the kernel answered."""
    got = node.snapshot()
    out: List[Dict[str, Any]] = []
    for oid in ids:
        p, r, a = got.percepts.get(oid), got.responses[oid], got.audio.get(oid)
        first = got.first_token.get(oid)
        out.append({
            'observation_id': oid, 'source': r.source,
            'transcript': p.transcript if p is not None else r.input_text,
            'response': answer_text(r) if r.status == Response.STATUS_OK else '',
            'status': STATUS[r.status], 'error': r.error or (p.error if p is not None else ''),
            'model': r.model, 'role': r.role,
            'asr_model': p.model if p is not None else '',
            'path': p.path if p is not None else '', 'fallback': p.fallback if p else '',
            'audio_duration_s': round(float(r.audio_duration_s or (
                p.audio_duration_s if p is not None else 0.0)), 3),
            'vad_s': round(float(a.vad_s), 3) if a is not None else None,
            'asr_s': round(float(p.asr_s), 3) if p is not None else None,
            'perception_s': round(float(r.perception_s or (
                p.perception_s if p is not None else 0.0)), 3),
            'latency_s': round(float(r.latency_s), 3),
            'first_token_s': round(first - sent_at, 3) if first is not None else None,
            'salience': round(float(r.salience), 3), 'metabolic_state': r.metabolic_state})
    return out


def hear(perceiver: Perceiver, path: str, data: bytes, as_json: bool, realtime: bool,
         timeout_s: float, out: IO[str]) -> int:
    node = perceiver.node
    assert node is not None
    name = Path(path).name
    t0 = time.monotonic()
    node.watch_source = f'file:{name}'
    res = node.play(names.MICROPHONE_PLAY, 'microphone', PlayMedia.Request(
        data=data, source=node.watch_source, realtime=realtime),
        timeout_s)
    if not res.accepted:
        raise GraphError(f'{path}: {res.message}')
    ids = list(res.observation_ids)
    if not ids:
        if as_json:
            print(json.dumps({'file': path, 'observation_ids': [], 'transcript': '',
                              'response': '', 'status': 'no speech',
                              'audio_duration_s': round(float(res.duration_s), 3),
                              'message': res.message}), file=out, flush=True)
        else:
            print(f'no speech heard in {path} ({res.message})', file=out, flush=True)
        return 1
    _wait(lambda: all(i in node.snapshot().responses for i in ids), timeout_s,
          f'the answer to {len(ids)} utterance(s) of {name}')
    try:   # a percept and its answer come on two topics: either may be first
        _wait(lambda: all(i in node.snapshot().percepts for i in ids), PERCEPT_LAG_S, '')
    except GraphError:
        pass   # answered without one (rejected before perception): the record says less
    records = hear_records(node, ids, t0)
    if as_json:
        first = records[0]
        summary = dict(first, file=path, observation_ids=ids,
                       transcript=' '.join(r['transcript'] for r in records if r['transcript']),
                       response='\n'.join(r['response'] for r in records if r['response']),
                       status='ok' if all(r['status'] == 'ok' for r in records)
                       else next(r['status'] for r in records if r['status'] != 'ok'),
                       asr_s=round(sum(r['asr_s'] or 0.0 for r in records), 3),
                       audio_duration_s=round(sum(r['audio_duration_s'] for r in records), 3),
                       utterances=records)
        print(json.dumps(summary, ensure_ascii=False), file=out, flush=True)
    else:
        for rec, oid in zip(records, ids):
            r = node.snapshot().responses[oid]
            asr = f', asr {rec["asr_s"]:.2f} s' if rec['asr_s'] is not None else ''
            print(f'heard ({rec["audio_duration_s"]:.1f} s{asr}): '
                  f'{rec["transcript"] or "(nothing recognised)"}', file=out)
            if r.status == Response.STATUS_OK:
                print(f'sage> {rec["response"]}', file=out)
            print(perceiver.chat.status_line(r), file=out, flush=True)
    return 0 if all(r['status'] == 'ok' for r in records) else 1


# ---- sage see --------------------------------------------------------------------------------
def see_done(node: PerceiveNode, ids: Sequence[str], since: float, settle_s: float) -> bool:
    """The kernel idle, no answer half streamed, and nothing new for a while: a short while
    (`TURN_START_S`, for a visual turn the last percept may start) once every keyframe has its
    percept, `settle_s` while some have none (the kernel perceives only the salient ones)."""
    got = node.snapshot()
    if any(i in got.streaming and i not in got.responses for i in ids):
        return False
    state = node.state
    if state is None or state.active_dispatches > 0:
        return False
    quiet = time.monotonic() - max(got.last_event, since)
    return quiet > (TURN_START_S if all(i in got.percepts for i in ids) else settle_s)


def see_record(node: PerceiveNode, path: str, res: PlayMedia.Response) -> Dict[str, Any]:
    got = node.snapshot()
    ids = list(res.observation_ids)
    percepts = [got.percepts[i] for i in ids if i in got.percepts]
    frames = [got.vision[i] for i in ids if i in got.vision]
    sal = [float(p.salience) for p in percepts] + [
        float(got.salience[i].total) for i in ids if i in got.salience and i not in got.percepts]
    best = max(percepts, key=lambda p: (len(p.detections), p.salience), default=None)
    seen: Dict[str, Dict[str, Any]] = {}
    for p in percepts:
        for d in _detections(p):
            key = f'{d["label"]}@{d["x"]},{d["y"]}'
            seen.setdefault(key, d)
    return {
        'file': path, 'observation_ids': ids, 'duration_s': round(float(res.duration_s), 3),
        'salience': round(max(sal), 3) if sal else None,
        'detections': list(seen.values()),
        'labels': sorted({d['label'] for d in seen.values()}),
        'description': best.description if best is not None else '',
        'motion': round(max([float(p.motion) for p in percepts] +
                            [float(f.motion) for f in frames], default=0.0), 4),
        'percepts': [{'observation_id': p.observation_id, 'source': p.source, 'path': p.path,
                      'fallback': p.fallback, 'model': p.model, 'description': p.description,
                      'detections': _detections(p), 'motion': round(float(p.motion), 4),
                      'salience': round(float(p.salience), 3),
                      'detection_s': round(float(p.detection_s), 3),
                      'perception_s': round(float(p.perception_s), 3), 'error': p.error,
                      'reason': got.vision[p.observation_id].reason
                      if p.observation_id in got.vision else ''}
                     for p in percepts],
        'not_perceived': [{'observation_id': i,
                           'reason': got.vision[i].reason if i in got.vision else '',
                           'motion': round(float(got.vision[i].motion), 4)
                           if i in got.vision else None,
                           'salience': round(float(got.salience[i].total), 3)
                           if i in got.salience else None}
                          for i in ids if i not in got.percepts],
        'responses': [_response_record(got.responses[i]) for i in ids if i in got.responses],
        'message': res.message}


def see(perceiver: Perceiver, path: str, data: bytes, as_json: bool, realtime: bool,
        timeout_s: float, out: IO[str], settle_s: float = SETTLE_S) -> int:
    node = perceiver.node
    assert node is not None
    node.watch_source = f'file:{Path(path).name}'
    res = node.play(names.CAMERA_PLAY, 'camera', PlayMedia.Request(
        data=data, source=node.watch_source, realtime=realtime), timeout_s)
    if not res.accepted:
        raise GraphError(f'{path}: {res.message}')
    ids = list(res.observation_ids)
    since = time.monotonic()
    if ids:
        _wait(lambda: see_done(node, ids, since, settle_s), timeout_s,
              f'the percepts of {Path(path).name}')
    rec = see_record(node, path, res)
    if as_json:
        print(json.dumps(rec, ensure_ascii=False), file=out, flush=True)
        return 0 if rec['percepts'] or not ids else 1
    if not rec['percepts']:
        print(f'nothing perceived in {path} ({res.message})', file=out, flush=True)
        return 1 if ids else 0
    for p in rec['percepts']:
        labels = ', '.join(f'{d["label"]} {d["score"]:.2f} at [{d["x"]}, {d["y"]}, '
                           f'{d["width"]}, {d["height"]}]' for d in p['detections']) or 'none'
        why = f' ({p["reason"]})' if p['reason'] else ''
        print(f'{p["observation_id"]}{why}: salience {p["salience"]:.2f}, motion '
              f'{p["motion"]:.3f}; detections: {labels}', file=out)
        if p['description']:
            print(f'  {p["description"]}', file=out)
        if p['error']:
            print(f'  perception failed: {p["error"]}', file=out)
    for k in rec['not_perceived']:
        why = f' ({k["reason"]})' if k['reason'] else ''
        sal = f'salience {k["salience"]:.2f}' if k['salience'] is not None else 'not scored'
        print(f'{k["observation_id"]}{why}: {sal}, not perceived (the kernel sends keyframes '
              'salient enough)', file=out)
    for r in rec['responses']:
        print(f'sage> {r["response"] or "[" + r["status"] + ": " + r["error"] + "]"}', file=out)
    out.flush()
    return 0
