"""Analyses of trained policies and their rollouts (docs/analysis.md)."""

from prerl.analysis.behaviours import (
    BEHAVIOUR_KEYS,
    COUNT_KEYS,
    THOUGHT_KINDS,
    behaviour_counts,
    classify_thought,
    split_thoughts,
    summarize_behaviours,
)

__all__ = [
    "BEHAVIOUR_KEYS",
    "COUNT_KEYS",
    "THOUGHT_KINDS",
    "behaviour_counts",
    "classify_thought",
    "split_thoughts",
    "summarize_behaviours",
]
