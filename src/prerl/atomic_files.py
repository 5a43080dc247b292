"""Files that a later command reads (summaries, settings, completion markers), written so that a
full disk or a killed process never leaves a 0-byte or truncated one.

:func:`write_text_atomic` writes a temporary file in the target's folder, fsyncs it and renames it
over the target (``os.replace``, atomic on POSIX): readers see the previous file or the new one,
whole. When anything fails (``ENOSPC`` included, which may surface only at ``fsync``), the
temporary file is removed, the previous file is left as it was and the error propagates.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["write_text_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Replace ``path``'s content with ``text`` atomically (see the module docstring); returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    data = memoryview(text.encode(encoding))
    # 0o666 less the umask, as open() would give the file itself (mkstemp would give 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            while data:  # os.write may write less than asked
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
