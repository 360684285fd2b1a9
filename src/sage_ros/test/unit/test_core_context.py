"""Fitting a conversation to a model's context window: facts survive, the tail stays verbatim."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

import pytest

from sage_ros.core.context import (FACTS_HEADER, MEMORY_HEADER, CountFn, SUMMARY_HEADER,
                                   ContextOverflow, SummaryCache, memory_block,
                                   extract_facts, extractive_summary, fit_to_window,
                                   summary_request)
from sage_ros.core.conversation import ChatTurn, Conversation


def counter_for(model_dir: Path) -> CountFn:
    """Token count of the rendered prompt, with the model's own tokenizer and chat template."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)

    def count(msgs: Sequence[ChatTurn]) -> int:
        ids: Any = tok.apply_chat_template([{'role': m.role, 'content': m.content} for m in msgs],
                                      add_generation_prompt=True, tokenize=True, return_dict=True)
        return len(ids['input_ids'])
    return count


def long_conversation() -> Conversation:
    conv = Conversation(system_prompt='You are a robot.', max_exchanges=100)
    conv.record('Hello, my name is Alice and I work in room 214.', 'Nice to meet you, Alice.')
    conv.record('The charging dock is next to the Blue Cabinet.', 'Noted.')
    for i in range(20):
        conv.record(f'please tell me something about the kitchen table number {i}',
                    'the table is clean and the cup is on the table next to the window ' * 3)
    return conv


def test_facts_are_names_numbers_and_quotes() -> None:
    facts = extract_facts('My name is Alice and the box is in room 214 of Building Seven. '
                          'Back at 7pm; it weighs 3.5 kg. Call it "Project Blue".')
    assert facts == ['Alice', 'room 214', 'Building Seven', '7pm', '3.5 kg', 'Project Blue']
    # A bare small count is noise; after a place word it names something.
    assert extract_facts('I have 3 cups and 214 boxes; dock 2 is free.') == ['214', 'dock 2']
    assert extract_facts('') == []
    assert extract_facts('Hello. Thanks!') == []


def test_a_conversation_that_fits_is_sent_unchanged(tiny_models: Dict[str, Path]) -> None:
    count = counter_for(tiny_models['small'])
    msgs = Conversation(system_prompt='sys').messages_for('hi')
    fitted = fit_to_window(msgs, count, window=512, reserve_tokens=16)
    assert fitted.messages == tuple(msgs) and fitted.compressed_messages == 0
    assert fitted.prompt_tokens == count(msgs)


def test_older_turns_are_summarised_and_facts_kept_verbatim(tiny_models: Dict[str, Path]) -> None:
    count = counter_for(tiny_models['small'])
    msgs = long_conversation().messages_for('where is my office?')
    assert count(msgs) > 1024
    fitted = fit_to_window(msgs, count, window=1024, reserve_tokens=64)
    assert fitted.prompt_tokens <= 1024 - 64
    assert fitted.prompt_tokens == count(fitted.messages)
    assert fitted.compressed_messages > 0
    system = fitted.messages[0]
    assert system.role == 'system' and system.content.startswith('You are a robot.')
    assert SUMMARY_HEADER in system.content and FACTS_HEADER in system.content
    for fact in ('Alice', 'room 214', 'Blue Cabinet'):
        assert fact in system.content
    # The tail is verbatim, starts with a question and ends with the new message.
    assert fitted.messages[1].role == 'user'
    assert fitted.messages[-1] == msgs[-1]
    assert list(fitted.messages[1:]) == list(msgs[-(len(fitted.messages) - 1):])


def test_the_model_summary_is_used_and_cached(tiny_models: Dict[str, Path]) -> None:
    count = counter_for(tiny_models['small'])
    calls: List[int] = []

    def summarize(turns: Sequence[ChatTurn]) -> str:
        calls.append(len(turns))
        return 'They talked about the kitchen.'
    cache = SummaryCache()
    msgs = long_conversation().messages_for('where is my office?')
    first = fit_to_window(msgs, count, 1024, 64, summarize, cache)
    again = fit_to_window(msgs, count, 1024, 64, summarize, cache)
    assert 'They talked about the kitchen.' in first.summary
    assert first == again
    assert len(calls) == 1   # the model is asked once, for the chosen cut, and then cached


