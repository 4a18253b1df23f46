"""The runtime must never import torch or transformers; checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_runtime_generates_without_importing_torch(tiny_bundles):
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from edgelvm.runtime import VLM
        vlm = VLM.load({str(tiny_bundles["llama-clip"])!r})
        frame = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        text = vlm.generate(frame, "What is on the table?", max_new_tokens=8)
        assert vlm.last_stats.new_tokens >= 1
        heavy = sorted(m for m in ("torch", "transformers", "onnx", "accelerate") if m in sys.modules)
        print("HEAVY=" + ",".join(heavy))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY=\n" in result.stdout or result.stdout.strip().endswith("HEAVY=")


def test_cli_help_and_generate_do_not_import_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from edgelvm.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('HEAVY=' + ','.join(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("HEAVY=")


def test_eval_of_a_bundle_does_not_import_torch(tiny_bundles, tmp_path):
    from edgelvm.data import write_split

    data = write_split(tmp_path / "data", seed=3, n=4)
    code = (
        "import sys\n"
        "from edgelvm.eval import EvalConfig, evaluate\n"
        f"report = evaluate({str(tiny_bundles['llama-clip'])!r}, {str(data)!r}, EvalConfig(max_new_tokens=4))\n"
        "assert report.metrics['n'] == 4\n"
        "print('HEAVY=' + ','.join(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("HEAVY=")
