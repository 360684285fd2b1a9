"""The conversation, owned by the language block rather than by any model, so it survives swaps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

DEFAULT_SYSTEM_PROMPT = (
    'You are SAGE, the cognition kernel of a robot. Answer briefly and helpfully; '
    'when asked to design or plan something, give a short structured answer.'
)


@dataclass(frozen=True)
class ChatTurn:
    role: str      # 'system', 'user' or 'assistant'
    content: str


class Conversation:
    """A system prompt plus user/assistant exchanges, capped at `max_exchanges` (oldest drop).

    The cap only bounds memory: what a model sees is fitted to its context window at generation
    time (`core.context`), where older exchanges are summarised rather than dropped.
    """

    def __init__(self, system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_exchanges: int = 64) -> None:
        self.system_prompt = system_prompt
        self._exchanges: List[Tuple[str, str]] = []
        self.set_max_exchanges(max_exchanges)

    def set_max_exchanges(self, n: int) -> None:
        """Change the cap (at run time too); the oldest exchanges beyond it are dropped now."""
        if n < 1:
            raise ValueError('max_exchanges must be at least 1')
        self.max_exchanges = n
        del self._exchanges[:-n]

    def __len__(self) -> int:
        return len(self._exchanges)

    def messages_for(self, user_text: str, context: str = '',
                     system_note: str = '') -> List[ChatTurn]:
        """The messages to send for a new user turn (not yet recorded); `context` is material
        for this turn only (e.g. partial results of a reasoning step), `system_note` is added
        to the system prompt for this turn only (e.g. its length budget)."""
        system = ' '.join(p for p in (self.system_prompt.strip(), system_note.strip()) if p)
        msgs = [ChatTurn('system', system)] if system else []
        for user, assistant in self._exchanges:
            msgs.append(ChatTurn('user', user))
            msgs.append(ChatTurn('assistant', assistant))
        if context.strip():
            user_text = f'Context for this request:\n{context.strip()}\n\nRequest: {user_text}'
        msgs.append(ChatTurn('user', user_text))
        return msgs

    def record(self, user_text: str, answer: str) -> None:
        self._exchanges.append((user_text, answer))
        del self._exchanges[:-self.max_exchanges]

    def clear(self) -> int:
        n = len(self._exchanges)
        self._exchanges.clear()
        return n
