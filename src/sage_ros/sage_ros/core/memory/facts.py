"""Facts from what people tell the robot, and the two decisions DREAM makes about them.

Extraction is rule-based and deterministic (no model on the dream path, the same text always
gives the same facts): a person's turn is split into sentences; questions are dropped; a set of
patterns recognises statements about people (names, relatives, where someone lives or works),
places, objects (where a thing is kept), routines (what happens at a time) and other
attributes ("my X is Y", "remember that X"). Each fact carries a category, a normalised
*subject* (what it is about: "charger location", "user name") and a normalised *value* (what is
said of it: "room 4", "sam", "08:00").

Two facts are then compared with the MiniLM cosine of their texts AND the values each carries
(times, numbers with their place word, names, days, quoted strings), because the cosine alone
cannot tell "the charger is in room 4" from "the charger is in room 7" (about 0.95) while a
paraphrase in other words can score lower than that:
- `same_fact`: a paraphrase of one fact -> merge (mentions add up);
- `changed_fact`: the same subject with a different value -> update (the newer supersedes).
Natural speech often names the subject differently or not in the pattern's shape ("We moved your
charging dock, it's next to the laundry room now", "I sold the Skoda and bought a Toyota"), so
both decisions also use each sentence's *topics* (`topics`: its noun phrases that are not the
object of a preposition, with their owner: "my car", "Mia's bedtime", "his car" of my brother)
and *change cues* (`change_cue`: "moved", "now", "switched", "sold", "new", "no longer"): a later
statement with a change cue about the same topic (same owner) or naming the same person or
thing, close enough by cosine (`change_cue_similarity`), that carries a conflicting value, names
the removed old value ("sold the Skoda") or says something new of its own topic, is an update;
two statements on one topic with agreeing values are a paraphrase (`topic_merge_similarity`).
A rhetorical frame ("did I tell you ...?") is a statement, trailing asides (", by the way") are
dropped, "half past seven" is 07:30.
The thresholds (`FactThresholds`) were tuned on bench/data/paraphrases.jsonl (see
bench/memory_paraphrase.py, which also reports a held-out part of the set).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

from ..params import check_ranges, tunable

CATEGORIES = ('person', 'place', 'object', 'routine', 'other')


@dataclass(frozen=True)
class Fact:
    """One statement worth keeping.

    `text` is the speaker's sentence, cleaned ("remember that", "actually" removed), which is
    what recall shows; `subject` and `value` are normalised keys for the merge/update
    decisions ('' when no pattern recognised the sentence: then only the cosine and the
    values in the text decide); `person` names whom the fact is about when a name is known.
    """

    text: str
    category: str
    subject: str
    value: str
    person: str = ''


@dataclass(frozen=True)
class FactThresholds:
    """The cosine thresholds of the merge/update decisions (tuned on the paraphrase set)."""

    same_subject_floor: float = tunable(
        0.3, 'Cosine above which two facts with the same subject and value are one fact',
        -1.0, 1.0)
    merge_similarity: float = tunable(
        0.72, 'Cosine above which two facts whose subject is unknown are paraphrases '
        '(when their values agree)', -1.0, 1.0)
    merge_similarity_other_subject: float = tunable(
        0.80, 'Cosine above which facts whose recognised subjects differ by added words ("the '
        'charger" / "the charger for you") are paraphrases, when their values agree', -1.0, 1.0)
    merge_similarity_two_sided: float = tunable(
        0.87, 'Cosine above which facts whose recognised subjects each have words the other '
        'lacks ("pills" / "tablets") are paraphrases, when their values agree', -1.0, 1.0)
    change_similarity: float = tunable(
        0.6, 'Cosine above which a fact of unknown subject whose values differ is an update of '
        'the other', -1.0, 1.0)
    topic_merge_similarity: float = tunable(
        0.6, 'Cosine above which two facts about the same topic (head noun phrase, same owner) '
        'with agreeing values are paraphrases, when no pattern recognised one of them', -1.0,
        1.0)
    change_cue_similarity: float = tunable(
        0.45, 'Cosine above which a later fact on the same topic (or naming the same person or '
        'thing) that says it changed ("moved", "now", "switched", "sold ... bought") updates '
        'the earlier one', -1.0, 1.0)

    def __post_init__(self) -> None:
        check_ranges(self)


# ---------------------------------------------------------------------------------------------
# normalisation

_UNITS = {'zero': 0, 'one': 1, 'two': 2, 'three': 3, 'four': 4, 'five': 5, 'six': 6, 'seven': 7,
          'eight': 8, 'nine': 9, 'ten': 10, 'eleven': 11, 'twelve': 12, 'thirteen': 13,
          'fourteen': 14, 'fifteen': 15, 'sixteen': 16, 'seventeen': 17, 'eighteen': 18,
          'nineteen': 19}
_TENS = {'twenty': 20, 'thirty': 30, 'forty': 40, 'fifty': 50, 'sixty': 60, 'seventy': 70,
         'eighty': 80, 'ninety': 90}
_ORDINALS = {'first': 1, 'second': 2, 'third': 3, 'fourth': 4, 'fifth': 5, 'sixth': 6,
             'seventh': 7, 'eighth': 8, 'ninth': 9, 'tenth': 10}
_NUMBER_WORD = re.compile(
    r"\b(?:(?P<tens>" + '|'.join(_TENS) + r")(?:[\s-](?P<unit>" + '|'.join(
        w for w in _UNITS if _UNITS[w] < 10 and w != 'zero') + r"))?|(?P<single>"
    + '|'.join(_UNITS) + r"))\b", re.IGNORECASE)
_ORDINAL_WORD = re.compile(r"\b(" + '|'.join(_ORDINALS) + r")\b(?=\s+(?:floor|level|door|room|"
                           r"shelf|drawer|row|aisle|bay|dock|locker|cabinet|bed|desk))",
                           re.IGNORECASE)
_ORDINAL_DIGITS = re.compile(r"\b(\d+)(?:st|nd|rd|th)\b", re.IGNORECASE)
_NUMBERED_THING = re.compile(r"\b(\d+)\s+(floor|level|shelf|drawer|row|aisle)\b", re.IGNORECASE)

_TIME = re.compile(
    r"\b(?P<h>\d{1,2})(?:[:.](?P<m>\d{2}))?(?:\s*(?P<ap>a\.?m\.?|p\.?m\.?|o'?clock|h\b))?"
    r"(?:\s+(?:in the\s+|at\s+)?(?P<part>morning|evening|afternoon|night|tonight))?",
    re.IGNORECASE)
_DAY_PART = re.compile(r"\b(morning|evening|afternoon|night|tonight)s?\b", re.IGNORECASE)
_NOON = re.compile(r"\b(noon|midday|midnight)\b", re.IGNORECASE)
_TIME_CONTEXT = re.compile(r"\b(?:at|around|about|by|before|after|from|until|till|til)\s*$",
                           re.IGNORECASE)
_DAYS = ('monday', 'tuesday', 'wednesday', 'thursday', 'friday', 'saturday', 'sunday',
         'weekday', 'weekend', 'january', 'february', 'march', 'april', 'may', 'june', 'july',
         'august', 'september', 'october', 'november', 'december', 'morning', 'evening',
         'afternoon', 'night', 'daily', 'weekly', 'monthly', 'breakfast', 'lunch', 'dinner',
         'supper', 'lunchtime', 'bedtime')
_DAY = re.compile(r"\b(" + '|'.join(_DAYS) + r")s?\b", re.IGNORECASE)
_PLACE_WORDS = frozenset({'room', 'floor', 'door', 'gate', 'table', 'bay', 'dock', 'level',
                          'aisle', 'shelf', 'bed', 'desk', 'station', 'zone', 'number', 'no',
                          'apartment', 'flat', 'building', 'platform', 'lane', 'row', 'seat',
                          'locker', 'cabinet', 'drawer', 'box', 'bin', 'lab', 'office', 'ward',
                          'house', 'street', 'bus', 'line', 'code', 'pin', 'channel', 'page'})
_QUOTED = re.compile(r"[\"“']([^\"”']{2,60})[\"”']")
_CAPITAL = re.compile(r"\b[A-Z][a-zA-Z'-]*[a-z][a-zA-Z'-]*\b|\b[A-Z]\b(?=\.)")
# Capitalised words that open sentences or are common words, not names.
_NOT_NAMES = frozenset(
    'i im i\'m ive i\'ve id i\'d ill i\'ll ok okay yes no hi hello hey please thanks thank the a '
    'an it its it\'s this that these those what where when who why how which can could would '
    'will do does did is are was were my your our their his her you we they he she sure also '
    'and but so then now sage remember note keep put call tell let don\'t dont every each on at '
    'in from after before usually always sometimes often normally today tomorrow yesterday '
    'tonight actually well oh by btw fyi just there here if as for to of with since room floor '
    'mine yours robot kitchen you\'ll you\'re we\'ll we\'re they\'re they\'ll it\'ll '
    'there\'s let\'s that\'s he\'s she\'s'.split()) | frozenset(_DAYS)
_STOP = frozenset(
    'the a an my our your his her their its this that these those of to in on at for with and or '
    'is are was were be been am i me we you it do does did usually always now still kept stored '
    'located normally often typically every each some any there here where which who what'.split())


def _int_words(match: 're.Match[str]') -> str:
    if match.group('single'):
        return str(_UNITS[match.group('single').lower()])
    value = _TENS[match.group('tens').lower()]
    if match.group('unit'):
        value += _UNITS[match.group('unit').lower()]
    return str(value)


def normalise_numbers(text: str) -> str:
    """Number words to digits ("room four" -> "room 4", "second floor" -> "floor 2")."""
    text = _NUMBER_WORD.sub(_int_words, text)
    text = _ORDINAL_WORD.sub(lambda m: str(_ORDINALS[m.group(1).lower()]), text)
    text = _ORDINAL_DIGITS.sub(r'\1', text)
    text = _CLOCK_PHRASE.sub(_clock_phrase, text)
    return _NUMBERED_THING.sub(lambda m: f'{m.group(2)} {m.group(1)}', text)


_CLOCK_PHRASE = re.compile(r"\b(?P<what>half past|quarter past|quarter to|half)\s+(?P<h>\d{1,2})"
                           r"\b(?!\s*[:.]\d)", re.IGNORECASE)


def _clock_phrase(m: 're.Match[str]') -> str:
    """"half past 7" -> "7:30", "quarter to 8" -> "7:45" (British "half 7" is 7:30 too)."""
    hour, what = int(m.group('h')), m.group('what').lower()
    if hour > 12:
        return m.group(0)
    if what == 'quarter to':
        return f'{(hour - 1) % 12 or 12}:45'
    return f'{hour}:{15 if what == "quarter past" else 30}'


def _times(text: str) -> List[Tuple[int, int, str]]:
    """(start, end, 'HH:MM') of each clock time in `text` (digits already normalised)."""
    out: List[Tuple[int, int, str]] = []
    context = _DAY_PART.search(text)
    context_part = context.group(1).lower() if context else ''
    for m in _NOON.finditer(text):
        out.append((m.start(), m.end(), '00:00' if m.group(1).lower() == 'midnight' else '12:00'))
    for m in _TIME.finditer(text):
        hour, minute = int(m.group('h')), int(m.group('m') or 0)
        ap = (m.group('ap') or '').lower().replace('.', '')
        part = (m.group('part') or '').lower()
        explicit = bool(ap or part or m.group('m'))
        if not explicit and not _TIME_CONTEXT.search(text[:m.start()]):
            continue
        if not ap and not part:
            part = context_part            # "every evening at 7": 19:00
        if m.group('m') and not (ap or part) and m.group(0).count('.') and hour > 12:
            continue                       # "3.50" is a number, not a time
        if hour > 23 or minute > 59:
            continue
        if ap.startswith('p') or part in ('evening', 'night', 'tonight') or \
                (part == 'afternoon' and hour < 12):
            if hour < 12:
                hour += 12
        elif (ap.startswith('a') or part == 'morning') and hour == 12:
            hour = 0
        out.append((m.start(), m.end(), f'{hour:02d}:{minute:02d}'))
    return out


_SPELLING = {'colour': 'color', 'favourite': 'favorite', 'neighbour': 'neighbor', 'grey': 'gray',
             'centre': 'center', 'theatre': 'theater', 'programme': 'program', 'mum': 'mother',
             'mom': 'mother', 'dad': 'father', 'grandma': 'grandmother', 'grandpa': 'grandfather',
             'tv': 'television', 'physio': 'physiotherapy', 'pill': 'medicine',
             'pills': 'medicine', 'tablet': 'medicine', 'tablets': 'medicine',
             'medication': 'medicine', 'medications': 'medicine', 'meds': 'medicine',
             'medicines': 'medicine'}


def _stem(word: str) -> str:
    w = word.lower().strip(".,;:!?\"'()")
    w = _SPELLING.get(w, w)
    if w.endswith("'s"):
        w = w[:-2]
    for suffix, repl in (('ies', 'y'), ('sses', 'ss'), ('ches', 'ch'), ('shes', 'sh'),
                         ('xes', 'x')):
        if w.endswith(suffix) and len(w) > len(suffix) + 2:
            return w[:-len(suffix)] + repl
    if w.endswith('s') and not w.endswith(('ss', 'us', 'is')) and len(w) > 3:
        return w[:-1]
    return w


def _key(text: str) -> str:
    """A phrase as a subject/value key: lowercase, digits, stems, no determiners."""
    text = normalise_numbers(text)
    words = [_stem(w) for w in re.findall(r"[A-Za-z0-9:'-]+", text)]
    return ' '.join(w for w in words if w and w not in _STOP)


def value_tokens(text: str) -> FrozenSet[str]:
    """The values a text carries, typed: 't:08:00', 'n:room 4', 'p:anna', 'd:monday', 'q:...'.

    Two statements that carry different values of one type say different things, however close
    their wording; this is what the cosine cannot see.
    """
    norm = normalise_numbers(text)
    tokens = set()
    spans = []
    for start, end, hhmm in _times(norm):
        tokens.add('t:' + hhmm)
        spans.append((start, end))
    masked = list(norm)
    for start, end in spans:
        masked[start:end] = ' ' * (end - start)
    rest = ''.join(masked)
    for m in re.finditer(r"\b\d+(?:[.,]\d+)?\b", rest):
        # Digits alone: "the code 4521" and "code is 4521" carry the same value.
        tokens.add('n:' + m.group(0))
    for m in _DAY.finditer(norm):
        tokens.add('d:' + m.group(1).lower())
    for m in _QUOTED.finditer(text):
        if ' ' in m.group(1) or any(c.isdigit() for c in m.group(1)):
            tokens.add('q:' + m.group(1).strip().lower())
    for name in _names(text):
        tokens.add('p:' + name.lower())
    for m in _RELATION.finditer(text):
        word = m.group(1).lower()
        tokens.add('r:' + _RELATION_SYNONYMS.get(word, word))
    return frozenset(tokens)


def _names(text: str) -> List[str]:
    """Capitalised words that are names ("Anna", "Lyon"), not sentence openers or stop words.
    A capitalised word opening a sentence counts only before a verb a name takes ("Anna lives",
    "Tom is"), not before anything else ("Goodbye, ...", "Bring me ...")."""
    out = []
    for m in _CAPITAL.finditer(text):
        word = m.group(0)
        low = word.lower()[:-2] if word.lower().endswith("'s") else word.lower()
        if low in _NOT_NAMES or low in _PLACE_WORDS:
            continue
        before = text[:m.start()].rstrip()
        if (not before or before[-1] in '.!?;:"') and not word.endswith("'s"):
            following = text[m.end():].split()
            if not following or following[0].lower().strip(',') not in _NAME_VERBS:
                continue
        out.append(word[:-2] if word.endswith("'s") else word)
    return out


# ---------------------------------------------------------------------------------------------
# extraction

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")
_QUESTION_START = re.compile(
    r"^(?:what|where|when|who|whom|whose|why|how|which|is|are|am|was|were|do|does|did|can|"
    r"could|would|will|should|shall|may(?!\s+\d)|might|have|has|had|isn't|aren't|don't|"
    r"doesn't|didn't|won't|wouldn't|couldn't|tell me|do you know|any idea)\b", re.IGNORECASE)
_PREFIXES = re.compile(
    r"^(?:(?:ok(?:ay)?|so|oh|well|also|and|but|actually|by the way|btw|fyi|hey|hi|hello|"
    r"sage|robot|just so you know|for the record|for your information|note that|please note "
    r"that|please note|note:|noted:|keep in mind that|bear in mind that|remember that|remember:|"
    r"remember|please remember that|please remember|don't forget that|do not forget that|"
    r"i want you to know that|i should mention that|i should tell you that|i wanted to tell you "
    r"that|just to let you know|let me tell you that|you should know that|from now on|now|"
    r"these days|nowadays|news:|update:|correction:|to be clear|reminder:|just a reminder(?: "
    r"that)?|a reminder(?: that)?|did i (?:ever )?(?:tell you|mention)(?: that)?|have i (?:ever )?"
    r"(?:told you|mentioned)(?: that)?|i told you(?: that)?|as i said|like i said|don't forget"
    r"(?: that)?|do not forget(?: that)?|just)[,:!]?\s+)+",
    re.IGNORECASE)
# Rhetorical frames that make a statement look like a question ("Did I tell you Anna lives in
# Lyon?"): the rest is a statement.
_RHETORICAL = re.compile(r"^(?:(?:oh|so|by the way|btw)[,]?\s+)?(?:did i (?:ever )?(?:tell you|"
                         r"mention)|have i (?:ever )?(?:told you|mentioned))\b", re.IGNORECASE)
# Trailing asides that say nothing about the fact.
_SUFFIXES = re.compile(r"(?:,\s*(?:by the way|btw|just so you know|for the record|please|"
                       r"if you need it|in case you need it|fyi|ok|okay))+\s*[.!?]*\s*$",
                       re.IGNORECASE)
_HEDGES = re.compile(r"\b(?:i think|i guess|maybe|perhaps|probably|kind of|sort of|um+|uh+|"
                     r"like,|you know|i mean|basically|anyway)\b", re.IGNORECASE)
_NEGATION = re.compile(r"\b(?:not|never|no longer|n't)\b", re.IGNORECASE)
_PRONOUN_START = re.compile(r"^(?:he|she|they|it|this|that|these|those|him|her|them)"
                            r"(?:'s|'re)?\b", re.IGNORECASE)
_CHITCHAT = frozenset('weather day it this that everything nothing life things today you we '
                      'everyone thing time'.split())

_REL = (r"(?:sister|brother|mother|mom|mum|father|dad|wife|husband|partner|son|daughter|"
        r"friend|best friend|boss|colleague|neighbou?r|grandmother|grandma|grandfather|grandpa|"
        r"aunt|uncle|cousin|niece|nephew|doctor|nurse|carer|caregiver|dog|cat|teacher|"
        r"roommate|flatmate|girlfriend|boyfriend|manager|assistant)")
_NAME_RE = r"[A-Z][a-zA-Z'-]+(?:\s+[A-Z][a-zA-Z'-]+)?"
_PREP = (r"(?:in|on|at|under|underneath|behind|inside|next to|beside|near|by|above|below|"
         r"in front of|on top of|into|onto|to)")
_PREP_AT = (r"(?:in|on|at|under|underneath|behind|inside|next to|beside|near|by|above|below|"
            r"in front of|on top of)")
_LOC_VERB = (r"(?:(?:is|are|'s|was|were|has been|have been|gets|get)(?:\s+(?:now|still|usually|"
             r"always|normally|often|currently|generally|back))?(?:\s+(?:kept|stored|located|"
             r"placed|"
             r"hidden|left|parked|found|tucked|sitting|lying|hanging|put|moved))?|sits|sit|"
             r"hangs|hang|stays|stay|lives|live|can be found|goes|go|belongs|belong|lies|lie)")
_ROUTINE_VERB = (r"(?:take|takes|have|has|eat|eats|drink|drinks|go|goes|walk|walks|wake up|"
                 r"wakes up|get up|gets up|sleep|sleeps|feed|feeds|water|waters|call|calls|"
                 r"visit|visits|shower|showers|exercise|exercises|cook|cooks|leave|leaves|"
                 r"start|starts|finish|finishes|meditate|meditates|run|runs|swim|swims|"
                 r"come home|comes home|pray|prays|clean|cleans|do|does|play|plays|read|reads|"
                 r"watch|watches|brush|brushes|charge|charges)")
_TIME_PHRASE = (r"(?:at|every|each|on|around|about|before|after|by|in the|once a|twice a|"
                r"daily|weekly|nightly|most|first thing)\b")

_PATTERNS: List[Tuple[str, 're.Pattern[str]']] = [(name, re.compile(p, re.IGNORECASE)) for
                                                  name, p in (
    ('user_name', r"^(?:please\s+)?(?:you (?:can|may|should) call me|call me|my name is|my "
                  r"name's|i am called|i'm called|people call me|everyone calls me|i go by|"
                  r"name's)\s+(?P<name>" + _NAME_RE + r")\s*(?:,\s*(?:not|nobody|no one|never)"
                  r"\b.*)?$"),
    ('user_name', r"^(?:i am|i'm|this is)\s+(?P<name>[A-Z][a-zA-Z'-]+)\s*$"),
    ('rel_name', r"^my (?P<rel>" + _REL + r")(?:'s name is| is called| is named| goes by|'s "
                 r"called| is)\s+(?P<name>" + _NAME_RE + r")\s*$"),
    ('rel_name', r"^(?P<name>" + _NAME_RE + r")(?:,)? is (?:my|our) (?P<rel>" + _REL + r")\s*$"),
    ('rel_name', r"^(?:the |my |our )(?P<rel>[\w -]+?)(?:'s name is| is called| is named|'s "
                 r"called| goes by)\s+(?P<name>" + _NAME_RE + r")\s*$"),
    ('lives', r"^(?:(?:my (?P<rel>" + _REL + r")(?:,)?\s+)?(?P<name>" + _NAME_RE + r")(?:,? my "
              r"(?P<rel2>" + _REL + r"),?)?|my (?P<rel3>" + _REL + r")|(?P<me>i|we))\s+"
              r"(?:now |still |currently )?(?:lives?|is living|are living|am living|stays?|"
              r"is based|are based|am based|resides?|moved|has moved|have moved|relocated|"
              r"has relocated)\s+(?:in|at|to|"
              r"over to|out to)\s+(?P<value>.+)$"),
    ('works', r"^(?:(?:my (?P<rel>" + _REL + r")(?:,)?\s+)?(?P<name>" + _NAME_RE + r")(?:,? my "
              r"(?P<rel2>" + _REL + r"),?)?|my "
              r"(?P<rel3>" + _REL + r")|(?P<me>i|we))\s+(?:now |still |currently )?(?:works?|is "
              r"working|am working|are working|is employed|am employed)\s+(?:at|in|for|as)\s+"
              r"(?P<value>.+)$"),
    ('born', r"^(?:(?P<name>" + _NAME_RE + r")|my (?P<rel3>" + _REL + r")|(?P<me>i))\s+(?:was|"
             r"were) born (?:on|in)\s+(?P<value>.+)$"),
    ('where_is', r"^(?P<value>.+?) is where (?:the |my |our |you'?ll find the |you can find "
                 r"the )?(?P<obj>.+?)(?: is| are| lives| live| goes| go| belongs| belong)?(?: "
                 r"kept| stored| usually| always)?\s*$"),
    ('find', r"^(?:you(?:'ll| will| can| could)?|we|i)\s+(?:always |usually )?(?:find|will "
             r"find|can find|could find)\s+(?:the |my |our |your )?(?P<obj>.+?)\s+(?P<prep>"
             + _PREP + r")\s+(?P<value>.+)$"),
    ('moved', r"^(?:i|we|someone|they|he|she|(?P<who>" + _NAME_RE + r"))\s+(?:have |has |'ve |"
              r"just |already )*(?:moved|put|took|brought|placed|relocated|shifted|carried)\s+"
              r"(?:the |my |our |your )?(?P<obj>.+?)\s+(?P<prep>to|into|onto|in|on|over to|"
              r"under|next to|inside|back to)\s+(?P<value>.+)$"),
    ('keep', r"^(?:i|we)\s+(?:always |usually |normally |now |still )?(?:keep|put|leave|store|"
             r"hang|park|stash)\s+(?:the |my |our )?(?P<obj>.+?)\s+(?P<prep>" + _PREP
             + r")\s+(?P<value>.+)$"),
    ('favourite', r"^(?:my|(?P<name>" + _NAME_RE + r")'s) (?:favou?rite|preferred) (?P<attr>.+?)"
                  r" (?:is|are)\s+(?P<value>.+)$"),
    ('preference', r"^(?P<me>i|we)\s+(?:really |do |much |strongly )?(?P<polarity>love|like|"
                   r"enjoy|prefer|adore|hate|dislike|detest|can't stand|cannot stand|don't "
                   r"like|do not like)\s+(?P<value>.+)$"),
    ('routine', r"^(?:(?P<me>i|we)|(?P<name>" + _NAME_RE + r")(?:,? my (?P<rel2>" + _REL
                + r"),)?|my (?P<rel3>" + _REL + r")(?:\s+(?P<who>" + _NAME_RE + r"))?)\s+"
                r"(?:usually |always |normally |often |typically |generally |tend to |like to |"
                r"need to |have to |must |should |each day |every day |)*(?P<verb>"
                + _ROUTINE_VERB + r")\b(?P<obj>.*?)\s*\b(?P<value>" + _TIME_PHRASE + r".*)$"),
    ('routine', r"^(?P<value>(?:every|each|on|at|most|around|in the)\b.+?),?\s+(?:(?P<me>i|we)|"
                r"(?P<name>" + _NAME_RE + r"))\s+(?:usually |always |normally |often |typically "
                r"|generally )?(?P<verb>" + _ROUTINE_VERB + r")\b(?P<obj>.*)$"),
    ('location', r"^(?:the |my |our |your |a |an )?(?P<obj>[\w' -]+?)\s+(?:now |still |"
                 r"usually |always |normally )?" + _LOC_VERB + r"\s+(?:now |still |usually |"
                 r"always |normally |kept |stored |found )?(?P<prep>" + _PREP_AT + r")\s+"
                 r"(?P<value>.+)$"),
    ('reverse_attribute', r"^(?P<value>.+?) (?:is|are) (?:my|our) (?P<attr>[\w' -]+?)\s*$"),
    ('attribute', r"^(?:my|our) (?P<attr>[\w' -]+?)\s+(?:is|are|was|'s)\s+(?:now |still |)?"
                  r"(?P<value>.+)$"),
    ('possessive', r"^(?P<name>" + _NAME_RE + r")'s (?P<attr>[\w' -]+?)\s+(?:is|are|was)\s+"
                   r"(?:now |still |)?(?P<value>.+)$"),
    ('the_attribute', r"^(?:the (?P<attr>[\w' -]+?)|(?P<bare>[A-Za-z][\w-]*(?: [a-z][\w-]*)?))"
                      r"\s+(?:is|are)\s+(?:now |still |)?(?P<value>.+)$"),
)]

_RELATION = re.compile(r"\b(" + _REL[3:-1] + r")\b", re.IGNORECASE)
_RELATION_SYNONYMS = {'mom': 'mother', 'mum': 'mother', 'dad': 'father', 'grandma': 'grandmother',
                      'grandpa': 'grandfather', 'neighbor': 'neighbour', 'caregiver': 'carer',
                      'flatmate': 'roommate', 'best friend': 'friend', 'manager': 'boss'}
_RELATION_WORDS = frozenset(w for w in _REL[3:-1].replace('?', '').replace('neighbour',
                            'neighbour neighbor').split('|') if ' ' not in w) | frozenset(
    _RELATION_SYNONYMS.values())
_PLACE_NOUNS = frozenset('kitchen bathroom bedroom office lab laboratory garage garden hall '
                         'hallway lobby room ward clinic cafeteria canteen library toilet loo '
                         'basement attic cellar balcony terrace pharmacy reception exit '
                         'entrance lift elevator staircase stairs corridor gym'.split())
_PERSON_ATTRS = frozenset('name age birthday job phone number phone email address surname '
                          'nickname pronoun occupation profession'.split())


def clean_text(sentence: str) -> str:
    """The sentence as a memory shows it: discourse openers and "remember that" removed."""
    s = sentence.strip().strip('"“”').strip()
    previous = None
    while previous != s:
        previous = s
        s = _PREFIXES.sub('', s).strip()
    s = _SUFFIXES.sub('', s)
    s = s.rstrip(' .!?;,')
    if not s:
        return ''
    return s[0].upper() + s[1:] + '.'


def is_question(sentence: str) -> bool:
    s = sentence.strip()
    if _RHETORICAL.match(s):
        return False                 # "did I tell you X?": X is said, not asked
    return s.endswith('?') or bool(_QUESTION_START.match(clean_text(s) or s))


def _who(groups: Dict[str, Optional[str]]) -> Tuple[str, str]:
    """(subject prefix, person) from the name/relation groups of a pattern."""
    name = groups.get('name') or groups.get('who') or ''
    rel = groups.get('rel') or groups.get('rel2') or groups.get('rel3') or ''
    if name:
        return name.lower(), name
    if rel:
        return _key(rel), ''
    return '', ''


def _canonical_times(text: str) -> str:
    """Clock times replaced by 'HH:MM' ("8 in the morning" -> "08:00")."""
    text = normalise_numbers(text)
    for start, end, hhmm in reversed(_times(text)):
        text = text[:start] + hhmm + text[end:]
    return text


def _value(raw: str) -> str:
    raw = _canonical_times(raw)
    value = re.sub(r"\s+(?:now|these days|nowadays|anymore|again|as well|too|instead|"
                   r"from now on|for now|at the moment)\s*$", '', raw.strip(' .!;,'),
                   flags=re.IGNORECASE)
    return _key(value)


_LIGHT_VERBS = frozenset({'take', 'have', 'ha', 'do', 'doe', 'get', 'go', 'goe'})
_VERB_BASE = {'walk': 'walk', 'feed': 'feed', 'wake': 'wake', 'watche': 'watch', 'brushe': 'brush',
              'finishe': 'finish'}


def _relation_key(rel: str) -> str:
    word = rel.lower().strip()
    return _RELATION_SYNONYMS.get(word, _key(word))


def _from_pattern(name: str, m: 're.Match[str]', text: str) -> Optional[Fact]:
    g = m.groupdict()
    if name == 'user_name':
        return Fact(text, 'person', 'user name', g['name'].lower(), g['name'])
    if name == 'rel_name':
        return Fact(text, 'person', _relation_key(g['rel']) + ' name', g['name'].lower(),
                    g['name'])
    if name in ('lives', 'works', 'born'):
        if (g.get('name') or 'x').split()[0].lower() in _NOT_NAMES:
            return None                    # "your charger lives in room 4": a location
        who, person = _who(g)
        attr = {'lives': 'home', 'works': 'work', 'born': 'birthday'}[name]
        return Fact(text, 'person', f'{who} {attr}'.strip(), _value(g['value']), person)
    if name in ('where_is', 'find', 'moved', 'keep', 'location'):
        obj = _key(g['obj'])
        if not obj or obj in _CHITCHAT or len(obj.split()) > 5 or \
                (name == 'keep' and obj.split()[0].endswith('ing')):
            return None                   # "we keep running out of paper": not a place
        first = g['obj'].strip().split()[0]
        owner = first[:-2] if first.endswith("'s") else first
        value_kinds = {t[:2] for t in value_tokens(g['value'])
                       if not (t.startswith('n:') and t[2:].isdigit())}
        if name == 'location' and ('t:' in value_kinds or 'd:' in value_kinds) and \
                'n:' not in value_kinds:
            # "my pills are at 8 am", "my birthday is on May 3": a time, not a place.
            person = owner if owner[:1].isupper() and owner.lower() not in _NOT_NAMES else ''
            suffix = '' if obj.split()[-1] in _PERSON_ATTRS else ' time'
            return Fact(text, 'routine' if suffix else 'person', f'{obj}{suffix}',
                        _value(g['value']), person)
        if owner[:1].isupper() and owner.lower() not in _NOT_NAMES and name == 'location' \
                and m.start('obj') == 0:
            category, person = 'person', owner
        elif any(w in _PLACE_NOUNS for w in obj.split()):
            category, person = 'place', ''
        else:
            category, person = 'object', ''
        return Fact(text, category, f'{obj} location', _value(g['value']), person)
    if name == 'favourite':
        who, person = _who(g)
        return Fact(text, 'person', f'{who} {_key("favourite " + g["attr"])}'.strip(),
                    _value(g['value']), person)
    if name == 'preference':
        polarity = g['polarity'].lower()
        liked = not any(w in polarity for w in ('hate', 'dislike', 'detest', 'stand', 'not',
                                                "n't"))
        return Fact(text, 'person', f'preference {_value(g["value"])}',
                    'like' if liked else 'dislike')
    if name == 'routine':
        who, person = _who(g)
        value, rest = g['value'], g['obj'] or ''
        tail = re.search(r"\s(?:at|every|each|on|around|about|before|after|by)\b.*$", rest,
                         re.IGNORECASE)
        if tail:    # "every night I go to bed at 10": the time after the verb is a value too
            value, rest = f'{value} {tail.group(0).strip()}', rest[:tail.start()]
        g = dict(g, obj=rest)
        if not (value_tokens(value) or re.search(r"\b(?:every|each|daily|weekly|nightly|"
                                                 r"once|twice)\b", value, re.IGNORECASE)):
            return None
        verb = _stem(g['verb'].split()[0])
        verb = '' if verb in _LIGHT_VERBS else _VERB_BASE.get(verb, verb)
        obj = ' '.join(w for w in (verb, _key(g['obj'])) if w) or _stem(g['verb'])
        prefix = who + ' ' if who else ''
        return Fact(text, 'routine', f'{prefix}{obj} time', _value(value), person)
    if name == 'reverse_attribute':
        if len(g['value'].split()) > 4:
            return None
        name = 'attribute'
    if name in ('attribute', 'possessive', 'the_attribute'):
        attr = _key(g.get('attr') or g.get('bare') or '')
        if not re.search(r"[a-z]", attr):
            return None                   # "two are vegan": a count, not an attribute
        if not attr or attr in _CHITCHAT or len(attr.split()) > 4:
            return None
        value = g['value']
        if name == 'the_attribute' and not value_tokens(value):
            return None           # "the food is nice": an opinion, not a fact worth keeping
        if name == 'possessive':
            who, person = g['name'].lower(), g['name']
        else:
            who, person = '', ''
        tokens = value_tokens(value)
        if any(t.startswith('t:') for t in tokens) or re.search(
                r"\b(?:every|each)\b", value, re.IGNORECASE):
            category = 'routine'
        elif attr.split()[-1] in _PERSON_ATTRS or person:
            category = 'person'
        elif any(t.startswith('n:') for t in tokens) and any(
                w in _PLACE_WORDS for t in tokens for w in t[2:].split()):
            category = 'place'
        else:
            category = 'other'
        subject = f'{who} {attr}'.strip()
        if category == 'routine' and not subject.endswith('time'):
            subject += ' time'            # "lunch is at noon" is about lunch time
        return Fact(text, category, subject, _value(value), person)
    return None


_STATEMENT_START = re.compile(
    r"^(?:(?i:(?:i|we)(?:'ve|'m|'d|'ll)?\s+(?!(?:want|need|would|'d|wonder|hope|think|guess|"
    r"mean|wish|don't know|"
    r"can't|cannot|could|should)\b)|(?:my|our|your|the|a|an)\s+\w+|(?:on|every|each|at|in the)\b"
    r"[^,]*?,?\s+(?:i|we)\s)|[A-Z][a-z]+(?:\s+[A-Z][a-z]+)?(?:\s+(?:is|was|has|had|lives|"
    r"lived|works|worked|likes|loves|went|moved|will|can|'s)\b|,\s+(?i:my|our|the)\b))")
_NAME_VERBS = frozenset("is was has had lives lived works worked likes loves went moved will can "
                        "'s and goes comes switched changed retired left sold bought started "
                        "stopped uses needs takes gets".split())


def _named_subject(text: str) -> bool:
    """Whether a sentence opens with a name doing something ("Marco switched to Wednesdays",
    "Dr Kim retired"): a statement about that person."""
    words = re.findall(r"[A-Za-z][A-Za-z'-]*|,", text)
    i = 0
    while i < len(words) and words[i].lower() in _TITLES:
        i += 1
    if i >= len(words) or not words[i][:1].isupper() or words[i].lower() in _NOT_NAMES:
        return False
    if words[i].endswith("'s") and words[i][:-2].lower() not in _NOT_NAMES:
        return True                              # "Sofia's piano lesson moved to Sunday"
    while i + 1 < len(words) and words[i + 1][:1].isupper():
        i += 1                                   # "Helen Ward retired"
    nxt = words[i + 1].lower() if i + 1 < len(words) else ''
    return nxt in _NAME_VERBS or nxt in _PAST_VERBS or (len(nxt) > 3 and (
        nxt.endswith('ed') or (nxt.endswith('s') and not nxt.endswith(("'s", 'ss')))))


def _fallback(text: str) -> Optional[Fact]:
    """A statement no pattern knows but that says something of the speaker or of someone
    named, with a value in it ("I went to Paris with Tom"): kept unstructured. Commands,
    requests and questions never get here as facts."""
    tokens = value_tokens(text)
    words = text.split()
    if len(words) < 4:
        return None
    if not (_STATEMENT_START.match(text) or _IMPERSONAL_CHANGE.match(text) or
            _named_subject(text)):
        return None
    if not tokens:
        # No value, but a statement of change about a topic ("I've started taking my coffee
        # with oat milk") or about something of someone's ("I drink my tea with milk").
        found = topics(text)
        owned = any(owner and owner not in ('?', '*') for owner, _ in found)
        if not found or not (change_cue(text) or (owned and len(words) >= 5)):
            return None
        if all(words_ <= _CHITCHAT for _, words_ in found):
            return None
    names = [t[2:] for t in tokens if t.startswith('p:')]
    return Fact(text, 'other', '', '', names[0].title() if len(names) == 1 else '')


_ABBREVIATION = re.compile(r"\b(?:dr|mr|mrs|ms|st|prof|no|nr|approx|etc|e\.g|i\.e)\.$",
                           re.IGNORECASE)


def sentences(text: str) -> List[str]:
    """Sentences of a turn, not split after "Dr." or "Mrs."."""
    out: List[str] = []
    for piece in _SENTENCE_SPLIT.split(text.strip()):
        if out and _ABBREVIATION.search(out[-1]):
            out[-1] = f'{out[-1]} {piece}'
        else:
            out.append(piece)
    return out


def extract(text: str) -> List[Fact]:
    """The facts in one person's turn (empty for questions, commands and chit-chat)."""
    facts: List[Fact] = []
    seen = set()
    for raw in sentences(text):
        if not raw.strip() or is_question(raw):
            continue
        cleaned = clean_text(raw)
        if not cleaned or len(cleaned) > 300:
            continue
        body = cleaned.rstrip('.')
        body = _HEDGES.sub('', body).strip(' ,')
        body = re.sub(r"\s{2,}", ' ', body)
        fact: Optional[Fact] = None
        if _PRONOUN_START.match(body) and not _IMPERSONAL_CHANGE.match(body):
            continue                      # "she is my grandmother": whom it means is not here
        if not _NEGATION.search(body) or re.match(r"^(?:i|we) (?:don't|do not) like\b", body,
                                                  re.IGNORECASE):
            for name, pattern in _PATTERNS:
                m = pattern.match(body)
                if m:
                    fact = _from_pattern(name, m, cleaned)
                    if fact is not None:
                        break
        if fact is None:
            fact = _fallback(cleaned)
        if fact is not None and fact.text not in seen:
            seen.add(fact.text)
            facts.append(fact)
    return facts


