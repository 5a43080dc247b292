"""Problems, held-out splits and prompt batches.

- sources:    ReasoningGymSource, FileSource, PackagedSource, ConcatSource  (``load() -> list[dict]``)
- splits:     make_split / assert_disjoint (train and validation never share a question)
- prompts:    chat-template rendering and the question-free marginal context
- collate:    left-padded prompt batches (pure)
- datamodule: PromptDataModule (LightningDataModule)
"""

from .collate import collate_prompts, left_pad
from .datamodule import PromptDataModule, PromptDataset, PromptTooLongError
from .prompts import encode_prompt, render_prompt, resolve_context_ids
from .sources import (
    PACKAGED_DATASETS,
    ConcatSource,
    FileSource,
    PackagedSource,
    ReasoningGymSource,
    Source,
    make_problem,
)
from .splits import OverlapError, assert_disjoint, dedupe, make_split, make_split_with_stats, normalize_question

__all__ = [
    "PACKAGED_DATASETS",
    "ConcatSource",
    "FileSource",
    "OverlapError",
    "PackagedSource",
    "PromptDataModule",
    "PromptDataset",
    "PromptTooLongError",
    "ReasoningGymSource",
    "Source",
    "assert_disjoint",
    "collate_prompts",
    "dedupe",
    "encode_prompt",
    "left_pad",
    "make_problem",
    "make_split",
    "make_split_with_stats",
    "normalize_question",
    "render_prompt",
    "resolve_context_ids",
]
