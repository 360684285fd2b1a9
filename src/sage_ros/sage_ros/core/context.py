"""Fit a conversation to one model's context window without losing what matters.

The conversation belongs to the language block and is sent whole; the model manager fits it to
whichever model serves the turn, with that model's own tokenizer, right before generating. The
system preamble and the latest exchanges stay verbatim; older exchanges become a short summary
(by a small model when one is resident, else extractive) followed by the named facts they
contained (names, numbers, places), copied verbatim so no summariser can lose them.

What the memory block recalled for the turn (an awakening preamble and memories, best first)
goes into the system message too, as one block bounded to a share of the window: the lowest
ranked memories are dropped first, then the preamble, so recall never crowds out the
conversation by more than that share.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple

from .conversation import ChatTurn

CountFn = Callable[[Sequence[ChatTurn]], int]       # tokens of the rendered prompt
SummarizeFn = Callable[[Sequence[ChatTurn]], str]   # older turns -> a short summary

SUMMARY_HEADER = 'Earlier in this conversation:'
FACTS_HEADER = 'Facts stated earlier (verbatim):'
MEMORY_HEADER = 'What you remember that may be relevant (most relevant first):'
DEFAULT_MEMORY_SHARE = 0.25   # of the room left after the answer's reserve


class ContextOverflow(ValueError):
    """Even the system preamble and the new message alone do not fit the window."""


@dataclass(frozen=True)
class FittedContext:
    messages: Tuple[ChatTurn, ...]   # what the model receives
    prompt_tokens: int               # [tokens] as counted by the model's tokenizer
    compressed_messages: int         # older messages replaced by the summary (0 = sent verbatim)
    summary: str                     # the summary block added to the system message ('' if none)
    facts: Tuple[str, ...]           # named facts kept verbatim from the compressed messages
    memory_used: int = 0             # recalled memories given to the model (a prefix, best first)
    preamble_used: bool = False      # the awakening preamble fitted and was given
    memory_block: str = ''           # the preamble + memories block of the system message


# Numbers with optional decimals and a unit or suffix ("214", "3.5 kg", "7pm", "20%").
_NUMBER = re.compile(r"\b\d+(?:[.,:]\d+)*(?:\s?(?:%|°[CF]|(?:kg|g|mg|km|m|cm|mm|s|ms|min|h|am|pm"
                     r"|V|W|Wh|kWh|mAh|MB|GB|MiB|GiB|Hz|kHz)\b))?")
# Runs of capitalised words ("Alice", "Room Seven", "New York"), not counting "I".
_NAME = re.compile(r"\b(?:[A-Z][a-zA-Z'-]+)(?:\s+(?:of|de|van|von|the)?\s*[A-Z][a-zA-Z'-]+)*")
# Words after which even a small number names something ("room 7", "dock 2").
_PLACE_WORDS = frozenset({'room', 'floor', 'door', 'gate', 'table', 'bay', 'dock', 'level', 'aisle',
                          'shelf', 'bed', 'desk', 'station', 'zone', 'number', 'no', 'apartment',
                          'building', 'platform', 'lane', 'row', 'seat', 'locker', 'cabinet'})
# Identifiers that mix letters and digits ("R159", "B-12", "PR2").
_CODE = re.compile(r"\b[A-Za-z][A-Za-z-]*\d[A-Za-z0-9-]*\b")
_QUOTED = re.compile(r"[\"“]([^\"”]{1,80})[\"”]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_NOT_NAMES = frozenset({'I', 'I\'m', 'I\'ll', 'I\'ve', 'I\'d', 'OK', 'Ok', 'Yes', 'No', 'Hi',
                        'Hello', 'Hey', 'Please', 'Thanks', 'Thank', 'The', 'A', 'An', 'It', 'This',
                        'That', 'What', 'Where', 'When', 'Who', 'Why', 'How', 'Can', 'Could',
                        'Would', 'Will', 'Do', 'Does', 'Is', 'Are', 'My', 'Your', 'You', 'We',
                        'Sure', 'Also', 'And', 'But', 'So', 'Then', 'Now', 'SAGE'})


def _starts_sentence(text: str, pos: int) -> bool:
    before = text[:pos].rstrip()
    return not before or before[-1] in '.!?:\n"“'


def extract_facts(text: str) -> List[str]:
    """Names, identifiers, numbers and quoted phrases of `text`, in order of appearance,
    without repeats."""
    found: List[Tuple[int, str]] = []
    for m in _QUOTED.finditer(text):
        found.append((m.start(), m.group(1).strip()))
    for m in _CODE.finditer(text):
        found.append((m.start(), m.group(0)))
    for m in _NUMBER.finditer(text):
        number = m.group(0).strip()
        before = text[:m.start()].split()
        place = before[-1] if before and before[-1].lower().strip('#:') in _PLACE_WORDS else ''
        if place:
            found.append((m.start(), f'{place} {number}'))   # "room 7", not a bare "7"
        elif not (number.isdigit() and len(number) <= 2):   # a bare small count is noise
            found.append((m.start(), number))
    mid_sentence = {m.group(0) for m in _NAME.finditer(text) if not _starts_sentence(text, m.start())}
    for m in _NAME.finditer(text):
        words = m.group(0).split()
        while words and words[0] in _NOT_NAMES:
            words = words[1:]
        # A lone capitalised word opening a sentence is usually just a word ("Call it ..."),
        # unless it also appears capitalised mid-sentence.
        if len(words) == 1 and _starts_sentence(text, m.start()) and words[0] not in mid_sentence:
            continue
        if words:
            found.append((m.start(), ' '.join(words)))
    seen: 'OrderedDict[str, None]' = OrderedDict()
    for _, fact in sorted(found):
        if fact and fact not in seen:
            seen[fact] = None
    return list(seen)


def extractive_summary(turns: Sequence[ChatTurn], max_chars: int = 600) -> str:
    """The user's sentences that carry facts (else their first sentence), oldest first."""
    picked: List[str] = []
    for turn in turns:
        if turn.role != 'user':
            continue
        sentences = [s.strip() for s in _SENTENCE.split(turn.content) if s.strip()]
        with_facts = [s for s in sentences if extract_facts(s)]
        picked.extend(with_facts or sentences[:1])
    if not picked:
        return ''
    text = 'The user said: ' + ' '.join(picked)
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(' ', 1)[0] + ' ...'
    return text