def test_a_failing_summariser_falls_back_to_extraction(tiny_models: Dict[str, Path]) -> None:
    count = counter_for(tiny_models['small'])

    def broken(turns: Sequence[ChatTurn]) -> str:
        raise RuntimeError('model gone')
    fitted = fit_to_window(long_conversation().messages_for('hi'), count, 1024, 64, broken)
    assert 'The user said:' in fitted.summary and 'Alice' in fitted.summary


def test_too_long_a_message_is_a_clear_error(tiny_models: Dict[str, Path]) -> None:
    count = counter_for(tiny_models['small'])
    msgs = Conversation(system_prompt='sys').messages_for('word ' * 2000)
    with pytest.raises(ContextOverflow, match='context window'):
        fit_to_window(msgs, count, window=512, reserve_tokens=64)


def test_extractive_summary_and_summary_request() -> None:
    turns = [ChatTurn('user', 'Hello there. My name is Alice. How are you?'),
             ChatTurn('assistant', 'Fine.'), ChatTurn('user', 'what is the weather like')]
    assert extractive_summary(turns) == 'The user said: My name is Alice. what is the weather like'
    req = summary_request(turns)
    assert req[0].role == 'system' and 'user: Hello there.' in req[1].content
    assert 'assistant: Fine.' in req[1].content


def test_context_goes_to_this_turn_only() -> None:
    conv = Conversation(system_prompt='sys')
    msgs = conv.messages_for('combine them', context='part 1: A\npart 2: B')
    assert 'part 2: B' in msgs[-1].content and msgs[-1].content.endswith('Request: combine them')
    conv.record('combine them', 'AB')
    assert all('part 2' not in m.content for m in conv.messages_for('next'))


def test_under_pressure_the_newest_facts_are_kept(tiny_models: Dict[str, Path]) -> None:
    count = counter_for(tiny_models['small'])
    conv = Conversation(system_prompt='sys', max_exchanges=200)
    for i in range(60):
        conv.record(f'Robot R{100 + i} parks in room {200 + i}.', 'Noted, thank you very much.')
    msgs = conv.messages_for('where does R159 park?')
    fitted = fit_to_window(msgs, count, window=512, reserve_tokens=64)
    assert fitted.prompt_tokens <= 512 - 64 and fitted.facts
    kept = fitted.messages[0].content
    assert 'R159' in kept and 'room 259' in kept          # the newest facts survive
    assert fitted.facts == tuple(extract_facts(' '.join(
        m.content for m in msgs[1:-1])))[-len(fitted.facts):]


# ---- recalled memory and the awakening preamble in the system message -------------------------

def word_count(msgs: Sequence[ChatTurn]) -> int:
    """A fake tokenizer: one token per word, four per message for the template."""
    return sum(4 + len(m.content.split()) for m in msgs)


PREAMBLE = 'You are SAGE. This is session 3 (phase: infant).'
MEMORIES = ['The user said earlier: my name is Alice', 'Remember: the dock is in room 7',
            'The user said earlier: I like green tea very much indeed']


def test_memory_goes_into_the_system_message_when_it_fits() -> None:
    msgs = Conversation(system_prompt='You are a robot.').messages_for('who am I?')
    fitted = fit_to_window(msgs, word_count, window=512, reserve_tokens=16, preamble=PREAMBLE,
                           memory=MEMORIES)
    assert fitted.memory_used == 3 and fitted.preamble_used
    system = fitted.messages[0].content
    assert system.startswith('You are a robot.') and PREAMBLE in system
    assert MEMORY_HEADER in system
    assert [line for line in system.splitlines() if line.startswith('- ')] == \
        [f'- {m}' for m in MEMORIES]          # best first, as given
    assert fitted.messages[1:] == tuple(msgs[1:]) and fitted.compressed_messages == 0
    assert fitted.memory_block == memory_block(PREAMBLE, MEMORIES)
    assert fitted.prompt_tokens == word_count(fitted.messages)


