"""Typed quantization method configs and the handler table: unknown methods and misplaced knobs are errors, and a
registered handler is what the verb runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from edgelvm.cli import app
from edgelvm.errors import ConfigError
from edgelvm.quantize import handlers
from edgelvm.quantize.methods import (
    AWQConfig,
    GPTQConfig,
    Int8VisionConfig,
    MethodConfig,
    ObserverSweep,
    RTNConfig,
    method_config,
)

runner = CliRunner(env={"COLUMNS": "240"})


def test_method_config_builds_the_named_method_with_its_own_knobs():
    assert method_config("llm", "gptq", group_size=64, damp=0.05) == GPTQConfig(group_size=64, damp=0.05)
    assert method_config("vision", "int8", observer="entropy") == Int8VisionConfig(observer="entropy")
    assert method_config("llm", "none") is None
    assert Int8VisionConfig(observer="auto").observer == ObserverSweep()  # "auto" is the sweep over every observer


def test_an_unknown_method_is_an_error():
    with pytest.raises(ConfigError, match="unknown llm method 'fp3'"):
        method_config("llm", "fp3")

    @dataclass(frozen=True)
    class Fp3Config(MethodConfig):
        name: ClassVar[str] = "fp3"

    from edgelvm.quantize import quantize_model

    with pytest.raises(ConfigError, match="no quantization method is registered for Fp3Config"):
        quantize_model(None, Fp3Config())  # refused before the model is touched
    with pytest.raises(ConfigError, match="not a quantization method config"):
        quantize_model(None, ["awq"])
    with pytest.raises(ConfigError, match="two methods for the llm part"):
        quantize_model(None, [RTNConfig(), AWQConfig()])


def test_a_bad_method_list_fails_before_the_output_is_touched(tmp_path):
    from edgelvm.quantize import quantize

    with pytest.raises(ConfigError, match="nothing to quantize"):
        quantize("no-such-model", None, [], out=tmp_path / "q")
    result = runner.invoke(app, ["quantize", "m", "-o", str(tmp_path / "q"), "--llm", "none", "--vision", "none"])
    assert "nothing to quantize" in str(result.exception)
    assert not (tmp_path / "q").exists()


def test_a_knob_of_another_method_is_an_error_not_ignored():
    with pytest.raises(ConfigError, match="not a knob of --llm rtn") as err:
        method_config("llm", "rtn", where={"damp": "--gptq-damp"}, damp=0.05)
    assert "gptq" in err.value.fix  # names the method that takes it
    with pytest.raises(ConfigError, match="not a knob of --llm none"):
        method_config("llm", "none", group_size=64)
    with pytest.raises(TypeError):
        AWQConfig(damp=0.05)  # the typed configs themselves have no such field


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--llm", "rtn", "--gptq-damp", "0.05"], "--gptq-damp"),
        (["--llm", "gptq", "--no-awq-clip"], "--awq-clip"),
        (["--llm", "smoothquant", "--group-size", "64"], "--group-size"),
        (["--llm", "rtn", "--vision", "none", "--calibrator", "entropy"], "--calibrator"),
    ],
)
def test_the_cli_refuses_an_option_the_chosen_method_does_not_use(tmp_path, args, flag):
    result = runner.invoke(app, ["quantize", "no-such-model", "-o", str(tmp_path / "q"), *args])
    assert result.exit_code != 0
    assert flag in str(result.exception) + result.output
    assert not (tmp_path / "q").exists()


def test_a_registered_handler_is_what_the_verb_runs(tiny_checkpoints, monkeypatch):
    """A new method is a config class plus register_handler: the verb calls it and records what it returns."""
    from edgelvm.models import load_model
    from edgelvm.models.checkpoint.quantized import RECORD, text_linears
    from edgelvm.quantize import quantize_model

    @dataclass(frozen=True)
    class CountConfig(MethodConfig):
        name: ClassVar[str] = "count"
        needs_calibration: ClassVar[bool] = False
        tag: str = "x"

    class CountHandler(handlers.Handler):
        sidecar = "count.safetensors"

        def __init__(self) -> None:
            self.seen: list[str] = []

        def layers(self, adapter: Any) -> dict[str, Any]:
            return text_linears(adapter)

        def apply(self, adapter, cfg, layers, stats, report, state) -> dict:
            self.seen += list(layers)
            return {}

        def record(self, cfg: Any, report: Any) -> dict[str, Any]:
            return {"method": cfg.name, "tag": cfg.tag}

        def tensors(self, quantized: dict[str, Any]) -> dict:
            return {}

    monkeypatch.setattr(handlers, "HANDLERS", dict(handlers.HANDLERS))  # the table as the test leaves it
    handler = CountHandler()
    handlers.register_handler(CountConfig, handler)
    adapter = load_model(str(tiny_checkpoints["llama-clip"]))
    result = quantize_model(adapter, CountConfig(tag="y"))
    assert handler.seen == list(text_linears(adapter)) and handler.seen
    assert getattr(adapter.config, RECORD) == {"llm": {"method": "count", "tag": "y"}}
    assert result.report.method == "count" and result.sidecars == {"count.safetensors": {}}
