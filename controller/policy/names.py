"""DNS labels, the site suffix, and subdomain name templates ('web{n}').

A name is `iface.container.subdomain.domain.tld`, where the site suffix `tld`
may itself have several labels (`home.arpa`, RFC 8375): code that splits a
name takes labels from the left, never assumes the suffix is the last one.

Two rules of one domain must never be able to render the same name. Templates
are tiny regular languages (literal text, one decimal number without leading
zeros, literal text), so the check is an exact emptiness test of the
intersection of two automata rather than a sample of rendered names.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_TEMPLATE_TEXT = re.compile(r"^[a-z0-9-]*\Z")
PLACEHOLDER = "{n}"
MAX_NAME = 253  # characters of a whole name, without the final dot (RFC 1035)


def is_label(text: str) -> bool:
    return bool(LABEL.match(text))


def suffix_problem(text: str) -> str | None:
    """What is wrong with a site suffix (`internal`, `home.arpa`), or None."""
    labels = text.split(".")
    bad = [label for label in labels if not is_label(label)]
    if bad:
        return (
            f"{bad[0]!r} is not a DNS label (1-63 of a-z, 0-9, '-', not starting or "
            "ending with '-')"
        )
    if labels[-1].isdigit():
        return f"its last label {labels[-1]!r} is all digits, which no top-level domain is"
    if len(text) > MAX_NAME:
        return f"{len(text)} characters, longer than the {MAX_NAME} of a DNS name"
    return None


@dataclass(frozen=True, slots=True)
class Template:
    prefix: str
    suffix: str
    numbered: bool  # False: a fixed name (the rule may hold one machine only)

    def render(self, n: int) -> str:
        return f"{self.prefix}{n}{self.suffix}" if self.numbered else self.prefix

    @property
    def text(self) -> str:
        return f"{self.prefix}{PLACEHOLDER}{self.suffix}" if self.numbered else self.prefix


def template_slot(template: Template, label: str, max_slots: int) -> int | None:
    """The slot whose name `template` renders as `label`, or None."""
    if not template.numbered:
        return 1 if label == template.prefix else None
    if not (label.startswith(template.prefix) and label.endswith(template.suffix)):
        return None
    digits = label[len(template.prefix) : len(label) - len(template.suffix)]
    if not digits.isdigit() or digits != str(int(digits)):
        return None
    n = int(digits)
    return n if 1 <= n <= max_slots else None


class TemplateError(ValueError):
    pass


def parse_template(text: str, max_slots: int) -> Template:
    if text.count(PLACEHOLDER) > 1:
        raise TemplateError(f"{text!r} has more than one {{n}}, expected at most one")
    prefix, sep, suffix = text.partition(PLACEHOLDER)
    for part in (prefix, suffix):
        if not _TEMPLATE_TEXT.match(part):
            raise TemplateError(
                f"{text!r} is not a name template, expected lowercase letters, digits, '-' "
                "and one {n}, like web{n}"
            )
    template = Template(prefix, suffix, bool(sep))
    if not template.numbered and max_slots != 1:
        raise TemplateError(
            f"{text!r} has no {{n}} but the rule may hold {max_slots} machines, "
            "expected a template with {n} (or max = 1)"
        )
    for n in (1, max_slots):
        label = template.render(n)
        if not is_label(label):
            raise TemplateError(
                f"{text!r} renders {label!r}, which is not a DNS label "
                "(1-63 of a-z, 0-9, '-', not starting or ending with '-')"
            )
    return template


# -- collision check -----------------------------------------------------------
# A template is a token list: literal characters and one DIGITS token standing
# for [1-9][0-9]*. NFA states: (i, False) = before token i; (i, True) = inside
# the DIGITS token i after at least one digit.

_DIGITS = object()
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-"


def _tokens(t: Template) -> list[object]:
    if not t.numbered:
        return list(t.prefix)
    return [*t.prefix, _DIGITS, *t.suffix]


def _closure(tokens: list[object], states: frozenset) -> frozenset:
    out = set(states)
    for i, inside in states:
        if inside:
            out.add((i + 1, False))
    return frozenset(out)


def _step(tokens: list[object], states: frozenset, ch: str) -> frozenset:
    nxt = set()
    for i, inside in states:
        if inside:
            if ch.isdigit():
                nxt.add((i, True))
            continue
        if i >= len(tokens):
            continue
        tok = tokens[i]
        if tok is _DIGITS:
            if ch in "123456789":
                nxt.add((i, True))
        elif tok == ch:
            nxt.add((i + 1, False))
    return _closure(tokens, frozenset(nxt))


def can_collide(a: Template, b: Template) -> str | None:
    """A name both templates can render (shortest found), or None if none exists."""
    ta, tb = _tokens(a), _tokens(b)
    start = (frozenset({(0, False)}), frozenset({(0, False)}))
    seen = {start}
    queue: deque[tuple[tuple[frozenset, frozenset], str]] = deque([(start, "")])
    while queue:
        (sa, sb), word = queue.popleft()
        if (len(ta), False) in sa and (len(tb), False) in sb:
            return word
        for ch in _ALPHABET:
            na, nb = _step(ta, sa, ch), _step(tb, sb, ch)
            if na and nb and (na, nb) not in seen:
                seen.add((na, nb))
                queue.append(((na, nb), word + ch))
    return None
