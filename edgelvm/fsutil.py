"""Writing directories so that a crash never leaves a half-written one in place of a good one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary sibling of ``target``, then swap it in. The previous ``target`` is moved
    aside first and removed only after the swap, so a failure at any point leaves it intact; the sibling lives on
    the same filesystem, so the renames are atomic."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
