"""Keys and session tokens never reach what pytest shows or writes, in any form.

:func:`redactor` builds the one replacement; the rest apply it to every place a value
a test handled can surface: report sections and failure text (:func:`redact_report`),
xfail reasons and recorded properties, the warnings summary (:func:`redact_warning`)
and live or file logging (:class:`LogRedactor`). What a test prints with capture turned
off (``-s``) goes straight to the terminal and cannot be redacted.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

REDACTED = "[redacted]"
# A run of this many characters of a secret is redacted wherever it appears: pytest
# shortens reprs in assertion text (``'sk-test-0f21c4...3d5340b83a240e'``), so the
# whole key may never be there to match. 12 characters of a random key are as unique
# as the key; a shared provider prefix being redacted too is the safe side.
PIECE = 12


def redactor(secrets_: Iterable[str]) -> Callable[[str], str]:
    """A function that replaces every secret, in every form it leaks in, by ``[redacted]``
    (see :func:`_redactor`; built once per set of secrets: every report phase asks)."""
    return _redactor(frozenset(s for s in secrets_ if s and len(s) >= 8))


@functools.lru_cache(maxsize=64)
def _redactor(secrets_: frozenset[str]) -> Callable[[str], str]:
    """The forms are the key proxy's (``keyproxy.leak_forms``), matched regardless of case
    (hex and percent-escapes are written in either, or mixed), plus JSON text in which
    any character may be spelled ``\\u00XX`` (or ``\\/``, ``\\"``, ``\\\\``), plus any run
    of :data:`PIECE` characters of a secret or its hex form (cut-off reprs).
    """
    from pytest_agentbox.inside.keyproxy import leak_forms

    plain = sorted(secrets_)
    forms = set(plain)
    forms |= {f.decode() for s in plain if s.isascii() for f in leak_forms(s.encode())}
    values = sorted({f for f in forms if len(f) >= 8}, key=len, reverse=True)
    alternatives = [_json_spelled(s) for s in plain if s.isascii()]
    alternatives += [re.escape(v) for v in values]
    if not alternatives:
        return lambda text: text
    whole = re.compile("|".join(alternatives), re.IGNORECASE)
    grams = {
        w[i : i + PIECE].lower()
        for s in plain
        for w in (s, s.encode().hex() if s.isascii() else s)
        for i in range(len(w) - PIECE + 1)
    }
    # Candidate runs first (made only of characters the secrets hold): ordinary text has
    # few, and only their windows are looked up.
    chars = sorted({c for g in grams for c in g + g.upper()})
    runs = re.compile("[" + "".join(re.escape(c) for c in chars) + "]{" + str(PIECE) + ",}")

    def redact(text: str) -> str:
        text = whole.sub(REDACTED, text)
        spans: list[list[int]] = []
        for run in runs.finditer(text):
            low, base = run.group().lower(), run.start()
            for i in range(len(low) - PIECE + 1):
                if low[i : i + PIECE] in grams:
                    a = base + i
                    if spans and a <= spans[-1][1]:
                        spans[-1][1] = a + PIECE
                    else:
                        spans.append([a, a + PIECE])
        if not spans:
            return text
        out, at = [], 0
        for a, b in spans:
            out += [text[at:a], REDACTED]
            at = b
        return "".join([*out, text[at:]])

    return redact


def _json_spelled(secret: str) -> str:
    """A pattern for ``secret`` with each character as itself or a JSON escape of it."""
    parts = []
    for c in secret:
        spellings = [re.escape(c), rf"\\u{ord(c):04x}"]
        if c in '/"\\':
            spellings.append(re.escape("\\" + c))
        parts.append("(?:" + "|".join(spellings) + ")")
    return "".join(parts)


class Hidden:
    """Every secret of every sandbox this process made: what process-wide output (the
    warnings summary, live logging) is redacted for, since it names no sandbox."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._redact: Callable[[str], str] = lambda text: text
        self._lock = threading.Lock()

    def add(self, values: Iterable[str]) -> None:
        with self._lock:
            new = {v for v in values if v and len(v) >= 8} - self._values
            if new:
                self._values |= new
                self._redact = redactor(self._values)

    def __call__(self, text: str) -> str:
        return self._redact(text)

    def __bool__(self) -> bool:
        return bool(self._values)


HIDDEN = Hidden()


def redact_report(report: Any, hidden: list[str]) -> None:
    """Redact pytest's own parts of ``report`` for ``hidden``: captured output and log
    sections, the failure text (a skip's ``(path, line, reason)`` keeps its shape), the
    xfail reason and string user properties (junit ``<property>``)."""
    if not hidden:
        return
    redact = redactor(hidden)
    report.sections = [(redact(title), redact(text)) for title, text in report.sections]
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: pytest unpacks it
        report.longrepr = (longrepr[0], longrepr[1], redact(str(longrepr[2])))
    elif longrepr is not None:
        text = str(longrepr)
        clean = redact(text)
        if clean != text:  # only then: the original keeps its structure for xdist
            report.longrepr = clean
    if isinstance(getattr(report, "wasxfail", None), str):
        report.wasxfail = redact(report.wasxfail)
    report.user_properties = [
        (name, redact(value) if isinstance(value, str) else value)
        for name, value in report.user_properties
    ]


def redact_warning(message: Any) -> None:
    """Redact a ``warnings.WarningMessage`` in place (before pytest keeps it for the
    warnings summary or an xdist worker sends it on)."""
    if not HIDDEN:
        return
    text = str(message.message)
    clean = HIDDEN(text)
    if clean != text:
        try:
            message.message = message.category(clean)
        except Exception:  # a category whose constructor wants more: a plain one
            message.message = UserWarning(clean)


class LogRedactor(logging.Filter):
    """A handler filter that redacts each record's message (pytest's live and file log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if HIDDEN:
            text = record.getMessage()
            clean = HIDDEN(text)
            if clean != text:
                record.msg, record.args = clean, None
        return True
