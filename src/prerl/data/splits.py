"""Held-out validation that never overlaps training.

All functions are pure (no I/O, no global state). Overlap is judged on the *normalised*
question text (Unicode NFKC, lower case, whitespace collapsed), so the same question from
two sources, or with different spacing, counts as one.
"""

from __future__ import annotations

import logging
import random
import re
import unicodedata
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = [
    "normalize_question",
    "dedupe",
    "find_repeats",
    "Repeats",
    "carve_val",
    "make_split",
    "make_split_with_stats",
    "assert_disjoint",
    "SplitStats",
    "OverlapError",
]

_WS = re.compile(r"\s+")


def normalize_question(text: str) -> str:
    """Canonical form used for de-duplication: NFKC, casefold, single spaces, stripped."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


class OverlapError(ValueError):
    """Raised when training and validation share a question (or a problem id)."""


@dataclass
class SplitStats:
    """What make_split did; all counts are numbers of problems."""

    train_loaded: int = 0
    val_loaded: int = 0
    train_duplicates: int = 0  # dropped inside train (same normalised question)
    val_duplicates: int = 0  # dropped inside val
    train_overlap_dropped: int = 0  # dropped from train because val has the question
    carved: int = 0  # moved from train to val (val_size / val_fraction)
    train: int = 0
    val: int = 0


def dedupe(problems: list[dict]) -> tuple[list[dict], int]:
    """Keep the first problem of each normalised question (order kept). Returns (kept, n_dropped)."""
    seen: set[str] = set()
    kept: list[dict] = []
    for p in problems:
        key = normalize_question(p["question"])
        if key in seen:
            continue
        seen.add(key)
        kept.append(p)
    return kept, len(problems) - len(kept)


@dataclass
class Repeats:
    """How often each problem occurs in a list: ``rows`` problems hold ``distinct`` questions (the
    key of :func:`dedupe`), one of them ``most`` times, one ``least`` times. ``conflicts``: (id kept,
    id of a later problem with the same question but another gold answer)."""

    rows: int
    distinct: int
    most: int
    least: int
    conflicts: list[tuple[str, str]]

    def describe(self) -> str:
        lead = f"{self.rows} records hold {self.distinct} distinct problems"
        if self.most == 1:
            return lead
        each = f"{self.most}" if self.most == self.least else f"{self.least} to {self.most}"
        return f"{lead}, each in {each} records"


def find_repeats(problems: list[dict]) -> Repeats:
    """Count the repeats of each question (verl's ``*_20times`` files hold every problem 20 times,
    the way verl draws 20 samples per problem)."""
    first: dict[str, dict] = {}
    counts: dict[str, int] = {}
    conflicts: list[tuple[str, str]] = []
    for p in problems:
        key = normalize_question(p["question"])
        if key in first:
            if p["answer"] != first[key]["answer"]:
                conflicts.append((first[key]["id"], p["id"]))
        else:
            first[key] = p
        counts[key] = counts.get(key, 0) + 1
    values = list(counts.values()) or [0]
    return Repeats(len(problems), len(counts), max(values), min(values), conflicts)


def carve_val(problems: list[dict], val_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Move ``val_size`` problems chosen by a seeded permutation into val. Returns (train, val).

    Both outputs keep the input order. Call on de-duplicated problems.
    """
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    if val_size >= len(problems):
        raise ValueError(
            f"val_size={val_size} leaves no training data: the source has only {len(problems)} "
            "distinct problems"
        )
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:val_size])
    train = [p for i, p in enumerate(problems) if i not in val_idx]
    val = [p for i, p in enumerate(problems) if i in val_idx]
    return train, val


def assert_disjoint(train: list[dict], val: list[dict]) -> None:
    """Raise OverlapError if any normalised question or any id appears in both splits."""
    val_q = {normalize_question(p["question"]): p["id"] for p in val}
    clashes = [(p["id"], val_q[k]) for p in train if (k := normalize_question(p["question"])) in val_q]
    if clashes:
        shown = ", ".join(f"{a} ~ {b}" for a, b in clashes[:5])
        raise OverlapError(f"{len(clashes)} training problems also appear in validation: {shown}")
    val_ids = {p["id"] for p in val}
    same_ids = [p["id"] for p in train if p["id"] in val_ids]
    if same_ids:
        raise OverlapError(f"{len(same_ids)} problem ids are in both splits: {same_ids[:5]}")


def make_split(
    train: list[dict],
    val: list[dict] | None = None,
    *,
    val_size: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """Return (train, val) with no shared question; see :func:`make_split_with_stats`."""
    train, val, _ = make_split_with_stats(train, val, val_size=val_size, val_fraction=val_fraction, seed=seed)
    return train, val


def make_split_with_stats(
    train: list[dict],
    val: list[dict] | None = None,
    *,
    val_size: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
) -> tuple[list[dict], list[dict], SplitStats]:
    """Return (train, val, stats) with no shared question.

    - ``val`` given: both are de-duplicated, then every training problem whose normalised
      question is in val is dropped from train (val is never touched, so a benchmark stays whole).
    - ``val`` None and ``val_size`` (or ``val_fraction``) given: val is carved out of the
      de-duplicated train by a permutation seeded with ``seed``.
    - neither: val is empty.
    The result is checked with :func:`assert_disjoint`.
    """
    if val is not None and (val_size is not None or val_fraction is not None):
        raise ValueError("give either a separate val source or val_size/val_fraction, not both")
    if val_size is not None and val_fraction is not None:
        raise ValueError("give val_size or val_fraction, not both")
    stats = SplitStats(train_loaded=len(train), val_loaded=len(val) if val is not None else 0)
    train, stats.train_duplicates = dedupe(train)
    if val is not None:
        val, stats.val_duplicates = dedupe(val)
        val_keys = {normalize_question(p["question"]) for p in val}
        kept = [p for p in train if normalize_question(p["question"]) not in val_keys]
        stats.train_overlap_dropped = len(train) - len(kept)
        train = kept
    elif val_size is not None or val_fraction is not None:
        if val_fraction is not None:
            if not 0.0 < val_fraction < 1.0:
                raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
            val_size = max(1, int(round(val_fraction * len(train))))
        train, val = carve_val(train, int(val_size), seed)
        stats.carved = len(val)
    else:
        val = []
    if not train:
        raise ValueError(
            "no training problems left after de-duplication and removing validation overlap "
            f"({stats.train_loaded} loaded, {stats.train_duplicates} duplicates, "
            f"{stats.train_overlap_dropped} in validation)"
        )
    assert_disjoint(train, val)
    stats.train, stats.val = len(train), len(val)
    return train, val, stats