class SummaryCache:
    """Summaries by the content of the turns they summarise: the cut point of a growing
    conversation moves one exchange at a time, so the same prefix is asked for repeatedly."""

    def __init__(self, size: int = 32) -> None:
        self._items: 'OrderedDict[str, str]' = OrderedDict()
        self._size = size

    @staticmethod
    def key(turns: Sequence[ChatTurn]) -> str:
        h = hashlib.sha256()
        for t in turns:
            h.update(t.role.encode())
            h.update(b'\0')
            h.update(t.content.encode())
            h.update(b'\1')
        return h.hexdigest()

    def get_or_make(self, turns: Sequence[ChatTurn], make: Callable[[], str]) -> str:
        k = self.key(turns)
        if k in self._items:
            self._items.move_to_end(k)
            return self._items[k]
        value = make()
        self._items[k] = value
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return value


def _with_summary(system: Optional[ChatTurn], block: str) -> List[ChatTurn]:
    if not block:
        return [system] if system else []
    content = f'{system.content}\n\n{block}' if system else block
    return [ChatTurn('system', content)]


def _block(summary: str, facts: Sequence[str]) -> str:
    parts = [f'{SUMMARY_HEADER} {summary}'] if summary else []
    if facts:
        parts.append(f'{FACTS_HEADER} {"; ".join(facts)}.')
    return '\n'.join(parts)


def memory_block(preamble: str, memory: Sequence[str]) -> str:
    """The text added to the system message for a preamble and recalled memories."""
    parts = [preamble.strip()] if preamble.strip() else []
    lines = [f'- {m.strip()}' for m in memory if m.strip()]
    if lines:
        parts.append('\n'.join([MEMORY_HEADER, *lines]))
    return '\n\n'.join(parts)


def fit_memory(system: Optional[ChatTurn], preamble: str, memory: Sequence[str],
               count_tokens: CountFn, budget_tokens: int) -> Tuple[str, int, bool]:
    """(block, memories used, preamble used): the preamble if it fits `budget_tokens` alone,
    then the longest prefix of `memory` (best first) that fits beside it. Measured as what the
    block adds to the system message, with the model's own tokenizer."""
    memory = [m for m in memory if m.strip()]
    if budget_tokens <= 0 or (not preamble.strip() and not memory):
        return '', 0, False
    base = system.content if system else ''
    base_tokens = count_tokens([ChatTurn('system', base)])

    def cost(block: str) -> int:
        content = f'{base}\n\n{block}' if base else block
        return count_tokens([ChatTurn('system', content)]) - base_tokens

    use_preamble = bool(preamble.strip()) and cost(memory_block(preamble, ())) <= budget_tokens
    kept_preamble = preamble if use_preamble else ''
    # Costs grow with the prefix: find the longest prefix that fits by bisection.
    lo, hi = 0, len(memory)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(memory_block(kept_preamble, memory[:mid])) <= budget_tokens:
            lo = mid
        else:
            hi = mid - 1
    return memory_block(kept_preamble, memory[:lo]), lo, use_preamble


