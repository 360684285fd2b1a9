"""A spoken turn through the real graph: end of speech -> first token of the answer.

The graph (in one process, one executor): microphone + kernel + perception block + model manager
+ language block, the demo's models (faster-whisper base int8 for speech, SmolLM2-135M for the
answer; every complexity is mapped to the small role so the baseline uses the same model). An
espeak-ng utterance of about 2, 3, 5 and 10 s (rate adjusted to the length, 0.5 s of silence
each side) is played through `microphone/play` with realtime=false: the node runs it through its
VAD as fast as it can, so the end of speech is the moment the node publishes the utterance
(AudioObservation; its `vad_s` says what the VAD itself adds after the speech ends, hangover
included). Measured per turn, on the probe's clock:

- e2e_s: AudioObservation received -> first `response/stream` chunk of that observation id;
- split: perception (the kernel's Percept.perception_s, goal -> result; of it asr_s is the
  model's own time), language TTFT (Percept received -> first chunk), and the rest (kernel:
  scoring, queueing, dispatch);
- with_vad_s: vad_s + e2e_s, what a speaker would wait after the last word with a live mic.

Baseline, the same run, interleaved: the same audio transcribed in-process by SpeechRunner +
`ModelPool.generate` TTFT on its transcript (same model, greedy). Goals: graph e2e <= 1.10 x
baseline (p50), and with_vad_s < 1.5 s for the 3 s utterance. Each turn starts after a
conversation reset, so every prompt is the same.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from asr_wer import SAMPLE_RATE, speech_model, synthesize, transcribe
from common import InProcessGraph, percentile, report, wait_until
from memory_ttft import graph_params, set_key

TEXTS = {
    2: 'Hello robot, how are you?',
    3: 'Please tell me what you can see in the room.',
    5: 'Please go to the kitchen and tell me if the window is open or closed.',
    # one breath, no full stop: the node's VAD ends an utterance at 0.3 s of silence, and
    # espeak pauses that long at a sentence end
    10: ('good morning robot I would like you to go to the kitchen and look at the table by the '
         'window and then tell me whether my red cup and my keys are still lying there'),
}


def utterance(seconds: int, text: str) -> np.ndarray:
    """`text` spoken in about `seconds` s (espeak rate adjusted), 0.5 s silence each side."""
    probe = synthesize(text, 'en-us', 175, pad_s=0.0)
    natural = probe.size / SAMPLE_RATE
    rate = int(min(400, max(90, 175 * natural / seconds)))
    return synthesize(text, 'en-us', rate, pad_s=0.5)


def wav_bytes(x: np.ndarray) -> bytes:
    import io

    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, x, SAMPLE_RATE, subtype='PCM_16', format='WAV')
    return buf.getvalue()


def stats(values: List[float]) -> Dict[str, Any]:
    if not values:
        return {'n': 0}
    return {'n': len(values), 'p50_s': round(percentile(values, 50), 4),
            'min_s': round(min(values), 4), 'max_s': round(max(values), 4),
            'spread_s': round(percentile(values, 90) - percentile(values, 10), 4),
            'mean_s': round(statistics.fmean(values), 4)}


class VoiceProbe:
    """Plays WAVs through the microphone node and times what follows, by observation id."""

    def __init__(self, g: InProcessGraph) -> None:
        from sage_interfaces.msg import (AudioObservation, KernelState, Percept, Response,
                                         ResponseChunk)
        from sage_interfaces.srv import PlayMedia, ResetConversation

        from sage_ros import names
        from sage_ros.nodes.common import LATCHED, RELIABLE
        self.lock = threading.Lock()
        self.audio: Dict[str, Any] = {}
        self.percepts: Dict[str, Any] = {}
        self.first: Dict[str, float] = {}
        self.responses: Dict[str, Any] = {}
        self.states: List[Any] = []
        node = g.probe
        node.create_subscription(AudioObservation, names.OBSERVATIONS_AUDIO,
                                 self._stamp(self.audio), RELIABLE)
        node.create_subscription(Percept, names.PERCEPTS, self._stamp(self.percepts), RELIABLE)
        node.create_subscription(Response, names.RESPONSE, self._stamp(self.responses),
                                 RELIABLE)
        node.create_subscription(ResponseChunk, names.RESPONSE_STREAM, self._on_chunk, RELIABLE)
        node.create_subscription(KernelState, names.STATE, lambda m: self.states.append(m),
                                 LATCHED)
        self.play_client = node.create_client(PlayMedia, names.MICROPHONE_PLAY)
        self.reset_client = node.create_client(ResetConversation, names.LANGUAGE_RESET)
        self._Play, self._Reset = PlayMedia, ResetConversation
        self.n = 0

    def _stamp(self, into: Dict[str, Any]) -> Any:
        def keep(m: Any) -> None:
            with self.lock:
                into.setdefault(m.observation_id, (time.perf_counter(), m))
        return keep

    def _on_chunk(self, m: Any) -> None:
        with self.lock:
            self.first.setdefault(m.observation_id, time.perf_counter())

    def wait_ready(self) -> None:
        wait_until(lambda: bool(self.states) and self.states[-1].ready, 600, 'KernelState.ready')
        wait_until(lambda: self.play_client.wait_for_service(timeout_sec=0.1), 60,
                   'microphone/play')

    def call(self, client: Any, request: Any, what: str) -> Any:
        fut = client.call_async(request)
        wait_until(fut.done, 120, what)
        return fut.result()

    def turn(self, data: bytes, timeout_s: float = 300.0) -> Dict[str, Any]:
        self.call(self.reset_client, self._Reset.Request(), 'conversation reset')
        self.n += 1
        res = self.call(self.play_client, self._Play.Request(
            data=data, source=f'file:bench{self.n}.wav', realtime=False), 'microphone/play')
        if not res.accepted or len(res.observation_ids) != 1:
            raise RuntimeError(f'play: accepted={res.accepted} ids={list(res.observation_ids)} '
                               f'({res.message})')
        oid = res.observation_ids[0]
        wait_until(lambda: oid in self.responses, timeout_s, f'the response to {oid}')
        with self.lock:
            t_audio, audio = self.audio[oid]
            t_percept, percept = self.percepts.get(oid, (None, None))
            t_first = self.first.get(oid)
            _, resp = self.responses[oid]
        if resp.status != 0 or t_first is None or percept is None:
            raise RuntimeError(f'turn {oid} not answered: status {resp.status} {resp.error!r} '
                               f'(percept: {percept is not None}, streamed: {t_first is not None})')
        e2e = t_first - t_audio
        lang = t_first - t_percept
        return {'e2e_s': e2e, 'vad_s': float(audio.vad_s), 'with_vad_s': float(audio.vad_s) + e2e,
                'asr_s': float(percept.asr_s), 'perception_s': float(percept.perception_s),
                'language_ttft_s': lang, 'kernel_s': e2e - float(percept.perception_s) - lang,
                'audio_duration_s': float(audio.duration_s), 'transcript': resp.input_text,
                'role': resp.role, 'model': resp.model, 'asr_model': percept.model,
                'prompt_tokens': int(resp.prompt_tokens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--runs', type=int, default=5)
    ap.add_argument('--durations', default='2,3,5,10')
    ap.add_argument('--max-new-tokens', type=int, default=16)
    args = ap.parse_args()
    durations = [int(d) for d in args.durations.split(',') if d]

    from sage_ros import graph
    from sage_ros.core.conversation import Conversation
    from sage_ros.core.models import ModelPool
    from common import demo_spec

    clips = {d: utterance(d, TEXTS[d]) for d in durations}
    with tempfile.TemporaryDirectory() as tmp:
        params = graph_params(Path(tmp) / 'sage.db', memory=False,
                              max_new_tokens=args.max_new_tokens)
        set_key(params, 'language_block', 'roles',
                {'simple': 'small', 'moderate': 'small', 'complex': 'small'})
        set_key(params, 'kernel', 'atp.answer_tokens', args.max_new_tokens)
        specs = (graph.MICROPHONE, graph.KERNEL, graph.LANGUAGE_BLOCK, graph.PERCEPTION_BLOCK,
                 graph.MODEL_MANAGER)
        g = InProcessGraph(specs, params, Path(tmp))
        try:
            g.wait_models_active()
            probe = VoiceProbe(g)
            probe.wait_ready()
            runner, loaded, entry = speech_model()
            spec = demo_spec('small', args.max_new_tokens, name='direct')
            pool = ModelPool({'direct': spec}, 'direct')
            pool.load('direct')

            def direct(audio: np.ndarray) -> Dict[str, float]:
                t0 = time.perf_counter()
                text, run_s = transcribe(runner, loaded, audio)
                t1 = time.perf_counter()
                first: List[float] = []
                out = pool.generate('direct', Conversation().messages_for(text),
                                    max_new_tokens=args.max_new_tokens,
                                    on_text=lambda _: first or first.append(time.perf_counter()))
                return {'asr_s': t1 - t0, 'ttft_s': first[0] - t1, 'total_s': first[0] - t0,
                        'prompt_tokens': int(out.prompt_tokens)}

            for d in durations:   # warm both paths per length (first use allocates)
                probe.turn(wav_bytes(clips[d]))
                direct(clips[d])
            rows: Dict[int, Dict[str, List[Any]]] = {
                d: {'graph': [], 'direct': []} for d in durations}
            for i in range(args.runs):
                for d in durations:
                    data = wav_bytes(clips[d])
                    if i % 2:
                        rows[d]['graph'].append(probe.turn(data))
                        rows[d]['direct'].append(direct(clips[d]))
                    else:
                        rows[d]['direct'].append(direct(clips[d]))
                        rows[d]['graph'].append(probe.turn(data))
        finally:
            g.close()

    results: Dict[str, Any] = {}
    for d in durations:
        gr, di = rows[d]['graph'], rows[d]['direct']
        e2e = stats([r['e2e_s'] for r in gr])
        base = stats([r['total_s'] for r in di])
        ratio = round(e2e['p50_s'] / base['p50_s'], 3) if base['p50_s'] else None
        results[f'{d}s'] = {
            'audio_duration_s': round(statistics.fmean(r['audio_duration_s'] for r in gr), 3),
            'transcript': gr[-1]['transcript'], 'answer_model': gr[-1]['model'],
            'prompt_tokens': {'graph': gr[-1]['prompt_tokens'], 'direct': di[-1]['prompt_tokens']},
            'graph': {'e2e': e2e, 'with_vad': stats([r['with_vad_s'] for r in gr]),
                      'vad': stats([r['vad_s'] for r in gr]),
                      'perception': stats([r['perception_s'] for r in gr]),
                      'asr': stats([r['asr_s'] for r in gr]),
                      'language_ttft': stats([r['language_ttft_s'] for r in gr]),
                      'kernel_rest': stats([r['kernel_s'] for r in gr])},
            'direct': {'total': base, 'asr': stats([r['asr_s'] for r in di]),
                       'ttft': stats([r['ttft_s'] for r in di])},
            'graph_over_direct_p50': ratio,
            'added_p50_s': round(e2e['p50_s'] - base['p50_s'], 4),
            'goal_overhead_met': ratio is not None and ratio <= 1.10}
    three = results.get('3s')
    report('voice_turn', {
        'runs': args.runs, 'max_new_tokens': args.max_new_tokens,
        'speech_model': entry.get('model_id'), 'chat_model': spec.model_id,
        'durations': results,
        'goal_overhead': 'graph e2e p50 <= 1.10 x (ASR + first token direct) p50, every length',
        'goal_overhead_met': all(r['goal_overhead_met'] for r in results.values()),
        'goal_3s': 'vad_s + e2e p50 < 1.5 s for the 3 s utterance',
        'goal_3s_met': (three['graph']['with_vad']['p50_s'] < 1.5) if three else None})


if __name__ == '__main__':
    main()
