"""`sage hear --json` and `sage see --json` as a user runs them, against a running graph (`sage
up`, the demo profile with tiny random language models, the real whisper and Haar cascade):
one JSON object with the documented fields, and one `sage: error:` line (exit code 2, no
traceback) for a missing file or one the sensor node refuses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest

from conftest import params_for
from graph_support import SAGE, Output, graph_env
from test_perception_e2e import (QUESTION, PerceptionProbe, graph_overrides, module_graph,
                                 words)

pytestmark = [pytest.mark.graph, pytest.mark.slow]

CLI_S = 300.0   # [s] one command, attaching included


@pytest.fixture(scope='module')
def running(tmp_path_factory: pytest.TempPathFactory, tiny_models: Dict[str, Path]
            ) -> Iterator[Tuple[PerceptionProbe, Output, int]]:
    with module_graph(tmp_path_factory.mktemp('perceive_cli'),
                      params_for(tiny_models, **graph_overrides())) as g:
        yield g


def sage(domain: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SAGE, *args], env=graph_env(domain), capture_output=True, text=True,
                          timeout=CLI_S, stdin=subprocess.DEVNULL)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert 'Traceback' not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith('sage: error:')]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_hear_json(running: Tuple[PerceptionProbe, Output, int], tmp_path: Path) -> None:
    from media_support import speak
    probe, _, domain = running
    wav = speak(QUESTION, tmp_path / 'question.wav', pad_s=0.8)
    proc = sage(domain, 'hear', '--json', '--attach', str(wav))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    rec: Dict[str, Any] = json.loads(lines[0])
    for key in ('transcript', 'response', 'asr_s', 'latency_s', 'observation_id',
                'audio_duration_s', 'model', 'status'):
        assert key in rec, key
    assert rec['status'] == 'ok' and rec['response']
    assert len(set(words(rec['transcript'])) & set(words(QUESTION))) >= 3, rec['transcript']
    assert rec['asr_s'] > 0 and rec['latency_s'] > 0 and rec['audio_duration_s'] > 1.0
    assert rec['observation_ids'] == [rec['observation_id']]
    # The same turn the graph answered on `response`.
    r = probe.wait_response(rec['observation_id'], 30)
    assert r.modality == 'speech' and r.input_text == rec['transcript']


def test_see_json(running: Tuple[PerceptionProbe, Output, int], tmp_path: Path) -> None:
    from media_support import astronaut_jpeg
    _, _, domain = running
    photo = astronaut_jpeg(tmp_path / 'astronaut.jpg')
    proc = sage(domain, 'see', '--json', '--attach', str(photo))
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ('observation_ids', 'salience', 'detections', 'description', 'motion'):
        assert key in rec, key
    assert len(rec['observation_ids']) == 1
    assert 'face' in [d['label'] for d in rec['detections']]
    assert rec['description'] and 0.0 <= rec['salience'] <= 1.0


def test_text_output_and_mistakes(running: Tuple[PerceptionProbe, Output, int],
                                  tmp_path: Path) -> None:
    from media_support import speak
    _, _, domain = running
    wav = speak('Hello robot.', tmp_path / 'hello.wav', pad_s=0.5)
    proc = sage(domain, 'hear', '--attach', str(wav))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('heard (') and '\nsage> ' in proc.stdout
    # Mistakes: one line each, exit code 2, before or after attaching.
    assert 'no such file' in one_error_line(sage(domain, 'hear', '--attach',
                                                 str(tmp_path / 'missing.wav')))
    broken = tmp_path / 'broken.wav'
    broken.write_bytes(wav.read_bytes()[:30])
    assert 'broken.wav' in one_error_line(sage(domain, 'hear', '--attach', str(broken)))
    text = tmp_path / 'notes.txt'
    text.write_text('not an image\n' * 10)
    assert 'notes.txt' in one_error_line(sage(domain, 'see', '--attach', str(text)))


def test_chat_voice_without_an_input_device(running: Tuple[PerceptionProbe, Output, int]
                                            ) -> None:
    """`sage chat --voice` where sounddevice finds no input device (this machine, a CI runner):
    one line says so and the chat goes on as text."""
    from sage_ros.cli.chat import input_device
    device, why = input_device()
    if device:
        pytest.skip(f'this machine has an input device ({device}): the no-device path is moot')
    _, _, domain = running
    proc = subprocess.run([*SAGE, 'chat', '--voice', '--attach', '--script', '-', '--json'],
                          env=graph_env(domain), input='hello robot\n', capture_output=True,
                          text=True, timeout=CLI_S)
    assert proc.returncode == 0, proc.stderr
    voice = [line for line in proc.stderr.splitlines() if line.startswith('--voice:')]
    assert len(voice) == 1 and 'text chat' in voice[0], proc.stderr
    assert why.split(' (')[0] in voice[0]
    assert json.loads(proc.stdout.strip().splitlines()[-1])['status'] == 'ok'
