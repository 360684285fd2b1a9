"""Complexity of a request and the model role that should serve it.

A first keyword heuristic (the plan's), kept behind `estimate_complexity` so a learned router
can replace it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Complexity(str, enum.Enum):
    SIMPLE = 'simple'
    MODERATE = 'moderate'
    COMPLEX = 'complex'

    @classmethod
    def parse(cls, value: str) -> 'Complexity':
        try:
            return cls(value.strip().lower())
        except ValueError:
            raise ValueError(f"unknown complexity {value!r}; expected one of "
                             f"{', '.join(c.value for c in cls)}") from None


_COMPLEX_WORDS = frozenset({
    'design', 'explain', 'analyze', 'analyse', 'plan', 'compare', 'why', 'derive', 'prove',
    'architecture', 'strategy', 'evaluate', 'optimize', 'optimise', 'implement', 'debug',
})
_GREETINGS = frozenset({'hi', 'hello', 'hey', 'thanks', 'thank', 'bye', 'goodbye', 'ok', 'okay',
                        'yes', 'no', 'morning', 'evening'})
_WORD = re.compile(r"[a-zA-Z']+")


def estimate_complexity(text: str) -> Complexity:
    words = [w.lower() for w in _WORD.findall(text)]
    if not words:
        return Complexity.SIMPLE
    if any(w in _COMPLEX_WORDS for w in words) or len(words) > 50:
        return Complexity.COMPLEX
    if len(words) <= 4 and (words[0] in _GREETINGS or text.rstrip().endswith('?')):
        return Complexity.SIMPLE
    if len(words) < 10 and text.rstrip().endswith('?'):
        return Complexity.SIMPLE
    return Complexity.MODERATE


@dataclass(frozen=True)
class RoleMap:
    """Which model role serves each complexity."""

    simple: str = 'small'
    moderate: str = 'small'
    complex: str = 'large'

    def role_for(self, complexity: Complexity) -> str:
        return str(getattr(self, complexity.value))
