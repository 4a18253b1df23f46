"""The CLI is a thin shell: export → inspect → generate, errors as short messages with exit code 2."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from edgelvm.cli import app
from edgelvm.manifest import FORMAT_VERSION

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
    assert f'"format_version": "{FORMAT_VERSION}"' in result.output

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


def test_prune_takes_calib_shapes_as_quantize_does(tiny_checkpoints, tmp_path):
    """`--calib shapes` means the shipped task's validation records to both stages (one resolver)."""
    import json

    model = str(tiny_checkpoints["llama-clip"])
    out = tmp_path / "p"
    result = runner.invoke(app, ["prune", model, "-o", str(out), "--calib", "shapes", "--calib-limit", "4",
                                 "--text-mlp", "0.25"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "prune_report.json").read_text())
    assert report["importance"] == "activation" and report["calibration"]["records"] == 4


def test_help_names_every_gqa_mode_and_clean_bool_flags():
    import re

    def help_text(command: str) -> str:
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output
        return re.sub(r"\x1b\[[0-9;]*m", "", result.output)  # no terminal colours

    prune_help = help_text("prune")
    assert all(mode in prune_help for mode in ("per_group", "kv_groups", "expand"))
    quantize_help = help_text("quantize")
    assert "--no-no-" not in quantize_help
    for flag in ("--awq-clip", "--no-awq-clip", "--act-order", "--no-act-order"):
        assert flag in quantize_help, flag


def test_quantize_bool_flags_reach_the_config(monkeypatch, tmp_path):
    """`--no-awq-clip` / `--no-act-order` turn their method's option off; without them they are on."""
    import edgelvm.quantize

    seen = []

    class Report:
        def summary(self) -> str:
            return ""

    def fake_quantize(model, calib, methods, **_options):
        seen.append(methods)
        return Report()

    monkeypatch.setattr(edgelvm.quantize, "quantize", fake_quantize)
    cases = (([], "clip", True), (["--no-awq-clip"], "clip", False), (["--llm", "gptq"], "act_order", True),
             (["--llm", "gptq", "--no-act-order"], "act_order", False))  # fmt: skip
    for flags, knob, expected in cases:
        result = runner.invoke(app, ["quantize", "m", "-o", str(tmp_path / "q"), *flags])
        assert result.exit_code == 0, result.output
        assert getattr(seen[-1][0], knob) == expected, flags


def test_quantize_layerwise_in_half_precision_from_the_cli(tiny_checkpoints, calib_records, tmp_path):
    """`--layerwise --dtype fp16`: one calibration pass, the checkpoint saved in fp16; a bad --dtype names the fix."""
    import json

    from safetensors import safe_open

    model = str(tiny_checkpoints["llama-clip"])
    calib = calib_records[0].image_path.parents[1]  # the records' dataset directory
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", model, "-o", str(out), "--calib", str(calib), "--llm", "gptq",
                                 "--calib-limit", "8", "--vision", "none", "--group-size", "32", "--layerwise",
                                 "--dtype", "fp16"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "quant_report.json").read_text())["calibration_passes"] == 1
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys() if "layers" in k} == {"torch.float16"}  # noqa: SIM118
    bad = runner.invoke(app, ["quantize", model, "-o", str(tmp_path / "x"), "--llm", "rtn", "--dtype", "int8"])
    assert bad.exit_code != 0 and "use fp32, fp16 or bf16" in str(bad.exception)  # the entry point prints it
