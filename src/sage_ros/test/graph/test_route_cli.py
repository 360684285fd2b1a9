"""`sage route` as a user runs it: JSON lines on stdout, one clear line for a mistake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SAGE_ROUTE = [sys.executable, '-m', 'sage_ros.cli.main', 'route']


def route(*args: str, stdin: str = '') -> subprocess.CompletedProcess:
    return subprocess.run([*SAGE_ROUTE, *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, HF_HUB_OFFLINE='1'))


def one_clear_line(p: subprocess.CompletedProcess, expected: str) -> None:
    assert p.returncode == 2 and p.stdout == '', (p.stdout, p.stderr)
    assert 'Traceback' not in p.stderr
    assert p.stderr.strip().splitlines() == [f'sage: error: {expected}'], p.stderr


@pytest.mark.graph
@pytest.mark.slow  # loads the offline MiniLM
def test_router_prints_one_json_object_per_prompt() -> None:
    p = route(stdin='hello\n\n   \nDesign a weekly cleaning schedule around our shifts.\n')
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r['prompt'] for r in records] == [
        'hello', 'Design a weekly cleaning schedule around our shifts.']
    assert [(r['complexity'], r['role'], r['method']) for r in records] == [
        ('simple', 'small', 'router'), ('complex', 'large', 'router')]
    for r in records:
        assert set(r['scores']) == {'simple', 'moderate', 'complex'}
        assert sum(r['scores'].values()) == pytest.approx(1.0, abs=1e-3)
        assert max(r['scores'], key=r['scores'].get) == r['complexity']


@pytest.mark.graph
def test_heuristic_uses_the_profile_roles() -> None:
    p = route('--heuristic', '--profile', 'sprout', stdin='hi\nExplain the design.\n')
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in p.stdout.splitlines()]
    assert [(r['complexity'], r['role'], r['scores']) for r in records] == [
        ('simple', 'small', None), ('complex', 'small', None)]  # Sprout has one model


@pytest.mark.graph
def test_mistakes_are_one_line(tmp_path: Path) -> None:
    one_clear_line(route('--params-file', '/no/such.yaml', stdin='hello\n'),
                   'parameters file not found: /no/such.yaml')
    bad = tmp_path / 'bad.yaml'
    bad.write_text('/**/language_block:\n  ros__parameters:\n    roles: {complex: 7}\n')
    one_clear_line(route('--heuristic', '--params-file', str(bad), stdin='hello\n'),
                   f'{bad}: language_block roles.complex must be a model role name, got 7')
    one_clear_line(route('--heuristic', stdin='\n \n'),
                   'no input: standard input has no non-empty lines')
