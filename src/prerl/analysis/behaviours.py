"""Reasoning-behaviour analysis of sampled responses (docs/analysis.md, "Reasoning behaviours").

Two layers, both pure functions of the response text:

1. SEAL thought classification (arXiv 2504.07986, as condensed in docs/method.md): a response
   is split into *thoughts* at blank lines; each thought is exactly one of ``reflection``,
   ``transition`` or ``execution``. These keyword lists are the paper's (SEAL's), not ours.
2. Four behaviour counters, ``subgoal_setting``, ``enumeration``, ``verification`` and
   ``backtracking``. The PreRL paper tracks these but publishes no definition, so the
   regular expressions below are THIS PROJECT'S OWN heuristics (see the comments on each list).
   A behaviour's count is the number of thoughts in which at least one of its patterns matches;
   the four are not exclusive of one another nor of the SEAL kinds.

Matching conventions (ours where SEAL's code leaves room, documented in docs/analysis.md):

- Line endings ``\\r\\n`` and ``\\r`` are normalised to ``\\n``; a "blank line" is a line holding
  only whitespace, so ``"a\\n\\n\\n b"`` and ``"a\\n  \\nb"`` both split into two thoughts.
- Each thought is stripped of surrounding whitespace; empty thoughts are dropped.
- Typographic apostrophes (U+2019, U+2018) are read as ``'`` so ``it’s correct`` matches.
- Keyword containment is case-insensitive (SEAL's code lower-cases both sides).
- The prefixes "Wait" and "Alternatively" are case-insensitive and must be the thought's first
  word: "wait, ..." and "WAIT" count, "Waiting ..." does not (SEAL's code uses a plain
  ``startswith`` and would count it), and "Wait" anywhere after the first word is not a start.
- Reflection is tested before transition; everything else is execution.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------------------------
# SEAL (the paper's definition, quoted in docs/method.md)
# ---------------------------------------------------------------------------------------------

#: A reflection thought starts with one of these words ...
REFLECTION_PREFIXES: tuple[str, ...] = ("wait",)
#: ... or contains one of these (case-insensitive substrings).
REFLECTION_KEYWORDS: tuple[str, ...] = (
    "verify",
    "make sure",
    "hold on",
    "think again",
    "'s correct",
    "'s incorrect",
    "let me check",
    "seems right",
)
#: A transition thought starts with one of these words ...
TRANSITION_PREFIXES: tuple[str, ...] = ("alternatively",)
#: ... or contains one of these. (SEAL's released code spells the first "think differenly", so
#: there it never matches; docs/method.md and this list use the intended spelling.)
TRANSITION_KEYWORDS: tuple[str, ...] = (
    "think differently",
    "another way",
    "another approach",
    "another method",
    "another solution",
    "another strategy",
    "another technique",
)

THOUGHT_KINDS: tuple[str, ...] = ("reflection", "transition", "execution")

# ---------------------------------------------------------------------------------------------
# Behaviour counters: THIS PROJECT'S OWN heuristics (the paper names the behaviours, gives no
# lists). Gandhi et al. 2025, "Cognitive Behaviors that Enable Self-Improving Reasoners"
# (arXiv 2503.01307), name verification, backtracking and subgoal setting (and backward
# chaining) and classify them with an LLM judge; enumeration is not one of theirs. The phrases
# below are our reading of those definitions, tuned to be precise rather than exhaustive.
# All patterns are compiled with re.IGNORECASE | re.MULTILINE.
# ---------------------------------------------------------------------------------------------

#: Subgoal setting: splitting the problem into intermediate goals ("First, we need to find x";
#: "Step 2:"; "let's break this down"). Plain numbered lists are NOT counted (instruct models
#: number everything), only explicit step headers and goal-stating phrases.
SUBGOAL_PATTERNS: tuple[str, ...] = (
    r"\bsub-?(goal|problem|task)s?\b",
    r"\bbreak (it|this|this problem|the problem|the question|[a-z]+) down\b",
    r"\bbreak down the (problem|question|task)\b",
    r"^\W*(#+\s*)?step\s+\d+\b",  # a line that starts with "Step 3" / "## Step 3" / "**Step 3"
    r"\b(first|next|then|finally|now),?\s+(we|i|let's|let us)\s+(need|have|want|must|should)\s+to\b",
    r"\b(first|next|then|finally|now),?\s+(let's|let us)\s+(find|compute|calculate|determine|solve|simplify|figure out)\b",
    r"\bto (solve|answer|find|determine) (this|the) (problem|question|value|answer)\b.*\b(we|i) (need|have|must|should|will)\b",
    r"\b(our|the|my) (goal|aim|objective|task) is to\b",
)

#: Enumeration: systematically going through cases or candidate values ("Case 1", "let's list
#: the possible values", "try each one", "one by one").
ENUMERATION_PATTERNS: tuple[str, ...] = (
    r"\bcase\s+(\d+|[ivx]+|[a-d])\s*[:.)]",
    r"\benumerat(e|es|ed|ing|ion)\b",
    r"\b(let's|let us|we can|we will|i will|i'll)\s+(list|try|check|consider|go through)\s+(all|each|every)\b",
    r"\blist(ing)? (all|out|the possible)\b",
    r"\b(all|the) possible (values|cases|options|outcomes|combinations|pairs|choices|solutions)\b",
    r"\bpossible (values|cases|options|outcomes|combinations|pairs|choices) (are|of|for|include)\b",
    r"\bone by one\b",
    r"\bfor each (possible|case|value|choice|option)\b",
)

#: Verification: checking an intermediate or final result ("let me check", "plug it back in",
#: "double-check", "this confirms"). Overlaps SEAL's reflection keywords on purpose: verification
#: is a behaviour, reflection a thought kind.
VERIFICATION_PATTERNS: tuple[str, ...] = (
    r"\bverif(y|ies|ied|ying|ication)\b",
    r"\b(double|re)-?check(s|ed|ing)?\b",
    r"\b(let me|let's|let us|we can|i can|i'll|we'll|to)\s+check\b",
    r"\bcheck(ing)? (if|whether|that|our|my|the (answer|result|solution))\b",
    r"\bsanity check\b",
    r"\bplug(ging)? (it|this|that|these|them|\w+) (back )?in(to)?\b",
    r"\bsubstitut(e|ing) (it |this |them |these |the \w+ )?back\b",
    r"\b(this|which|that) (confirms|is consistent|matches|checks out)\b",
    r"\bconfirm(s|ed|ing)? (that|the|our|my)\b",
    r"\bmake sure\b",
)

#: Backtracking: noticing an error or a dead end and abandoning the current path ("that's wrong",
#: "I made a mistake", "let me start over", "go back", "this doesn't work").
BACKTRACKING_PATTERNS: tuple[str, ...] = (
    r"\b(that|this|it)('s| is| was)\s+(not (right|correct)|wrong|incorrect)\b",
    r"\b(i|we) made (a|an) (mistake|error)\b",
    r"\b(my|a|an|the) (mistake|error) (was|is|here)\b",
    r"\b(start|starting) over\b",
    r"\b(let me|let's|let us|i'll|we'll|i need to|we need to)\s+(re-?do|re-?think|reconsider|re-?evaluate|re-?examine|recalculate|re-?compute|try again|go back)\b",
    r"\bgo(ing)? back to\b",
    r"\b(does|did|do)(n't| not) (work|make sense|seem right)\b",
    r"\bscratch that\b",
    r"\bon second thought\b",
    r"\boops\b",
    r"\bthat can(no|')t be (right|correct)\b",
)

BEHAVIOUR_PATTERNS: dict[str, tuple[str, ...]] = {
    "subgoal_setting": SUBGOAL_PATTERNS,
    "enumeration": ENUMERATION_PATTERNS,
    "verification": VERIFICATION_PATTERNS,
    "backtracking": BACKTRACKING_PATTERNS,
}
BEHAVIOUR_KEYS: tuple[str, ...] = tuple(BEHAVIOUR_PATTERNS)
#: The keys of ``behaviour_counts``, in order.
COUNT_KEYS: tuple[str, ...] = ("thoughts",) + THOUGHT_KINDS + BEHAVIOUR_KEYS

_COMPILED: dict[str, tuple[re.Pattern, ...]] = {
    key: tuple(re.compile(p, re.IGNORECASE | re.MULTILINE) for p in patterns)
    for key, patterns in BEHAVIOUR_PATTERNS.items()
}
_BLANK_LINE = re.compile(r"\n[^\S\n]*\n")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'"})


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").translate(_APOSTROPHES)


def split_thoughts(text: str) -> list[str]:
    """Split a response into thoughts at blank lines (lines holding only whitespace).

    Line endings are normalised first, each thought is stripped, empty ones are dropped; any
    number of consecutive blank lines is one separator.
    """
    if not text:
        return []
    parts = _BLANK_LINE.split(_normalise(text))
    return [p.strip() for p in parts if p.strip()]


def _starts_with_word(lowered: str, words: tuple[str, ...]) -> bool:
    return any(re.match(re.escape(w) + r"(?![a-z])", lowered) for w in words)


def classify_thought(thought: str) -> str:
    """SEAL's kind of one thought: ``"reflection"``, ``"transition"`` or ``"execution"``.

    Reflection: the first word is "Wait" (any case) or the thought contains one of
    ``REFLECTION_KEYWORDS``; else transition: the first word is "Alternatively" or it contains one
    of ``TRANSITION_KEYWORDS``; else execution. Containment is case-insensitive.
    """
    lowered = _normalise(thought).strip().lower()
    if _starts_with_word(lowered, REFLECTION_PREFIXES) or any(k in lowered for k in REFLECTION_KEYWORDS):
        return "reflection"
    if _starts_with_word(lowered, TRANSITION_PREFIXES) or any(k in lowered for k in TRANSITION_KEYWORDS):
        return "transition"
    return "execution"


def thought_behaviours(thought: str) -> set[str]:
    """The project's behaviours (``BEHAVIOUR_KEYS``) one thought shows (any pattern matches)."""
    normalised = _normalise(thought)
    return {key for key, patterns in _COMPILED.items() if any(p.search(normalised) for p in patterns)}


