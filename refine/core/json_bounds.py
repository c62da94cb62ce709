"""What parsing a JSON text costs, bounded before ``json.loads`` pays it.

``json.loads`` of n bytes can build far more than n bytes of Python objects: ``[{},{},...]`` is a 64-byte
dict (plus an 8-byte list slot) per 3 bytes, so a 60 MB line costs 1.5 GB. The bytes are bounded elsewhere
(``max_doc_bytes``, an answer's size cap); the number of values is bounded here. A JSON text holds at most
``1 + commas + colons + containers`` values (keys included), counting those outside strings; with that many
values bounded, what a parse builds is bounded by ~72 bytes per value plus its strings' characters.

``too_many_values(data, limit)`` decides it without parsing: one count of the four bytes anywhere (C speed,
an upper bound: characters inside strings count too) settles almost every text; only when that count is over
the limit are the strings skipped (a regex with possessive quantifiers: no backtracking, no per-character
state) to count what lies outside them, stopping as soon as the limit is passed.
"""

from __future__ import annotations

import re

# a JSON string: possessive, so a 60 MB one is one match with no backtracking state kept
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_MARKS = (b",", b":", b"{", b"[")


def _marks(data: bytes, start: int = 0, end: int | None = None) -> int:
    end = len(data) if end is None else end
    return sum(data.count(m, start, end) for m in _MARKS)


def too_many_values(data: bytes, limit: int) -> bool:
    """More than ``limit`` JSON values (objects, arrays, strings, numbers, literals and keys) in ``data``.

    Exact for well-formed JSON up to the ``+1`` of the top value; for malformed text it is whatever the count
    of separators outside strings says (the parser will refuse the text anyway)."""
    if len(data) // 2 <= limit or _marks(data) + 1 <= limit:
        return False
    count, at = 1, 0
    for m in _STRING.finditer(data):
        count += _marks(data, at, m.start())            # (each string but a container's first follows a mark:
        if count > limit:                               # about 2 * limit strings at most before this is True)
            return True
        at = m.end()
    return count + _marks(data, at) > limit
