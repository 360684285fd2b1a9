"""What the kernel asks the small model when a session ends, and how it reads the answer.

`session/end` sends one ephemeral Language goal: the instruction below as its text, the
session's transcript (newest exchanges, bounded) as its context. The answer is a summary and,
after a `Remember next time:` line, the note for the next session. A model that gives no such
line (a small or random model) still gives a summary; the note then falls back to what the
user asked to remember during the session, in their words. No ROS here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .memory.facts import pinned_request

NOTE_MARKER = 'Remember next time:'
INSTRUCTION = (
    'The conversation below is ending. In one or two sentences, summarise what happened. Then, '
    f'on a new line starting with "{NOTE_MARKER}", write the one thing you should remember '
    'when you talk again.')
_MARKER = re.compile(r'remember(?:ed)? next time\s*[:\-]\s*', re.IGNORECASE)
MAX_SUMMARY_CHARS = 600
MAX_NOTE_CHARS = 300


@dataclass(frozen=True)
class Exchange:
    """One answered turn of the session, as the transcript shows it."""

    user: str
    answer: str


def transcript(exchanges: Sequence[Exchange], max_chars: int = 2000) -> str:
    """The newest exchanges that fit `max_chars`, oldest first ("User: ... / Robot: ...")."""
    lines: List[str] = []
    used = 0
    for ex in reversed(exchanges):
        block = f'User: {ex.user.strip()}\nRobot: {ex.answer.strip()}'
        if used + len(block) + 1 > max_chars:
            if not lines:    # the newest alone is too long: keep its beginning
                lines.append(block[:max_chars])
            break
        lines.append(block)
        used += len(block) + 1
    return '\n'.join(reversed(lines))


def _clip(text: str, limit: int) -> str:
    text = ' '.join(text.split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(' ', 1)[0] + ' ...'


def parse_answer(text: str) -> Tuple[str, str]:
    """(summary, note) from the model's answer; the note is '' when it gave no marker line."""
    m = _MARKER.search(text)
    if m is None:
        return _clip(text, MAX_SUMMARY_CHARS), ''
    return (_clip(text[:m.start()], MAX_SUMMARY_CHARS),
            _clip(text[m.end():], MAX_NOTE_CHARS))


def remembered(user_texts: Sequence[str]) -> str:
    """What the user asked to remember this session ("remember that X" -> X), newest last;
    the extractive note when the model wrote none."""
    picked = []
    for t in user_texts:
        what = pinned_request(t)
        if what:
            picked.append(what.rstrip('.') + '.')
    return _clip(' '.join(picked), MAX_NOTE_CHARS)


@dataclass(frozen=True)
class Ending:
    """How a session was closed: by the model or extractively, and why."""

    summary: str            # '' = let the store write its extractive summary
    note: str
    by_model: bool
    why: str                # in words, for the service's message


def ending(answer: Optional[str], error: str, user_texts: Sequence[str]) -> Ending:
    """Combine the model's answer (None when it failed, with `error`) and the fallbacks."""
    fallback_note = remembered(user_texts)
    if answer is None or not answer.strip():
        why = error or 'the model gave an empty answer'
        return Ending('', fallback_note, False, f'extractive summary ({why})')
    summary, note = parse_answer(answer)
    if note:
        return Ending(summary, note, True, 'summary and note by the model')
    return Ending(summary, fallback_note, True,
                  'summary by the model; note from what the user asked to remember'
                  if fallback_note else 'summary by the model; no note')
