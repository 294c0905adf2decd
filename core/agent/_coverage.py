"""
Does an answer still lack a part of its question? A cheap, model-free check.

A question names the things it is about: its numbers, its proper nouns (capitalised
words that do not start a sentence) and its identifiers (``snake_case``, ``name2``).
A run that called tools and then answered has *covered* a thing when some call of
the run named it in its arguments: the number among the arguments' numbers, the word
inside one of their strings (case-blind). What is left uncovered is a part the model
may have skipped: "What is 13 squared, and what is the capital of France?" answered
after ``square(13)`` alone leaves ``France``.

Only a run that called a tool is checked (a run with no call answered without tools,
as it may); a thing a call's result already holds counts as covered too, so a chain
(``square(6)`` then ``add(36, 10)``) is judged by all its calls. It can be wrong both
ways, which is why the agent only asks the model once more and takes its word then.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from callward.core._canonical import JSONValue

_NUMBER: Final = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.]*[A-Za-z_])")
_IDENTIFIER: Final = re.compile(r"\b[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+\b|\b[a-z]+\d+\b")
_WORD: Final = re.compile(r"[A-Za-z][\w'-]*")
_SENTENCE_START: Final = re.compile(r"(?:^|[.?!:;]\s+|[\"'(]\s*)$")
_NOT_NAMES: Final = frozenset({"I", "OK", "Please", "Thanks", "Hi", "Hello"})
MAX_MENTIONS: Final = 16


def mentions(question: str) -> tuple[str, ...]:
    """The numbers, proper nouns and identifiers a question names, in order, once each."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", question)
    found: dict[str, int] = {}
    for match in _NUMBER.finditer(text):
        found.setdefault(match.group(), match.start())
    for match in _IDENTIFIER.finditer(text):
        found.setdefault(match.group(), match.start())
    for match in _WORD.finditer(text):
        word = match.group()
        if (word[0].isupper() and word not in _NOT_NAMES and not word.isupper()
                and not _SENTENCE_START.search(text[:match.start()])):
            found.setdefault(word, match.start())
    ordered = sorted(found, key=found.__getitem__)
    return tuple(ordered[:MAX_MENTIONS])


def uncovered(question: str, named: Iterable[JSONValue]) -> tuple[str, ...]:
    """
    The things ``question`` names that no value in ``named`` (the run's call arguments
    and results) names: the parts an answer may still lack.
    """
    numbers: set[float] = set()
    strings: list[str] = []
    for value in named:
        _collect(value, numbers, strings)
    text = "\n".join(strings).lower()
    left = []
    for mention in mentions(question):
        try:
            if float(mention) in numbers:
                continue
        except ValueError:
            if mention.lower() in text:
                continue
        left.append(mention)
    return tuple(left)


def _collect(value: JSONValue, numbers: set[float], strings: list[str]) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        numbers.update((float(value), -float(value)))  # "subtract 7" may be add(x, -7)
    elif isinstance(value, str):
        strings.append(value)
        for match in _NUMBER.finditer(value):
            numbers.update((float(match.group()), -float(match.group())))
    elif isinstance(value, list):
        for item in value:
            _collect(item, numbers, strings)
    elif isinstance(value, dict):
        for key, item in value.items():
            strings.append(key)
            _collect(item, numbers, strings)