def parse(text: str) -> Fact:
    """A stored fact's text back to a Fact (its first one; unstructured if none matches)."""
    found = extract(text)
    if found:
        return found[0]
    return Fact(clean_text(text) or text, 'other', '', '')


# ---------------------------------------------------------------------------------------------
# decisions

_HEADS = frozenset({'location', 'time', 'home', 'work', 'name', 'birthday'})


def _subject_relation(a: Fact, b: Fact) -> str:
    """How two subjects relate: 'same', 'one_sided' (one adds words: "charger" / "charger
    cable"), 'two_sided' (each has words the other lacks: "door code" / "alarm code"),
    'different' (another attribute or another person), 'unknown' (either not recognised)."""
    if not a.subject or not b.subject:
        return 'unknown'
    ta, tb = a.subject.split(), b.subject.split()
    if set(ta) == set(tb) or ''.join(ta) == ''.join(tb):
        return 'same'
    if ta[-1] in _HEADS and tb[-1] in _HEADS and ta[-1] != tb[-1]:
        return 'different'
    only_a, only_b = set(ta) - set(tb), set(tb) - set(ta)
    if (only_a | only_b) & _RELATION_WORDS:
        return 'different'                   # "Omar" / "Omar's brother"
    # Words sharing a long prefix are one word ("physio" / "physiotherapy").
    for x in list(only_a):
        match = next((y for y in only_b if len(os.path.commonprefix([x, y])) >= 5), None)
        if match is not None:
            only_a.discard(x)
            only_b.discard(match)
    if not only_a and not only_b:
        return 'same'
    if not only_a or not only_b:
        return 'one_sided'
    return 'two_sided'


