"""The hearing path's processes killed (kill -9) under `sage up --processes`, as test_liveness
does for the language path: the perception block killed while it transcribes a long utterance
(the heard turn fails at once and says why, the block is back, the next utterance is answered),
and the microphone killed between utterances (restarted; its play service works again).
Real processes, the real faster-whisper base, espeak-ng speech made here.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Dict

import pytest

from conftest import params_for
from graph_support import child_pid, claim_domain, stop
from sage_ros import names
from test_perception_e2e import TURN_S, PerceptionProbe, graph_overrides, start_graph

pytestmark = [pytest.mark.graph, pytest.mark.slow]

FAILOVER_S = 10.0      # death -> a Response that says so (test_liveness's bound)
BACK_S = 30.0          # death -> restarted and beating ready again
# One sentence without punctuation: about 20 s of speech with no pause the VAD ends on, so one
# utterance whose transcription takes long enough to kill into.
LONG = ('the robot walked slowly along the narrow corridor looking at every open door and '
        'counting the boxes stacked against the wall while the people in the next room talked '
        'about the weather and the train that would leave the station late in the evening '
        'because of the storm that had closed the bridge over the river near the old mill')


def busy(probe: PerceptionProbe, fqn: str) -> bool:
    beat = probe.beats.get(fqn)
    return beat is not None and beat.goals_active > 0 and probe.alive(fqn)


def back(probe: PerceptionProbe, fqn: str, old: str) -> bool:
    beat = probe.beats.get(fqn)
    return (beat is not None and beat.instance_id != old and beat.ready and probe.alive(fqn)
            and probe.ready())


def test_hearing_survives_its_nodes_killed(tmp_path: Path, tiny_models: Dict[str, Path]
                                           ) -> None:
    from media_support import speak
    long_wav = speak(LONG, tmp_path / 'long.wav', pad_s=0.8)
    short_wav = speak('Hello robot.', tmp_path / 'hello.wav', pad_s=0.5)
    domain, lock = claim_domain()
    proc, out, probe = start_graph(params_for(tiny_models, **graph_overrides()), tmp_path,
                                   domain)
    try:
        block = probe.fqn(names.PERCEPTION_BLOCK)
        probe.wait(lambda: probe.alive(block) and probe.beats[block].ready, 60,
                   'the perception block ready')
        # Kill the block while it works on the long utterance; if the transcription ended
        # before the kill landed (a fast machine), play it again.
        for attempt in range(3):
            res = probe.play(names.MICROPHONE_PLAY, path=long_wav, source=f'mic:long{attempt}')
            assert res.accepted and res.observation_ids, res.message
            oid = res.observation_ids[-1]
            probe.wait(lambda: busy(probe, block) or oid in probe.percepts, TURN_S,
                       'the perception block working on the utterance')
            if busy(probe, block):
                old = probe.beats[block].instance_id
                pid = child_pid(out, names.PERCEPTION_BLOCK)
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                break
            print(f'attempt {attempt}: transcribed before the kill: {probe.percepts[oid]}')
        else:
            pytest.fail('the perception block never was busy long enough to kill, three times')
        r = probe.wait_response(oid, FAILOVER_S)
        assert time.monotonic() - killed < FAILOVER_S
        assert r.status == r.STATUS_FAILED and r.modality == 'speech', (r.status, r.error)
        assert r.error.startswith('perception failed: ') and 'perception' in r.error[19:], \
            r.error
        assert probe.wait_percept(oid, FAILOVER_S).error, 'the percept says it failed'
        probe.wait(lambda: back(probe, block, old), BACK_S - (time.monotonic() - killed),
                   'the perception block back in service')
        assert f'{names.PERCEPTION_BLOCK} (pid {pid}) killed by SIGKILL; restarting it' \
            in out.text()
        res = probe.play(names.MICROPHONE_PLAY, path=short_wav, source='mic:after')
        assert res.accepted and res.observation_ids, res.message
        r = probe.wait_response(res.observation_ids[-1], TURN_S)
        assert r.status == r.STATUS_OK and r.modality == 'speech', r.error

        # The microphone, killed between utterances, comes back and hears again.
        mic = probe.fqn(names.MICROPHONE)
        old = probe.beats[mic].instance_id
        pid = child_pid(out, names.MICROPHONE)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        probe.wait(lambda: back(probe, mic, old), BACK_S, 'the microphone back')
        # An utterance published before the kernel has matched the new process's publisher is
        # lost (volatile QoS, as for any restarted sensor): the kernel scores every utterance it
        # gets, so one it did not score within seconds is played again.
        for attempt in range(3):
            res = probe.play(names.MICROPHONE_PLAY, path=short_wav, source='mic:again')
            assert res.accepted and res.observation_ids, res.message
            oid = res.observation_ids[-1]
            try:
                probe.wait(lambda: oid in probe.salience, 15.0, f'the kernel scoring {oid}')
                break
            except AssertionError:
                print(f'attempt {attempt}: the kernel never got {oid} '
                      f'(the probe did: {oid in probe.audio})')
        r = probe.wait_response(oid, TURN_S)
        assert r.status == r.STATUS_OK and r.modality == 'speech', r.error
        assert proc.poll() is None, 'the graph was torn down'
        assert 'Traceback' not in out.text()
    except AssertionError:
        print(out.text()[-12000:])       # what the graph said, for the failure's story
        raise
    finally:
        probe.close()
        stop(proc, output=out)
        lock.close()
