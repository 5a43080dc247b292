"""The evaluator behind ``src/eval.py`` (``prerl.evaluate.evaluate``): eval sets, seeded chunked
sampling inside ``Trainer.predict``, per-problem records with resume, summaries and plots."""

from .records import CorruptRecordsError, RecordWriter, complete_chunks, read_records
from .report import format_table, plot_pass_at_k, set_summary
from .sets import EvalSet, PromptTooLongError, resolve_eval_sets

__all__ = [
    "CorruptRecordsError",
    "EvalSet",
    "PromptTooLongError",
    "RecordWriter",
    "complete_chunks",
    "format_table",
    "plot_pass_at_k",
    "read_records",
    "resolve_eval_sets",
    "set_summary",
]
