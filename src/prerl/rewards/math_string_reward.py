"""The authors' math reward: the last ``\\boxed{}``, Hendrycks MATH string normalisation, string equality.

The PreRL authors (arXiv 2604.14142) train and validate with verl's MATH scorer. Its behaviour,
reimplemented here from that description and the public Hendrycks MATH normalisation rules
(``strip_string`` of the MATH benchmark's ``is_equiv``), not from their code:

1. Extraction. The LAST occurrence of ``\\boxed`` in the response (``\\fbox`` only when there is
   no ``\\boxed`` at all) starts the box; it ends at the first ``}`` that closes every ``{``
   opened since (escaped braces count as braces). No such ``}``: no answer, even when an earlier
   box was complete. The box is unwrapped only when written ``\\boxed{...}`` or ``\\boxed ...``
   (a space, then the content as written up to the box's end: ``\\boxed {5}`` gives ``{5}``);
   ``\\fbox{...}`` and other spellings give no answer.
2. Normalisation of the answer and of the gold, the same rules in this order (:func:`normalise`).
3. Reward 1.0 iff the two normalised strings are equal, else 0.0. When a rule cannot be applied
   (the MATH code raises there: two ``\\text{ `` units, ``\\sqrt`` or ``\\frac`` with nothing
   after it, one ``/`` between parts that are not integers) the RAW strings are compared instead.

There is no symbolic comparison: ``16.0`` is not ``16``, ``\\sqrt{2}/2`` is not
``\\frac{\\sqrt{2}}{2}``. docs/rewards.md lists where this and :class:`MathVerifyReward` differ.
"""

from __future__ import annotations

import torch

from .types import RewardResult, check_lengths

__all__ = ["MathStringReward", "authors_last_box", "normalise", "same_answer"]


class _NoNormalForm(ValueError):
    """A MATH normalisation rule does not apply to this string (the answers are compared raw)."""


def authors_last_box(text: str) -> str | None:
    """Content of the last box as the authors' scorer reads it (module docstring, point 1)."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth, end = 0, None
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                end = i
                break
    if end is None:
        return None
    box = text[start:end + 1]
    # The spaced form is tested anywhere in the box but accepted only at its start (as the scorer does).
    if "\\boxed " in box:
        return box[len("\\boxed "):] if box.startswith("\\boxed ") else None
    if box.startswith("\\boxed{"):  # ends with "}" by construction
        return box[len("\\boxed{"):-1]
    return None


def _units_removed(s: str) -> str:
    # MATH writes units as "\text{ unit}" (with the space) after the value: keep what precedes it.
    parts = s.split("\\text{ ")
    if len(parts) > 2:
        raise _NoNormalForm("more than one \\text{ unit")
    return parts[0]


def _braced_sqrt(s: str) -> str:
    # \sqrt3 -> \sqrt{3}: a one-character argument gets braces (applied before spaces are removed).
    head, *rest = s.split("\\sqrt")
    out = [head]
    for part in rest:
        if not part:
            raise _NoNormalForm("\\sqrt without an argument")
        out.append("\\sqrt" + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:]))
    return "".join(out)


def _braced_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}: one-character arguments get braces.
    head, *rest = s.split("\\frac")
    out = [head]
    for part in rest:
        if not part:
            raise _NoNormalForm("\\frac without arguments")
        if part[0] == "{":
            out.append("\\frac" + part)
        elif len(part) < 2:
            return s  # the MATH rule gives up on the whole string, unchanged
        elif part[1] == "{":
            out.append("\\frac{" + part[0] + "}" + part[1:])
        else:
            out.append("\\frac{" + part[0] + "}{" + part[1] + "}" + part[2:])
    return "".join(out)


def _integer_slash(s: str) -> str:
    # "3/4" -> "\frac{3}{4}" when both sides are integers written plainly; any other single "/" is
    # a rule that cannot apply (int() fails), so the raw strings are compared.
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        raise _NoNormalForm("a/b with a non-integer side") from None
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def normalise(s: str) -> str:
    """The Hendrycks MATH ``strip_string`` rules, in their order. Raises ``_NoNormalForm`` where
    the rules cannot be applied (see :func:`same_answer`)."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    s = _units_removed(s)
    # Only the escaped percent sign goes (verl's form of the rule): "50%" stays "50%".
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 5", "k=5" -> "5"
        s = sides[1]
    s = _braced_sqrt(s).replace(" ", "")
    s = _braced_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _integer_slash(s)


def same_answer(answer: str, gold: str) -> bool:
    """Equal after :func:`normalise` of both; the raw strings when either cannot be normalised."""
    try:
        return normalise(answer) == normalise(gold)
    except _NoNormalForm:
        return answer == gold


class MathStringReward:
    """Reward 1.0 iff the last box of the response equals the gold after MATH normalisation.

    Args:
        gold_field: key of the problem dict holding the gold answer string.
    """

    def __init__(self, gold_field: str = "answer") -> None:
        self.gold_field = gold_field

    def __call__(self, responses: list[str], problems: list[dict]) -> RewardResult:
        check_lengths(responses, problems)
        rewards: list[float] = []
        extracted: list[str | None] = []
        for response, problem in zip(responses, problems):
            if self.gold_field not in problem:
                raise KeyError(f"problem {problem.get('id', '?')!r} has no gold field {self.gold_field!r}")
            gold = problem[self.gold_field]
            answer = authors_last_box(response)
            extracted.append(answer)
            ok = answer is not None and gold is not None and same_answer(answer, str(gold))
            rewards.append(1.0 if ok else 0.0)
        return RewardResult(torch.tensor(rewards, dtype=torch.float32), 0, extracted)

    def __repr__(self) -> str:
        return f"MathStringReward(gold_field={self.gold_field!r})"