def behaviour_counts(text: str) -> dict[str, int]:
    """Per-response counts, keys ``COUNT_KEYS``.

    ``thoughts``: number of thoughts; ``reflection`` / ``transition`` / ``execution``: thoughts
    of each SEAL kind (they sum to ``thoughts``); ``subgoal_setting`` / ``enumeration`` /
    ``verification`` / ``backtracking``: thoughts showing that behaviour (each <= ``thoughts``).
    An empty response has all zeros.
    """
    counts = dict.fromkeys(COUNT_KEYS, 0)
    for thought in split_thoughts(text):
        counts["thoughts"] += 1
        counts[classify_thought(thought)] += 1
        for key in thought_behaviours(thought):
            counts[key] += 1
    return counts


def total_counts(texts: list[str]) -> dict[str, int]:
    """``behaviour_counts`` summed over responses (keys ``COUNT_KEYS``): additive, so shards of
    a batch (e.g. data-parallel ranks) can be summed before ``summary_from_totals``."""
    totals = dict.fromkeys(COUNT_KEYS, 0)
    for text in texts:
        for key, value in behaviour_counts(text).items():
            totals[key] += value
    return totals


def summary_from_totals(totals: dict[str, float], responses: int) -> dict[str, float]:
    """``summarize_behaviours`` from summed counts of ``responses`` responses."""
    n = int(responses)
    summary: dict[str, float] = {"responses": float(n)}
    for key in COUNT_KEYS:
        summary[key] = float(totals[key]) / n if n else 0.0
    thoughts = float(totals["thoughts"])
    for key in THOUGHT_KINDS + BEHAVIOUR_KEYS:
        summary[f"{key}_frac"] = float(totals[key]) / thoughts if thoughts else 0.0
    return summary


def summarize_behaviours(texts: list[str]) -> dict[str, float]:
    """Aggregate ``behaviour_counts`` over responses.

    Returns, for n = len(texts):
        ``responses``: n;
        ``<key>`` for every key of ``COUNT_KEYS``: the mean count per response (sum / n);
        ``<kind>_frac`` for the three SEAL kinds and the four behaviours: the pooled fraction
        of thoughts, sum over responses of the count / sum of ``thoughts`` (responses with more
        thoughts weigh more; the SEAL fractions sum to 1 when there is any thought).
    With no responses, or no thoughts, the means / fractions are 0.0 (never NaN).
    """
    return summary_from_totals(total_counts(texts), len(texts))
