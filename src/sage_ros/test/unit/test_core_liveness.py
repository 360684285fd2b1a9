"""core.liveness: new, restarted and back nodes; silence is confirmed before a node counts as gone."""

from __future__ import annotations

import pytest

from sage_ros.core.liveness import BACK, NEW, RESTARTED, Beat, LivenessMonitor


def test_events_for_new_restarted_and_back_nodes() -> None:
    m = LivenessMonitor(timeout_s=2.0, confirm_s=0.25)
    assert m.beat(Beat('/sage/language_block', 'a', block='language'), 0.0) == NEW
    assert m.beat(Beat('/sage/language_block', 'a', block='language'), 0.5) is None
    assert m.beat(Beat('/sage/language_block', 'b', block='language'), 1.0) == RESTARTED
    serving = m.block('language')
    assert serving is not None and serving.instance_id == 'b'
    assert m.expire(3.1) == [] and m.expire(3.4)[0].instance_id == 'b'
    assert m.alive('/sage/language_block') is None and m.block('language') is None
    assert m.beat(Beat('/sage/language_block', 'b', block='language'), 4.0) == BACK
    m.expire(10.0)
    m.expire(10.5)
    assert m.beat(Beat('/sage/language_block', 'c', block='language'), 11.0) == RESTARTED


def test_a_silence_must_be_seen_twice_before_the_node_is_gone() -> None:
    m = LivenessMonitor(timeout_s=2.0, confirm_s=0.25)
    m.beat(Beat('/sage/kernel', 'k'), 0.0)
    assert m.expire(2.5) == []                       # first sight of the silence
    m.beat(Beat('/sage/kernel', 'k'), 2.6)           # a late beat, taken after the timer ran
    assert m.expire(2.8) == [] and m.alive('/sage/kernel') is not None
    assert m.expire(4.7) == [] and m.expire(4.8) == []    # a new silence starts the count again
    gone = m.expire(4.96)
    assert [b.node for b in gone] == ['/sage/kernel'] and m.expire(9.0) == []


def test_the_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LivenessMonitor(timeout_s=0.0)


def test_stopped_says_why_one_instance_no_longer_runs() -> None:
    m = LivenessMonitor(timeout_s=2.0, confirm_s=0.25)
    node = '/sage/language_block'
    assert m.stopped(node, 'a') == ''                # never seen: nothing to say
    m.beat(Beat(node, 'a'), 0.0)
    assert m.stopped(node, 'a') == ''
    m.expire(2.5)
    m.expire(2.8)
    assert m.stopped(node, 'a') == 'stopped (no heartbeat for 2.0 s)'
    assert m.stopped(node, 'b') == 'restarted'       # a goal of another instance than the last
    m.beat(Beat(node, 'b'), 5.0)                     # the new instance is up
    assert m.stopped(node, 'a') == 'restarted' and m.stopped(node, 'b') == ''
    m.beat(Beat(node, 'c'), 6.0)                     # restarted again before any silence
    assert m.stopped(node, 'b') == 'restarted'
