"""Observation validation, salience, energy, routing and conversation: pure core, no ROS."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from sage_ros.core.conversation import Conversation
from sage_ros.core.energy import AtpLedger
from sage_ros.core.routing import Complexity, RoleMap, estimate_complexity
from sage_ros.core.salience import Observation, SalienceWeights, SnarcSalience, ngram_embedder
from sage_ros.core.text import InvalidText, sanitize


def test_sanitize_removes_control_characters_and_collapses_whitespace() -> None:
    assert sanitize('he\x00llo\x07\n  world\t!\u200b') == 'hello world !'


@pytest.mark.parametrize('raw, reason', [('', 'empty'), ('   \n\t', 'empty'),
                                         ('\x00\x01\x1b', 'control')])
def test_sanitize_refuses_empty_text(raw: str, reason: str) -> None:
    with pytest.raises(InvalidText, match=reason):
        sanitize(raw)


def test_sanitize_refuses_oversized_text_instead_of_cutting_it() -> None:
    with pytest.raises(InvalidText, match='too long: 1000000 characters'):
        sanitize('a' * 1_000_000, max_chars=4000)
    assert sanitize('é' * 4000, max_chars=4000) == 'é' * 4000


def scorer() -> SnarcSalience:
    return SnarcSalience(ngram_embedder())


def test_repeated_input_loses_novelty_and_new_input_regains_it() -> None:
    s = scorer()
    first = s.score('text', Observation('where is the red cup?'))
    again = s.score('text', Observation('where is the red cup?'))
    other = s.score('text', Observation('ALERT!!! smoke detected in the kitchen'))
    assert first.novelty == 1.0
    assert again.novelty == pytest.approx(0.0, abs=1e-9)
    assert other.novelty > 0.7
    assert again.total < first.total


def test_surprise_rises_for_an_input_unlike_the_recent_ones() -> None:
    s = scorer()
    calm = [s.score('text', Observation(f'status report number {i} all nominal'))
            for i in range(12)]
    shout = s.score('text', Observation('FIRE!!! EVACUATE NOW!!! EVERYONE OUT OF THE BUILDING!!!'))
    assert calm[0].surprise == 0.0  # nothing was predicted before the first observation
    assert shout.surprise > 0.8 > max(c.surprise for c in calm[1:])
    assert shout.arousal > 0.8 > max(c.arousal for c in calm)


def test_sensors_have_separate_histories() -> None:
    s = scorer()
    s.score('a', Observation('hello there'))
    assert s.score('b', Observation('hello there')).novelty == 1.0


def test_reward_is_neutral_until_outcomes_then_learns() -> None:
    s = scorer()
    first = s.score('text', Observation('hi'))
    assert first.reward == 0.5
    for _ in range(5):
        s.record_outcome('text', first, 1.0)
    assert s.score('text', Observation('hi')).reward > 0.8
    for _ in range(20):
        s.record_outcome('text', first, 0.0)
    assert s.score('text', Observation('hi')).reward < 0.2


@pytest.mark.parametrize('text', ['x', '!' * 5000, 'A' * 3000, '1234567890' * 100, 'ünïcödé 你好'])
def test_salience_dimensions_stay_in_unit_interval(text: str) -> None:
    s = SnarcSalience(ngram_embedder(), weights=SalienceWeights(surprise=1.0, novelty=0.0,
                                                                 arousal=1.0))
    for _ in range(3):
        sc = s.score('text', Observation(text))
        for v in (*sc.dims(), sc.total, sc.confidence):
            assert 0.0 <= v <= 1.0 and not math.isnan(v)


def test_zero_weights_fall_back_to_equal_weights() -> None:
    w = SalienceWeights(0.0, 0.0, 0.0, 0.0, 0.0).normalised()
    assert w == pytest.approx((0.2,) * 5)


def test_atp_grant_is_capped_by_what_is_available_and_unused_part_returns() -> None:
    ledger = AtpLedger(capacity=10.0)
    g1 = ledger.reserve(8.0)
    g2 = ledger.reserve(8.0)
    assert (g1, g2) == (8.0, 2.0)
    assert ledger.available == 0.0
    assert ledger.settle(g1, spent=3.0) == (3.0, 5.0)   # charged what was used, rest returned
    assert ledger.settle(g2, spent=99.0) == (7.0, 0.0)  # overrun charged as far as ATP allows
    assert ledger.level == 0.0 and ledger.unpaid_total == pytest.approx(92.0)
    ledger.recharge(100.0)
    assert ledger.level == 10.0                          # recharge stops at capacity


@pytest.mark.parametrize('text, expected', [
    ('hello', Complexity.SIMPLE), ('Hi there!', Complexity.SIMPLE),
    ('What time is it?', Complexity.SIMPLE),
    ('Design a routine for tidying the lab bench.', Complexity.COMPLEX),
    ('Explain how the arm calibration works', Complexity.COMPLEX),
    ('Please bring the blue box from the shelf to the table', Complexity.MODERATE),
    ('word ' * 60, Complexity.COMPLEX),
])
def test_complexity_heuristic(text: str, expected: Complexity) -> None:
    assert estimate_complexity(text) is expected


def test_role_map_and_complexity_parsing() -> None:
    roles = RoleMap(simple='tiny', moderate='tiny', complex='big')
    assert roles.role_for(Complexity.parse(' Complex ')) == 'big'
    with pytest.raises(ValueError, match='unknown complexity'):
        Complexity.parse('hard')


def test_conversation_keeps_system_prompt_and_latest_exchanges() -> None:
    c = Conversation(system_prompt='be brief', max_exchanges=2)
    for i in range(3):
        c.record(f'q{i}', f'a{i}')
    msgs = c.messages_for('q3')
    assert [(m.role, m.content) for m in msgs] == [
        ('system', 'be brief'), ('user', 'q1'), ('assistant', 'a1'), ('user', 'q2'),
        ('assistant', 'a2'), ('user', 'q3')]
    assert c.clear() == 2 and len(c) == 0


def test_core_never_imports_ros() -> None:
    code = ('import sys, pkgutil, importlib, sage_ros.core as c\n'
            'for m in pkgutil.iter_modules(c.__path__): importlib.import_module("sage_ros.core." + m.name)\n'
            'bad = [m for m in sys.modules if m.split(".")[0] in ("rclpy", "std_msgs", "sage_interfaces")]\n'
            'assert not bad, bad\n')
    subprocess.run([sys.executable, '-c', code], check=True)
