"""Context across a swap, with the real offline models: what was said to the small model is in
the large model's prompt after the swap, compressed to its window, and the large model uses it."""

from __future__ import annotations

import pytest

from sage_ros.core.context import FACTS_HEADER
from sage_ros.core.conversation import Conversation
from sage_ros.core.language import LanguageBlock
from sage_ros.core.models import ModelPool, ModelSpec
from sage_ros.core.routing import Complexity, RoleMap
from sage_ros.core.swap_policy import PolicyConfig, SwapPolicy

pytestmark = pytest.mark.slow

FILLER = [(f'Tell me about the weather on day {i}.', 'It was sunny and calm all day long, '
           'with a light breeze from the west and no rain at all.') for i in range(1, 9)]


def test_facts_survive_a_swap_and_compression() -> None:
    specs = {
        'small': ModelSpec(role='small', model_id='SmolLM2-135M-Instruct',
                           path='offline:smollm2-135m-instruct', max_new_tokens=24,
                           context_window=2048),
        # A deliberately small window for the large model: the history must be compressed.
        'large': ModelSpec(role='large', model_id='Qwen2.5-Coder-0.5B-Instruct',
                           path='offline:qwen2.5-coder-0.5b-instruct', max_new_tokens=24,
                           context_window=320),
    }
    pool = ModelPool(specs, 'small', max_resident=1,
                     policy=SwapPolicy(PolicyConfig(substitute=False)), summary_tokens=40)
    block = LanguageBlock(pool, Conversation(system_prompt='You are a helpful robot.'),
                          RoleMap(simple='small', moderate='small', complex='large'))
    try:
        first = block.respond('Hello! My name is Alice and my office is room 214.',
                              Complexity.SIMPLE)
        assert first.generation.role == 'small'
        for user, reply in FILLER:
            block.conversation.record(user, reply)

        g = block.respond('What is my name, and which room is my office?',
                          Complexity.COMPLEX).generation
        assert g.role == 'large' and g.swapped
        ctx = g.context
        assert ctx is not None and ctx.compressed_messages > 0
        assert ctx.prompt_tokens <= 320
        system = ctx.messages[0].content
        assert FACTS_HEADER in system and 'Alice' in system and '214' in system
        # The real large model reads the facts back (greedy decoding: deterministic).
        assert 'Alice' in g.text or '214' in g.text, g.text
    finally:
        pool.unload_all()
