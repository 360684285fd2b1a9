"""The language block: keeps the conversation and answers turns through a model role.

Before a turn that belongs to the conversation it asks memory (`recall`) what is relevant and
hands the awakening preamble and the recalled lines to the generator, which fits them into the
model's window (`core.context.fit_to_window`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from .answers import length_hint as length_hint_text
from .blocks import BlockType, CapabilityBlock
from .conversation import Conversation
from .models import GenerationResult, Generator, StopFn, TextFn
from .routing import Complexity, RoleMap, estimate_complexity


@dataclass(frozen=True)
class Recalled:
    """What memory gave for a turn: the awakening preamble and memory lines, best first."""
    preamble: str = ''
    memory: Tuple[str, ...] = ()


RecallFn = Callable[[str], Recalled]   # the turn's text -> what memory has for it; never raises

# How a recalled memory of each kind reads to the model (MemoryItem.KIND_* values).
_KIND_LINES = {
    'pinned': 'You were asked to remember: {text}',
    'fact': 'Known: {text}',
    'note': 'A note from an earlier session: {text}',
    'summary': 'An earlier session: {text}',
}
MAX_MEMORY_CHARS = 400   # one recalled memory is cut to this many characters


def memory_line(kind: str, text: str, session: int = 0) -> str:
    """One recalled memory as the model reads it: an episode is what the user said earlier
    (with its session when known), a pinned memory something to remember."""
    text = ' '.join(text.split())
    if len(text) > MAX_MEMORY_CHARS:
        text = text[:MAX_MEMORY_CHARS].rsplit(' ', 1)[0] + ' ...'
    template = _KIND_LINES.get(kind)
    if template is not None:
        return template.format(text=text)
    when = f'In session {session}' if session > 0 else 'Earlier'
    return f'{when} the user said: "{text}"'


def _no_recall(text: str) -> Recalled:
    return Recalled()


@dataclass(frozen=True)
class LanguageAnswer:
    generation: GenerationResult
    complexity: Complexity
    recalled: Recalled = Recalled()

    @property
    def memory_used(self) -> int:
        """Recalled memories the model was given (those that fitted its window)."""
        return self.generation.memory_used


class LanguageBlock(CapabilityBlock):
    """Answers text in one conversation that belongs to the block, not to a model.

    The role (small or large model) is chosen per turn from the request's complexity; the same
    conversation is sent whichever model answers, so a swap loses nothing.
    """

    name = 'language'
    block_type = BlockType.MONOLITHIC

    def __init__(self, generator: Generator, conversation: Optional[Conversation] = None,
                 roles: Optional[RoleMap] = None, max_new_tokens: int = 0,
                 temperature: float = 0.0,
                 classify: Callable[[str], Complexity] = estimate_complexity,
                 length_hint: bool = False, recall: RecallFn = _no_recall) -> None:
        self.generator = generator
        self.recall = recall   # asked before each turn that is not ephemeral
        self.classify = classify
        self.conversation = conversation or Conversation()
        self.roles = roles or RoleMap()
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.length_hint = length_hint   # tell the model a turn's token cap in the system prompt

    @property
    def capabilities(self) -> Tuple[str, ...]:
        return ('conversation', 'question_answering', 'instruction_following')

    @property
    def modalities(self) -> Tuple[str, ...]:
        return ('text',)

    @property
    def loaded(self) -> bool:
        return True  # holds no model of its own; the model manager serves them

    def load(self) -> None:
        """Nothing to load: models live in the model manager."""

    def unload(self) -> None:
        """Nothing to release: models live in the model manager."""

    def respond(self, text: str, complexity: Optional[Complexity] = None,
                max_new_tokens: int = 0, on_text: Optional[TextFn] = None,
                should_stop: Optional[StopFn] = None, ephemeral: bool = False,
                context: str = '') -> LanguageAnswer:
        """Answer `text`. The exchange is recorded only if the generation succeeded and the turn
        is not `ephemeral`; `context` is shown to the model for this turn only. The answer is
        capped by the turn's `max_new_tokens` (an ATP grant) and the block's, whichever is
        lower; with `length_hint` the model is told that cap when the turn sets one. A turn
        that is not ephemeral first asks `recall` for the preamble and relevant memories."""
        complexity = complexity or self.classify(text)
        role = self.roles.role_for(complexity)
        cap = min((n for n in (max_new_tokens, self.max_new_tokens) if n > 0), default=0)
        note = length_hint_text(cap) if self.length_hint and max_new_tokens > 0 else ''
        recalled = Recalled() if ephemeral else self.recall(text)
        result = self.generator.generate(
            role, self.conversation.messages_for(text, context, note),
            max_new_tokens=cap,
            temperature=self.temperature, on_text=on_text, should_stop=should_stop,
            complexity=complexity.value, preamble=recalled.preamble,
            memory=recalled.memory)
        if not ephemeral:
            self.conversation.record(text, result.text)
        return LanguageAnswer(result, complexity, recalled)
