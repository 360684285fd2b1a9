"""The `sage` command as a user runs it: mistakes are one clear line; the demo on real models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import yaml

from conftest import params_for

SAGE = [sys.executable, '-m', 'sage_ros.cli.main']


def run(*args: str, stdin: str = '', timeout: float = 300, domain: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
               ROS_DOMAIN_ID=str(domain or 100 + os.getpid() % 30))
    return subprocess.run([*SAGE, *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_clear_line(p: subprocess.CompletedProcess, expected: str) -> None:
    assert p.returncode == 2, p.stderr
    assert 'Traceback' not in p.stderr and 'Traceback' not in p.stdout
    errors = [line for line in p.stderr.splitlines() if 'error' in line]
    assert len(errors) == 1 and expected in errors[0], p.stderr


def test_help_describes_every_command() -> None:
    p = run('--help')
    assert p.returncode == 0 and all(c in p.stdout for c in ('chat', 'up', 'models'))
    p = run('chat', '--help')
    assert p.returncode == 0 and '--script' in p.stdout and '--json' in p.stdout


def test_bad_params_path_is_one_line() -> None:
    one_clear_line(run('chat', '--params-file', '/no/such.yaml', '--script', '-', stdin='hi\n'),
                   'parameters file not found: /no/such.yaml')
    one_clear_line(run('up', '--params-file', '/no/such.yaml'), 'parameters file not found')


def test_missing_script_is_one_line_before_anything_starts() -> None:
    one_clear_line(run('chat', '--script', '/no/such/script.txt'),
                   'no such script file: /no/such/script.txt')


def test_empty_script_is_one_line(tiny_params_file: Path) -> None:
    one_clear_line(run('chat', '--embedded', '--params-file', str(tiny_params_file),
                       '--script', '-', '--json', stdin='\n  \n'),
                   'no input: standard input has no non-empty lines')


def test_missing_models_are_one_line(tmp_path: Path, tiny_models: Dict[str, Path]) -> None:
    pf = tmp_path / 'missing.yaml'
    pf.write_text(yaml.safe_dump(params_for(
        tiny_models, **{'model_manager:models.small.path': str(tmp_path / 'gone'),
                        'model_manager:models.large.path': str(tmp_path / 'gone too')})))
    one_clear_line(run('chat', '--embedded', '--params-file', str(pf), '--script', '-',
                       stdin='hello\n'), "model for role 'small' not found")


def test_one_missing_model_falls_back_and_says_so(tmp_path: Path,
                                                 tiny_models: Dict[str, Path]) -> None:
    pf = tmp_path / 'missing.yaml'
    pf.write_text(yaml.safe_dump(params_for(
        tiny_models, **{'model_manager:models.small.path': str(tmp_path / 'gone')})))
    p = run('chat', '--embedded', '--params-file', str(pf), '--script', '-', '--json',
            stdin='hello\nthanks\n')
    assert p.returncode == 0, p.stderr
    turns = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(turns) == 2
    for t in turns:
        assert t['status'] == 'ok' and t['role'] == 'large' and t['requested_role'] == 'small'
        assert "'small'" in t['fallback'] and 'not found' in t['fallback']


def test_invalid_parameter_value_is_one_line(tmp_path: Path, tiny_models: Dict[str, Path]) -> None:
    pf = tmp_path / 'bad.yaml'
    pf.write_text(yaml.safe_dump(params_for(tiny_models, **{'text_sensor:source': 'carrier pigeon'})))
    one_clear_line(run('up', '--params-file', str(pf)), "source='carrier pigeon'")
    pf.write_text(yaml.safe_dump(params_for(tiny_models, **{'language_block:router': 'oracle'})))
    one_clear_line(run('up', '--params-file', str(pf)), "unknown router 'oracle'")


@pytest.mark.slow
def test_demo_answers_small_then_large_with_a_swap_and_keeps_the_conversation() -> None:
    p = run('chat', '--embedded', '--script', '-', '--json', timeout=600,
            stdin='hello\nDesign a simple routine for a robot to tidy a desk.\nthanks!\n')
    assert p.returncode == 0, p.stderr
    turns = [json.loads(line) for line in p.stdout.splitlines()]
    # The design request goes to the language block, or, when its salience passes the
    # kernel's reasoning threshold (which depends on the sensor's history and the time of day),
    # to the reasoning block, whose steps run through the language block: the large model
    # answers either way. The swap policy then keeps the large model for the short "thanks!"
    # right after the swap (hysteresis: no swap back for one simple turn), and says so.
    assert [t['block'] for t in turns][::2] == ['language', 'language']
    assert turns[1]['block'] in ('language', 'reasoning')
    assert [(t['model'], t['role'], t['requested_role'], t['swapped']) for t in turns] == [
        ('SmolLM2-135M-Instruct', 'small', 'small', False),
        ('Qwen2.5-Coder-0.5B-Instruct', 'large', 'large', True),
        ('Qwen2.5-Coder-0.5B-Instruct', 'large', 'small', False)]
    assert turns[2]['fallback'] and not turns[0]['fallback'] and not turns[1]['fallback']
    assert all(t['status'] == 'ok' and t['response'] for t in turns)
    assert [t['complexity'] for t in turns] == ['simple', 'complex', 'simple']
    assert all(t['metabolic_state'] in ('WAKE', 'FOCUS') for t in turns)
    assert all(0.0 <= t['salience'] <= 1.0 and t['stance'] for t in turns)


def test_json_lines_carry_the_observation_id_source_and_shortened_answers() -> None:
    from sage_interfaces.msg import Response
    from sage_ros.cli.chat import answer_text, as_json
    r = Response(turn_id=7, observation_id='c0ffee01/3', source='console', text='Hello.',
                 truncated=True, status=Response.STATUS_OK)
    record = json.loads(as_json('hi', r))
    assert (record['observation_id'], record['source'], record['truncated']) == (
        'c0ffee01/3', 'console', True)
    assert answer_text(r) == 'Hello. (shortened)'
    r.truncated = False
    assert answer_text(r) == 'Hello.' and json.loads(as_json('hi', r))['truncated'] is False
