"""Writing output directories (export, prune, quantize, datasets, TensorRT engines): atomically, only over
edgelvm's own outputs, with the permissions a normal file write would give, and cleaning up after runs that were
killed. This is the one staging-and-swap implementation; every stage writes through it.

- **Atomic**: the output is written into a staging sibling ``.NAME.partial-PID-XXXX`` and renamed into place; a
  previous output is moved aside (``.NAME.old-PID``) and removed only after the swap.
- **Only our own outputs are replaced** (:func:`prepare_output`): ``--force`` replaces a directory edgelvm
  recognises as its output (a bundle's ``edgelvm.json``, or the :data:`OUTPUT_MARKER` every prune, quantize,
  distill and dataset output carries) and never the input or a directory containing it.
- **Stale staging** left by a killed run (its pid is no longer running on this host) is removed by the next run to
  the same output, with a warning naming it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from edgelvm.errors import ConfigError, EdgeLVMError

log = logging.getLogger(__name__)

#: Written into every prune, quantize, distill and dataset output (bundles are recognised by their ``edgelvm.json``).
OUTPUT_MARKER = ".edgelvm-output.json"
#: Written into a staging directory first thing: who is writing it (pid, host), for the stale-staging cleanup.
PARTIAL_OWNER = ".edgelvm-partial.json"
#: Report files of prune / quantize outputs written before :data:`OUTPUT_MARKER` existed.
LEGACY_MARKERS = ("prune_report.json", "quant_report.json")


def current_umask() -> int:
    """This process's umask, without changing it (``/proc`` on Linux; elsewhere set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_edgelvm_output(path: str | Path) -> bool:
    """Whether ``path`` is a directory edgelvm wrote: a bundle (``edgelvm.json`` naming a ``format_version``), or a
    prune / quantize checkpoint (its :data:`OUTPUT_MARKER`, or the report file older versions wrote)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / OUTPUT_MARKER).is_file() or any((path / name).is_file() for name in LEGACY_MARKERS):
        return True
    try:
        data = json.loads((path / "edgelvm.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data


def prepare_output(
    out: str | Path,
    *,
    force: bool,
    inputs: Iterable[str | Path | None] = (),
    option: str = "--out",
    error: type[EdgeLVMError] = ConfigError,
) -> Path:
    """Check that ``out`` may be written; returns it with symlinks resolved (what will be replaced).

    Refuses (``error``, naming the directory and the fix): a path that is not a directory; a non-empty directory
    without ``force``; with ``force``, a directory edgelvm did not write (``is_edgelvm_output``), or one that is, or
    contains, one of ``inputs`` (the checkpoint, calibration data).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise error("output path exists and is not a directory", where=out, fix=f"choose another {option} path")
    target = Path(os.path.realpath(out))
    if not target.is_dir() or not any(target.iterdir()):
        return target
    if not force:
        raise error(
            "output directory is not empty",
            where=out,
            fix="choose an empty or new directory, or pass --force to replace it (only an earlier edgelvm output is "
            "replaced, and only once the new one is complete)",
        )
    for given in inputs:
        if given is None or not Path(given).exists():
            continue  # a hub id, or nothing: not a local directory the output could overlap
        source = Path(os.path.realpath(given))
        if source == target or target in source.parents:
            raise error(
                f"--force would delete the input {given}: the output directory is "
                + ("the input itself" if source == target else "a folder containing it"),
                where=out,
                fix=f"write to a new directory ({option} NEW_DIR)",
            )
    if not is_edgelvm_output(target):
        raise error(
            "--force replaces only a directory edgelvm wrote (a bundle, or a prune / quantize / distill / dataset "
            "output), and this one is not (no edgelvm.json or edgelvm output marker)",
            where=out,
            fix=f"choose another {option} directory, or move or delete this one yourself if you mean to",
        )
    return target


# ---- staging and swap ----------------------------------------------------------------------------------------------
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)(?:-[^/]*)?$")


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True  # unknown: keep what might still be in use
    return True


def clean_stale_partials(target: str | Path) -> list[Path]:
    """Remove staging directories of earlier runs writing ``target`` whose process is gone (killed runs), and
    restore an output that a run killed mid-swap left moved aside. Logs a warning per directory; returns them.

    A staging directory is removed only if it names this output, carries :data:`PARTIAL_OWNER` from this host and
    its pid is not running; a moved-aside output only if it is an edgelvm output and its pid is not running."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    handled: list[Path] = []
    host = socket.gethostname()
    for path in sorted(target.parent.iterdir()):
        match = _STALE.match(path.name)
        if not match or match["name"] != target.name or not path.is_dir() or path.is_symlink():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _pid_running(pid):
            continue
        if match["kind"] == "partial":
            try:
                owner = json.loads((path / PARTIAL_OWNER).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(owner, dict) or owner.get("host") != host or owner.get("pid") != pid:
                continue
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s: an unfinished output left by an edgelvm run (pid %d) that was stopped", path, pid)
            handled.append(path)
        elif is_edgelvm_output(path):
            if target.exists():
                shutil.rmtree(path, ignore_errors=True)
                log.warning("removed %s: a replaced output an edgelvm run (pid %d) did not finish deleting", path, pid)
            else:
                os.replace(path, target)
                log.warning("restored %s from %s: an edgelvm run (pid %d) stopped mid-replace", target, path, pid)
            handled.append(path)
    return handled


def make_staging(target: str | Path) -> Path:
    """A new staging directory next to ``target`` (cleaning stale ones of earlier runs first), owned by this run."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    (staging / PARTIAL_OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return staging


def apply_umask_permissions(root: str | Path) -> None:
    """Give ``root`` and everything in it the modes a plain ``mkdir`` / ``open(..., "w")`` would under this
    process's umask (0755 / 0644 under the usual 022). ``mkdtemp`` creates 0700 and some writers (safetensors,
    ``mkstemp``) 0600, which would make one stage's output unreadable to the group where another's is not."""
    mask = current_umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    root = Path(root)
    os.chmod(root, dir_mode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, dir_mode)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode | (os.stat(path).st_mode & 0o111 & ~mask))


def swap_into_place(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` to ``target``; a previous ``target`` is removed only after the rename."""
    (staging / PARTIAL_OWNER).unlink(missing_ok=True)
    apply_umask_permissions(staging)
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def write_dir_atomically(target: Path, write: Callable[[Path], None], *, stage: str = "output") -> None:
    """``write(tmp)`` into a staging sibling of ``target``, then swap it in (see the module docstring). The output
    gets :data:`OUTPUT_MARKER` (naming ``stage``: ``"prune"``, ``"quantize"``), which lets a later ``--force``
    replace it. Call :func:`prepare_output` first: this replaces whatever ``target`` is."""
    target = Path(target)
    staging = make_staging(target)
    try:
        write(staging)
        (staging / OUTPUT_MARKER).write_text(json.dumps({"written_by": "edgelvm", "stage": stage}) + "\n")
        swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
