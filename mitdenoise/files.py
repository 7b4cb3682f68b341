"""Writing files so that a reader, a crash or a second process never sees half of one.

Every file the package writes (images, checkpoints, training state, logs of settings,
benchmark results) goes through :func:`write_atomically`: a temporary file with a unique
name in the target's folder, flushed to disk, then renamed over the target. Readers see
the old file or the new one; an error or a signal removes the temporary file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)

NAME_LIMIT = 240
"""Bytes of the target's name kept in the temporary file's name (``.NAME.XXXXXXXX.tmp`` must fit
the 255-byte limit that NAME itself meets)."""


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(temp)`` fills a temporary file beside ``path``, which then replaces ``path`` whole.

    The temporary file is fsynced before the rename, and gets the permissions a new file
    would (``0o666`` less the umask). Whatever ``write`` raises, the temporary file is gone
    and ``path`` is as it was. ``FileNotFoundError`` if ``path``'s folder does not exist.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{_shortened(path.name, NAME_LIMIT)}.", suffix=".tmp")
    temp = Path(name)
    try:
        os.close(fd)
        write(temp)
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(temp, 0o666 & ~_UMASK)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)`` through :func:`write_atomically`."""
    write_atomically(path, lambda temp: temp.write_text(text))


def _shortened(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` bytes of UTF-8 (on a character boundary)."""
    return name.encode()[:limit].decode(errors="ignore")
