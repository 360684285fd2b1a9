"""What the kernel keeps of what it heard and saw, decided without ROS.

- `wake_word(transcript, words)`: the wake word a transcript contains ('' = none), matched
  whole-word and case-insensitively, punctuation ignored.
- `VisualContext`: the latest description per camera for `context_s` seconds, given to language
  goals as "The camera (source) reported N s ago: <description>".
- `VisionTurnGate`: whether a perceived frame starts a turn of its own (salient enough, found
  something, and not within `min_turn_period_s` of the camera's last vision turn).
- `vision_turn_text(source, description)`: the words of such a turn, and `VISION_TURN_CONTEXT`,
  what the language block is told about it.
- `WaitingSamples`: samples waiting for the perception block (none ready, ATP short), in
  arrival order, that expire after `deferred_ttl_s` with the reason they waited.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, Generic, Iterator, List, Sequence, Tuple, TypeVar

T = TypeVar('T')

# Said to the language block with a vision turn (context: given to the model, not recorded).
VISION_TURN_CONTEXT = ('This turn is not something a person said: it is what your camera {source} '
                       'just saw. Remark on it in one short sentence.')
MOTION_ONSET = 'motion onset'
PLAYED = 'played'


def _words(text: str) -> str:
    return ' ' + ' '.join(re.sub(r"[^\w']+", ' ', text.lower()).split()) + ' '


def wake_word(transcript: str, words: Sequence[str]) -> str:
    """The first of `words` that `transcript` contains as whole words ('' = none)."""
    heard = _words(transcript)
    for w in words:
        if _words(w).strip() and _words(w) in heard:
            return w
    return ''


def vision_turn_text(source: str, description: str) -> str:
    """A vision turn's text: "[camera] One face is in view, left of centre." """
    return f'[{source}] {description.strip()}'


@dataclass(frozen=True)
class Sighting:
    source: str
    description: str
    at: float       # [s] when the kernel received the percept


class VisualContext:
    """The latest description of each camera, kept for `context_s` seconds."""

    def __init__(self) -> None:
        self._latest: Dict[str, Sighting] = {}

    def add(self, source: str, description: str, now: float) -> None:
        if description.strip():
            self._latest[source] = Sighting(source, description.strip(), now)

    def recent(self, now: float, context_s: float) -> List[Sighting]:
        """The sightings at most `context_s` old, oldest first (none when `context_s` is 0)."""
        if context_s <= 0:
            return []
        return sorted((s for s in self._latest.values() if now - s.at <= context_s),
                      key=lambda s: s.at)

    def context(self, now: float, context_s: float) -> str:
        """Language goal context, one line per camera ('' when nothing is recent)."""
        lines = []
        for s in self.recent(now, context_s):
            ago = max(0.0, now - s.at)
            lines.append(f'The camera ({s.source}) reported {ago:.0f} s ago: {s.description}')
        return '\n'.join(lines)


class VisionTurnGate:
    """Whether a perceived frame starts a vision turn; rate-limited per camera."""

    def __init__(self) -> None:
        self._last: Dict[str, float] = {}

    def decide(self, source: str, salience: float, found: bool, now: float,
               turn_salience: float, min_period_s: float) -> Tuple[bool, str]:
        """(start a turn, why not). `found`: the percept has detections or came from motion
        onset. A turn that starts is counted for the rate limit."""
        if not found:
            return False, 'nothing found in it'
        if salience < turn_salience:
            return False, f'salience {salience:.2f} < {turn_salience:.2f}'
        last = self._last.get(source, -math.inf)
        if now - last < min_period_s:
            return False, (f'{source!r} started a vision turn {now - last:.0f} s ago '
                           f'(at most one every {min_period_s:g} s)')
        self._last[source] = now
        return True, ''


@dataclass
class Waiting(Generic[T]):
    item: T
    received_at: float
    reason: str = ''


@dataclass
class WaitingSamples(Generic[T]):
    """Samples waiting for the perception block, oldest first."""

    queue: Deque[Waiting[T]] = field(default_factory=deque)

    def add(self, item: T, now: float) -> None:
        self.queue.append(Waiting(item, now))

    def __len__(self) -> int:
        return len(self.queue)

    def __iter__(self) -> Iterator[Waiting[T]]:
        return iter(list(self.queue))

    def remove(self, w: Waiting[T]) -> None:
        self.queue.remove(w)

    def expire(self, now: float, ttl_s: float) -> List[Waiting[T]]:
        """Remove and return those that waited `ttl_s` or longer."""
        gone = [w for w in self.queue if now - w.received_at >= ttl_s]
        for w in gone:
            self.queue.remove(w)
        return gone
