"""Issue 18 (4): ``--force`` replaces only edgelvm's own outputs and never the input; killed runs' staging is
cleaned by the next run to the same output; outputs get umask-respecting permissions (export, prune, quantize)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgelvm import fsutil
from edgelvm.errors import ConfigError, ExportError


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_force_never_deletes_its_input(tiny_checkpoints, tmp_path):
    from edgelvm.export import ExportConfig, export

    checkpoint = tmp_path / "models" / "ckpt"
    shutil.copytree(tiny_checkpoints["llama-clip"], checkpoint)
    before = _snapshot(checkpoint)
    os.symlink(checkpoint, tmp_path / "link")
    for out in (checkpoint, checkpoint.parent, tmp_path / "link", tmp_path / "models" / ".." / "models"):
        with pytest.raises(ExportError, match="--force would delete the input") as err:
            export(checkpoint, out, ExportConfig(force=True))
        assert "Fix:" in str(err.value)
    assert _snapshot(checkpoint) == before


def test_force_refuses_a_folder_edgelvm_did_not_write(tiny_checkpoints, tmp_path):
    from edgelvm.export import ExportConfig, export
    from edgelvm.prune import PruneConfig, prune
    from edgelvm.quantize import RTNConfig, quantize

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes")
    model = tiny_checkpoints["llama-clip"]
    with pytest.raises(ExportError, match=r"--force replaces only a directory edgelvm wrote") as err:
        export(model, notes, ExportConfig(force=True))
    assert str(notes) in str(err.value) and "Fix:" in str(err.value)
    with pytest.raises(ConfigError, match=r"--force replaces only a directory edgelvm wrote"):
        prune(model, None, PruneConfig(out=notes, force=True))
    with pytest.raises(ConfigError, match=r"--force replaces only a directory edgelvm wrote"):
        quantize(model, None, RTNConfig(), out=notes, force=True)
    assert _snapshot(notes) == {"todo.txt": b"my notes"}


def test_force_replaces_edgelvm_outputs(tiny_bundles, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["llama-clip"], bundle)
    assert fsutil.prepare_output(bundle, force=True) == bundle.resolve()  # a bundle: its edgelvm.json
    out = tmp_path / "quantized"
    fsutil.write_dir_atomically(out, lambda d: (d / "model.safetensors").write_bytes(b"x"), stage="quantize")
    assert json.loads((out / fsutil.OUTPUT_MARKER).read_text())["stage"] == "quantize"
    fsutil.prepare_output(out, force=True)  # its marker
    with pytest.raises(ConfigError, match="not empty"):
        fsutil.prepare_output(out, force=False)
    fsutil.write_dir_atomically(out, lambda d: (d / "model.safetensors").write_bytes(b"y"), stage="quantize")
    assert (out / "model.safetensors").read_bytes() == b"y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "quantized"]  # no staging left behind


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_of_killed_runs_is_cleaned_and_said(tmp_path, caplog):
    out = tmp_path / "out"
    dead = _dead_pid()
    stale = tmp_path / f".out.partial-{dead}-abc"
    stale.mkdir()
    (stale / fsutil.PARTIAL_OWNER).write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    (stale / "vision.onnx").write_bytes(b"half")
    unknown = tmp_path / f".out.partial-{dead}-xyz"  # no owner note: not provably ours, kept
    unknown.mkdir()
    alive = tmp_path / f".out.partial-{os.getppid()}-def"  # a running process's: kept
    alive.mkdir()
    (alive / fsutil.PARTIAL_OWNER).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    other = tmp_path / f".other.partial-{dead}-abc"  # another output's: kept
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="edgelvm.fsutil"):
        fsutil.write_dir_atomically(out, lambda d: (d / "a.txt").write_text("new"))
    assert not stale.exists() and unknown.exists() and alive.exists() and other.exists()
    assert str(stale) in caplog.text and f"pid {dead}" in caplog.text


def test_output_moved_aside_by_a_killed_swap_is_restored(tmp_path, caplog):
    out = tmp_path / "out"
    fsutil.write_dir_atomically(out, lambda d: (d / "a.txt").write_text("old"))
    aside = tmp_path / f".out.old-{_dead_pid()}"
    out.rename(aside)  # killed between moving the old output aside and renaming the new one in
    with caplog.at_level(logging.WARNING, logger="edgelvm.fsutil"):
        assert fsutil.clean_stale_partials(out) == [aside]
    assert (out / "a.txt").read_text() == "old" and "restored" in caplog.text


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_output_permissions_follow_the_umask(tmp_path, mask):
    import numpy as np
    from safetensors.numpy import save_file

    from edgelvm.manifest import write_text_atomic

    def write(stage: Path) -> None:
        save_file({"w": np.zeros(2, dtype=np.float32)}, str(stage / "model.safetensors"))  # writes 0600
        (stage / "sub").mkdir()
        write_text_atomic(stage / "sub" / "report.json", "{}")  # mkstemp: 0600

    previous = os.umask(mask)
    try:
        fsutil.write_dir_atomically(tmp_path / "out", write, stage="quantize")
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o777 & ~mask
    for name in ("model.safetensors", "sub/report.json", fsutil.OUTPUT_MARKER):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~mask, name
