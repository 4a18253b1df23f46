"""`edgelvm distill`'s options are generated from DistillConfig / TeacherAPIConfig fields (edgelvm.cli_options)."""

from __future__ import annotations

import re
from dataclasses import fields

from typer.testing import CliRunner

from edgelvm.cli import app
from edgelvm.distill.config import DistillConfig, TeacherAPIConfig

runner = CliRunner(env={"COLUMNS": "240"})


def _help() -> str:
    result = runner.invoke(app, ["distill", "--help"])
    assert result.exit_code == 0, result.output
    return re.sub(r"\x1b\[[0-9;]*m", "", result.output)


def test_every_documented_field_is_an_option_with_its_help():
    text = _help()
    for cls, prefix in ((DistillConfig, ""), (TeacherAPIConfig, "teacher_")):
        for f in fields(cls):
            if "help" in f.metadata:
                name = f.metadata.get("param", prefix + f.name)
                assert "--" + name.replace("_", "-") in text, name
    assert "Softmax temperature of the divergence." in text and "API teacher" in text
    assert "--progress" not in text and "--teacher-api-key-env" not in text  # cli=False fields stay hidden


def test_options_reach_the_config(monkeypatch, tmp_path):
    import edgelvm.distill

    seen = {}

    class Report:
        student_params, teacher_params, finished, steps, samples, wall_seconds = 1, 2, False, 0, 0, 0.0
        teacher_api, evals = None, []

    def fake_distill(teacher, student, data, config):
        seen["config"] = config
        return Report()

    monkeypatch.setattr(edgelvm.distill, "distill", fake_distill)
    args = ["distill", "t", "-d", str(tmp_path), "-o", str(tmp_path / "o"), "--steps", "7", "--weight-decay", "0.1"]
    result = runner.invoke(app, [*args, "--teacher-generate", "--top-k", "5"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.steps, config.weight_decay, config.teacher_generate, config.top_k) == (7, 0.1, True, 5)
    assert (config.kd_weight, config.ce_weight, config.teacher_api) == (1.0, 0.0, None)  # the library defaults
    assert config.out == tmp_path / "o"

    result = runner.invoke(app, [*args, "--teacher-api", "http://127.0.0.1:9/v1", "--teacher-model", "m",
                                 "--teacher-rate", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    api = seen["config"].teacher_api
    assert (api.url, api.model, api.requests_per_second) == ("http://127.0.0.1:9/v1", "m", None)
    assert (seen["config"].kd_weight, seen["config"].ce_weight) == (0.0, 1.0)  # the API teacher's defaults