def _values(f: Fact) -> FrozenSet[str]:
    tokens = value_tokens(f.text)
    if f.subject:
        # The subject's own names ("anna home") are not values of the fact.
        subject_names = {'p:' + w for w in f.subject.split()}
        if f.person:
            subject_names.update('p:' + w.lower() for w in f.person.split())
        tokens = frozenset(t for t in tokens if t not in subject_names)
    return tokens


def _word_set(value: str) -> FrozenSet[str]:
    return frozenset(w for w in value.split() if w not in _STOP)


def _conflicts(a: Fact, b: Fact) -> FrozenSet[str]:
    """The value types ('t:', 'n:', 'p:', 'd:', 'q:', 'r:') on which the two facts disagree:
    both carry values of that type and neither set contains the other (a type only one side
    mentions is extra detail, not a conflict)."""
    va, vb = _values(a), _values(b)
    out = set()
    for kind in ('t:', 'n:', 'p:', 'd:', 'q:', 'r:'):
        xa = {t for t in va if t.startswith(kind)}
        xb = {t for t in vb if t.startswith(kind)}
        if xa and xb and not (xa <= xb or xb <= xa):
            out.add(kind)
    return frozenset(out)


def _values_agree(a: Fact, b: Fact) -> Optional[bool]:
    """Whether the two facts say the same value: True, False (they conflict), None (unknown)."""
    if _conflicts(a, b):
        return False
    va, vb = _values(a), _values(b)
    if {t for t in va & vb if not t.startswith('r:')}:
        return True
    if a.value and b.value:
        wa, wb = _word_set(a.value), _word_set(b.value)
        if wa == wb:
            return True
        if wa and wb and not (va and vb):
            return len(wa & wb) / max(1, min(len(wa), len(wb))) >= 0.5
    return None


