"""Coherent awakening: who the robot is, which session this is, how far it has grown, and what
earlier sessions asked it to carry forward, built from the store at start.

Everything here is a pure function of the store (`MemoryStore`): nothing is kept in files
beside it, so the awakening is whatever the database says, after any `kill -9`. The boot
preamble is short and bounded (`max_chars`): it goes into every prompt, and the model
manager's context fitting gives it at most a share of the window.

Phases are configurable as strings `name:min_sessions[:milestone=count,...]` (e.g.
`child:5:facts=10`): a phase is reached when the completed sessions and every milestone count
are at least its own; phases are climbed in order, so one cannot be skipped. Milestones count
what the store knows (`MILESTONES`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

DEFAULT_NAME = 'SAGE'
DEFAULT_MAX_CHARS = 700       # [characters] of the boot preamble
DEFAULT_MAX_THREADS = 3       # notes of earlier sessions carried forward
DEFAULT_MAX_PINNED = 5        # pinned memories named in the preamble
MAX_ITEM_CHARS = 200          # one thread or pinned memory in the preamble

# Milestone name -> the memory kind it counts ('' = every live memory; 'dreams' = dreams).
MILESTONES: Mapping[str, str] = {
    'facts': 'fact', 'pinned': 'pinned', 'episodes': 'episode', 'notes': 'note',
    'memories': '', 'dreams': 'dreams',
}

# What each phase means for how the robot speaks (said in the preamble).
_PHASE_NOTES: Mapping[str, str] = {
    'newborn': 'everything is new: ask, listen and learn names',
    'infant': 'you are learning the people and places around you',
    'child': 'you know some people and routines; connect what you learn',
    'adolescent': 'you know your world well; question and refine what you know',
    'adult': 'you know your world; help with judgement and care',
}


@dataclass(frozen=True)
class Phase:
    """A developmental phase: reached with `min_sessions` completed sessions and every
    milestone count (`MILESTONES` names) at least its value."""
    name: str
    min_sessions: int = 0
    milestones: Mapping[str, int] = field(default_factory=dict)

    def reached(self, completed: int, counts: Mapping[str, int]) -> bool:
        return completed >= self.min_sessions and all(
            counts.get(k, 0) >= v for k, v in self.milestones.items())

    def spec(self) -> str:
        """The parameter string this phase parses from."""
        extra = ','.join(f'{k}={v}' for k, v in self.milestones.items())
        return f'{self.name}:{self.min_sessions}' + (f':{extra}' if extra else '')


DEFAULT_PHASES: Tuple[Phase, ...] = (
    Phase('newborn', 0),
    Phase('infant', 1),
    Phase('child', 5, {'memories': 20}),
    Phase('adolescent', 15, {'facts': 25}),
    Phase('adult', 40, {'facts': 100, 'dreams': 10}),
)


def parse_phases(specs: Sequence[str]) -> Tuple[Phase, ...]:
    """Phases from `name:min_sessions[:milestone=count,...]` strings, in order; a ValueError
    names the bad entry. The minimum sessions must not decrease (phases are climbed in order)."""
    phases: List[Phase] = []
    for raw in specs:
        parts = [p.strip() for p in raw.split(':')]
        if len(parts) not in (2, 3) or not parts[0]:
            raise ValueError(f'phase {raw!r}: expected name:min_sessions[:milestone=count,...]')
        name, sessions = parts[0], parts[1]
        try:
            min_sessions = int(sessions)
        except ValueError:
            raise ValueError(f'phase {raw!r}: min_sessions {sessions!r} is not a whole '
                             'number') from None
        if min_sessions < 0:
            raise ValueError(f'phase {raw!r}: min_sessions must be at least 0')
        milestones: Dict[str, int] = {}
        for item in (parts[2].split(',') if len(parts) == 3 and parts[2] else []):
            key, sep, value = (x.strip() for x in item.partition('='))
            if not sep or key not in MILESTONES:
                raise ValueError(f'phase {raw!r}: milestone {item.strip()!r} must be one of '
                                 f'{", ".join(f"{m}=N" for m in MILESTONES)}')
            try:
                milestones[key] = int(value)
            except ValueError:
                raise ValueError(f'phase {raw!r}: milestone {key} count {value!r} is not a '
                                 'whole number') from None
        if phases and min_sessions < phases[-1].min_sessions:
            raise ValueError(f'phase {raw!r}: min_sessions {min_sessions} is below the previous '
                             f'phase\'s ({phases[-1].min_sessions}); list phases in order')
        if any(p.name == name for p in phases):
            raise ValueError(f'phase {raw!r}: {name!r} is listed twice')
        phases.append(Phase(name, min_sessions, milestones))
    if not phases:
        raise ValueError('at least one phase is needed')
    return tuple(phases)


def phase_for(phases: Sequence[Phase], completed: int, counts: Mapping[str, int]) -> Phase:
    """The last phase reached, climbing in order (the first phase when none is)."""
    current = phases[0]
    for phase in phases:
        if not phase.reached(completed, counts):
            break
        current = phase
    return current


class _Session(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def number(self) -> int: ...
    @property
    def ended(self) -> Optional[float]: ...
    @property
    def summary(self) -> str: ...


class _Memory(Protocol):
    @property
    def session(self) -> int: ...
    @property
    def text(self) -> str: ...


class AwakeningStore(Protocol):
    """The part of `core.memory.store.MemoryStore` the awakening reads."""

    def current_session(self) -> Optional[_Session]: ...
    def sessions(self, limit: int = 50) -> Sequence[_Session]: ...
    def completed_sessions(self) -> int: ...
    def list_memories(self, kind: Optional[str] = None, session: Optional[int] = None,
                      include_superseded: bool = False, limit: int = 100,
                      offset: int = 0) -> Sequence[_Memory]: ...
    def pinned(self) -> Sequence[_Memory]: ...
    def count(self, kind: Optional[str] = None) -> int: ...
    def dream_count(self) -> int: ...


@dataclass(frozen=True)
class Thread:
    """Something an earlier session asked to carry forward."""
    session: int      # session number it came from (0 if unknown)
    text: str


@dataclass(frozen=True)
class Awakening:
    name: str                       # the robot's name
    session: int                    # this session's number (1 = the first)
    completed: int                  # sessions completed before it
    phase: str
    phase_note: str
    last_summary: str               # the previous session's summary ('' if none)
    last_session: int               # its number (0 if none)
    threads: Tuple[Thread, ...]     # notes of earlier sessions, newest first
    pinned: Tuple[str, ...]         # pinned memories, newest first
    counts: Mapping[str, int]       # milestone counts
    preamble: str                   # the boot preamble for the language context


def _clip(text: str, limit: int = MAX_ITEM_CHARS) -> str:
    text = ' '.join(text.split())
    return text if len(text) <= limit else text[:limit].rsplit(' ', 1)[0] + ' ...'


def milestone_counts(store: AwakeningStore) -> Dict[str, int]:
    """The milestone counts of `MILESTONES`, from the store."""
    counts: Dict[str, int] = {}
    for name, kind in MILESTONES.items():
        if kind == 'dreams':
            counts[name] = store.dream_count()
        else:
            counts[name] = store.count(kind or None)
    return counts


def awaken(store: AwakeningStore, name: str = DEFAULT_NAME,
           phases: Sequence[Phase] = DEFAULT_PHASES, max_threads: int = DEFAULT_MAX_THREADS,
           max_pinned: int = DEFAULT_MAX_PINNED,
           max_chars: int = DEFAULT_MAX_CHARS) -> Awakening:
    """The awakening the store gives now: the open session (else the one the next start
    opens), the phase by completed sessions and milestones, the notes of earlier sessions
    (newest first) and the pinned memories, and the preamble built from them."""
    current = store.current_session()
    recent = list(store.sessions(limit=max(50, max_threads + 2)))
    numbers = {s.id: s.number for s in recent}
    if current is not None:
        number = current.number
    else:
        number = (recent[0].number + 1) if recent else 1
    completed = store.completed_sessions()
    counts = milestone_counts(store)
    phase = phase_for(phases, completed, counts)
    closed = [s for s in recent if s.ended is not None
              and (current is None or s.id != current.id)]
    last = closed[0] if closed else None
    threads: List[Thread] = []
    if max_threads > 0:
        for m in store.list_memories(kind='note', limit=max_threads * 4):
            if current is not None and m.session == current.id:
                continue        # written in this session: not a thread from an earlier one
            if m.text.strip() and all(t.text != m.text.strip() for t in threads):
                threads.append(Thread(numbers.get(m.session, 0), m.text.strip()))
            if len(threads) >= max_threads:
                break
    pinned = tuple(m.text.strip() for m in store.pinned() if m.text.strip())[:max(0, max_pinned)]
    a = Awakening(
        name=name, session=number, completed=completed, phase=phase.name,
        phase_note=_PHASE_NOTES.get(phase.name, ''),
        last_summary=last.summary.strip() if last else '', last_session=last.number if last else 0,
        threads=tuple(threads), pinned=pinned, counts=counts, preamble='')
    return replace(a, preamble=boot_preamble(a, max_chars))


def boot_preamble(a: Awakening, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """The preamble: identity, session and phase first, then the last session's summary, the
    continuity threads and the pinned memories, as many as fit `max_chars` (whole lines)."""
    first = (f'You are {a.name}. This is session {a.session}' +
             (f', after {a.completed} completed' if a.completed else ', your first') +
             f'; developmental phase: {a.phase}' + (f' ({a.phase_note}).' if a.phase_note else '.'))
    lines = [_clip(first, max(40, max_chars))]
    optional: List[str] = []
    if a.last_summary:
        optional.append(f'Last time (session {a.last_session}): {_clip(a.last_summary)}')
    for t in a.threads:
        where = f'In session {t.session}' if t.session else 'Earlier'
        optional.append(f'{where} you wanted to remember: {_clip(t.text)}')
    for text in a.pinned:
        optional.append(f'You were asked to remember: {_clip(text)}')
    size = len(lines[0])
    for line in optional:
        if size + 1 + len(line) > max_chars:
            break
        lines.append(line)
        size += 1 + len(line)
    return '\n'.join(lines)
