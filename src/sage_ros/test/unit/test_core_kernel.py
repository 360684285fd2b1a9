"""Kernel decisions and capability routing, without ROS."""

from __future__ import annotations

import pytest

from sage_ros.core.blocks import BlockDescriptor, BlockRegistry, BlockType
from sage_ros.core.kernel import Dispatch, Kernel, KernelConfig, Rejection
from sage_ros.core.language import LanguageBlock
from sage_ros.core.salience import TextSalience


def language(name: str = 'language', loaded: bool = True) -> BlockDescriptor:
    return BlockDescriptor(name, BlockType.MONOLITHIC, ('conversation',), ('text',),
                           f'/sage/blocks/{name}', 'sage_interfaces/action/Language', loaded)


def kernel(**config: float) -> Kernel:
    k = Kernel(scorer=TextSalience(), config=KernelConfig(**config))  # type: ignore[arg-type]
    k.blocks.update(language())
    return k


def test_text_is_scored_and_dispatched_to_the_block_offering_conversation() -> None:
    k = kernel()
    score, d = k.observe('text', 'hello\x00 robot', now=0.0)
    assert isinstance(d, Dispatch)
    assert d.text == 'hello robot' and d.block.name == 'language' and d.turn_id == 1
    assert score is not None and score.novelty == 1.0
    assert k.snapshot(0.0).active_dispatches == 1


@pytest.mark.parametrize('raw, reason', [('', 'invalid input: empty text'),
                                         ('x' * 5000, 'invalid input: text too long')])
def test_invalid_text_is_rejected_with_a_reason_and_not_scored(raw: str, reason: str) -> None:
    k = kernel()
    score, d = k.observe('text', raw, now=0.0)
    assert score is None
    assert isinstance(d, Rejection) and d.reason.startswith(reason)
    assert k.snapshot(0.0).rejected_total == 1


def test_no_block_means_rejection() -> None:
    k = Kernel(scorer=TextSalience())
    k.blocks.update(language(loaded=False))
    _, d = k.observe('text', 'hello', now=0.0)
    assert isinstance(d, Rejection) and 'no loaded block' in d.reason


def test_observations_wait_while_atp_is_short_then_recover() -> None:
    k = kernel(atp_capacity=10.0, atp_grant=10.0, atp_min_dispatch=5.0, atp_recharge_per_s=1.0,
               atp_per_token=1.0)
    _, first = k.observe('text', 'one', now=0.0)
    assert isinstance(first, Dispatch)
    k.complete(first.turn_id, True, completion_tokens=8, now=0.0)    # 8 ATP spent, 2 left
    _, second = k.observe('text', 'two', now=0.0)
    assert isinstance(second, Rejection) and second.reason.startswith('ATP short')
    assert 'ATP short' in k.snapshot(0.0).last_decision
    _, third = k.observe('text', 'three', now=4.0)                    # recharged to 6
    assert isinstance(third, Dispatch)


def test_completion_charges_work_done_and_updates_trust() -> None:
    k = kernel(atp_per_token=0.5, trust_alpha=0.5, initial_trust=0.5)
    _, d = k.observe('text', 'hello', now=0.0)
    assert isinstance(d, Dispatch)
    assert k.complete(d.turn_id, True, completion_tokens=4, now=0.0) == 2.0
    assert k.trust['language'] == 0.75
    _, d2 = k.observe('text', 'again', now=0.0)
    assert isinstance(d2, Dispatch)
    k.complete(d2.turn_id, False, completion_tokens=0, now=0.0)
    assert k.trust['language'] == 0.375
    assert k.complete(999, True, 1, now=0.0) == 0.0   # unknown turn: nothing happens


def test_registry_prefers_the_most_trusted_loaded_block() -> None:
    reg = BlockRegistry()
    reg.update(language('a'))
    reg.update(language('b'))
    reg.update(BlockDescriptor('eyes', BlockType.MODULAR, ('detection',), ('image',), loaded=True))
    assert reg.find('conversation', 'text', {'a': 0.2, 'b': 0.9}).name == 'b'  # type: ignore[union-attr]
    assert reg.find('conversation', 'image') is None
    reg.remove('b')
    assert reg.find('conversation', 'text').name == 'a'  # type: ignore[union-attr]


def test_language_block_describes_its_contract() -> None:
    desc = LanguageBlock(generator=None).describe('/sage/blocks/language', 'T')  # type: ignore[arg-type]
    assert desc.block_type is BlockType.MONOLITHIC
    assert 'conversation' in desc.capabilities and desc.modalities == ('text',)
    assert desc.loaded and desc.action_name == '/sage/blocks/language'
