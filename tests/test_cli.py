"""The CLI is a thin shell: export → inspect → generate, errors as short messages with exit code 2."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from edgelvm.cli import app

runner = CliRunner(env={"COLUMNS": "240"})


def test_version():
    from edgelvm import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_export_inspect_generate(tiny_checkpoints, tmp_path, test_images):
    bundle = tmp_path / "bundle"
    result = runner.invoke(
        app, ["export", str(tiny_checkpoints["llama-clip"]), "-o", str(bundle), "--max-length", "128"]
    )
    assert result.exit_code == 0, result.output
    assert (bundle / "edgelvm.json").is_file()

    result = runner.invoke(app, ["inspect", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "decoder.onnx" in result.output and "max length 128" in result.output

    result = runner.invoke(app, ["inspect", str(bundle), "--json"])
    assert '"format_version": "1.0"' in result.output

    image = tmp_path / "frame.png"
    test_images[0].save(image)
    result = runner.invoke(
        app, ["generate", str(bundle), "-i", str(image), "-p", "What is on the table?", "--max-new-tokens", "12"]
    )
    assert result.exit_code == 0, result.output

    from edgelvm.runtime import VLM

    expected = VLM.load(bundle).generate(image, "What is on the table?", max_new_tokens=12)
    assert result.stdout.rstrip("\n") == expected


def test_errors_are_short_messages_with_exit_code_2(tmp_path):
    """Run the real entry point: the message names the file and the fix, and there is no traceback."""
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "edgelvm.cli", "generate", str(tmp_path / "empty"), "-p", "hi"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "edgelvm.json is missing" in result.stderr and "Fix:" in result.stderr
    assert "Traceback" not in result.stderr


def test_quantize_then_export(tiny_checkpoints, tmp_path):
    """`edgelvm quantize` (INT4 RTN, no calibration) → `edgelvm export` writes the INT4 decoders; a method that needs
    calibration data without it is a short error from the real entry point."""
    out = tmp_path / "q"
    model = str(tiny_checkpoints["llama-clip"])
    result = runner.invoke(
        app, ["quantize", model, "-o", str(out), "--llm", "rtn", "--vision", "none", "--group-size", "32"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "int4.safetensors").is_file() and (out / "quant_report.json").is_file()
    result = runner.invoke(app, ["export", str(out), "-o", str(tmp_path / "bundle"), "--max-length", "64"])
    assert result.exit_code == 0, result.output
    manifest = (tmp_path / "bundle" / "edgelvm.json").read_text()
    assert '"precision": "int4"' in manifest

    failed = subprocess.run(
        [sys.executable, "-m", "edgelvm.cli", "quantize", model, "-o", str(tmp_path / "x"), "--llm", "awq"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 2
    assert "need calibration data" in failed.stderr and "Fix:" in failed.stderr and "Traceback" not in failed.stderr
