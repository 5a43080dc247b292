"""Pure helpers that pull a final answer out of a model response (or a reference solution).

All functions return ``None`` when nothing suitable is found; none of them raise on odd input.
"""

from __future__ import annotations

import re

__all__ = [
    "find_boxed_spans",
    "last_boxed",
    "last_answer_tag",
    "last_number",
    "extract_answer",
    "EXTRACTION_MODES",
]

# \boxed and \fbox both mark a final answer in MATH-style solutions. Either braced
# (``\boxed{...}``) or, as in a few MATH solutions, followed by one bare token (``\boxed 2``).
_BOXED_CMD = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*(\{)?")
_BARE_TOKEN = re.compile(r"[^\s${}]+")


def find_boxed_spans(text: str) -> list[tuple[int, int]]:
    """Return (start, end) index pairs of the *contents* of every complete ``\\boxed{...}``.

    Braces are matched with a depth counter, so nested groups such as
    ``\\boxed{\\frac{1}{2}}`` are returned whole. Escaped braces (``\\{`` and ``\\}``) are
    treated as literal characters. An unterminated ``\\boxed{`` is ignored. ``\\boxed 2``
    (no braces) yields the single bare token after it.
    """
    spans: list[tuple[int, int]] = []
    n = len(text)
    for m in _BOXED_CMD.finditer(text):
        start = m.end()
        if m.group(1) is None:  # bare form: "\boxed 2"
            t = _BARE_TOKEN.match(text, start)
            if t:
                spans.append((t.start(), t.end()))
            continue
        depth = 1
        i = start
        while i < n:
            ch = text[i]
            if ch == "\\" and i + 1 < n and text[i + 1] in "{}":
                i += 2  # escaped brace: literal
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    spans.append((start, i))
                    break
            i += 1
    return spans


def last_boxed(text: str) -> str | None:
    """Contents of the last complete ``\\boxed{...}`` (nested braces allowed), stripped.

    Returns ``None`` when the text has no complete boxed expression or the last one is empty.
    A boxed expression nested in another one is not "last" unless it ends last; we take the
    span that *starts* last among the outermost ones, i.e. the final answer the writer boxed.
    """
    spans = find_boxed_spans(text)
    if not spans:
        return None
    # Keep only outermost spans (a span inside an earlier span is part of that answer).
    outer: list[tuple[int, int]] = []
    for s, e in spans:
        if outer and s < outer[-1][1]:
            continue
        outer.append((s, e))
    s, e = outer[-1]
    content = text[s:e].strip()
    return content or None


_ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)


def last_answer_tag(text: str) -> str | None:
    """Contents of the last ``<answer>...</answer>`` pair, stripped (as reasoning_gym.utils.extract_answer)."""
    matches = list(_ANSWER_TAG.finditer(text))
    if not matches:
        return None
    content = matches[-1].group(1).strip()
    return content or None


# A number: optional sign, digits with optional thousands separators, optional decimals.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")


def last_number(text: str) -> str | None:
    """The last number written in the text, thousands separators removed (``"1,234.5" -> "1234.5"``).

    A leading ``+`` is dropped; a leading ``-`` is kept. This is the lenient extraction mode:
    any number the model writes last counts as its answer.
    """
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    num = matches[-1].group(0).replace(",", "")
    if num.startswith("+"):
        num = num[1:]
    return num


EXTRACTION_MODES = {
    "boxed": last_boxed,
    "answer_tag": last_answer_tag,
    "last_number": last_number,
}


def extract_answer(text: str, mode: str = "boxed") -> str | None:
    """Dispatch to one of the extraction modes: ``boxed``, ``answer_tag`` or ``last_number``."""
    try:
        fn = EXTRACTION_MODES[mode]
    except KeyError:
        raise ValueError(
            f"unknown extraction mode {mode!r}; expected one of {sorted(EXTRACTION_MODES)}"
        ) from None
    return fn(text)
