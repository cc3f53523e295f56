"""Atomic writes: every cache, index, export and model folder appears whole or not at all.

Why: a run killed mid-write (Ctrl-C, OOM, preemption) must leave either the old file or the new one, never a
half-written one that the next run trusts. Write into a temp name beside the target, then rename: a rename
within one folder is atomic on POSIX and Windows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STALE_AFTER_S = 3600
"""A leftover without a readable writer pid (older naming) is removed once it is this old."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(final: Path) -> list[Path]:
    """Remove what killed writers of ``final`` left beside it (``.NAME.tmp-PID-*``, ``.NAME.old-PID-*``): a
    leftover whose writer process is gone. Called before each write of the same target, so a kill inside the
    write window costs nothing but the next write's few milliseconds. Returns what was removed."""
    removed = []
    for kind in ("tmp", "old"):
        for path in final.parent.glob(f".{final.name}.{kind}-*"):
            pid_text = path.name[len(f".{final.name}.{kind}-") :].split("-", 1)[0]
            if pid_text.isdigit():
                stale = int(pid_text) != os.getpid() and not _alive(int(pid_text))
            else:
                try:
                    stale = time.time() - path.stat().st_mtime > STALE_AFTER_S
                except FileNotFoundError:
                    continue
            if stale:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


@contextmanager
def atomic_folder(final: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it is renamed to ``final``, on error removed.

    ``replace=False`` keeps an existing ``final`` (another process published the same content first).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a published folder is as readable as any other
        if final.exists():
            if not replace:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``final``; on success it is flushed to disk and renamed over ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """UTF-8 text written atomically (JSON configs, priors, model cards)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
