"""Registry of adapters keyed by ``config.model_type``, and checkpoint loading.

Adapters are registered by dotted path so that listing the supported families never imports torch.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from edgelvm.errors import ExportError, UnsupportedModelError

if TYPE_CHECKING:
    from edgelvm.models.base import VLMAdapter

#: model_type -> "module:Class". A new family is one adapter file plus one line here.
_ADAPTERS: dict[str, str] = {
    "blip-2": "edgelvm.models.blip2:Blip2Adapter",
    "instructblip": "edgelvm.models.instructblip:InstructBlipAdapter",
    "internvl": "edgelvm.models.internvl:InternVLAdapter",
    "idefics": "edgelvm.models.idefics:IdeficsAdapter",
    "idefics3": "edgelvm.models.idefics3:Idefics3Adapter",
    "llava": "edgelvm.models.llava:LlavaAdapter",
    "llava_next": "edgelvm.models.llava_next:LlavaNextAdapter",
    "paligemma": "edgelvm.models.paligemma:PaliGemmaAdapter",
    "llava_onevision": "edgelvm.models.llava_onevision:LlavaOnevisionAdapter",
    "smolvlm": "edgelvm.models.idefics3:Idefics3Adapter",
    "qwen2_5_vl": "edgelvm.models.qwen2_vl:Qwen25VLAdapter",
    "qwen2_vl": "edgelvm.models.qwen2_vl:Qwen2VLAdapter",
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_ADAPTERS))


def adapter_for_model_type(model_type: str, *, where: str | Path | None = None) -> type[VLMAdapter]:
    """The adapter class for ``model_type``; an unsupported type raises listing the supported ones."""
    target = _ADAPTERS.get(model_type)
    if target is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}",
            where=where,
            fix="use a checkpoint of a supported family (see `edgelvm export --help`), or add an adapter under "
            "edgelvm/models/",
        )
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def read_model_type(model_dir: str | Path) -> str:
    """``model_type`` from ``config.json`` without importing transformers (so errors are fast and clear)."""
    path = Path(model_dir)
    if not path.exists():
        raise ExportError(
            "model directory does not exist",
            where=path,
            fix="pass a local Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer and processor "
            "files); download hub models first with `huggingface-cli download`",
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ExportError(
            "config.json is missing: not a Hugging Face checkpoint directory",
            where=path,
            fix="point at the directory written by `save_pretrained` (it holds config.json)",
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ExportError(f"config.json is not valid JSON ({err})", where=config_path, fix="restore the file") from None
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ExportError(
            "field 'model_type' is missing", where=config_path, fix="this must be a transformers config.json"
        )
    return model_type


def load_model(model: str | Path, **kwargs) -> VLMAdapter:
    """Load a checkpoint (local directory, or a hub id when online) and wrap it in its family's adapter.

    A local path is checked first so that a typo gives a clear error instead of a hub lookup.
    """
    path = Path(model)
    if path.exists() or str(model).startswith((".", "/", "~")):
        model_type = read_model_type(path)
        source = str(path)
    else:  # a hub id: let transformers resolve it (needs network or a populated HF cache)
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(str(model)).model_type
        source = str(model)
    adapter_cls = adapter_for_model_type(model_type, where=source)
    return adapter_cls.from_pretrained(source, **kwargs)
