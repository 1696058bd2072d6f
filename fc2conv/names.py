"""Names from untrusted files and patterns from users: shown escaped, matched in linear time.

A tensor or file name comes from the checkpoint, so it may hold anything: a newline followed by a
forged ``verdict: PASS``, terminal escape codes, a lone surrogate that no terminal encoding accepts.
:func:`printable` shows such characters as escapes wherever text reaches a terminal. Layer patterns
(``--layers``) are matched by RE2, whose time is linear in the name: a pattern such as
``^(\\w+)*fc$`` cannot make a hostile name take hours, as it can with Python's backtracking ``re``.
"""

from __future__ import annotations

from typing import Any

from fc2conv.errors import PlanError

__all__ = ["NamePattern", "compile_pattern", "printable"]


def printable(text: str) -> str:
    """``text`` with every character that is not printable shown as an escape, so it stays one line.

    Control characters (``\\n``, ``\\x1b``, ...), format characters (bidirectional overrides), line and
    paragraph separators and lone surrogates become ``\\n``, ``\\x1b``, ``\\u202e``, ``\\ud800``, as
    Python's ``repr`` writes them; every other character (letters of any script) is kept.

    Example:
        >>> printable("fc\\nverdict: PASS")
        'fc\\\\nverdict: PASS'
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


class NamePattern:
    """A compiled layer pattern: :meth:`search` as ``re.Pattern.search``, in time linear in the name."""

    def __init__(self, pattern: str, regex: Any) -> None:
        self.pattern = pattern
        self._regex = regex

    def search(self, name: str) -> object | None:
        """The match anywhere in ``name``, or None."""
        try:
            return self._regex.search(name)
        except UnicodeEncodeError:  # a lone surrogate (RE2 reads UTF-8): match its escaped spelling
            return self._regex.search(printable(name))


def compile_pattern(pattern: str) -> NamePattern:
    """Compile a user's layer pattern with RE2 (Python's syntax, without lookaround or backreferences).

    Raises:
        PlanError: not a valid pattern, or one that needs backtracking (lookaround, backreferences).
    """
    import re2  # google-re2: imported here, so that commands without a pattern do not load it

    options = re2.Options()
    options.log_errors = False  # RE2 would log the error on stderr too; the message below is the one line
    try:
        return NamePattern(pattern, re2.compile(pattern, options))
    except re2.error as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise PlanError(
            f"layer pattern {pattern!r} is not a valid regular expression for RE2, the linear-time engine fc2conv "
            f"matches names with ({detail}; lookaround and backreferences are not available)"
        ) from exc
    except UnicodeEncodeError as exc:
        raise PlanError(f"layer pattern {pattern!r} is not valid text (it holds {exc.object[exc.start]!r})") from exc