def fit_to_window(messages: Sequence[ChatTurn], count_tokens: CountFn, window: int,
                  reserve_tokens: int, summarize: Optional[SummarizeFn] = None,
                  cache: Optional[SummaryCache] = None, preamble: str = '',
                  memory: Sequence[str] = (),
                  memory_share: float = DEFAULT_MEMORY_SHARE) -> FittedContext:
    """`messages` fitted to `window - reserve_tokens` (see `_fit_history`), with the preamble
    and recalled `memory` (best first) added to the system message as one block of at most
    `memory_share` of that room.

    Within its share the block takes precedence over verbatim old history (which is then
    summarised, its facts kept); what does not fit the share is dropped, lowest-ranked memory
    first, then the preamble. If the system prompt, the block and the newest message together
    do not fit, the block shrinks until they do (to nothing: then as without memory). The
    system prompt and the newest message always stay.
    """
    if not messages:
        raise ValueError('no messages to fit')
    if not preamble.strip() and not any(m.strip() for m in memory):
        return _fit_history(messages, count_tokens, window, reserve_tokens, summarize, cache)
    limit = window - max(0, reserve_tokens)
    share = min(max(memory_share, 0.0), 1.0)
    system = messages[0] if messages[0].role == 'system' else None
    body = list(messages[1:] if system else messages)
    block, used, with_preamble = fit_memory(system, preamble, memory, count_tokens,
                                            int(share * limit))
    while True:
        if block:
            content = f'{system.content}\n\n{block}' if system and system.content else block
            candidate = [ChatTurn('system', content), *body]
        else:
            candidate = list(messages)
        try:
            fitted = _fit_history(candidate, count_tokens, window, reserve_tokens, summarize,
                                  cache)
        except ContextOverflow:
            if not block:
                raise
            # The newest message is long: give the block less room, to nothing at worst.
            memory = list(memory)[:max(0, used - 1)] if used else []
            preamble = preamble if used else ''
            block, used, with_preamble = fit_memory(system, preamble, memory, count_tokens,
                                                    int(share * limit))
            continue
        return replace(fitted, memory_used=used, preamble_used=with_preamble,
                       memory_block=block)


def _fit_history(messages: Sequence[ChatTurn], count_tokens: CountFn, window: int,
                 reserve_tokens: int, summarize: Optional[SummarizeFn] = None,
                 cache: Optional[SummaryCache] = None) -> FittedContext:
    """The longest verbatim tail of `messages` that fits `window - reserve_tokens`, with the
    older part summarised into the system message.

    `messages` is [system?] + history + [the new user message]; history is cut only at the
    start of an exchange (a user message), so the model never sees a reply without its question.
    The cut is chosen with the cheap extractive summary; `summarize` (a model) is then asked
    once, for that cut, and its text is used if it fits in the same room. When even the facts do
    not all fit, the newest are kept.
    """
    if not messages:
        raise ValueError('no messages to fit')
    limit = window - max(0, reserve_tokens)
    total = count_tokens(messages)
    if total <= limit:
        return FittedContext(tuple(messages), total, 0, '', ())

    system = messages[0] if messages[0].role == 'system' else None
    body = list(messages[1:] if system else messages)
    newest = body[-1:]
    history = body[:-1]
    # Cut points: the start of each exchange in the history, latest exchanges kept first.
    cuts = sorted({i for i, m in enumerate(history) if m.role == 'user'} | {len(history)} - {0})
    max_chars = max(200, limit)   # about a quarter of the room: ~4 characters per token

    def attempt(older: Sequence[ChatTurn], recent: Sequence[ChatTurn], summary: str,
                facts: Sequence[str]) -> Optional[FittedContext]:
        block = _block(summary, facts)
        candidate = _with_summary(system, block) + list(recent) + newest
        tokens = count_tokens(candidate)
        if tokens > limit:
            return None
        return FittedContext(tuple(candidate), tokens, len(older), block, tuple(facts))

    for cut in cuts:
        older, recent = history[:cut], history[cut:]
        facts = list(dict.fromkeys(f for t in older for f in extract_facts(t.content)))
        extractive = extractive_summary(older, max_chars)
        fitted = attempt(older, recent, extractive, facts)
        if fitted is None:
            continue
        if summarize is not None:
            def make() -> str:
                try:
                    return summarize(older).strip()[:max(len(extractive), 80)]
                except Exception:  # a failed summary must never cost the turn
                    return ''
            written = cache.get_or_make(older, make) if cache is not None else make()
            if written:
                fitted = attempt(older, recent, written, facts) or fitted
        return fitted

    # Not even the latest exchange fits beside a summary: the facts alone, newest first kept.
    facts = list(dict.fromkeys(f for t in history for f in extract_facts(t.content)))
    for first in range(len(facts) + 1):
        fitted = attempt(history, [], '', facts[first:])
        if fitted is not None:
            return fitted
    tokens = count_tokens(_with_summary(system, '') + newest)
    raise ContextOverflow(f'the message needs {tokens} tokens with the system prompt, more than '
                          f'the {limit} the context window leaves after reserving '
                          f'{reserve_tokens} for the answer')


SUMMARY_INSTRUCTION = ('Summarise this conversation in at most three sentences for the assistant '
                       'who continues it. Keep every name, number and place exactly as written.')


def summary_request(turns: Sequence[ChatTurn]) -> List[ChatTurn]:
    """The messages that ask a model to summarise `turns`."""
    transcript = '\n'.join(f'{t.role}: {t.content}' for t in turns if t.role != 'system')
    return [ChatTurn('system', SUMMARY_INSTRUCTION), ChatTurn('user', transcript)]
