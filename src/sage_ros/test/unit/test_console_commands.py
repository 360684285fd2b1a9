"""The console's commands without a graph: which lines are commands (never sent as turns),
an unknown one is one line, the kernel's database is found in the parameters files, and the
session-end helpers read a model's summary and note or fall back to the user's words."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import yaml

from sage_ros.cli.chat import Chat, is_command, kernel_state_file, run_command
from sage_ros.core.sessions import Exchange, ending, parse_answer, remembered, transcript


@pytest.mark.parametrize('line, command', [
    ('/state', True), ('  /remember the key is blue', True), ('/Quit', True),
    ('/', False), ('/ 3 apples', False), ('what is 3/4?', False), ('', False)])
def test_which_lines_are_commands(line: str, command: bool) -> None:
    assert is_command(line) is command


def test_an_unknown_command_is_one_line_and_help_lists_them() -> None:
    chat = cast(Chat, object())        # neither needs the graph
    assert run_command(chat, '/fly away') == ('unknown command /fly (not sent); /help lists '
                                              'the commands')
    shown = run_command(chat, '/help')
    for name in ('/state', '/sleep', '/remember', '/forget', '/sessions', '/quit'):
        assert name in shown


def test_the_kernel_database_comes_from_the_parameters(tmp_path: Path,
                                                       isolated_state_dir: Path) -> None:
    base = tmp_path / 'base.yaml'
    base.write_text(yaml.safe_dump({'/**/kernel': {'ros__parameters': {'state_file': ''}}}))
    assert kernel_state_file([base]) == isolated_state_dir / 'sage.db'
    top = tmp_path / 'top.yaml'
    top.write_text(yaml.safe_dump({'/**/kernel': {'ros__parameters': {
        'state_file': str(tmp_path / 'robot.db')}}}))
    assert kernel_state_file([base, top]) == tmp_path / 'robot.db'
    off = tmp_path / 'off.yaml'
    off.write_text(yaml.safe_dump({'/**/kernel': {'ros__parameters': {'state_file': 'none'}}}))
    assert kernel_state_file([base, off]) is None


def test_the_summary_and_note_are_read_from_the_answer_or_fall_back() -> None:
    assert parse_answer('We spoke.\nRemember next time: ask about Lyon') == (
        'We spoke.', 'ask about Lyon')
    users = ['hello', 'remember that the key is blue', 'Please remember: pills at 8']
    assert remembered(users) == 'the key is blue. pills at 8.'
    e = ending('random words without a marker', '', users)
    assert (e.summary, e.note, e.by_model) == ('random words without a marker',
                                               'the key is blue. pills at 8.', True)
    e = ending(None, 'language block not reachable', users)
    assert e.summary == '' and not e.by_model and 'language block not reachable' in e.why
    text = transcript([Exchange('a' * 50, 'b'), Exchange('newest', 'answer')], max_chars=40)
    assert text == 'User: newest\nRobot: answer'

