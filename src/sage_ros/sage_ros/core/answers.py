"""Shortened answers: an answer that ran into its token budget is cut back to a sentence end.

A generation that stops at `max_new_tokens` without its end-of-sequence token usually ends
mid-sentence ("5. **Test the Routine"). `cut_to_sentence` keeps the text up to the last
complete sentence. List markers ("5.") and decimals ("2.5") are not sentence ends; the end of
a complete line (followed by a newline) is one, so a list is cut after its last whole item.
With no sentence end at all the text is kept whole: cutting would leave nothing to say.
The cut text is always a prefix of the generated text, so what streamed stays consistent.
"""

from __future__ import annotations

import re
from typing import Tuple

# [.!?…] and optional closing quotes, brackets or emphasis, then a space or the end of the
# text; CJK full stops end a sentence without a space after them.
_CLOSE = '\'"\u2019\u201d)\\]*_'
_SENTENCE_END = re.compile(rf'[.!?\u2026]+[{_CLOSE}]*(?=\s|$)|[\u3002\uff01\uff1f]+[{_CLOSE}]*')
_LIST_MARKER = re.compile(r'(?:^|\n)[ \t]*(?:\d+|[a-zA-Z])\.$')


def is_sentence_end(text: str, end: int) -> bool:
    """Whether `text[:end]` (ending in sentence punctuation) ends a sentence."""
    head = text[:end].rstrip('\'"\u2019\u201d)]*_')
    return not _LIST_MARKER.search(head)


def cut_to_sentence(text: str) -> Tuple[str, bool]:
    """(text up to its last complete sentence or line, whether anything was cut off)."""
    stripped = text.rstrip()
    best = 0
    for m in _SENTENCE_END.finditer(stripped):
        if is_sentence_end(stripped, m.end()):
            best = m.end()
    last_line = stripped.rfind('\n')
    if last_line > 0 and stripped[:last_line].strip():
        best = max(best, len(stripped[:last_line].rstrip()))
    if best == 0 or best >= len(stripped):
        return stripped, False
    return stripped[:best], True


def length_hint(max_new_tokens: int) -> str:
    """A sentence for the system prompt that tells the model its length budget (about 0.75
    words per token for English with these tokenizers)."""
    words = max(5, int(max_new_tokens * 0.7))
    return f'Keep the answer under {words} words and end it with a complete sentence.'

