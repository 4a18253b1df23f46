"""`edgelvm plan` reads config.json as plain data (no transformers import); its answers must equal those from
transformers' own config classes, on hub-style sparse and flat layouts as well as on what `save_pretrained` writes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgelvm.errors import EdgeLVMError
from edgelvm.models.config_json import PlainConfig, snapshot_defaults, stored_snapshot
from edgelvm.models.registry import adapter_for_model_type, load_config
from edgelvm.plan import footprint_of_adapter, plan_config
from tests.fixtures.hub_configs import write_hub_configs


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory) -> dict[str, Path]:
    from tests.test_plan import write_real_shapes

    root = tmp_path_factory.mktemp("plan-configs")
    return {**write_real_shapes(root / "saved"), **write_hub_configs(root / "hub")}


def footprint(config, source: str) -> dict:
    adapter = adapter_for_model_type(config.model_type).for_config(config, source)
    fields = dataclasses.asdict(footprint_of_adapter(adapter, from_config=True))
    return {k: v for k, v in fields.items() if k != "source"}


def test_plain_reading_equals_transformers_config_classes(config_dirs):
    for name, path in config_dirs.items():
        plain, source = plan_config(path)
        assert isinstance(plain, PlainConfig), name  # the fast path served it
        transformers_config, _ = load_config(path)
        assert footprint(plain, source) == footprint(transformers_config, source), name


def test_defaults_snapshot_matches_the_installed_transformers():
    """A transformers upgrade that changes a default fails here: rerun scripts/config_defaults.py."""
    current = snapshot_defaults()
    stored = stored_snapshot()
    assert stored["model_types"] == current["model_types"]
    assert stored["classes"] == json.loads(json.dumps(current["classes"])), (
        "edgelvm/models/config_defaults.json is stale: run `python scripts/config_defaults.py`"
    )


def test_plan_process_imports_neither_transformers_nor_torch(config_dirs):
    code = (
        "import sys\nfrom edgelvm.cli import app\n"
        f"sys.argv = ['edgelvm', 'plan', {str(config_dirs['qwen2-vl-2b-flat'])!r}, '--json']\n"
        "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["family"] == "qwen2_vl"
    assert result.stderr.strip().splitlines()[-1] == "[]"


def test_a_number_field_holding_text_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llava", "text_config": {"model_type": "llama", "num_hidden_layers": "32"}})
    )
    with pytest.raises(EdgeLVMError) as err:
        plan_config(tmp_path)
    assert "text_config.num_hidden_layers" in str(err.value) and "config.json" in str(err.value.where)


def test_a_text_model_outside_the_snapshot_falls_back_to_transformers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {"model_type": "phi3"}}))
    config, _ = plan_config(tmp_path)
    assert not isinstance(config, PlainConfig) and config.text_config.model_type == "phi3"
