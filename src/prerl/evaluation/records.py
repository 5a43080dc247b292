"""The per-problem JSONL of an evaluation, and reading it back to resume.

One file per eval set, ``<run>/problems/<set>.jsonl``, one JSON object per problem::

    {"set", "index", "chunk", "id", "question", "answer", "prompt", "prompt_tokens",
     "responses": [str], "extracted": [str | null], "rewards": [float], "correct": [bool],
     "num_correct": int, "lengths": [int], "truncated": [bool], "behaviours": [{str: int}],
     "reward_timeouts": int, "reward_errors": int}

Problems are sampled in fixed chunks (``batch_size`` problems, by index); the records of a chunk
are appended together and fsynced. On resume only complete chunks are kept: a chunk cut short, or
a truncated last line (the process was killed mid-write, or the disk was full), is dropped and
sampled again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from prerl.atomic_files import write_text_atomic

log = logging.getLogger(__name__)

__all__ = ["RecordWriter", "read_records", "complete_chunks", "CorruptRecordsError"]


class CorruptRecordsError(ValueError):
    """A per-problem JSONL cannot be read back (not the truncated last line of an interrupted write)."""


def read_records(path: Path) -> tuple[list[dict], bool]:
    """The records of ``path`` (missing file: none) and whether the file was cut mid-line (then it
    must be rewritten before anything is appended).

    A line that is not JSON is an error naming the file and line, unless it is the last line and
    the file does not end with a newline (a write cut short), which is dropped with a warning. A
    last line cut just before its newline is a whole record: it is kept.
    """
    path = Path(path)
    if not path.exists():
        return [], False
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            if lineno == len(lines) and not raw.endswith(b"\n"):
                log.warning("%s: line %d is cut short (an interrupted write): dropped, its chunk is sampled again",
                            path, lineno)
                continue
            raise CorruptRecordsError(
                f"{path}: line {lineno}: malformed record ({e}); this file is an evaluation's own output: delete the "
                "line (its chunk is then sampled again) or the file, then resume"
            ) from None
        records.append(rec)
    # Appending to a file without its final newline would glue the next record onto its last line.
    return records, bool(raw) and not raw.endswith(b"\n")


def complete_chunks(records: Iterable[dict], expected: dict[int, list[str]], path: Path) -> dict[int, list[dict]]:
    """The records of every chunk that is complete: chunk -> records in index order.

    ``expected`` maps each chunk to the problem ids it holds now; a record whose id is not the
    one expected at its chunk means the data changed since the records were written (an error).
    """
    by_chunk: dict[int, dict[str, dict]] = {}
    for rec in records:
        chunk, pid = rec.get("chunk"), rec.get("id")
        if chunk not in expected or pid not in expected[chunk]:
            raise CorruptRecordsError(
                f"{path}: problem {pid!r} (chunk {chunk}) is not one this evaluation samples in that chunk: the data, "
                "its order, the limit or batch_size changed since it was written; evaluate into a new folder"
            )
        by_chunk.setdefault(chunk, {})[pid] = rec
    done = {}
    for chunk, recs in by_chunk.items():
        if set(recs) == set(expected[chunk]):
            done[chunk] = [recs[pid] for pid in expected[chunk]]
    return done


class RecordWriter:
    """Appends the records of one set's chunks to its JSONL, fsynced per chunk."""

    def __init__(self, path: Path, keep: list[dict] | None = None, rewrite: bool = False) -> None:
        """``keep``: records already there to keep (complete chunks); ``rewrite``: the file holds
        more than ``keep`` (partial chunks, a cut line) and is rewritten with ``keep`` first (atomically)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if rewrite:
            write_text_atomic(self.path, _lines(keep or []))
        self._fd: int | None = None

    def write(self, records: list[dict]) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        # Unbuffered: a write that fails (a full disk) leaves at most a cut last line, which a resume
        # drops, and no buffered rest that close() would append later.
        data = memoryview(_lines(records).encode("utf-8"))
        while data:
            data = data[os.write(self._fd, data):]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _lines(records: list[dict]) -> str:
    return "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