def same_fact(a: Fact, b: Fact, similarity: float,
              thresholds: Optional[FactThresholds] = None) -> bool:
    """Whether `b` tells the same fact as `a` in other words (a paraphrase: merge them)."""
    th = thresholds or FactThresholds()
    if not math.isfinite(similarity):
        return False
    agree = _values_agree(a, b)
    if agree is False:
        return False
    relation = _subject_relation(a, b)
    if relation == 'same':
        if a.value == b.value or agree is True:
            return similarity >= th.same_subject_floor
        return False                       # same subject, other value: that is a change
    if relation == 'one_sided':
        return similarity >= th.merge_similarity_other_subject
    if relation == 'two_sided':
        return similarity >= th.merge_similarity_two_sided
    if relation == 'different':
        return False
    if _cued_change(a, b, similarity, th, relation, _conflicts(a, b)):
        return False               # "Dr Kim retired, my new dentist is ...": a change
    if similarity >= th.merge_similarity:
        return True
    return _topic_paraphrase(a, b, similarity, th)


def changed_fact(a: Fact, b: Fact, similarity: float,
                 thresholds: Optional[FactThresholds] = None) -> bool:
    """Whether `b` gives a new value for what `a` was about (an update: b supersedes a)."""
    th = thresholds or FactThresholds()
    if not math.isfinite(similarity):
        return False
    conflicts = _conflicts(a, b)
    if 'r:' in conflicts:
        return False                       # another person ("my aunt Rose" / "my grandmother Rose")
    relation = _subject_relation(a, b)
    if relation == 'same':
        if a.subject.startswith('preference '):
            return a.value != b.value
        if conflicts:
            return True
        agree = _values_agree(a, b)
        return agree is not True and bool(a.value) and bool(b.value) and a.value != b.value
    if relation == 'unknown' and conflicts and similarity >= th.change_similarity and \
            _frame_overlap(a.text, b.text) >= 0.5:
        # Without known subjects: the words around the values are the same (same statement
        # frame, other value), not merely the same topic.
        return True
    return _cued_change(a, b, similarity, th, relation, conflicts)


