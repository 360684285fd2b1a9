"""Validation of text observations, shared by the kernel and the console."""

from __future__ import annotations

import unicodedata
DEFAULT_MAX_CHARS = 4000


class InvalidText(ValueError):
    """An observation that cannot be used; the message says why, in words."""


def sanitize(raw: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Remove control characters and collapse whitespace; refuse empty and oversized text.

    Oversized text is refused rather than cut: an answer to half a request would be wrong
    without saying so.
    """
    if max_chars <= 0:
        raise ValueError('max_chars must be positive')
    if len(raw) > max_chars:
        raise InvalidText(f'text too long: {len(raw)} characters (limit {max_chars})')
    kept = []
    for ch in raw:
        if ch in '\n\t\r':
            kept.append(' ')
        elif unicodedata.category(ch) in ('Cc', 'Cf', 'Cs', 'Co', 'Cn'):
            continue
        else:
            kept.append(ch)
    text = ' '.join(''.join(kept).split())
    if not text:
        raise InvalidText('empty text' if not raw.strip() else 'text has only control characters')
    return text
