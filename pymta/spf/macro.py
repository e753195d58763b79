"""SPF macro strings (RFC 7208 section 7): parsing and expansion.

A macro string is parsed once (when its record is parsed) into literal text
and :class:`Macro` references; expanding it is then a pure function of the
letter values.  Syntax errors raise :class:`MacroSyntaxError`, which the
record parser turns into a permerror.

Which letters are allowed depends on where the string is: ``c``, ``r`` and
``t`` only in explanation text (7.1/8), which also allows spaces
(``explain-string = *( macro-string / SP )``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

__all__ = ["Macro", "MacroString", "MacroSyntaxError", "parse_macro_string",
           "DOMAIN_LETTERS", "EXPLANATION_LETTERS"]

#: letters allowed in a domain-spec (and in unknown modifiers)
DOMAIN_LETTERS = frozenset("slodipvh")
#: letters allowed in explanation text
EXPLANATION_LETTERS = DOMAIN_LETTERS | frozenset("crt")

_DELIMITERS = frozenset(".-+,/_=")
_BODY = re.compile(r"([A-Za-z])([0-9]*)([rR]?)([.\-+,/_=]*)\Z")

#: the largest DIGIT transformer honoured; more parts than that are never needed
_MAX_PARTS = 128


class MacroSyntaxError(ValueError):
    """A macro string that does not follow RFC 7208 7.1."""


@dataclass(frozen=True)
class Macro:
    """One ``%{...}`` reference."""

    letter: str             # lower case
    url_escape: bool        # the letter was upper case (7.3)
    parts: int | None       # keep this many right-hand parts
    reverse: bool
    delimiters: str         # "" means "."

    def expand(self, value: str) -> str:
        delimiters = self.delimiters or "."
        pieces = re.split("[" + re.escape(delimiters) + "]", value)
        if self.reverse:
            pieces.reverse()
        if self.parts is not None:
            pieces = pieces[-self.parts:]
        text = ".".join(pieces)
        # unreserved characters (RFC 3986) stay, everything else is %-escaped
        return quote(text, safe="~") if self.url_escape else text


@dataclass(frozen=True)
class MacroString:
    """A parsed macro string: literal text and :class:`Macro` items in order."""

    text: str
    items: tuple[str | Macro, ...]
    #: the string ends with a macro-expand (``%{..}``, ``%%``, ``%_`` or ``%-``)
    ends_with_expand: bool
    #: the literal text after the last macro-expand, as written
    tail: str

    @property
    def letters(self) -> frozenset[str]:
        return frozenset(item.letter for item in self.items if isinstance(item, Macro))

    def expand(self, values: Mapping[str, str]) -> str:
        """The string with every macro replaced; ``values`` maps each used letter to its value."""
        out = []
        for item in self.items:
            out.append(item if isinstance(item, str) else item.expand(values[item.letter]))
        return "".join(out)

    def __str__(self) -> str:
        return self.text


def parse_macro_string(text: str, *, explanation: bool = False) -> MacroString:
    """Parse ``text``; raise :class:`MacroSyntaxError` naming the problem."""
    letters = EXPLANATION_LETTERS if explanation else DOMAIN_LETTERS
    items: list[str | Macro] = []
    literal: list[str] = []
    tail_start = 0
    ends_with_expand = False
    i, n = 0, len(text)

    def flush() -> None:
        if literal:
            items.append("".join(literal))
            literal.clear()

    while i < n:
        ch = text[i]
        if ch == "%":
            nxt = text[i + 1] if i + 1 < n else ""
            if nxt in ("%", "_", "-"):
                literal.append({"%": "%", "_": " ", "-": "%20"}[nxt])
                i += 2
            elif nxt == "{":
                close = text.find("}", i + 2)
                if close < 0:
                    raise MacroSyntaxError(f"unterminated macro in {text!r}")
                items_body = text[i + 2:close]
                match = _BODY.match(items_body)
                if match is None:
                    raise MacroSyntaxError(f"invalid macro %{{{items_body}}} in {text!r}")
                letter_raw, digits, reverse, delimiters = match.groups()
                letter = letter_raw.lower()
                if letter not in letters:
                    where = "explanation text" if explanation else "a domain-spec"
                    raise MacroSyntaxError(f"macro letter {letter_raw!r} is not allowed in {where} "
                                           f"({text!r})")
                parts = None
                if digits:
                    parts = int(digits)
                    if parts == 0:
                        raise MacroSyntaxError(f"macro %{{{items_body}}} keeps zero parts in {text!r}")
                    parts = min(parts, _MAX_PARTS)
                flush()
                items.append(Macro(letter, letter_raw.isupper(), parts, bool(reverse),
                                   "".join(dict.fromkeys(delimiters))))
                i = close + 1
            else:
                shown = text[i:i + 2]
                raise MacroSyntaxError(f"'%' must be followed by '{{', '%', '_' or '-', "
                                       f"got {shown!r} in {text!r}")
            ends_with_expand = True
            tail_start = i
            continue
        if "\x21" <= ch <= "\x7e" or (explanation and ch == " "):
            literal.append(ch)
            ends_with_expand = False
            i += 1
            continue
        raise MacroSyntaxError(f"invalid character {ch!r} in {text!r}")
    flush()
    return MacroString(text, tuple(items), ends_with_expand, text[tail_start:])