# ---------------------------------------------------------------------------------------------
# topics and change cues: what a sentence is about, and whether it says something changed

_IMPERSONAL_CHANGE = re.compile(
    r"^(?:they|someone|somebody)\s+(?:have\s+|'ve\s+|just\s+|already\s+)*(?:moved|changed|"
    r"switched|replaced|put|relocated|swapped|shifted)\b", re.IGNORECASE)
_CHANGE_CUE = re.compile(
    r"\b(?:now|from now on|these days|nowadays|no longer|any ?more|instead|moved|move|moving|"
    r"switched|switch|changed|change|swapped|started|starting|stopped|replaced|sold|bought|"
    r"got rid of|gave away|retired|left|quit|new|newly|became|become|has become|relocated|"
    r"shifted|not any more)\b", re.IGNORECASE)
# Cues that the earlier value is gone ("I sold the Skoda", "Karen retired"): naming it in the
# later sentence is then a change, not a repeat.
_REMOVAL_CUE = re.compile(r"\b(?:sold|got rid of|gave away|replaced|retired|left|quit|no longer|"
                          r"stopped|moved out|passed away|broke|broken)\b", re.IGNORECASE)
_OWNERS = {'my': 'me', 'our': 'me', 'your': 'you', 'the': '', 'a': '', 'an': '', 'his': '?',
           'her': '?', 'their': '?', 'its': '', 'this': '', 'that': ''}