def test_without_memory_nothing_changes() -> None:
    msgs = long_conversation().messages_for('where is my office?')
    plain = fit_to_window(msgs, word_count, window=400, reserve_tokens=32)
    empty = fit_to_window(msgs, word_count, window=400, reserve_tokens=32, preamble=' ',
                          memory=['', '  '])
    assert plain == empty and plain.memory_used == 0 and not plain.preamble_used


def test_memory_is_bounded_by_its_share_lowest_ranked_dropped_first() -> None:
    msgs = Conversation(system_prompt='sys').messages_for('hi')
    many = [f'memory number {i} ' + 'word ' * 10 for i in range(20)]   # ~13 tokens each
    fitted = fit_to_window(msgs, word_count, window=416, reserve_tokens=16, preamble=PREAMBLE,
                           memory=many, memory_share=0.25)
    added = word_count(fitted.messages[:1]) - word_count([ChatTurn('system', 'sys')])
    assert added <= 100                                  # a quarter of the 400-token room
    assert 0 < fitted.memory_used < len(many) and fitted.preamble_used
    system = fitted.messages[0].content
    assert all(m.strip() in system for m in many[:fitted.memory_used])   # a prefix: the best
    assert all(m.strip() not in system for m in many[fitted.memory_used:])
    # Memories go before the preamble: a share too small for any memory still holds it.
    small = fit_to_window(msgs, word_count, window=416, reserve_tokens=16, preamble=PREAMBLE,
                          memory=many, memory_share=0.04)
    assert small.preamble_used and small.memory_used == 0
    # And a share too small for the preamble drops it too.
    none = fit_to_window(msgs, word_count, window=416, reserve_tokens=16, preamble=PREAMBLE,
                         memory=many, memory_share=0.01)
    assert not none.preamble_used and none.memory_used == 0
    assert none.messages == tuple(msgs)


def test_memory_takes_its_share_from_old_history_which_is_summarised() -> None:
    msgs = long_conversation().messages_for('where is my office?')
    plain = fit_to_window(msgs, word_count, window=400, reserve_tokens=32)
    with_memory = fit_to_window(msgs, word_count, window=400, reserve_tokens=32,
                                preamble=PREAMBLE, memory=MEMORIES)
    assert with_memory.memory_used == 3 and with_memory.prompt_tokens <= 400 - 32
    assert with_memory.compressed_messages >= plain.compressed_messages > 0
    system = with_memory.messages[0].content
    # system prompt, then the memory block, then the summary of the older turns
    assert system.index('You are a robot.') < system.index(PREAMBLE) \
        < system.index(MEMORY_HEADER) < system.index(SUMMARY_HEADER)
    assert 'Alice' in system                      # the facts of the summarised turns stay
    assert with_memory.messages[-1] == msgs[-1]


def test_a_long_new_message_shrinks_the_memory_block_rather_than_fail() -> None:
    msgs = Conversation(system_prompt='sys').messages_for('word ' * 365)
    fitted = fit_to_window(msgs, word_count, window=416, reserve_tokens=16, preamble=PREAMBLE,
                           memory=MEMORIES, memory_share=0.25)
    assert fitted.prompt_tokens <= 400 and fitted.messages[-1] == msgs[-1]
    assert fitted.memory_used < len(MEMORIES)
    with pytest.raises(ContextOverflow):
        fit_to_window(Conversation(system_prompt='sys').messages_for('word ' * 420), word_count,
                      window=416, reserve_tokens=16, preamble=PREAMBLE, memory=MEMORIES)


def test_memory_fits_with_a_real_tokenizer(tiny_models: Dict[str, Path]) -> None:
    count = counter_for(tiny_models['small'])
    msgs = long_conversation().messages_for('where is my office?')
    many = [f'The user said earlier: the cup number {i} is on the table' for i in range(40)]
    fitted = fit_to_window(msgs, count, window=1024, reserve_tokens=64, preamble=PREAMBLE,
                           memory=many)
    assert fitted.prompt_tokens <= 1024 - 64 and fitted.prompt_tokens == count(fitted.messages)
    assert 0 < fitted.memory_used < len(many) and fitted.preamble_used
    block_tokens = count([ChatTurn('system', 'You are a robot.\n\n' + fitted.memory_block)]) \
        - count([ChatTurn('system', 'You are a robot.')])
    assert block_tokens <= 0.25 * (1024 - 64)