_TOPIC_BREAK = frozenset(
    "is are was were be been being am 's has have had do does did will would can could should "
    "may might must and or but so because that which who whom while when where if then than it "
    "it's he she they we i you me him them us there here not no now still also too again just "
    "always usually never really very goes go comes come lives live works work sits sit stays "
    "stay takes take gets get got put puts keeps keep uses use needs need likes like loves love "
    "says say tell tells knows know lies hangs sleeps naps eats drinks wants likes 're 've 'll "
    "one ones every each".split())
_TOPIC_PREPOSITIONS = frozenset(
    "in on at to into onto under underneath behind inside beside near by above below with from "
    "of for next over off out up down through across around against between beneath about "
    "after before until like than as via per".split())
# Words that say little about WHICH thing a phrase means.
_GENERIC = frozenset("new old time day thing stuff place one current usual favorite own "
                     "other same first last good bad big small little spare".split())
_TITLES = frozenset('dr doctor mr mrs ms miss prof professor sir'.split())
_PAST_VERBS = frozenset('told said made went took got gave left sold bought brought kept put ran '
                        'saw met knew thought found came became began broke chose drove fell '
                        'felt forgot grew heard hid held lost paid quit rode sent set shut sat '
                        'slept spent stole swam threw woke wore won wrote'.split())


def change_cue(text: str) -> bool:
    """Whether a sentence says something changed ("moved", "now", "switched", "sold")."""
    return bool(_CHANGE_CUE.search(text))


def topics(text: str) -> List[Tuple[str, FrozenSet[str]]]:
    """What a sentence is about, without a parser: its noun phrases that are not the object of a
    preposition ("the charger", "my pill time", "Mia's bedtime", not "in the kitchen"), each
    as (owner, stemmed content words). Owner: 'me' ("my", "our"), 'you' ("your"), a person or
    relation ("mia", "sister" for "Mia's", "my sister's"), '' when unknown ("the", "a"); "his"
    and "her" resolve to the sentence's subject when it is a name or a relation. A capitalised
    sentence subject ("Mia goes ...", "Dr Kim retired") is a topic of its own."""
    words = re.findall(r"[A-Za-z0-9][A-Za-z0-9'’-]*|[,;:]", normalise_numbers(text))
    words = [w.replace('’', "'") for w in words]
    out: List[Tuple[str, FrozenSet[str]]] = []
    subject = ''
    # A capitalised subject: "Mia goes", "Dr Kim retired", "Grandma naps".
    head = []
    for w in words:
        if not w[:1].isupper() or w.lower() in _OWNERS or w.lower() in ('i', 'we', 'they'):
            break
        low = w.lower()[:-2] if w.lower().endswith("'s") else w.lower()
        if low in _NOT_NAMES and low not in _TITLES:
            break
        head.append(_RELATION_SYNONYMS.get(low, low))
        if w.lower().endswith("'s"):
            break
    head_words = frozenset(h for h in head if h not in _TITLES)
    if head_words:
        out.append(('', head_words))
        subject = ' '.join(sorted(head_words))
    i = 0
    while i < len(words):
        w = words[i]
        low = w.lower()
        prev = words[i - 1].lower() if i else ''
        owner: Optional[str] = None
        if low in _OWNERS:
            owner = _OWNERS[low]
        elif low.endswith("'s") and len(low) > 3 and low[:-2] not in _NOT_NAMES:
            owner = _RELATION_SYNONYMS.get(low[:-2], _stem(low[:-2]))
            if prev not in _TOPIC_PREPOSITIONS:
                # "Mia's bedtime" is about Mia too (a secondary topic: owner '*').
                out.append(('*', frozenset({owner})))
        if owner is None or prev in _TOPIC_PREPOSITIONS:
            i += 1
            continue
        phrase: List[str] = []
        j = i + 1
        while j < len(words) and len(phrase) < 4:
            x = words[j].lower()
            if x in _TOPIC_BREAK or x in _TOPIC_PREPOSITIONS or x in ',;:' or x in _OWNERS or \
                    x in _PAST_VERBS or (x.endswith('ed') and len(x) > 4):
                break
            if x.endswith("'s"):
                break                              # "my sister's boss": the next phrase's owner
            phrase.append(x if words[j][:1].isupper() else _stem(x))
            j += 1
        if owner == '?':
            owner = subject
        keys = frozenset(p for p in phrase if p not in _STOP and p not in _GENERIC)
        if keys:
            if owner == 'me' and len(phrase) == 1 and phrase[0] in _RELATION_WORDS:
                subject = subject or phrase[0]     # "my brother sold his car": his = brother
            out.append((owner, keys))
        i = j if j > i + 1 else i + 1
    return out


def _fact_topics(f: Fact) -> List[Tuple[str, FrozenSet[str]]]:
    """The topics of a fact's sentence and, when a pattern recognised it, of its subject
    ("vitamin d time" -> vitamin, d)."""
    found = topics(f.text)
    if f.subject:
        person = {w.lower() for w in f.person.split()}
        words = frozenset(w for w in f.subject.split() if w not in _HEADS and w not in _GENERIC
                          and w not in _STOP and w not in person)
        if words and not any(words & w for _, w in found):
            # Only where the sentence's phrases miss it ("I take vitamin D at lunch"): "my car"
            # keeps its owner.
            found.append((' '.join(sorted(person)), words))
    return found


def _topic_relation(a: Fact, b: Fact, primary: bool = False) -> str:
    """'same' (a topic of each shares a content word, owners compatible), 'other_owner' (shared
    words, but whose differs: "my car" / "his car" of my brother), else 'none'. `primary`:
    a possessor ("the printer's toner") does not count as the topic."""
    ta, tb = _fact_topics(a), _fact_topics(b)
    if primary:
        ta, tb = [t for t in ta if t[0] != '*'], [t for t in tb if t[0] != '*']
    result = 'none'
    for oa, wa in ta:
        for ob, wb in tb:
            if not (wa & wb):
                continue
            oa, ob = oa.strip('*'), ob.strip('*')
            if oa and ob and oa != ob:
                result = 'other_owner'
                continue
            return 'same'
    return result


def _content_words(text: str) -> FrozenSet[str]:
    words = {_stem(w) for w in re.findall(r"[A-Za-z']+", normalise_numbers(text))}
    return frozenset(w for w in words if w and w not in _STOP and w not in _GENERIC and
                     w not in _TOPIC_BREAK and not _CHANGE_CUE.fullmatch(w))


def _names_of(f: Fact) -> FrozenSet[str]:
    return frozenset(t for t in value_tokens(f.text) if t.startswith('p:'))


def _cued_change(a: Fact, b: Fact, similarity: float, th: FactThresholds,
                 relation: str, conflicts: FrozenSet[str]) -> bool:
    """A later statement that says its topic changed: "We moved the printer, it's in room 15
    now" after "The printer is in room 12", "I sold the Peugeot and bought a Trek" after "My
    bike is a red Peugeot", "Marco switched to Wednesdays" after "Marco comes on Mondays"."""
    if not change_cue(b.text) or similarity < th.change_cue_similarity:
        return False
    topic = _topic_relation(a, b)
    if topic == 'other_owner':
        return False
    named = bool(_names_of(a) & _names_of(b))
    if relation == 'different' and not (topic == 'same' and conflicts):
        return False               # "Leo works at the bakery" / "Leo moved to Paris"
    if topic != 'same' and not named:
        return False
    if conflicts:
        return True
    if _REMOVAL_CUE.search(b.text) and _old_value_named(a, b):
        return True                # "Karen retired, my new manager is Luis"
    # Otherwise the change must be of b's own topic (not "the printer's toner") and b must say
    # something a did not: the new value.
    if _topic_relation(a, b, primary=True) != 'same' or _values_agree(a, b) is True:
        return False
    return bool(_values(b) - _values(a)) or bool(_content_words(b.text) -
                                                 _content_words(a.text))


def _old_value_named(a: Fact, b: Fact) -> bool:
    """Whether b names what a said (its value or names): "I sold the Peugeot" after "My bike is
    a red Peugeot"."""
    named = _names_of(a) & _names_of(b)
    words = _content_words(a.value) if a.value else _content_words(a.text)
    return bool(named) or bool(words & _content_words(b.text))


def _topic_paraphrase(a: Fact, b: Fact, similarity: float, th: FactThresholds) -> bool:
    """Two statements about one topic (same owner) that agree on their values, when no pattern
    recognised one of them: "The bins are collected on Monday mornings" / "The rubbish gets
    picked up Monday morning"."""
    if similarity < th.topic_merge_similarity or _conflicts(a, b):
        return False
    if change_cue(b.text) and not change_cue(a.text) and _REMOVAL_CUE.search(b.text):
        return False
    if _topic_relation(a, b) != 'same':
        return False
    va, vb = _values(a), _values(b)
    if va or vb:
        return bool({t for t in va & vb if not t.startswith('r:')})
    wa, wb = _content_words(a.text), _content_words(b.text)
    return bool(wa and wb) and len(wa & wb) / min(len(wa), len(wb)) >= 0.5


def _frame_overlap(a: str, b: str) -> float:
    def frame(text: str) -> FrozenSet[str]:
        words = {_stem(w) for w in re.findall(r"[A-Za-z']+", normalise_numbers(text))}
        return frozenset(w for w in words if w not in _STOP and w.lower() not in
                         {t[2:] for t in value_tokens(text) if t.startswith('p:')})
    fa, fb = frame(a), frame(b)
    if not fa or not fb:
        return 0.0
    return len(fa & fb) / len(fa | fb)


def clarity(text: str) -> float:
    """How clear a statement is to show back: carries values, no hedges, a sentence's length."""
    words = len(text.split())
    score = min(3, len(value_tokens(text))) * 1.0
    score -= 1.5 * len(_HEDGES.findall(text))
    score -= 0.15 * max(0, words - 14) + 0.3 * max(0, 5 - words)
    return score


@dataclass(frozen=True)
class Candidate:
    """An earlier memory a new fact is compared with."""

    memory_id: int
    fact: Fact
    similarity: float


@dataclass(frozen=True)
class Decision:
    action: str          # 'merge' (paraphrase of target), 'update' (supersedes target), 'add'
    target: int          # memory id of the candidate (0 for 'add')
    similarity: float


def decide(new: Fact, candidates: Sequence[Candidate],
           thresholds: Optional[FactThresholds] = None) -> Decision:
    """Merge into the most similar paraphrase, else update the most similar changed fact,
    else add."""
    ranked = sorted(candidates, key=lambda c: -c.similarity)
    for c in ranked:
        if same_fact(c.fact, new, c.similarity, thresholds):
            return Decision('merge', c.memory_id, c.similarity)
    for c in ranked:
        if changed_fact(c.fact, new, c.similarity, thresholds):
            return Decision('update', c.memory_id, c.similarity)
    return Decision('add', 0, ranked[0].similarity if ranked else 0.0)


# "remember that X", "remember: X", "please remember X" -> X (the whole turn is the request).
_REMEMBER = re.compile(r'^\s*(?:please\s+)?(?:do\s+)?remember\s*(?:that\b|:|,)?\s*(?P<what>.+?)'
                       r'\s*[.!]?\s*$', re.IGNORECASE | re.DOTALL)
_NOT_A_REQUEST = re.compile(r'^(?:me|when|what|who|where|how|why|if|whether|the\s+time)\b|\?\s*$',
                            re.IGNORECASE)


def pinned_request(text: str) -> Optional[str]:
    """X of a turn that asks to remember X ("remember that X", "remember: X"), else None. A
    question about memory ("remember when ...?", "do you remember me?") is not a request."""
    m = _REMEMBER.match(text)
    if m is None or text.rstrip().endswith('?'):
        return None
    what = m.group('what').strip()
    if not what or _NOT_A_REQUEST.match(what):
        return None
    return what
